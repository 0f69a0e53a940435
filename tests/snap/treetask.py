"""A deterministic producer for process-tree tests: ``sh -c 'treetask.py ... | gzip > out.gz'``.

Shaped like ``minimap2 ref.fa reads.fq | gzip``: it writes SAM-like text lines to stdout at a
steady pace, each carrying its number, a hash-derived sequence, and the process's own view of
itself: ``getpid()``, ``getppid()``, and whether ``/proc/self`` is the process itself (its
``NSpid`` ends with ``getpid()``). In a PID namespace of its own (``snapstore run``) these are the
same on every machine, so the whole output is the same bytes whether the run was checkpointed
and resumed elsewhere or not.

``--progress FILE``: every 100 lines, FILE (opened and closed each time, never kept open) gets
the number of lines written so far and the host PID (``NSpid``'s first field), so a test knows
how far it is.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time


def _nspids() -> list[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(p) for p in line.split()[1:]]
    return []


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.001, help="seconds between lines")
    p.add_argument("--progress", required=True)
    args = p.parse_args()
    out = sys.stdout
    for i in range(1, args.lines + 1):
        ids = _nspids()
        self_ok = bool(ids) and ids[-1] == os.getpid()
        seq = hashlib.sha256(str(i).encode()).hexdigest() * 2
        out.write(
            f"read{i}\t0\tchr1\t{i * 7}\t60\t128M\t*\t0\t0\t{seq}\t*\t"
            f"pid:{os.getpid()}\tppid:{os.getppid()}\tself:{int(self_ok)}\n"
        )
        if i % 100 == 0:
            out.flush()
            tmp = args.progress + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{i} {ids[0] if ids else 0}\n")
            os.replace(tmp, args.progress)
        time.sleep(args.interval)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
