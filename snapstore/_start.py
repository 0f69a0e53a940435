"""The ``snapstore`` command and ``python -m snapstore``: ``snapstore.cli.main``, started and
ended for the restore's sake, whose user waits from the command's start to the task running.

- ``restore`` and ``run`` first start ``_warm``: threads that walk the restore's path on the
  mount (listings, lookups, the chunked files' quick checks) while the rest is imported.
- CRIU's version check (``criu.prefetch``: a process start, 20-30 ms) starts before the rest of
  the program is imported (40-60 ms from a cold page cache, as on a new machine), so that it is
  done before a restore needs its answer. For ``dump`` and ``run`` as well.
- ``restore`` leaves with ``os._exit`` once its output is flushed: the interpreter's teardown
  (the modules, the idle worker threads of its checks) took 12 ms more, and a restore leaves
  no file open for writing nor any exit handler with work to do.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]

_USES_CRIU = ("restore", "dump", "run")


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in ("restore", "run"):
        from snapstore import _warm

        _warm.start(sys.argv[2:])
        import json  # noqa: F401  (the warm-up's checks parse with it; nothing imports in them)

        _warm.imported.set()
    if command in _USES_CRIU:
        from snapstore import criu

        criu.prefetch()
    from snapstore.cli import main as cli_main

    code = cli_main()
    if command == "restore":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
