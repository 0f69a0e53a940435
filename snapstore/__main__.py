"""``python -m snapstore``: the same as the ``snapstore`` command."""

from __future__ import annotations

import sys

from snapstore._start import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
