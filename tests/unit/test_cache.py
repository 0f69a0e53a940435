"""Tests for fusionfs.cache.ChunkCache: bound, LRU order, persistence, crash leftovers, full disk,
free-space minimum, file modes, concurrency, and a model-based Hypothesis test."""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import fcntl
import logging
import os
import pathlib
import random
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import missing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fusionfs.cache import ChunkCache
from fusionfs.stats import Stats
from fusionfs.store.base import ETag, Key

HDR = 4096  # header block per chunk file
CS = 4096  # chunk size used by most tests


def payload(key: str, etag: str, index: int, n: int) -> bytes:
    """Deterministic chunk content, different for every (key, etag, index)."""
    seed = f"{key}|{etag}|{index}|".encode("utf-8", "surrogatepass")
    return (seed * (n // len(seed) + 1))[:n]


def chunk_files(root: pathlib.Path) -> dict[str, int]:
    """Name -> size of every chunk file on disk."""
    out = {}
    with os.scandir(root / "chunks") as subs:
        for sub in subs:
            with os.scandir(sub.path) as it:
                out.update({de.name: de.stat().st_size for de in it if de.is_file()})
    return out


def temp_files(root: pathlib.Path) -> list[str]:
    """Temp files (writes in progress or cut short) anywhere in the cache: tmp/ and beside the
    chunks."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


@contextlib.contextmanager
def opened(root: pathlib.Path, *, crashed: bool = False, **kw: Any) -> Iterator[ChunkCache]:
    """An open cache; ``crashed``: end it as a killed daemon would (no clean-shutdown marker)."""
    kw.setdefault("max_bytes", 1 << 30)
    kw.setdefault("min_free_bytes", 0)
    cache = ChunkCache(root, **kw)
    cache.open()
    try:
        yield cache
    finally:
        cache.close(mark_clean=not crashed)


def put(c: ChunkCache, key: str, index: int, n: int = 1000, etag: str = "e1") -> bool:
    return c.put(Key(key), ETag(etag), CS, index, payload(key, etag, index, n))


def get(c: ChunkCache, key: str, index: int, etag: str = "e1") -> bytes | None:
    return c.get(Key(key), ETag(etag), CS, index)


def the_file(root: pathlib.Path) -> pathlib.Path:
    (path,) = [p for p in (root / "chunks").glob("*/*") if p.is_file()]
    return path


# ------------------------------------------------------------------ basics


def test_put_get_contains_and_stats(tmp_path: pathlib.Path) -> None:
    stats = Stats()
    with opened(tmp_path, stats=stats) as c:
        assert get(c, "a", 0) is None
        assert not c.contains(Key("a"), ETag("e1"), CS, 0)
        assert put(c, "a", 0, 1000)
        assert c.contains(Key("a"), ETag("e1"), CS, 0)
        assert get(c, "a", 0) == payload("a", "e1", 0, 1000)
        # Another ETag, chunk size or index is another chunk.
        assert get(c, "a", 0, etag="e2") is None
        assert c.get(Key("a"), ETag("e1"), CS * 2, 0) is None
        assert get(c, "a", 1) is None
        # memoryview input, empty chunk
        mv = memoryview(bytearray(b"xyz" * 10))
        assert c.put(Key("b"), ETag("e"), CS, 3, mv)
        assert c.get(Key("b"), ETag("e"), CS, 3) == b"xyz" * 10
        with pytest.raises(ValueError, match="contiguous"):
            c.put(Key("b"), ETag("e"), CS, 9, memoryview(b"abcdef")[::2])
        ints = memoryview(array.array("i", [1, 2, 3]))  # non-byte format: stored as raw bytes
        assert c.put(Key("b"), ETag("e"), CS, 5, ints)
        assert c.get(Key("b"), ETag("e"), CS, 5) == ints.tobytes()
        assert c.put(Key("b"), ETag("e"), CS, 4, b"")
        assert c.get(Key("b"), ETag("e"), CS, 4) == b""
        assert c.used_bytes == (HDR + 1000) + (HDR + 30) + (HDR + ints.nbytes) + HDR
        assert c.used_bytes == sum(chunk_files(tmp_path).values())
        assert stats.cache_hits == 4
        assert stats.cache_misses == 4
        assert stats.cache_bytes == c.used_bytes
        assert stats.cache_chunks == 4
    assert stats.cache_bytes == 0 and stats.cache_chunks == 0  # close() hands them back


def test_odd_keys_do_not_collide(tmp_path: pathlib.Path) -> None:
    keys = ["a", "a|", "a\x00", "dir/ü", "\udcff", "x" * 2000]
    with opened(tmp_path) as c:
        for i, k in enumerate(keys):
            assert c.put(Key(k), ETag(""), CS, 0, payload(k, "", i, 10))
        for i, k in enumerate(keys):
            assert c.get(Key(k), ETag(""), CS, 0) == payload(k, "", i, 10)


def test_bad_arguments(tmp_path: pathlib.Path) -> None:
    with opened(tmp_path) as c:
        with pytest.raises(ValueError, match="exceeds chunk_size"):
            c.put(Key("a"), ETag("e"), 10, 0, b"x" * 11)
        with pytest.raises(ValueError, match="bad chunk address"):
            c.get(Key("a"), ETag("e"), 0, 0)
        with pytest.raises(ValueError, match="bad chunk address"):
            c.get(Key("a"), ETag("e"), CS, -1)


def test_lifetime(tmp_path: pathlib.Path) -> None:
    c = ChunkCache(tmp_path, max_bytes=1 << 20, min_free_bytes=0)
    assert get(c, "a", 0) is None  # before open: a miss, not an error
    assert not put(c, "a", 0)
    c.open()
    with pytest.raises(RuntimeError, match="twice"):
        c.open()
    assert put(c, "a", 0)
    c.close()
    c.close()
    assert get(c, "a", 0) is None
    assert not put(c, "a", 1)
    assert not c.contains(Key("a"), ETag("e1"), CS, 0)
    c.drop_object(Key("a"))  # no error
    assert c.used_bytes == 0
    assert len(chunk_files(tmp_path)) == 1  # close keeps the files
    with pytest.raises(RuntimeError, match="after close"):
        c.open()


# ------------------------------------------------------------------ bound and LRU


def test_lru_eviction_order(tmp_path: pathlib.Path) -> None:
    """[S-READ-1] the chunk cache evicts the least recently used chunk first."""
    stats = Stats()
    size = HDR + 1000
    with opened(tmp_path, max_bytes=3 * size, stats=stats) as c:
        assert put(c, "a", 0) and put(c, "b", 0) and put(c, "c", 0)
        assert get(c, "a", 0) is not None  # a is now the most recently used
        assert put(c, "d", 0)  # evicts b, the least recently used
        assert get(c, "b", 0) is None
        assert put(c, "a", 0)  # already there: a touch, nothing evicted
        assert put(c, "e", 0)  # evicts c
        assert get(c, "c", 0) is None
        assert [get(c, k, 0) is not None for k in "ade"] == [True, True, True]
        assert c.used_bytes == 3 * size == sum(chunk_files(tmp_path).values())
        assert stats.cache_evictions == 2
        # A bigger chunk evicts as many as it needs, oldest first (a, d, e order after gets).
        assert c.put(Key("big"), ETag("e"), 2 * CS, 0, b"z" * (2 * size - HDR))
        assert get(c, "a", 0) is None and get(c, "d", 0) is None
        assert get(c, "e", 0) is not None
        assert c.used_bytes <= 3 * size


def test_never_above_max_bytes(tmp_path: pathlib.Path) -> None:
    """[S-CACHE-1] the chunk cache never exceeds its size bound (--cache-size), on disk as in its
    count."""
    rng = random.Random(7)
    max_bytes = 20_000
    with opened(tmp_path, max_bytes=max_bytes) as c:
        for i in range(300):
            n = rng.randrange(0, CS + 1)
            put(c, f"k{rng.randrange(40)}", i % 5, n, etag=str(i % 3))
            assert c.used_bytes <= max_bytes
            if i % 25 == 0:
                assert sum(chunk_files(tmp_path).values()) == c.used_bytes
        assert sum(chunk_files(tmp_path).values()) == c.used_bytes


def test_chunk_larger_than_max_is_not_cached(tmp_path: pathlib.Path) -> None:
    with opened(tmp_path, max_bytes=HDR + 100) as c:
        assert put(c, "a", 0, 100)
        assert not put(c, "b", 0, 101)  # HDR + 101 > max_bytes
        assert get(c, "a", 0) is not None  # and nothing was evicted for it
        assert temp_files(tmp_path) == []


def test_drop_object(tmp_path: pathlib.Path) -> None:
    with opened(tmp_path) as c:
        for etag in ("e1", "e2"):
            for i in range(3):
                assert put(c, "victim", i, etag=etag)
        assert c.put(Key("victim"), ETag("e1"), CS * 2, 0, b"x")
        assert put(c, "other", 0)
        c.drop_object(Key("victim"))
        assert get(c, "victim", 0) is None and get(c, "victim", 2, etag="e2") is None
        assert get(c, "other", 0) is not None
        assert c.used_bytes == HDR + 1000 == sum(chunk_files(tmp_path).values())
        c.drop_object(Key("never-cached"))
    # After a remount, drop_object still finds an object's chunks (the key tag is in the name).
    with opened(tmp_path) as c:
        c.drop_object(Key("other"))
        assert c.used_bytes == 0 and chunk_files(tmp_path) == {}


# ------------------------------------------------------------------ persistence


def test_survives_reopen(tmp_path: pathlib.Path) -> None:
    with opened(tmp_path) as c:
        for i in range(10):
            assert put(c, "obj", i, 100 + i)
        used = c.used_bytes
    stats = Stats()
    with opened(tmp_path, stats=stats) as c:
        assert c.used_bytes == used
        assert stats.cache_chunks == 10 and stats.cache_bytes == used
        for _ in range(2):  # first read verifies, second trusts
            for i in range(10):
                assert get(c, "obj", i) == payload("obj", "e1", i, 100 + i)
        assert stats.cache_hits == 20 and stats.cache_misses == 0


class _CountingChecksum:
    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kw)


def test_clean_close_lets_the_next_open_trust_chunks_without_hashing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fusionfs.cache as cache_mod

    with opened(tmp_path) as c:
        for i in range(4):
            assert put(c, "obj", i)
    assert (tmp_path / "CLEAN").exists(), "a clean close leaves the marker"
    counter = _CountingChecksum(cache_mod._checksum)
    monkeypatch.setattr(cache_mod, "_checksum", counter)
    with opened(tmp_path, crashed=True) as c:
        assert not (tmp_path / "CLEAN").exists(), "open() takes the marker before serving"
        for i in range(4):
            assert get(c, "obj", i) == payload("obj", "e1", i, 1000)
        assert counter.calls == 0, "chunks synced at a clean close are not hashed again"
    # that instance "crashed" (no marker): the next one verifies every chunk on first read
    with opened(tmp_path) as c:
        for i in range(4):
            assert get(c, "obj", i) == payload("obj", "e1", i, 1000)
        assert counter.calls == 4


@pytest.mark.allow_logs("dropping corrupt chunk")
def test_chunk_written_after_a_trusted_open_is_verified_after_a_crash(
    tmp_path: pathlib.Path,
) -> None:
    """[S-CACHE-1] a cache file left half-written by a crash is never served: it is hash-checked
    when first read after the mount that followed the crash."""
    with opened(tmp_path) as c:
        assert put(c, "old", 0)
    with opened(tmp_path, crashed=True) as c:  # trusted open, then new writes, then a crash
        assert put(c, "new", 0)
    new = next(
        p
        for p in (tmp_path / "chunks").glob("*/*")
        if p.read_bytes()[HDR:] == payload("new", "e1", 0, 1000)
    )
    raw = bytearray(new.read_bytes())
    raw[HDR + 10] ^= 0x40  # what a power loss can leave under a final name
    new.write_bytes(raw)
    with opened(tmp_path) as c:
        assert get(c, "new", 0) is None, "garbage after a crash is never served"
        assert get(c, "old", 0) == payload("old", "e1", 0, 1000)


def test_reopen_with_lower_limit_evicts_oldest(tmp_path: pathlib.Path) -> None:
    with opened(tmp_path) as c:
        for i in range(6):
            assert put(c, "obj", i, 1000)
    # Age the files: chunk i last used at t0 + i, except chunk 0, the most recent.
    names = {}
    t0 = time.time() - 1000
    for p in (tmp_path / "chunks").glob("*/*"):
        data_tail = p.read_bytes()[HDR:]
        i = next(j for j in range(6) if data_tail == payload("obj", "e1", j, 1000))
        names[i] = p
        t = t0 + (100 if i == 0 else i)
        os.utime(p, (t, t))
    stats = Stats()
    with opened(tmp_path, max_bytes=3 * (HDR + 1000), stats=stats) as c:
        assert c.used_bytes == 3 * (HDR + 1000)
        assert stats.cache_evictions == 3
        kept = [i for i in range(6) if c.contains(Key("obj"), ETag("e1"), CS, i)]
        assert kept == [0, 4, 5]
        assert sorted(chunk_files(tmp_path)) == sorted(names[i].name for i in kept)


# ------------------------------------------------------------------ crash leftovers


def test_leftover_temp_files_removed(tmp_path: pathlib.Path) -> None:
    with opened(tmp_path) as c:
        assert put(c, "a", 0)
    (tmp_path / "tmp" / "deadbeef.1.1.tmp").write_bytes(b"half a chunk")
    foreign = tmp_path / "chunks" / "00" / "README"
    foreign.parent.mkdir(exist_ok=True)
    foreign.write_text("not ours")
    # a put cut short writes its temp file beside the chunk's final name
    (tmp_path / "chunks" / "00" / f".{'0' * 32}-{'1' * 16}.77.3.tmp").write_bytes(b"half")
    assert len(temp_files(tmp_path)) == 2
    with opened(tmp_path) as c:
        assert temp_files(tmp_path) == []
        assert foreign.exists()  # files that are not ours are left alone
        assert c.used_bytes == HDR + 1000
        assert get(c, "a", 0) is not None


def _corrupt_cases() -> list[str]:
    return ["truncated", "flipped_data", "flipped_magic", "trailing", "empty", "wrong_name"]


@pytest.mark.allow_logs("dropping corrupt chunk")
@pytest.mark.parametrize("case", _corrupt_cases())
def test_corrupt_chunk_never_served(
    tmp_path: pathlib.Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    with opened(tmp_path, crashed=True) as c:
        assert put(c, "a", 0, 1000)
        if case == "wrong_name":
            assert put(c, "b", 0, 1000)
    if case == "wrong_name":
        # A valid chunk file under another chunk's name: identity check catches it.
        files = sorted((tmp_path / "chunks").glob("*/*"))
        a = next(p for p in files if p.read_bytes()[HDR:] == payload("a", "e1", 0, 1000))
        b = next(p for p in files if p != a)
        shutil.copyfile(a, b)
        path = b
    else:
        path = the_file(tmp_path)
        raw = bytearray(path.read_bytes())
        if case == "truncated":
            raw = raw[: HDR + 500]
        elif case == "flipped_data":
            raw[HDR + 123] ^= 0x01
        elif case == "flipped_magic":
            raw[0] ^= 0xFF
        elif case == "trailing":
            raw += b"extra"
        elif case == "empty":
            raw = bytearray()
        path.write_bytes(raw)
    stats = Stats()
    with caplog.at_level(logging.WARNING, logger="fusionfs.cache"):
        with opened(tmp_path, stats=stats) as c:
            key = "b" if case == "wrong_name" else "a"
            assert get(c, key, 0) is None
            assert get(c, key, 0) is None  # still a miss, and logged only once
            assert not path.exists()
            assert c.used_bytes == sum(chunk_files(tmp_path).values())
            assert stats.cache_misses == 2
            if case == "wrong_name":
                assert get(c, "a", 0) == payload("a", "e1", 0, 1000)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if case == "empty":
        assert warnings == []  # an empty file is discarded by the scan, before any read
    else:
        assert len(warnings) == 1 and "corrupt chunk" in warnings[0].getMessage()


# ------------------------------------------------------------------ full disk


@pytest.mark.allow_logs("cannot store a chunk")
def test_enospc_degrades_to_not_cached(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """[S-CACHE-1] a full disk makes a chunk uncached (put answers False), never a failed read."""
    stats = Stats()
    with opened(tmp_path, stats=stats) as c:
        assert put(c, "a", 0)
        real_writev = os.writev

        def failing_writev(fd: int, bufs: Any) -> int:
            real_writev(fd, [b"partial"])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "writev", failing_writev)
        with caplog.at_level(logging.WARNING, logger="fusionfs.cache"):
            assert not put(c, "b", 0)
            assert not put(c, "c", 0)
        assert stats.cache_write_failures == 2
        assert temp_files(tmp_path) == []
        assert get(c, "b", 0) is None
        assert get(c, "a", 0) == payload("a", "e1", 0, 1000)
        assert c.used_bytes == HDR + 1000 == sum(chunk_files(tmp_path).values())
        # Only one WARNING for a burst of failures.
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        monkeypatch.undo()
        assert put(c, "b", 0)
        assert get(c, "b", 0) == payload("b", "e1", 0, 1000)


class FakeClock:
    """A monotonic clock for ``ChunkCache(clock=...)`` that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def tiny_tmpfs(where: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    where.mkdir()
    if os.geteuid() != 0:
        missing("root", "mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        missing("tmpfs", f"cannot mount one here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.allow_logs("cannot store a chunk")
@pytest.mark.timeout(30)
def test_enospc_on_a_real_full_filesystem(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tiny_tmpfs(tmp_path / "mnt", "4m") as mnt:
        stats = Stats()
        clock = FakeClock()
        with opened(mnt / "cache", max_bytes=64 << 20, stats=stats, clock=clock) as c:
            # Right after open's statvfs, fill the disk behind the cache's back.
            st = os.statvfs(mnt)
            filler = mnt / "filler"
            filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (256 << 10)))
            with caplog.at_level(logging.WARNING, logger="fusionfs.cache"):
                assert not c.put(Key("big"), ETag("e"), 1 << 20, 0, b"x" * (1 << 20))
            assert stats.cache_write_failures == 1
            assert temp_files(mnt / "cache") == []
            assert chunk_files(mnt / "cache") == {}
            assert c.get(Key("big"), ETag("e"), 1 << 20, 0) is None
            assert any("cannot store" in r.getMessage() for r in caplog.records)
            # Small chunks still fit; after the failure the cache re-reads the free space.
            assert c.put(Key("small"), ETag("e"), CS, 0, b"y" * 100)
            assert c.get(Key("small"), ETag("e"), CS, 0) == b"y" * 100
            filler.unlink()
            clock.now += 1.1  # the free space is re-read at least every second
            assert c.put(Key("big"), ETag("e"), 1 << 20, 0, b"x" * (1 << 20))
            assert c.used_bytes == sum(chunk_files(mnt / "cache").values())


class FakeStatvfs:
    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: Any) -> Any:
        self.calls += 1
        return os.statvfs_result((1, 1, 1 << 40, self.free, self.free, 0, 0, 0, 0, 255))


def test_min_free_bytes_evicts_then_refuses(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[S-CACHE-1] the chunk cache keeps --cache-min-free free on its filesystem: it evicts, then
    stores nothing, rather than fill the disk."""
    size = HDR + 1000
    fake = FakeStatvfs(free=(1 << 20) + 3 * size + 100)
    monkeypatch.setattr(os, "statvfs", fake)
    stats = Stats()
    with opened(tmp_path, min_free_bytes=1 << 20, stats=stats) as c:
        # Three fit in the free space above the minimum; the estimate tracks what we write.
        assert put(c, "a", 0) and put(c, "b", 0) and put(c, "c", 0)
        assert stats.cache_evictions == 0
        # The fourth needs room: the least recently used chunk goes.
        assert put(c, "d", 0)
        assert stats.cache_evictions == 1 and get(c, "a", 0) is None
        assert fake.calls <= 2  # statvfs is not called per put
    # Someone else wrote to the disk: at open the cache gives back what is missing, oldest first.
    fake.free = (1 << 20) - 1
    with opened(tmp_path, min_free_bytes=1 << 20) as c:
        assert c.used_bytes == 2 * size == sum(chunk_files(tmp_path).values())
    # The disk is full: the cache gives back everything and stores nothing.
    fake.free = 0
    with opened(tmp_path, min_free_bytes=1 << 20) as c:
        assert c.used_bytes == 0 and chunk_files(tmp_path) == {}
        assert not put(c, "e", 0)
        assert temp_files(tmp_path) == []


def test_free_space_is_rechecked(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeStatvfs(free=1 << 40)
    monkeypatch.setattr(os, "statvfs", fake)
    clock = FakeClock()
    with opened(tmp_path, min_free_bytes=1 << 20, clock=clock) as c:
        for i in range(100):
            assert put(c, "a", i, 10)
        assert fake.calls <= 2
        # 64 MiB written triggers a re-read
        calls = fake.calls
        for i in range(70):
            assert c.put(Key("big"), ETag("e"), 1 << 20, i, b"\0" * (1 << 20))
            c.drop_object(Key("big"))
        assert fake.calls > calls
        # and so does time: after ~1 s the disk is seen as full
        fake.free = 0
        clock.now += 0.9
        assert put(c, "b", 0)  # not yet re-read
        clock.now += 0.2
        assert not put(c, "c", 0)
        assert c.used_bytes == 0


# ------------------------------------------------------------------ modes


def test_modes_are_private(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "cache"
    old = os.umask(0)
    try:
        with opened(root) as c:
            assert put(c, "a", 0)
    finally:
        os.umask(old)
    for d in [root, root / "chunks", root / "tmp", *(root / "chunks").iterdir()]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(the_file(root).stat().st_mode) == 0o600
    # Pre-existing loose permissions are tightened at open.
    sub = the_file(root).parent
    os.chmod(root, 0o755)
    os.chmod(sub, 0o777)
    with opened(root):
        pass
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(sub.stat().st_mode) == 0o700


def test_a_sub_directory_removed_under_an_open_cache_is_made_again(
    tmp_path: pathlib.Path,
) -> None:
    """Sub-directories are made on the first chunk that needs one (after an ENOENT), so one
    removed meanwhile (by hand, by a cleaner) costs a miss, never a failed put."""
    root = tmp_path / "cache"
    old = os.umask(0)
    try:
        with opened(root) as c:
            assert put(c, "a", 0)
            sub = the_file(root).parent
            shutil.rmtree(sub)
            c.drop_object(Key("a"))
            assert put(c, "a", 0, n=2000)
            assert get(c, "a", 0) == payload("a", "e1", 0, 2000)
            assert stat.S_IMODE(sub.stat().st_mode) == 0o700
    finally:
        os.umask(old)


# ------------------------------------------------------------------ concurrency


@pytest.mark.timeout(60)
def test_concurrent_get_put_drop(tmp_path: pathlib.Path) -> None:
    stats = Stats()
    max_bytes = 40 * (HDR + 1500)
    errors: list[BaseException] = []
    wrong: list[tuple[str, int]] = []
    with opened(tmp_path, max_bytes=max_bytes, stats=stats) as c:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(1500):
                    k, i = f"k{rng.randrange(12)}", rng.randrange(8)
                    n = 500 + (i * 137 + len(k) * 31) % 1000  # fixed per chunk
                    op = rng.random()
                    if op < 0.45:
                        put(c, k, i, n)
                    elif op < 0.97:
                        got = get(c, k, i)
                        if got is not None and got != payload(k, "e1", i, n):
                            wrong.append((k, i))
                    else:
                        c.drop_object(Key(k))
                    assert c.used_bytes <= max_bytes
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and wrong == []
        files = chunk_files(tmp_path)
        assert c.used_bytes == sum(files.values()) <= max_bytes
        assert stats.cache_bytes == c.used_bytes and stats.cache_chunks == len(files)
        assert temp_files(tmp_path) == []
        assert stats.cache_hits > 0 and stats.cache_evictions > 0
        held = [
            (k, i)
            for k in (f"k{j}" for j in range(12))
            for i in range(8)
            if c.contains(Key(k), ETag("e1"), CS, i)
        ]
        assert len(held) == len(files)


class Pause:
    """Wraps an ``os`` function so that its first call from the thread named ``blocked`` waits.

    ``reached`` is set when that call arrives; the call proceeds once ``go`` is set. This
    orders the races the index must survive deterministically.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.real = getattr(os, name)
        self.reached = threading.Event()
        self.go = threading.Event()
        self.done = False
        monkeypatch.setattr(os, name, self)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if threading.current_thread().name == "blocked" and not self.done:
            self.done = True
            self.reached.set()
            assert self.go.wait(10)
        return self.real(*args, **kw)


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), name="blocked")
    t.start()
    return t, out


@pytest.mark.timeout(30)
def test_drop_while_chunk_is_being_written(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path) as c:
        pause = Pause(monkeypatch, "rename")
        t, _ = in_thread(put, c, "a", 0)
        assert pause.reached.wait(10)
        c.drop_object(Key("a"))  # the object was overwritten while its old chunk was written
        pause.go.set()
        t.join()
        assert get(c, "a", 0) is None  # the old version's chunk did not survive the drop
        assert c.used_bytes == 0 and chunk_files(tmp_path) == {}


@pytest.mark.timeout(30)
def test_put_while_same_chunk_is_being_deleted(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path) as c:
        assert put(c, "a", 0)
        pause = Pause(monkeypatch, "unlink")
        t, _ = in_thread(c.drop_object, Key("a"))
        assert pause.reached.wait(10)
        # The deleting thread has not unlinked yet: a put of the same chunk must not write a
        # file that the pending unlink would then remove behind the index's back.
        assert not put(c, "a", 0)
        pause.go.set()
        t.join()
        assert c.used_bytes == sum(chunk_files(tmp_path).values())
        assert put(c, "a", 0)
        assert get(c, "a", 0) == payload("a", "e1", 0, 1000)
        assert c.used_bytes == sum(chunk_files(tmp_path).values())


@pytest.mark.allow_logs("dropping corrupt chunk")
@pytest.mark.timeout(30)
def test_slow_reader_of_corrupt_chunk_keeps_newer_copy(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with opened(tmp_path, crashed=True) as c:
        assert put(c, "a", 0)
    path = the_file(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(raw)
    with opened(tmp_path) as c:
        pause = Pause(monkeypatch, "fstat")  # fstat: only the first-read verification calls it
        t, out = in_thread(get, c, "a", 0)
        assert pause.reached.wait(10)
        # Meanwhile the object is dropped and its chunk cached again, correctly this time.
        c.drop_object(Key("a"))
        assert put(c, "a", 0)
        pause.go.set()
        t.join()
        assert out == [None]  # the slow reader saw the corrupt bytes and did not serve them
        # ... and it did not throw away the newer, good copy.
        assert get(c, "a", 0) == payload("a", "e1", 0, 1000)
        assert c.used_bytes == sum(chunk_files(tmp_path).values()) == HDR + 1000


# ------------------------------------------------------------------ model-based


class CacheModel(RuleBasedStateMachine):
    """Random put/get/drop/remount against an exact LRU model with the size bound."""

    MAX = 8 * (HDR + 100)

    def __init__(self) -> None:
        super().__init__()
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="cache-model-"))
        self.cache = ChunkCache(self.root, max_bytes=self.MAX, min_free_bytes=0)
        self.cache.open()
        # (key, etag, index) -> data, in LRU order (oldest first)
        self.model: collections.OrderedDict[tuple[str, str, int], bytes] = collections.OrderedDict()

    def _used(self) -> int:
        return sum(HDR + len(v) for v in self.model.values())

    @rule(
        key=st.sampled_from(["a", "b", "c"]),
        etag=st.sampled_from(["1", "2"]),
        index=st.integers(0, 3),
        n=st.integers(0, 200) | st.just(MAX),
    )
    def put(self, key: str, etag: str, index: int, n: int) -> None:
        ident = (key, etag, index)
        data = self.model.get(ident, payload(key, etag, index, n))
        stored = self.cache.put(Key(key), ETag(etag), self.MAX, index, data)
        if ident in self.model:
            assert stored
            self.model.move_to_end(ident)
        elif HDR + len(data) > self.MAX:
            assert not stored
        else:
            assert stored
            while self._used() + HDR + len(data) > self.MAX:
                self.model.popitem(last=False)
            self.model[ident] = data

    @rule(
        key=st.sampled_from(["a", "b", "c"]),
        etag=st.sampled_from(["1", "2"]),
        index=st.integers(0, 3),
    )
    def get(self, key: str, etag: str, index: int) -> None:
        got = self.cache.get(Key(key), ETag(etag), self.MAX, index)
        assert got == self.model.get((key, etag, index))
        if got is not None:
            self.model.move_to_end((key, etag, index))

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def get_cached(self, data: st.DataObject) -> None:
        # Hits are what reorder the LRU: pick one of the chunks the model holds.
        key, etag, index = data.draw(st.sampled_from(sorted(self.model)))
        self.get(key, etag, index)

    @rule(key=st.sampled_from(["a", "b", "c"]))
    def drop(self, key: str) -> None:
        self.cache.drop_object(Key(key))
        for ident in [i for i in self.model if i[0] == key]:
            del self.model[ident]

    @rule()
    def remount(self) -> None:
        self.cache.close()
        self.cache = ChunkCache(self.root, max_bytes=self.MAX, min_free_bytes=0)
        self.cache.open()
        # The scan orders by file times; touching every chunk in model order re-aligns LRU order.
        for (key, etag, index), data in self.model.items():
            assert self.cache.get(Key(key), ETag(etag), self.MAX, index) == data

    @invariant()
    def bounded(self) -> None:
        assert self.cache.used_bytes == self._used() <= self.MAX

    @rule()
    def disk_matches_index(self) -> None:
        # A rule, not an invariant: scanning 256 directories after every step is slow.
        assert sum(chunk_files(self.root).values()) == self.cache.used_bytes
        assert os.listdir(self.root / "tmp") == []

    def teardown(self) -> None:
        self.cache.close()
        shutil.rmtree(self.root, ignore_errors=True)


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------ O_DIRECT and its fallback


def test_direct_and_buffered_writes_make_the_same_file(tmp_path: pathlib.Path) -> None:
    """Chunk files written past the page cache (O_DIRECT, padded then truncated) and through
    it are byte for byte the same, for aligned and unaligned lengths."""
    files = {}
    for direct in (True, False):
        root = tmp_path / ("direct" if direct else "buffered")
        with opened(root) as c:
            c._direct = direct
            for n in (0, 1, 1000, 4095, 4096):
                assert put(c, f"k{n}", 0, n)
                assert get(c, f"k{n}", 0) == payload(f"k{n}", "e1", 0, n)
        files[direct] = {
            name: p.read_bytes()
            for name, p in ((p.name, p) for p in (root / "chunks").rglob("*") if p.is_file())
        }
    assert files[True] == files[False]
    assert len(files[True]) == 5
    for raw in files[True].values():
        assert len(raw) >= HDR  # header block, then the data


def test_a_filesystem_without_o_direct_falls_back(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    with opened(tmp_path) as c:
        monkeypatch.setattr(os, "open", no_direct)
        assert put(c, "a", 0, 1000)
        assert not c._direct
        assert put(c, "b", 0, 2000)
        monkeypatch.undo()
        assert get(c, "a", 0) == payload("a", "e1", 0, 1000)
        assert get(c, "b", 0) == payload("b", "e1", 0, 2000)
        assert temp_files(tmp_path) == []


def _resident_pages(path: pathlib.Path) -> int:
    """How many of the file's pages are in the page cache (mincore of a mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # maps, touches nothing
    try:
        window = (ctypes.c_char * size).from_buffer(mapped)
        vec = (ctypes.c_ubyte * ((size + 4095) // 4096))()
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(window)), ctypes.c_size_t(size), vec):
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del window
        return sum(v & 1 for v in vec)
    finally:
        mapped.close()


def test_a_hit_leaves_none_of_the_chunk_file_in_the_page_cache(tmp_path: pathlib.Path) -> None:
    """Hits are read through the page cache and then dropped from it (_drop_pages)."""
    with opened(tmp_path) as c:
        assert put(c, "a", 0, CS)
        path = the_file(tmp_path)
        path.read_bytes()  # whatever put left, the file is in the page cache now
        assert _resident_pages(path) > 0
        assert get(c, "a", 0) == payload("a", "e1", 0, CS)
        assert _resident_pages(path) == 0
        assert get(c, "a", 0) == payload("a", "e1", 0, CS)  # read again from disk


def test_hits_do_not_depend_on_dropping_pages(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    with opened(tmp_path) as c:
        assert put(c, "a", 0, 3000)
        monkeypatch.setattr(os, "posix_fadvise", refuse)
        assert get(c, "a", 0) == payload("a", "e1", 0, 3000)
        monkeypatch.delattr(os, "posix_fadvise")
        assert get(c, "a", 0) == payload("a", "e1", 0, 3000)


@pytest.mark.allow_logs("dropping corrupt chunk")
def test_a_chunk_file_of_an_older_format_reads_as_a_miss(tmp_path: pathlib.Path) -> None:
    """Format 2 (blake3 checksums) files left by an older fusionfs: a miss, then refetched."""
    import struct

    with opened(tmp_path) as c:
        assert put(c, "obj", 0)
    path = the_file(tmp_path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<H", raw, 4, 2)  # the format version field
    path.write_bytes(bytes(raw))
    with opened(tmp_path, crashed=True) as c:
        assert get(c, "obj", 0) is None
        assert not path.exists()
        assert put(c, "obj", 0)
        assert get(c, "obj", 0) == payload("obj", "e1", 0, 1000)


def test_chunk_subdirectories_are_spread_over_the_file_system(tmp_path: pathlib.Path) -> None:
    # ext4 places a new file's inode in its directory's block group; the chunks directory is
    # marked "top of a directory hierarchy" so that its sub-directories (and the chunk files
    # in them) are spread over block groups (docs/design/cache.md)
    from fusionfs import cache as cache_mod

    with opened(tmp_path) as c:
        assert put(c, "a", 0)
        assert temp_files(tmp_path) == []  # the temp file was renamed into place
        if not _fs_type(tmp_path).startswith("ext"):
            pytest.skip("not ext2/3/4: the flag is theirs")
        fd = os.open(tmp_path / "chunks", os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = array.array("i", [0])
            fcntl.ioctl(fd, cache_mod._FS_IOC_GETFLAGS, flags, True)
        finally:
            os.close(fd)
        assert flags[0] & cache_mod._FS_TOPDIR_FL


def _fs_type(path: pathlib.Path) -> str:
    """The type of the file system holding ``path``, from /proc/self/mountinfo."""
    best, kind = "", ""
    real = str(path.resolve())
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mnt = fields[4]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, fields[fields.index("-") + 1]
    return kind
