"""A test task for CRIU: known memory, a counter, an output file it appends to.

Run as a script (never imported by the tests): ``python memtask.py --state DIR [--mib N]
[--seed S] [--content random|fastq] [--out FILE] [--interval SECONDS] [--exit-at N
--exit-code C]``.

- Fills N MiB with a pattern derived from the seed, so any page restored wrongly, or not at
  all, is detected. ``--content random`` (the default): block i is the BLAKE3 XOF of (seed, i),
  incompressible. ``--content fastq``: block i is 4096 sequencing reads of 256 bytes in FASTQ
  (``@SRR...`` header with the read's number, 100 bases of ACGT, ``+``, 100 binned qualities),
  bases and qualities drawn from the BLAKE3 XOF of (seed, i): every page distinct (each holds
  16 read numbers no other page has), about 3x with zstd (2.9-3.0x at level 1 in 128 KiB
  chunks), like a bioinformatics task's read buffers. Needs numpy (the ``bench`` extra);
  fills in place on up to 4 threads, about 250 MiB/s per core.
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
import concurrent.futures
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import blake3

_MIB = 1 << 20


def _random_block(seed: int, i: int) -> bytes:
    return blake3.blake3(f"{seed}:{i}".encode()).digest(length=_MIB)


class _Fastq:
    """Blocks of FASTQ reads (see the module docstring); numpy is imported on first use."""

    REC = 256  # bytes per read: header 52 (with its newline), 100 bases, "\n+\n", 100 quals, "\n"
    SEQ = 100
    HEAD = REC - 2 * SEQ - 4
    PER_BLOCK = _MIB // REC
    # NovaSeq-like binned qualities, weighted: what makes the whole about 3x with zstd
    QUALS = (("F", 72), (":", 10), (",", 4), ("#", 2), ("E", 5), ("A", 3), ("<", 2), ("7", 1))
    QUALS += (("-", 1),)

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        head = b"@SRR8512345.00000000000 1100:00000:00000 length=100"
        assert len(head) == self.HEAD - 1
        t = np.full(self.REC, ord("\n"), np.uint8)
        t[: self.HEAD - 1] = np.frombuffer(head, np.uint8)
        plus = self.HEAD + self.SEQ
        t[plus : plus + 3] = np.frombuffer(b"\n+\n", np.uint8)
        self.template = t
        self.bases = b"ACGT" * 64  # bytes.translate tables: random byte -> character
        total = sum(w for _, w in self.QUALS)
        quals = bytearray()
        acc = 0
        for char, weight in self.QUALS:
            quals += char.encode() * (
                round(256 * (acc + weight) / total) - round(256 * acc / total)
            )
            acc += weight
        assert len(quals) == 256
        self.quals = bytes(quals)
        self.digits = bytes(48 + (b * 10 >> 8) for b in range(256))
        index = np.arange(self.PER_BLOCK)[:, None] // 10 ** np.arange(3, -1, -1) % 10 + 48
        self.index_digits = index.astype(np.uint8)
        self.scratch = np.empty((self.PER_BLOCK, self.REC), np.uint8)

    def fill(self, recs: Any, seed: int, i: int) -> None:
        """Write block i into ``recs``, a (4096, 256) uint8 array (a view of the task's memory)."""
        np = self.np
        n, seq, head = self.PER_BLOCK, self.SEQ, self.HEAD
        # random bytes: the BLAKE3 XOF of (seed, i), several times faster than numpy's PCG64
        raw = blake3.blake3(f"fastq:{seed}:{i}".encode()).digest(length=n * (12 + 2 * seq))
        recs[:] = self.template
        # the read's number, unique in the whole memory (no page repeats another): the
        # block's number in 7 digits, then the read's index in the block in 4
        recs[:, 12:19] = np.frombuffer(f"{i:07d}".encode(), np.uint8)
        recs[:, 19:23] = self.index_digits
        # tile (last two digits) and x:y position: random digits
        digits = np.frombuffer(raw[: n * 12].translate(self.digits), np.uint8).reshape(n, 12)
        recs[:, 26:28] = digits[:, 0:2]
        recs[:, 29:34] = digits[:, 2:7]
        recs[:, 35:40] = digits[:, 7:12]
        at = n * 12
        bases = raw[at : at + n * seq].translate(self.bases)
        recs[:, head : head + seq] = np.frombuffer(bases, np.uint8).reshape(n, seq)
        q = head + seq + 3
        quals = raw[at + n * seq :].translate(self.quals)
        recs[:, q : q + seq] = np.frombuffer(quals, np.uint8).reshape(n, seq)

    def block(self, seed: int, i: int) -> bytes:
        self.fill(self.scratch, seed, i)
        return bytes(self.scratch.tobytes())

    def blocks_of(self, memory: bytearray) -> Any:
        """``memory`` as an array of blocks: ``[i]`` is block i's (4096, 256) view."""
        return self.np.frombuffer(memory, self.np.uint8).reshape(-1, self.PER_BLOCK, self.REC)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--content", choices=("random", "fastq"), default="random")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--exit-at", type=int, default=0)
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()
    fastq: _Fastq | None = None
    if args.content == "fastq":
        try:
            fastq = _Fastq()
        except ImportError:
            print("memtask: --content fastq needs numpy (pip install numpy)", file=sys.stderr)
            return 2
        _block = fastq.block
    else:
        _block = _random_block

    memory = bytearray(args.mib * _MIB)
    if fastq is not None:  # in place (no block-sized copies), on every core (1.5x on 2)
        blocks = fastq.blocks_of(memory)
        with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            for _ in pool.map(lambda i: fastq.fill(blocks[i], args.seed, i), range(args.mib)):
                pass
        del blocks  # the array's export of the buffer
    else:
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
            i for i in range(args.mib) if view[i * _MIB : (i + 1) * _MIB].tobytes() != expected(i)
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
