"""The fusionfs core (``Filesystem``) without a kernel: namespace, reads, writes, caches.

Every test drives the filesystem through the calls the kernel would make (see
``fs_harness.Harness``). Tests that need only small objects run over LocalStore and over S3Store
(moto); those with objects of several parts run over LocalStore only, because moto copies the
whole object on every ranged GET. Store calls are counted by the ``FaultyStore`` wrapper.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fs_harness import CHUNK, PART, FsFactory, KiB, data_of
from helpers import wait_until
from trio.testing import MockClock

from fusionfs import staging, writer
from fusionfs.errors import (
    Exists,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoEntry,
    NotADirectory,
    NotEmpty,
    Stale,
    errno_for,
)
from fusionfs.fs import Kind
from fusionfs.store import FaultyStore, Key, LocalStore, NotFound, Transient

# -- namespace ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_lookup_getattr_create_unlink(make_fs: FsFactory, any_store: FaultyStore) -> None:
    h = await make_fs(any_store)
    with pytest.raises(NoEntry):
        await h.lookup("nope")
    data = data_of(3000)
    await h.write_file("f.txt", data)
    inode = await h.stat("f.txt")
    assert inode.kind is Kind.FILE
    assert inode.size == 3000
    assert stat.S_ISREG(inode.st_mode) and inode.mode == 0o644
    assert await h.get("f.txt") == data  # committed at close, under its own key

    # an empty new file is an object too
    await h.write_file("empty", b"")
    assert (await h.stat("empty")).size == 0
    assert await h.get("empty") == b""

    await h.unlink("f.txt")
    with pytest.raises(NoEntry):
        await h.lookup("f.txt")
    with pytest.raises(NotFound):
        await trio.to_thread.run_sync(any_store.inner.head, Key("f.txt"))
    assert await h.listdir("") == ["empty"]

    # the same answers from a filesystem that has never seen these files
    h2 = await make_fs(any_store)
    with pytest.raises(NoEntry):
        await h2.lookup("f.txt")
    assert (await h2.stat("empty")).size == 0


@pytest.mark.timeout(30)
async def test_mkdir_rmdir(make_fs: FsFactory, any_store: FaultyStore) -> None:
    h = await make_fs(any_store)
    d = await h.mkdir("d", 0o750)
    assert d.kind is Kind.DIR and d.mode == 0o750
    with pytest.raises(Exists):
        await h.mkdir("d")
    await h.write_file("d/f", b"x")
    with pytest.raises(NotEmpty) as info:
        await h.rmdir("d")
    assert errno_for(info.value) == errno.ENOTEMPTY
    with pytest.raises(IsADirectory):
        await h.unlink("d")
    with pytest.raises(NotADirectory):
        await h.rmdir("d/f")
    await h.unlink("d/f")
    assert await h.listdir("d") == []
    await h.rmdir("d")
    with pytest.raises(NoEntry):
        await h.lookup("d")
    assert await h.listdir("") == []
    h2 = await make_fs(any_store)
    assert await h2.listdir("") == []


@pytest.mark.timeout(30)
async def test_rmdir_of_a_directory_known_only_from_a_deeper_key(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    await h.put("p/q/r.txt", b"deep")  # no marker for p/ or p/q/ on S3
    assert await h.listdir("") == ["p"]
    with pytest.raises(NotEmpty):
        await h.rmdir("p")
    assert await h.read_file("p/q/r.txt") == b"deep"


@pytest.mark.timeout(30)
async def test_rename_file(make_fs: FsFactory, any_store: FaultyStore) -> None:
    h = await make_fs(any_store)
    data = data_of(200 * KiB, seed=1)
    await h.write_file("a", data)
    await h.mkdir("sub")
    await h.rename("a", "sub/b")
    assert await h.read_file("sub/b") == data
    with pytest.raises(NoEntry):
        await h.lookup("a")
    assert await h.listdir("") == ["sub"]
    assert await h.get("sub/b") == data
    with pytest.raises(NotFound):
        await trio.to_thread.run_sync(any_store.inner.head, Key("a"))

    # over an existing file; RENAME_NOREPLACE refuses
    await h.write_file("c", b"other")
    with pytest.raises(Exists):
        await h.rename("c", "sub/b", flags=1)
    await h.rename("c", "sub/b")
    assert await h.read_file("sub/b") == b"other"
    await h.write_file("e", b"e")
    with pytest.raises(IsADirectory):
        await h.rename("e", "sub")

    h2 = await make_fs(any_store)
    assert await h2.read_file("sub/b") == b"other"
    assert sorted(await h2.listdir("")) == ["e", "sub"]


@pytest.mark.timeout(30)
async def test_rename_of_an_open_file_keeps_the_handle_reading(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    data = data_of(5 * CHUNK, seed=2)
    await h.put("a", data)
    fh = await h.open("a")
    assert await h.read(fh, 0, 10) == data[:10]
    await h.rename("a", "b")
    assert await h.read(fh, 3 * CHUNK, 100) == data[3 * CHUNK : 3 * CHUNK + 100]
    await h.close(fh)


async def _rename_tree_and_check(make_fs: FsFactory, store: FaultyStore) -> None:
    h = await make_fs(store)
    await h.mkdir("d")
    await h.mkdir("d/sub")
    await h.mkdir("d/empty")
    files = {"d/x": data_of(1000, 1), "d/sub/y": data_of(70 * KiB, 2), "d/sub/z": b""}
    for path, data in files.items():
        await h.write_file(path, data)
    await h.symlink("d/link", "sub/y")
    # one file still open for writing: its staged data moves with the tree
    fh = await h.create("d/open")
    await h.write(fh, 0, b"staged")

    await h.rename("d", "e")

    await h.close(fh)
    with pytest.raises(NoEntry):
        await h.lookup("d")
    assert await h.listdir("") == ["e"]
    assert await h.listdir("e") == ["empty", "link", "open", "sub", "x"]
    assert await h.listdir("e/sub") == ["y", "z"]
    for path, data in files.items():
        assert await h.read_file("e" + path[1:]) == data
    assert await h.read_file("e/open") == b"staged"
    assert await h.readlink("e/link") == "sub/y"

    h2 = await make_fs(store)
    assert await h2.listdir("") == ["e"]
    assert await h2.listdir("e") == ["empty", "link", "open", "sub", "x"]
    assert await h2.read_file("e/sub/y") == files["d/sub/y"]
    assert await h2.read_file("e/open") == b"staged"
    with pytest.raises(InvalidArgument):
        await h2.rename("e", "e/sub/inside")


@pytest.mark.timeout(30)
async def test_rename_directory_tree(make_fs: FsFactory, s3_store: FaultyStore) -> None:
    await _rename_tree_and_check(make_fs, s3_store)


class _SlowFileDeletes(FaultyStore):
    """Deletes of objects (not of directory markers) take 50 ms longer: makes the order in
    which concurrent deletes finish deterministic enough to show an ordering bug."""

    def delete(self, key: Key) -> None:
        if not key.endswith("/"):
            time.sleep(0.05)  # the slowness under test, not synchronisation
        super().delete(key)


@pytest.mark.timeout(30)
async def test_rename_directory_tree_local(make_fs: FsFactory, tmp_path: Path) -> None:
    root = tmp_path / "slow-store"
    root.mkdir()
    store = _SlowFileDeletes(LocalStore(root))
    await _rename_tree_and_check(make_fs, store)


@pytest.mark.timeout(30)
async def test_symlink_readlink(make_fs: FsFactory, any_store: FaultyStore) -> None:
    h = await make_fs(any_store)
    target = "../some/where/" + "t" * 200
    link = await h.symlink("l", target)
    assert link.kind is Kind.SYMLINK and stat.S_ISLNK(link.st_mode)
    assert await h.readlink("l") == target
    # the target is the object's body (so LIST-only tools and other clients keep it)
    assert await h.get("l") == target.encode()
    with pytest.raises(Exists):
        await h.symlink("l", "x")

    h2 = await make_fs(any_store)
    assert (await h2.stat("l")).kind is Kind.SYMLINK
    assert await h2.readlink("l") == target
    assert (await h2.listdir_kinds(""))["l"] in (Kind.FILE, Kind.SYMLINK)  # LIST has no mode
    assert (await h2.stat("l")).kind is Kind.SYMLINK


@pytest.mark.timeout(30)
async def test_chmod_chown_utimens_kept_in_metadata(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    await h.write_file("f", b"content")
    ino = (await h.lookup("f")).ino
    mtime = 1_234_567_890_123_456_789
    await h.fs.setattr(ino, mode=0o600)
    await h.fs.setattr(ino, uid=1234, gid=4321)
    await h.fs.setattr(ino, mtime_ns=mtime)
    inode = await h.stat("f")
    assert (inode.mode, inode.uid, inode.gid) == (0o600, 1234, 4321)

    h2 = await make_fs(any_store)
    inode = await h2.stat("f")
    assert (inode.mode, inode.uid, inode.gid) == (0o600, 1234, 4321)
    assert inode.mtime_ns == mtime  # kept exactly, as decimal seconds (S-ATTR-1)
    assert await h2.read_file("f") == b"content"

    # metadata set while the file is open for writing goes up with the content
    fh = await h2.open("f", os.O_WRONLY | os.O_TRUNC)
    await h2.write(fh, 0, b"new")
    await h2.fs.setattr((await h2.lookup("f")).ino, mode=0o640)
    await h2.close(fh)
    h3 = await make_fs(any_store)
    inode = await h3.stat("f")
    assert inode.mode == 0o640 and (inode.uid, inode.gid) == (1234, 4321)
    assert await h3.read_file("f") == b"new"


async def test_utimens_and_chmod_after_the_last_commit_reach_the_store(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-ATTR-1: a chmod or utimens that comes after the file's last commit, while it is still
    open (or before its release arrives), is stored at once: no commit is coming to carry it
    (rsync: close its temporary file, then set times and mode, then rename)."""
    h = await make_fs(any_store)
    fh = await h.create("f")
    await h.write(fh, 0, b"data")
    await h.fs.flush(fh)  # close(2): committed, the release has not come yet
    ino = (await h.lookup("f")).ino
    mtime = 1_111_111_111_000_000_000
    await h.fs.setattr(ino, mtime_ns=mtime)
    await h.fs.setattr(ino, mode=0o604)
    await h.fs.release(fh)
    fresh = await make_fs(any_store)
    inode = await fresh.stat("f")
    assert inode.mode == 0o604
    assert abs(inode.mtime_ns - mtime) < 1000
    assert await fresh.read_file("f") == b"data"
    # and a rewrite after such a copy reads the rest of the file from the copy (no ESTALE)
    fh = await fresh.open("f", os.O_RDWR)
    await fresh.fs.flush(fh)
    await fresh.fs.setattr(inode.ino, mode=0o600)
    await fresh.write(fh, 1, b"A")
    await fresh.close(fh)
    assert await (await make_fs(any_store)).read_file("f") == b"dAta"


