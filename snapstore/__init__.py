"""snapstore: checkpoint a running task into a fusionfs mount with CRIU, and restore it lazily.

The command line is ``snapstore`` (``snapstore.cli:main``, or ``python -m snapstore``); the
layers are cli -> dump / restore flows -> catalog (manifests) + criu (process runner). It uses
only fusionfs's public API (``fusionfs.client``) and the mounted path. See docs/snapstore.md.
"""

from __future__ import annotations

__all__: list[str] = []
