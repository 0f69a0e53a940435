"""Staging-file writes: O_DIRECT for the block-aligned part, the page cache for the rest."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from fusionfs import staging, writer


def _batch(rng: random.Random, pieces: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    return [(off, rng.randbytes(n)) for off, n in pieces]


def _expected(size: int, batch: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(size)
    for off, data in batch:
        out[off : off + len(data)] = data
    return bytes(out)


@pytest.mark.parametrize(
    "pieces",
    [
        [(0, 1 << 20), (1 << 20, 1 << 20)],  # aligned 1 MiB writes, as the kernel sends them
        [(0, 1 << 20), (1 << 20, 5000)],  # a file whose end is not block-aligned
        [(100, 9000), (9100, 3000)],  # an unaligned start: all through the page cache
        [(0, 4096 * 3 + 7), (4096 * 3 + 7 + 10, 100)],  # a gap: two stretches
        [(0, 9 << 20)],  # larger than the aligned buffer
        [(i * 4096, 4096) for i in range(600)],  # more than 512 pieces in one stretch
    ],
)
def test_write_batch_with_and_without_o_direct_stores_the_same_bytes(
    tmp_path: Path, pieces: list[tuple[int, int]]
) -> None:
    rng = random.Random(len(pieces))
    batch = _batch(rng, pieces)
    size = max(off + len(d) for off, d in batch)
    results = []
    for direct in (True, False):
        fd, dfd = staging.open_staging(tmp_path / f"f{direct}")
        if not direct and dfd >= 0:
            os.close(dfd)
            dfd = -1
        try:
            assert staging.write_batch(fd, batch, dfd)
            results.append(os.pread(fd, size + 10, 0))
        finally:
            os.close(fd)
            if dfd >= 0:
                os.close(dfd)
    assert results[0] == results[1] == _expected(size, batch)


def test_o_direct_reads_see_every_write_including_unaligned_cached_ones(tmp_path: Path) -> None:
    """Reads back from staging go through the O_DIRECT fd at aligned offsets; the bytes that
    took the page cache (an unaligned start, a ragged end, a rewrite through the buffered fd,
    still dirty) must be in what they return, and a read past the end is short, not padded."""
    rng = random.Random(7)
    batch = _batch(rng, [(0, 3 << 20), ((3 << 20) + 100, 9000), ((3 << 20) + 9100, 5001)])
    size = max(off + len(d) for off, d in batch)
    want = bytearray(_expected(size, batch))
    fd, dfd = staging.open_staging(tmp_path / "f")
    assert dfd >= 0  # the test machines' filesystem has O_DIRECT
    try:
        assert staging.write_batch(fd, batch, dfd)
        patch = rng.randbytes(777)
        os.pwrite(fd, patch, 5000)  # dirty in the page cache over O_DIRECT-written blocks
        want[5000 : 5000 + len(patch)] = patch
        for off, length in ((0, size), (4096, 1 << 20), (3 << 20, 20000), (8192, 1), (0, 100)):
            got = staging.pread_direct(dfd, length, off)
            assert got == bytes(want[off : off + length]), (off, length)
        assert staging.pread_direct(dfd, 1 << 20, 3 << 20) == bytes(want[3 << 20 :])
        # nothing to read (an empty file's commit), in a thread with no buffer yet: b"", no mmap
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(staging.pread_direct, dfd, 0, 0).result() == b""
    finally:
        os.close(fd)
        os.close(dfd)


def test_a_refused_o_direct_write_falls_back_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, dfd = staging.open_staging(tmp_path / "f")
    assert dfd >= 0  # the test machines' filesystem has O_DIRECT
    real = os.pwrite

    def refuse(f: int, data: Any, off: int) -> int:
        if f == dfd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(f, data, off)

    monkeypatch.setattr(os, "pwrite", refuse)
    batch = _batch(random.Random(1), [(0, 1 << 20), (1 << 20, 4096)])
    try:
        assert not staging.write_batch(fd, batch, dfd)  # tells the caller to stop using dfd
        assert os.pread(fd, 3 << 20, 0) == _expected((1 << 20) + 4096, batch)
    finally:
        os.close(fd)
        os.close(dfd)


@pytest.mark.parametrize("seed", range(20))
def test_recent_writes_answer_only_with_the_newest_bytes(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory run of newest writes (what parts and the chunk feed read back) never
    answers with bytes a later write replaced, whatever the order of writes."""
    monkeypatch.setattr(writer, "_RECENT_MAX", 64 << 10)
    rng = random.Random(seed)
    model = bytearray()
    recent = writer._Recent()
    answered = 0
    front = 0
    for _ in range(300):
        kind = rng.random()
        if kind < 0.7:  # append at the front, as a sequential writer does
            off = front
        elif kind < 0.85:  # rewrite somewhere before the front (kernel writeback re-sends)
            off = rng.randrange(0, max(1, front))
        else:  # leave a gap
            off = front + rng.randrange(1, 10000)
        data = rng.randbytes(rng.randrange(1, 20000))
        end = off + len(data)
        if end > len(model):
            model.extend(bytes(end - len(model)))
        model[off:end] = data
        recent.wrote(off, data)
        front = max(front, end)
        if rng.random() < 0.02:
            recent.clear()  # a truncate
        for _ in range(3):
            a = rng.randrange(max(0, front - 80000), front)  # mostly near the front
            n = rng.randrange(1, 30000)
            got = recent.get(a, n)
            if got is not None:
                answered += 1
                assert got == bytes(model[a : a + n])
    assert answered > 50  # it does answer, not only refuse