@pytest.mark.timeout(30)
async def test_setattr_that_changes_nothing_stored_makes_no_request(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-ATTR-3: the kernel repeats the mtime it holds after an fsync or a rename; storing it
    again would be one more server-side copy (it was, at the end of every snapstore dump)."""
    h = await make_fs(local_store)
    await h.write_file("f", b"content")
    ino = (await h.lookup("f")).ino
    mtime = 1_234_567_890_123_456_789
    await h.fs.setattr(ino, mtime_ns=mtime)
    copies = local_store.calls["copy"]
    assert copies == 1
    await h.fs.setattr(ino, mtime_ns=mtime)
    await h.fs.setattr(ino, mode=(await h.stat("f")).mode, uid=os.getuid())
    assert local_store.calls["copy"] == copies
    # a change that did not reach the store is sent again when it is repeated
    local_store.fail("copy", Transient, times=1)
    with pytest.raises(Exception) as info:
        await h.fs.setattr(ino, mode=0o600)
    assert errno_for(info.value) == errno.EIO, repr(info.value)
    await h.fs.setattr(ino, mode=0o600)
    assert local_store.calls["copy"] == copies + 2
    h2 = await make_fs(local_store)
    inode = await h2.stat("f")
    assert inode.mode == 0o600 and abs(inode.mtime_ns - mtime) < 1000


@pytest.mark.timeout(30)
async def test_directory_mode_kept_in_metadata(make_fs: FsFactory, any_store: FaultyStore) -> None:
    h = await make_fs(any_store)
    await h.mkdir("d", 0o700)
    await h.fs.setattr((await h.lookup("d")).ino, uid=1234, gid=4321)
    h2 = await make_fs(any_store)
    inode = await h2.stat("d")
    assert (inode.mode, inode.uid, inode.gid) == (0o700, 1234, 4321)


@pytest.mark.timeout(30)
async def test_sequential_read_through_the_page_cache_leaves_no_chunk_in_memory(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-READ-7: the kernel keeps what a sequential read through its page cache returned, so
    the daemon drops each chunk once the read has passed its end; with --direct-io there is no
    page cache and the chunks stay (within the memory bound) for a re-read."""
    data = data_of(8 * CHUNK + 100, 3)
    await make_fs(local_store)  # the store's object is written below, outside the mounts
    local_store.put(Key("f"), data)

    def held(h: Any) -> list[int]:
        return sorted(cid[2] for cid in h.chunks._engine._mem if cid[0] == "f")

    h = await make_fs(local_store)
    fh = await h.open("f")
    assert await h.read(fh, 0, 3 * CHUNK + 10) == data[: 3 * CHUNK + 10]
    assert held(h)[:1] == [3]  # chunk 3 is only partly read: it stays (and read-ahead after it)
    off = 3 * CHUNK + 10
    while off < len(data):  # on, in reads of a chunk
        piece = await h.read(fh, off, CHUNK)
        assert piece == data[off : off + CHUNK]
        off += len(piece)
    await h.close(fh)
    assert held(h) == []
    d = await make_fs(local_store, direct_io=True)
    assert await d.read_file("f", block=CHUNK) == data
    assert held(d) == list(range(9))


@pytest.mark.timeout(30)
async def test_random_small_read_fetches_its_pages_and_a_second_one_the_whole_chunk(
    make_fs: FsFactory, local_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S-READ-8: a random read of up to a chunk, of chunks nothing holds, fetches only the
    pages it needs (and caches nothing); the next random read of such a chunk fetches it whole,
    and it is cached; a read that covers a whole chunk fetches whole chunks."""
    data = data_of(16 * CHUNK, 5)
    await make_fs(local_store)
    local_store.put(Key("f"), data)
    gets: list[tuple[int, int]] = []
    real = local_store.get_range

    def spy(key: Key, start: int, length: int, etag: Any = None) -> bytes:
        gets.append((start, length))
        return real(key, start, length, etag)

    monkeypatch.setattr(local_store, "get_range", spy)
    h = await make_fs(local_store)
    fh = await h.open("f")
    off = 5 * CHUNK + 8192 + 100
    assert await h.read(fh, off, 4096) == data[off : off + 4096]
    assert gets == [(5 * CHUNK + 8192, 8192)]  # the two pages the read touches
    assert h.stats.sparse_reads == 1
    await h.settle()  # any cache write would be done by now
    assert not h.cache.contains(Key("f"), (await h.lookup("f")).etag, CHUNK, 5)

    await h.close(fh)
    etag = (await h.lookup("f")).etag

    async def read_anew(off: int, size: int) -> None:
        """A random read by a new handle (no sequential history)."""
        gets.clear()
        fh = await h.open("f")
        try:
            assert await h.read(fh, off, size) == data[off : off + size]
        finally:
            await h.close(fh)

    await read_anew(5 * CHUNK + 40000, 4096)
    assert gets == [(5 * CHUNK, CHUNK)]  # touched before: fetched whole
    await wait_until(lambda: h.cache.contains(Key("f"), etag, CHUNK, 5), 5, "chunk 5 cached")
    await read_anew(8 * CHUNK + 4096, CHUNK)
    assert gets == [(8 * CHUNK + 4096, CHUNK)]  # a chunk's worth across two: its own pages
    assert h.stats.sparse_reads == 2
    await read_anew(12 * CHUNK, CHUNK)
    assert gets == [(12 * CHUNK, CHUNK)]  # a whole chunk: fetched as one, and cached
    assert h.stats.sparse_reads == 2
    await wait_until(lambda: h.cache.contains(Key("f"), etag, CHUNK, 12), 5, "chunk 12 cached")


# -- listings -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_readdir_of_2500_objects_complete_and_sorted(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    # moto takes about 7 ms a PUT on this machine: over S3, just past one LIST page (1000 keys)
    n = 2500 if isinstance(any_store.inner, LocalStore) else 1005
    names = [f"f{(i * 7919) % n:05d}" for i in range(n)]  # put in a scrambled order
    names += ["sub/a", "zz/deeper/b", "\u00e9t\u00e9"]

    async def put_all(batch: list[str]) -> None:
        for name in batch:
            await h.put(f"big/{name}", b"")

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(put_all, names[i::16])
    listed = await h.listdir("big")
    expected = sorted({n.split("/")[0] for n in names}, key=os.fsencode)
    assert len(listed) == n + 3
    assert listed == expected
    kinds = await h.listdir_kinds("big")
    assert kinds["sub"] is Kind.DIR and kinds["zz"] is Kind.DIR and kinds["f00000"] is Kind.FILE
    # the listing serves negative lookups and the entries resolve
    with pytest.raises(NoEntry):
        await h.lookup("big/f99999")
    assert (await h.stat(f"big/f{n - 1:05d}")).size == 0


@pytest.mark.timeout(30)
async def test_directory_shadows_file_of_the_same_name(
    make_fs: FsFactory, s3_store: FaultyStore
) -> None:
    # S3 only: a directory cannot hold both "x" and "x/" (LocalStore refuses such a put)
    h = await make_fs(s3_store)
    await h.put("x", b"a file")
    await h.put("x/y", b"inside")
    assert await h.listdir("") == ["x"]
    assert (await h.listdir_kinds(""))["x"] is Kind.DIR
    assert (await h.stat("x")).kind is Kind.DIR
    assert await h.listdir("x") == ["y"]
    assert await h.read_file("x/y") == b"inside"
    # [S-MAP-3] "a lookup without a fresh listing finds the object"
    h2 = await make_fs(s3_store)
    assert (await h2.stat("x")).kind is Kind.FILE


@pytest.mark.timeout(30)
async def test_names_invalid_as_file_names_are_skipped(
    make_fs: FsFactory, s3_store: FaultyStore
) -> None:
    # S3 only: LocalStore cannot hold these keys at all
    h = await make_fs(s3_store)
    long = "n" * 300
    for key in ("d/ok", f"d/{long}", "d//empty-component", f"d/{long}/below"):
        await h.put(key, b"v")
    assert await h.listdir("d") == ["ok"]
    with pytest.raises(NameTooLong):
        await h.lookup(f"d/{long}")
    assert await h.read_file("d/ok") == b"v"


# -- reads ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_reads_of_partial_whole_and_past_end_ranges(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    size = 3 * CHUNK + 1234
    data = data_of(size, seed=3)
    await h.put("f", data)
    fh = await h.open("f")
    cases = [
        (0, 10),
        (5, 1),
        (CHUNK - 5, 10),
        (CHUNK, CHUNK),
        (CHUNK - 1, 2 * CHUNK + 2),
        (0, size),
        (0, size + 999),
        (size - 3, 100),
        (size - 1, 1),
        (size, 10),
        (size + 100, 10),
        (2 * CHUNK + 17, 0),
        (123, 3 * CHUNK),
    ]
    for off, n in cases:
        assert await h.read(fh, off, n) == data[off : off + n], (off, n)
    await h.close(fh)
    assert await h.read_file("f", block=4096) == data
    assert await h.read_file("f", block=size) == data


@pytest.mark.timeout(30)
async def test_two_readers_of_one_chunk_cause_one_get(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    data = data_of(CHUNK - 100, seed=4)  # one chunk: no read-ahead beyond it
    await h.put("f", data)
    fh1, fh2 = await h.open("f"), await h.open("f")
    before = local_store.calls["get_range"]
    gate = threading.Event()
    local_store.stall("get_range", event=gate)
    results: dict[str, bytes] = {}

    async def read(name: str, fh: int, off: int) -> None:
        results[name] = await h.read(fh, off, 1000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "a", fh1, 0)
        nursery.start_soon(read, "b", fh2, 5000)
        await wait_until(lambda: local_store.waiting("get_range") == 1, 5, "the first GET")
        await trio.testing.wait_all_tasks_blocked()  # the second reader is waiting too:
        assert local_store.waiting("get_range") == 1  # for the first GET, not a GET of its own
        gate.set()
    assert results == {"a": data[:1000], "b": data[5000:6000]}
    assert local_store.calls["get_range"] - before == 1
    await h.close(fh1)
    await h.close(fh2)


@pytest.mark.timeout(30)
async def test_sequential_reads_read_ahead_in_larger_gets(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store, read_request_size=4 * CHUNK, max_readahead=16 * CHUNK)
    nchunks = 64
    data = data_of(nchunks * CHUNK, seed=5)
    await h.put("f", data)
    before = local_store.calls["get_range"]
    assert await h.read_file("f", block=32 * KiB) == data  # two kernel reads per chunk
    gets = local_store.calls["get_range"] - before
    # without read-ahead/coalescing: one GET per chunk (64); with 4-chunk requests: about 16
    assert 0 < gets <= nchunks // 3, gets


@pytest.mark.timeout(30)
async def test_read_ahead_waits_for_a_cache_that_is_behind(
    make_fs: FsFactory, local_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # [S-READ-2] read-ahead pauses while the cache's write backlog is full, so what a
    # sequential read fetches gets cached instead of being skipped; reads are never held back
    h = await make_fs(local_store, read_request_size=4 * CHUNK, max_readahead=16 * CHUNK)
    nchunks = 32
    data = data_of(nchunks * CHUNK, seed=11)
    await h.put("f", data)
    got: list[int] = []
    real_get = local_store.get_range

    def counted_get(key: Key, start: int, length: int, *args: Any) -> bytes:
        got.append(length)
        return real_get(key, start, length, *args)

    monkeypatch.setattr(local_store, "get_range", counted_get)
    src = h.chunks._engine  # the fetch engine of plain reads
    with src._backlog_lock:
        src._backlog += src._backlog_limit  # the cache disk is behind
    fh = await h.open("f")
    try:
        for off in range(0, 8 * CHUNK, 32 * KiB):  # 8 chunks, in kernel-sized reads
            assert await h.read(fh, off, 32 * KiB) == data[off : off + 32 * KiB]
        await h.settle(cache_backlog=src._backlog_limit)  # read-ahead would be done now
        assert sum(got) == 8 * CHUNK, "only what was read is fetched"
        assert h.stats.cache_writes_skipped == 8  # and not cached: the backlog is full
        with src._backlog_lock:
            src._backlog -= src._backlog_limit  # it caught up
        for off in range(8 * CHUNK, 10 * CHUNK, 32 * KiB):
            assert await h.read(fh, off, 32 * KiB) == data[off : off + 32 * KiB]
        await wait_until(
            lambda: sum(got) >= 16 * CHUNK, 10, "read-ahead to run ahead of the reads again"
        )
        for off in range(10 * CHUNK, nchunks * CHUNK, 32 * KiB):
            assert await h.read(fh, off, 32 * KiB) == data[off : off + 32 * KiB]
    finally:
        await h.close(fh)
    # every write released its share of the backlog
    await wait_until(lambda: src._backlog == 0, 10, "the cache writes")
    assert h.stats.cache_writes_skipped == 8
    assert sum(got) == nchunks * CHUNK  # nothing fetched twice


@pytest.mark.timeout(30)
async def test_etag_change_under_open_handle_is_stale_not_mixed(
    make_fs: FsFactory, any_store: FaultyStore, clock: MockClock
) -> None:
    h = await make_fs(any_store, metadata_ttl=0.2)
    old, new = data_of(8 * CHUNK, seed=6), data_of(8 * CHUNK, seed=7)
    await h.put("f", old)
    fh = await h.open("f")
    # random reads: no read-ahead, so chunk 1 is fetched only when asked for
    assert await h.read(fh, 5 * CHUNK, 100) == old[5 * CHUNK : 5 * CHUNK + 100]
    assert await h.read(fh, 0, 100) == old[:100]
    # not synchronisation: LocalStore's ETag comes from the file's mtime, so the new version
    # must be written at another (wall-clock) time; trio's clock stands still here
    time.sleep(0.01)
    await h.put("f", new)  # overwritten by another client, same size
    with pytest.raises(Stale) as info:
        await h.read(fh, 0, 2 * CHUNK)  # chunk 0 cached (old), chunk 1 not: never a splice
    assert errno_for(info.value) == errno.ESTALE
    # what is cached of the old version is still served whole
    assert await h.read(fh, 0, 100) == old[:100]
    await h.close(fh)
    clock.jump(0.25)
    assert await h.read_file("f") == new  # a new open sees the new version


@pytest.mark.timeout(30)
async def test_out_of_band_changes_seen_after_attr_timeout(
    make_fs: FsFactory, any_store: FaultyStore, clock: MockClock
) -> None:
    h = await make_fs(any_store, metadata_ttl=0.3)
    await h.write_file("f", b"version one")
    await h.mkdir("d")
    await h.write_file("d/gone", b"bye")
    assert await h.read_file("f") == b"version one"
    assert await h.listdir("d") == ["gone"]

    await h.put("f", b"version two, longer")
    await trio.to_thread.run_sync(any_store.inner.delete, Key("d/gone"))
    await h.put("d/new", b"hello")
    await h.put("other", b"!")
    clock.jump(0.35)

    assert (await h.stat("f")).size == len(b"version two, longer")
    assert await h.read_file("f") == b"version two, longer"
    with pytest.raises(NoEntry):
        await h.lookup("d/gone")
    assert await h.listdir("d") == ["new"]
    assert await h.read_file("other") == b"!"
    assert await h.listdir("") == ["d", "f", "other"]


@pytest.mark.timeout(30)
async def test_cache_survives_a_new_filesystem_on_the_same_cache_dir(
    make_fs: FsFactory, tmp_path: os.PathLike[str]
) -> None:
    root = os.path.join(tmp_path, "shared-store")
    os.mkdir(root)
    first = FaultyStore(LocalStore(root))
    h = await make_fs(first)
    data = data_of(10 * CHUNK + 5, seed=8)
    await h.put("f", data)
    assert await h.read_file("f") == data
    assert first.calls["get_range"] > 0
    etag = (await h.stat("f")).etag
    assert etag is not None

    def all_cached() -> bool:
        return all(h.cache.contains(Key("f"), etag, CHUNK, i) for i in range(11))

    await wait_until(all_cached, 5, "every chunk to be in the disk cache")
    await h.shutdown()

    second = FaultyStore(LocalStore(root))
    h2 = await make_fs(second, cache_dir=h.cache_dir)
    assert await h2.read_file("f") == data
    assert await h2.read_file("f", block=1000) == data
    assert second.calls["get_range"] == 0
    assert second.calls["head"] >= 1  # it did check the version


# -- writes -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_rewrite_in_the_middle_and_append_to_a_large_file(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    size = 2 * PART + 3 * CHUNK + 77  # three parts
    expected = bytearray(data_of(size, seed=9))
    await h.put("big", bytes(expected))

    # rewrite in the middle: a write that covers parts of two chunks of part 2
    fh = await h.open("big", os.O_WRONLY)
    off = PART + 5 * CHUNK - 300
    patch = b"P" * 1000
    await h.write(fh, off, patch)
    expected[off : off + len(patch)] = patch
    # reading through the writing handle sees base and staged bytes together
    assert await h.read(fh, off - 10, 1020) == bytes(expected[off - 10 : off + 1010])
    await h.close(fh)
    assert (await h.stat("big")).size == size
    assert await h.get("big") == bytes(expected)

    # append (O_APPEND: the kernel writes at the current size)
    fh = await h.open("big", os.O_WRONLY | os.O_APPEND)
    tail = data_of(3 * CHUNK + 11, seed=10)
    await h.write(fh, size, tail[: CHUNK // 2])
    await h.write(fh, size + CHUNK // 2, tail[CHUNK // 2 :])
    expected += tail
    await h.close(fh)
    assert await h.get("big") == bytes(expected)
    if isinstance(any_store.inner, LocalStore):
        assert any_store.calls["upload_part_copy"] > 0  # unchanged parts copied in the store

    h2 = await make_fs(any_store)
    assert (await h2.stat("big")).size == len(expected)
    assert await h2.read_file("big") == bytes(expected)


@pytest.mark.timeout(30)
async def test_rewrite_of_a_small_file_keeps_the_rest(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    expected = bytearray(data_of(3 * CHUNK, seed=11))
    await h.put("f", bytes(expected))
    fh = await h.open("f", os.O_RDWR)
    await h.write(fh, CHUNK + 10, b"xyz")
    expected[CHUNK + 10 : CHUNK + 13] = b"xyz"
    await h.write(fh, 4 * CHUNK, b"past the end")  # leaves a hole of zeros
    expected += bytes(CHUNK) + b"past the end"
    assert await h.read_fh(fh) == bytes(expected)
    await h.close(fh)
    assert await h.get("f") == bytes(expected)


@pytest.mark.timeout(30)
async def test_large_sequential_write_streams_parts_while_writing(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    data = data_of(3 * PART + 100 * KiB, seed=12)
    fh = await h.create("stream")
    for off in range(0, len(data), 128 * KiB):
        await h.write(fh, off, data[off : off + 128 * KiB])
    # parts go up in the background while the file is still open, before any flush
    await wait_until(lambda: local_store.calls["upload_part"] >= 3, 5, "3 parts sent")
    assert local_store.calls["complete_multipart"] == 0
    with pytest.raises(NotFound):  # nothing visible under the key before close
        await trio.to_thread.run_sync(local_store.inner.head, Key("stream"))
    await h.close(fh)
    assert local_store.calls["upload_part"] == 4  # the three streamed, then only the tail
    assert local_store.calls["complete_multipart"] == 1
    assert local_store.calls["put"] == 0
    assert await h.get("stream") == data
    assert await h.read_file("stream") == data


@pytest.mark.timeout(30)
async def test_truncate(make_fs: FsFactory, any_store: FaultyStore) -> None:
    h = await make_fs(any_store)
    data = data_of(3 * CHUNK + 500, seed=13)
    await h.write_file("f", data)

    inode = await h.truncate("f", CHUNK + 100)  # inside a chunk: the rest of it comes along
    assert inode.size == CHUNK + 100
    assert await h.get("f") == data[: CHUNK + 100]
    assert await h.read_file("f") == data[: CHUNK + 100]

    await h.truncate("f", 2 * CHUNK)  # grow: zeros
    assert await h.get("f") == data[: CHUNK + 100] + bytes(CHUNK - 100)

    # ftruncate on an open handle, then write
    fh = await h.open("f", os.O_RDWR)
    await h.fs.setattr((await h.lookup("f")).ino, size=10, fh=fh)
    await h.write(fh, 20, b"end")
    assert await h.read(fh, 0, 100) == data[:10] + bytes(10) + b"end"
    await h.close(fh)
    assert await h.get("f") == data[:10] + bytes(10) + b"end"

    await h.truncate("f", 0)
    assert await h.get("f") == b""
    assert (await h.stat("f")).size == 0
    # O_TRUNC open of an existing file
    await h.write_file("f", b"again")
    await h.write_file("f", b"x")
    assert await h.get("f") == b"x"


def _staged_names(h: Any) -> list[str]:
    return sorted(p.name for p in h.staging_dir.iterdir())


@pytest.mark.timeout(30)
async def test_a_small_new_file_is_held_in_memory_and_committed_without_a_staging_file(
    make_fs: FsFactory, any_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S-WRITE-9: create, write, close of a small file touch no staging file; held longer than
    writer._HOLD_S, its bytes are staged, and only then a crash record naming the key."""
    real_batch = staging.write_batch

    def write_batch(*args: Any) -> bool:
        time.sleep(0.2)  # a slow disk: the record must still come after the held bytes
        return real_batch(*args)

    monkeypatch.setattr(staging, "write_batch", write_batch)
    h = await make_fs(any_store)
    fh = await h.create("small")
    await h.write(fh, 0, b"x" * 4096)
    await h.write(fh, 4096, b"tail")
    assert _staged_names(h) == []  # nothing on disk while held
    assert await h.read(fh, 4090, 100) == b"x" * 6 + b"tail"  # served from the held writes
    assert _staged_names(h) == []
    await h.close(fh)
    assert await h.get("small") == b"x" * 4096 + b"tail"
    assert any_store.calls["put"] == 1
    assert _staged_names(h) == []

    started = trio.current_time()
    fh = await h.create("kept-open")
    await h.write(fh, 0, b"unsaved")
    # the record appears by a rename of a temporary file: wait for the two final names
    await wait_until(
        lambda: sorted(p.suffix for p in h.staging_dir.iterdir()) == [".data", ".json"],
        5,
        "the held file to be staged",
    )
    assert trio.current_time() - started >= writer._HOLD_S * 0.9
    record = next(p for p in h.staging_dir.glob("*.json"))
    assert json.loads(record.read_text())["key"] == "kept-open"
    assert record.with_suffix(".data").read_bytes() == b"unsaved"
    await h.write(fh, 7, b" now saved")
    await h.close(fh)
    assert await h.get("kept-open") == b"unsaved now saved"
    assert _staged_names(h) == []


@pytest.mark.timeout(30)
async def test_a_new_file_is_staged_once_it_outgrows_the_hold(
    make_fs: FsFactory, local_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past writer._HOLD_MAX bytes, or past the mount's writer._HOLD_BUDGET, a new file's
    writes go to its staging file at once; reads, gaps and truncation behave the same."""
    h = await make_fs(local_store)
    big = data_of(writer._HOLD_MAX + 64 * KiB, seed=21)
    fh = await h.create("big")
    for off in range(0, len(big), 64 * KiB):
        await h.write(fh, off, big[off : off + 64 * KiB])
    await wait_until(lambda: len(_staged_names(h)) == 2, 5, "big to be staged")
    assert h.uploader.held_bytes == 0
    await h.close(fh)
    assert await h.get("big") == big

    monkeypatch.setattr(writer, "_HOLD_BUDGET", 100 * KiB)
    first, second = await h.create("a"), await h.create("b")
    await h.write(first, 0, data_of(80 * KiB, seed=1))
    assert _staged_names(h) == [] and h.uploader.held_bytes == 80 * KiB
    await h.write(second, 0, data_of(80 * KiB, seed=2))  # over the budget: staged now
    await wait_until(lambda: len(_staged_names(h)) == 2, 5, "b to be staged")
    # a gap, a read across it and a truncate of the held file: staged on demand, same bytes
    await h.write(first, 100 * KiB, b"after a gap")
    got = await h.read(first, 70 * KiB, 50 * KiB)
    assert got == data_of(80 * KiB, seed=1)[70 * KiB :] + bytes(20 * KiB) + b"after a gap"
    await h.fs.setattr((await h.lookup("a")).ino, size=90 * KiB, fh=first)
    await h.close(first)
    await h.close(second)
    assert await h.get("a") == data_of(80 * KiB, seed=1) + bytes(10 * KiB)
    assert await h.get("b") == data_of(80 * KiB, seed=2)
    assert _staged_names(h) == [] and h.uploader.held_bytes == 0


@pytest.mark.timeout(60)
async def test_write_behind_directory_close_returns_before_commit(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    # [S-WRITE-7] "close of a file below DIR starts its commit and returns at once; fsync of the
    # file and the user.fusionfs.flush control still return only once it is durable"
    h = await make_fs(local_store)
    await h.mkdir("imgs")
    d = await h.stat("imgs")
    await h.fs.setxattr(d.ino, b"user.fusionfs.write-behind", b"1")
    assert h.fs.getxattr(d.ino, b"user.fusionfs.write-behind") == b"1"
    gate = threading.Event()
    local_store.stall("put", event=gate)
    await h.write_file("imgs/a.img", b"x" * 1000)  # close returned although the PUT is stalled
    with pytest.raises(NotFound):
        local_store.inner.head(Key("imgs/a.img"))
    gate.set()
    local_store.release("put")
    await h.fs.flush_all()  # waits for the background commit
    assert local_store.inner.head(Key("imgs/a.img")).size == 1000


@pytest.mark.timeout(60)
async def test_rewrite_of_a_streamed_part_resends_only_that_part(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    # [S-WRITE-3] a write into a part already sent keeps the stream: that part goes up again
    h = await make_fs(local_store)
    data = bytearray(data_of(3 * PART + 1000, seed=7))
    fh = await h.create("f")
    for off in range(0, len(data), 1 << 20):
        await h.write(fh, off, bytes(data[off : off + (1 << 20)]))
    # the first parts stream during the writes
    await wait_until(lambda: local_store.calls["upload_part"] >= 2, 10, "two parts sent")
    patch = b"Z" * 4096
    await h.write(fh, 100, patch)  # inside part 1, already sent
    data[100 : 100 + len(patch)] = patch
    await h.close(fh)
    assert local_store.calls["create_multipart"] == 1  # the stream was kept, not restarted
    assert local_store.calls["upload_part"] <= 3 + 1 + 1  # parts + tail + one resend
    assert await h.get("f") == bytes(data)


def _lookup_calls(store: FaultyStore) -> tuple[int, int]:
    """The store's HEAD and LIST calls so far: what lookups cost."""
    return store.calls["head"], store.calls["list"]


def _since(before: tuple[int, int], store: FaultyStore) -> tuple[int, int]:
    heads, lists = _lookup_calls(store)
    return heads - before[0], lists - before[1]


@pytest.mark.timeout(30)
async def test_creates_in_a_listed_directory_cost_one_list_per_ttl_not_a_probe_per_name(
    make_fs: FsFactory, any_store: FaultyStore, clock: MockClock
) -> None:
    # [S-MAP-7] "a lookup of a name this mount has not seen ... refreshes that directory's listing"
    h = await make_fs(any_store, metadata_ttl=0.3)
    await h.mkdir("d")

    before = _lookup_calls(any_store)
    for i in range(10):  # a directory just made is known empty: no request per new name
        await h.write_file(f"d/f{i}", b"x")
    assert _lookup_calls(any_store) == before
    clock.jump(0.35)  # the listing expires; the next unknown name re-lists, once
    before = _lookup_calls(any_store)
    for i in range(10, 20):
        await h.write_file(f"d/f{i}", b"x")
    heads, lists = _since(before, any_store)
    # "d" itself is revalidated once (LIST d/, HEAD of its marker: a known directory is not
    # HEADed as a file first, S-MAP-3), and one LIST of d/ answers all ten new names; a probe
    # per name would be a HEAD and a LIST each (20)
    assert (heads, lists) == (1, 2)
    # what another client adds is seen once the listing is older than the TTL (S-CONS-1)
    await h.put("d/oob", b"from elsewhere")
    with pytest.raises(NoEntry):
        await h.lookup("d/oob")
    clock.jump(0.35)
    assert (await h.stat("d/oob")).size == len(b"from elsewhere")
    assert sorted(await h.listdir("d")) == sorted([f"f{i}" for i in range(20)] + ["oob"])


@pytest.mark.timeout(30)
async def test_concurrent_lookups_of_a_stale_directory_share_one_probe(
    make_fs: FsFactory, any_store: FaultyStore, clock: MockClock
) -> None:
    # [S-MAP-7] "Concurrent lookups of one name that needs asking the store share one probe"
    # [S-MAP-3] "A directory this mount knows is revalidated ... with a LIST of `a/`"
    h = await make_fs(any_store, metadata_ttl=0.2)
    await h.mkdir("d")
    await h.write_file("d/f", b"x")
    clock.jump(0.25)  # "d" is stale now
    before = _lookup_calls(any_store)
    any_store.stall("list", seconds=0.2)  # keep the first probe in flight while the rest arrive
    found: list[Kind] = []

    async def look() -> None:
        found.append((await h.lookup("d")).kind)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(look)
    any_store.clear()
    assert found == [Kind.DIR] * 8
    heads, lists = _since(before, any_store)
    assert (heads, lists) == (1, 1)  # LIST d/ and a HEAD of its marker, once for all eight


@pytest.mark.timeout(30)
async def test_a_cold_directory_lookup_asks_for_its_listing_and_its_marker_at_once(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    # [S-MAP-3] "The LIST of `a/` and the HEAD of its marker `a/` go together, one round trip"
    await trio.to_thread.run_sync(
        any_store.inner.put, Key("d/"), b"", {"mode": str(stat.S_IFDIR | 0o710), "uid": "7"}
    )
    await trio.to_thread.run_sync(any_store.inner.put, Key("d/f"), b"x", None)
    await trio.to_thread.run_sync(any_store.inner.put, Key("e/f"), b"x", None)  # no marker
    h = await make_fs(any_store)
    heads, lists = _lookup_calls(any_store)
    listing = threading.Event()
    any_store.stall("list", event=listing)
    found: list[Any] = []

    async def look() -> None:
        found.append(await h.lookup("d"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look)
        # the HEAD of "d" (no such object), then the LIST of "d/" (held) and, meanwhile, the
        # HEAD of the marker "d/": both HEADs are in while the LIST is still unanswered
        await wait_until(
            lambda: any_store.calls["head"] - heads >= 2, 10, "the marker's HEAD beside the LIST"
        )
        assert any_store.calls["list"] - lists == 1 and not found
        listing.set()
    any_store.clear()
    d = found[0]
    assert d.kind is Kind.DIR and (d.mode, d.uid) == (0o710, 7)  # the marker's answer
    assert _since((heads, lists), any_store) == (2, 1)
    e = await h.lookup("e")  # the LIST shows no marker: the directory's defaults
    assert e.kind is Kind.DIR and e.uid != 7
    before = _lookup_calls(any_store)
    with pytest.raises(NoEntry):
        await h.lookup("nothing")
    assert _since(before, any_store) == (2, 1)  # a name that is nothing: a HEAD more


@pytest.mark.timeout(30)
async def test_a_known_directory_replaced_by_a_file_is_seen_as_the_file(
    make_fs: FsFactory, any_store: FaultyStore, clock: MockClock
) -> None:
    """Checking a known directory first (S-MAP-3) still finds the object once the directory is
    gone from the store."""
    h = await make_fs(any_store, metadata_ttl=0.2)
    await h.mkdir("x")
    await h.write_file("x/inner", b"1")
    assert (await h.lookup("x")).kind is Kind.DIR
    await trio.to_thread.run_sync(any_store.delete, Key("x/inner"))
    await trio.to_thread.run_sync(any_store.delete, Key("x/"))
    await h.put("x", b"a file now")
    clock.jump(0.25)
    inode = await h.lookup("x")
    assert inode.kind is Kind.FILE and inode.size == len(b"a file now")
    assert await h.read_file("x") == b"a file now"


@pytest.mark.timeout(30)
async def test_a_listed_small_file_is_looked_up_and_read_with_one_request(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    # [S-MAP-8] "one ranged GET answers the lookup and the read"
    h = await make_fs(any_store)
    mode = str(stat.S_IFREG | 0o600)
    for i in range(5):
        await h.put(f"d/f{i}", f"content {i}".encode(), {"mode": mode})
    await h.put("d/big", bytes(200_000))
    fresh = await make_fs(any_store)  # another machine: nothing known
    # the listing asks for the metadata of every entry it cannot tell (S-MAP-5): a GET of the
    # head of each small file (could be a symlink; the lookups and reads below need it anyway)
    # and a HEAD of the big one; after that no lookup asks again
    await fresh.lookup("d")
    start = dict(any_store.calls)
    assert sorted(await fresh.listdir("d")) == ["big"] + [f"f{i}" for i in range(5)]
    for i in range(5):
        assert (await fresh.stat(f"d/f{i}")).mode & 0o777 == 0o600  # metadata came with it
        assert await fresh.read_file(f"d/f{i}") == f"content {i}".encode()
    spent = {op: n - start.get(op, 0) for op, n in any_store.calls.items()}
    assert spent.get("get_head", 0) == 5, spent
    assert spent.get("get_range", 0) == 0 and spent.get("head", 0) == 1, spent
    before = dict(any_store.calls)
    assert len(await fresh.read_file("d/big")) == 200_000  # above the limit: known, then GET
    spent = {op: n - before.get(op, 0) for op, n in any_store.calls.items()}
    assert spent.get("head", 0) == 0 and spent.get("get_range", 0) >= 1, spent


@pytest.mark.timeout(60)
async def test_a_streamed_file_is_not_copied_for_the_timestamp_of_its_own_writes(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    # [S-ATTR-2] "keeps the mtime it had when its upload began, when the only later change is
    # the timestamp of its own writes ... an mtime set to before the upload began ... is stored"
    h = await make_fs(local_store)
    data = data_of(2 * PART + 1000, seed=3)
    for name, mtime_ns in (("own", None), ("old", 1_500_000_000_000_000_000)):
        streams = local_store.calls["create_multipart"]
        fh = await h.create(name)
        for off in range(0, len(data), 1 << 20):
            await h.write(fh, off, data[off : off + (1 << 20)])
        await wait_until(
            lambda streams=streams: local_store.calls["create_multipart"] > streams,
            10,
            f"{name} to stream",
        )
        # what the kernel's writeback cache sends at close: the time of the last write
        stamp = mtime_ns if mtime_ns is not None else time.time_ns()
        await h.fs.setattr((await h.lookup(name)).ino, mtime_ns=stamp, fh=fh)
        copies = local_store.calls["copy"]
        await h.close(fh)
        info = local_store.inner.head(Key(name))
        assert info.size == len(data)
        if mtime_ns is None:
            assert local_store.calls["copy"] == copies  # no server-side copy of the object
        else:
            assert local_store.calls["copy"] == copies + 1
            assert info.metadata is not None
            assert abs(float(info.metadata["mtime"]) * 1e9 - mtime_ns) < 1e4
    assert await h.get("own") == data and await h.get("old") == data


async def test_times_set_on_files_are_seen_after_a_listing_on_a_fresh_mount(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-ATTR-1: the mtime stored in a file's metadata is what `stat` gives after a listing on
    a fresh mount (rsync -a compares them), for files of every size, not the LIST's time."""
    h = await make_fs(any_store)
    mtime = 1_500_000_000_123_456_789
    sizes = {"empty": 0, "small": 100, "big": 3 * CHUNK + 5}
    for name, size in sizes.items():
        await h.write_file(name, data_of(size))
        await h.fs.setattr((await h.lookup(name)).ino, mtime_ns=mtime)
    fresh = await make_fs(any_store)
    assert sorted(await fresh.listdir()) == sorted(sizes)
    for name in sizes:
        inode = await fresh.stat(name)
        assert inode.mtime_ns == mtime, name


async def test_a_directory_shows_the_same_mtime_on_a_fresh_mount(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-ATTR-1: a directory's marker keeps its times, so a fresh mount (after a listing, or a
    lookup) shows the mtime this mount showed, set by mkdir or by utimens."""
    h = await make_fs(any_store)
    made = await h.mkdir("d")
    await h.mkdir("e")
    await h.fs.setattr((await h.lookup("e")).ino, mtime_ns=1_600_000_000_987_654_321)
    fresh = await make_fs(any_store)
    assert sorted(await fresh.listdir()) == ["d", "e"]
    assert (await fresh.stat("d")).mtime_ns == made.mtime_ns
    assert (await fresh.stat("e")).mtime_ns == 1_600_000_000_987_654_321


# -- special files and hard links (pjdfstest) ---------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fmt", "kind", "rdev"),
    [
        (stat.S_IFIFO, Kind.FIFO, 0),
        (stat.S_IFSOCK, Kind.SOCKET, 0),
        (stat.S_IFCHR, Kind.CHAR, os.makedev(1, 3)),
        (stat.S_IFBLK, Kind.BLOCK, os.makedev(8, 1)),
    ],
)
async def test_special_files_are_objects_that_carry_their_type(
    make_fs: FsFactory, any_store: FaultyStore, fmt: int, kind: Kind, rdev: int
) -> None:
    """S-SPECIAL-1: mknod of a FIFO, socket, character or block device stores an empty object
    whose metadata has its type, mode, owner and rdev; a cold mount (LIST has no metadata)
    learns the type from the lookup's HEAD; chmod, chown, utimens, rename and unlink work."""
    h = await make_fs(any_store)
    root = await h.lookup("")
    node = await h.fs.mknod(root.ino, b"sp", fmt | 0o640, rdev, 1000, 1001)
    assert node.kind is kind and stat.S_IFMT(node.st_mode) == fmt
    assert (node.mode, node.uid, node.gid, node.rdev) == (0o640, 1000, 1001, rdev)
    assert await h.get("sp") == b""
    with pytest.raises(Exists):
        await h.fs.mknod(root.ino, b"sp", fmt | 0o640, rdev, 0, 0)
    with pytest.raises(InvalidArgument):
        await h.fs.open(node.ino, os.O_RDONLY)  # never read or written as data
    await h.fs.setattr(node.ino, mode=0o600, uid=7, gid=8, mtime_ns=1_000_000_000_000)

    h2 = await make_fs(any_store)
    assert (await h2.listdir_kinds(""))["sp"] in (Kind.FILE, kind)  # LIST has no metadata
    again = await h2.stat("sp")
    assert again.kind is kind
    assert (again.mode, again.uid, again.gid, again.rdev) == (0o600, 7, 8, rdev)
    assert again.mtime_ns == 1_000_000_000_000
    await h2.rename("sp", "moved")
    assert (await h2.stat("moved")).kind is kind
    assert not await h2.exists("sp")
    await h2.unlink("moved")
    assert await h2.listdir("") == []

    h3 = await make_fs(any_store)
    assert await h3.listdir("") == []


@pytest.mark.timeout(30)
async def test_truncate_beyond_the_largest_object_is_efbig(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-ATTR-4: a size S3 cannot hold (over 5 TiB) is EFBIG at once, and the file is kept
    (it was EIO after staging a sparse file of that size: pjdfstest ftruncate/12.t)."""
    h = await make_fs(local_store)
    await h.write_file("f", b"data")
    with pytest.raises(FileTooLarge) as info:
        await h.truncate("f", 999_999_999_999_999)
    assert errno_for(info.value) == errno.EFBIG
    assert await h.read_file("f") == b"data"
    assert not any(h.staging_dir.iterdir())


@pytest.mark.timeout(30)
async def test_adding_or_removing_an_entry_moves_the_directory_times(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-DIR-2: create, mkdir, mknod, symlink, unlink, rmdir and rename move the mtime and
    ctime of the directories whose entries they change (pjdfstest */00.t)."""
    h = await make_fs(any_store)
    d = await h.mkdir("d")
    e = await h.mkdir("e")
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("create", lambda: h.write_file("d/f", b"x")),
        ("mkdir", lambda: h.mkdir("d/sub")),
        ("mknod", lambda: h.fs.mknod(d.ino, b"p", stat.S_IFIFO | 0o644, 0, 0, 0)),
        ("symlink", lambda: h.symlink("d/l", "f")),
        ("unlink", lambda: h.unlink("d/l")),
        ("rmdir", lambda: h.rmdir("d/sub")),
        ("rename", lambda: h.rename("d/f", "e/f")),
    ]
    for what, step in steps:
        d.mtime_ns = d.ctime_ns = e.mtime_ns = e.ctime_ns = 1
        await step()
        assert d.mtime_ns > 1 and d.ctime_ns > 1, what
    assert e.mtime_ns > 1 and e.ctime_ns > 1  # the rename's target directory too


@pytest.mark.timeout(30)
async def test_an_entry_made_in_a_new_directory_is_found_after_the_kernel_forgets_it(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-MAP-7: a directory made here starts with a known, empty listing, and what is then
    created, renamed or removed in it through this mount keeps that listing true: the kernel
    may forget an entry at once, and its next lookup within the TTL must still find it (it was
    ENOENT: pjdfstest mknod/05.t lost a fresh directory so, now and then)."""
    h = await make_fs(any_store, metadata_ttl=30.0)
    d = await h.mkdir("d")
    await h.mkdir("d/sub")
    await h.write_file("d/f", b"x")
    await h.fs.mknod(d.ino, b"p", stat.S_IFIFO | 0o644, 0, 0, 0)
    await h.symlink("d/l", "f")
    await h.write_file("d/gone", b"z")
    await h.unlink("d/gone")

    async def forgotten_then_found(name: str) -> None:
        child = await h.lookup(name)
        h.fs.forget([(child.ino, child.lookups)])  # the kernel lets go of it
        assert (await h.lookup(name)).name == name.rsplit("/")[-1].encode(), name

    for name in ("sub", "f", "p", "l"):
        await forgotten_then_found(f"d/{name}")
    assert not await h.exists("d/gone")
    await h.rename("d/f", "d/sub/f")  # a rename within listings known here
    assert not await h.exists("d/f")
    await forgotten_then_found("d/sub/f")
    assert await h.read_file("d/sub/f") == b"x"


async def test_a_listing_that_lags_the_objects_does_not_turn_a_symlink_into_a_file(
    make_fs: FsFactory,
    any_store: FaultyStore,
    monkeypatch: pytest.MonkeyPatch,
    clock: MockClock,
) -> None:
    """S-MAP-5: tar makes a symlink that points outside (../a) as an empty placeholder file
    first, then replaces it; Ceph RGW's bucket index can still list the placeholder (size 0,
    its ETag) after the object is the symlink. The readdir's metadata probe asks the object,
    and what the object says wins: the entry is a symlink with its target, on this mount and
    on a fresh one (the CI run that found it: diff -r saw 'a regular empty file')."""
    import dataclasses

    from fusionfs.store.base import ETag, ListPage

    h = await make_fs(any_store)
    await h.mkdir("d")
    await h.write_file("d/l", b"")  # the placeholder
    placeholder = any_store.inner.head(Key("d/l"))
    await h.unlink("d/l")
    await h.symlink("d/l", "../a")
    real_list = any_store.inner.list

    def lagging(*args: Any, **kwargs: Any) -> ListPage:
        page = real_list(*args, **kwargs)
        objects = [
            dataclasses.replace(o, size=0, etag=ETag(placeholder.etag)) if o.key == "d/l" else o
            for o in page.objects
        ]
        return dataclasses.replace(page, objects=objects)

    monkeypatch.setattr(any_store.inner, "list", lagging)
    clock.jump(0.25)  # past the attribute TTL: the next readdir lists again
    for fs in (h, await make_fs(any_store)):
        assert (await fs.listdir_kinds("d"))["l"] is Kind.SYMLINK
        assert await fs.readlink("d/l") == "../a"
