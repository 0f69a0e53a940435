"""A test task for CRIU: known memory, a counter, an output file it appends to.

Run as a script (never imported by the tests): ``python memtask.py --state DIR [--mib N]
[--seed S] [--out FILE] [--interval SECONDS] [--exit-at N --exit-code C]``.

- Fills N MiB with a pattern derived from the seed (block i is the BLAKE3 XOF of (seed, i)), so
  any page restored wrongly, or not at all, is detected.
- Every interval it increments a counter and, with --out, appends ``"<counter>\\n"`` to FILE
  (flushed to the kernel at once), so the file must always read 1, 2, 3, ... with no gap and no
  repeat: a restore that resumes at the wrong file offset shows.
- Writes ``DIR/ready`` (its pid) once the memory is filled.
- On SIGUSR1 it verifies the whole pattern and writes ``DIR/verify.json`` atomically:
  ``{"ok": bool, "counter": int, "pid": int, "bad_blocks": [...]}``.
- With --exit-at N it exits with --exit-code once the counter reaches N.
- On SIGUSR2 it rewrites every tenth MiB block (10 % of its memory, blocks i % 10 == 3) with
  the pattern of seed + 1 and writes ``DIR/changed``; later verifications expect that.

Caveat: the pattern check runs inside a signal handler in the main thread; the counter does not
advance while it runs (about 0.3 s per 256 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import blake3

_MIB = 1 << 20


def _block(seed: int, i: int) -> bytes:
    return blake3.blake3(f"{seed}:{i}".encode()).digest(length=_MIB)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--exit-at", type=int, default=0)
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()

    memory = bytearray(args.mib * _MIB)
    for i in range(args.mib):
        memory[i * _MIB : (i + 1) * _MIB] = _block(args.seed, i)
    counter = 0
    changed = False

    def expected(i: int) -> bytes:
        return _block(args.seed + 1 if changed and i % 10 == 3 else args.seed, i)

    def change(_signo: int, _frame: FrameType | None) -> None:
        nonlocal changed
        changed = True
        for i in range(3, args.mib, 10):
            memory[i * _MIB : (i + 1) * _MIB] = expected(i)
        tmp = args.state / ".changed.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.rename(args.state / "changed")

    def verify(_signo: int, _frame: FrameType | None) -> None:
        view = memoryview(memory)
        bad = [
            i
            for i in range(args.mib)
            if view[i * _MIB : (i + 1) * _MIB].tobytes() != expected(i)
        ]
        result = {"ok": not bad, "counter": counter, "pid": os.getpid(), "bad_blocks": bad[:20]}
        tmp = args.state / f".verify.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(result))
        tmp.rename(args.state / "verify.json")

    signal.signal(signal.SIGUSR1, verify)
    signal.signal(signal.SIGUSR2, change)
    out = open(args.out, "a", buffering=1) if args.out else None
    tmp = args.state / ".ready.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(args.state / "ready")
    while True:
        counter += 1
        if out is not None:
            out.write(f"{counter}\n")
            out.flush()
        if args.exit_at and counter >= args.exit_at:
            return int(args.exit_code)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
