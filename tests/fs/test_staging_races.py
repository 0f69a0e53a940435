"""Races of the staging writer (``fusionfs.writer.StagedFile``) under concurrent requests.

The kernel sends writes to one file concurrently (the writeback cache flushes dirty pages from
several threads; several writers may share an inode), and every await in the writer lets another
request run. Each test here stops a store call in the middle of one request (``FaultyStore.stall``)
and runs the racing request meanwhile, so the interleaving that lost data on the old code happens
every time. The random interleavings are in ``test_staging_model.py``.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from fs_harness import CHUNK, PART, FsFactory, data_of

from fusionfs.store import FaultyStore

_GET_OPS = ("get_range", "get_into")


def _stall_gets(store: FaultyStore, gate: threading.Event) -> None:
    for op in _GET_OPS:
        store.stall(op, event=gate)


def _gets_waiting(store: FaultyStore) -> int:
    return sum(store.waiting(op) for op in _GET_OPS)


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (state another thread changes) until it holds; fail after timeout."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _patched(data: bytes, *pieces: tuple[int, bytes]) -> bytes:
    out = bytearray(data)
    for off, piece in pieces:
        out[off : off + len(piece)] = piece
    return bytes(out)


async def _cold_read(make_fs: FsFactory, store: FaultyStore, path: str) -> bytes:
    """The file as a fresh filesystem with an empty cache reads it from the store."""
    fresh = await make_fs(store)
    return await fresh.read_file(path)


class _Gates:
    """Holds each GET of the inner store at a gate of its own, opened one at a time."""

    def __init__(self, store: FaultyStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self._lock = threading.Lock()
        self._gates: list[threading.Event] = []
        self._all_open = False
        for op in _GET_OPS:
            real = getattr(store.inner, op)
            monkeypatch.setattr(store.inner, op, functools.partial(self._call, real))

    def _call(self, real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        gate = threading.Event()
        with self._lock:
            self._gates.append(gate)
            if self._all_open:
                gate.set()
        gate.wait(30)
        return real(*args, **kwargs)

    @property
    def arrived(self) -> int:
        with self._lock:
            return len(self._gates)

    def open(self, n: int) -> None:
        with self._lock:
            self._gates[n].set()

    def open_all(self) -> None:
        with self._lock:
            self._all_open = True
            for gate in self._gates:
                gate.set()


async def test_two_partial_writes_into_one_unfilled_chunk_both_land(
    make_fs: FsFactory, local_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S-WRITE-10: two writes into one chunk not yet filled from the old object both reach the
    store: the second waits for the first's fill instead of filling the chunk again (whose old
    bytes, written after the first write's, would replace them)."""
    base = data_of(4 * CHUNK, seed=1)
    await (await make_fs(local_store)).write_file("f", base)
    h = await make_fs(local_store)  # empty cache: the fill reads the store
    fh = await h.open("f", os.O_WRONLY)
    a = (CHUNK + 10, b"A" * 100)
    b = (CHUNK + 1000, b"B" * 300)
    gates = _Gates(local_store, monkeypatch)
    first_done = trio.Event()

    async def first() -> None:
        await h.write(fh, *a)
        first_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await _until(lambda: gates.arrived >= 1, "the first write's fill")
        nursery.start_soon(h.write, fh, *b)
        await trio.testing.wait_all_tasks_blocked()  # the second write is as far as it gets
        gates.open(0)
        with trio.fail_after(10):
            await first_done.wait()
        gates.open_all()  # (the old code's second fill of the chunk ends only now)
    await h.close(fh)
    expected = _patched(base, a, b)
    assert await h.read_file("f") == expected
    assert await _cold_read(make_fs, local_store, "f") == expected


async def test_a_whole_chunk_written_during_a_fill_is_not_overwritten_by_old_bytes(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-WRITE-10: a write that covers a whole chunk while a partial write's fill of that chunk
    is still reading the old object wins: the fill's old bytes never land over it."""
    base = data_of(4 * CHUNK, seed=2)
    await (await make_fs(local_store)).write_file("f", base)
    h = await make_fs(local_store)
    fh = await h.open("f", os.O_WRONLY)
    partial = (2 * CHUNK + 5, b"p" * 10)
    whole = (2 * CHUNK, data_of(CHUNK, seed=3))
    gate = threading.Event()
    _stall_gets(local_store, gate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.write, fh, *partial)
        await _until(lambda: _gets_waiting(local_store) >= 1, "the fill's GET")
        await h.write(fh, *whole)  # needs no fill: lands while the partial write's fill waits
        gate.set()
    local_store.clear()
    await h.close(fh)
    # the partial write came first, the whole-chunk write after it (it returned first, but the
    # partial one was still in flight: either order is a valid outcome of concurrent writes,
    # never the old bytes)
    result = await _cold_read(make_fs, local_store, "f")
    assert result[: 2 * CHUNK] == base[: 2 * CHUNK]
    assert result[3 * CHUNK :] == base[3 * CHUNK :]
    chunk = result[2 * CHUNK : 3 * CHUNK]
    assert chunk in (whole[1], _patched(whole[1], (5, b"p" * 10))), "old bytes in the chunk"


async def test_a_fill_that_outlives_a_commit_reads_the_new_object_not_estale(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-CONS-5: a write whose fill of a chunk is still reading when an fsync of the same file
    commits a new version gets the bytes (the same in both versions), never ESTALE: a client
    never sees ESTALE for its own writes."""
    base = data_of(PART + 40 * CHUNK, seed=4)  # two parts: the commit is a multipart upload
    await (await make_fs(local_store)).write_file("f", base)
    h = await make_fs(local_store)
    fh = await h.open("f", os.O_RDWR)
    first = (10, b"x" * 10)
    await h.write(fh, *first)
    local_store.stall("complete_multipart")
    gate = threading.Event()
    late = (PART + 35 * CHUNK + 7, b"y" * 20)  # past the read-ahead of the commit's own fills
    committed = trio.Event()

    async def fsync() -> None:
        await h.fs.fsync(fh)
        committed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fsync)
        await _until(lambda: local_store.waiting("complete_multipart") >= 1, "the commit")
        _stall_gets(local_store, gate)
        nursery.start_soon(h.write, fh, *late)
        await _until(lambda: _gets_waiting(local_store) >= 1, "the late write's fill")
        local_store.release("complete_multipart")
        with trio.fail_after(10):
            await committed.wait()  # the old version is gone from the store now
        gate.set()
    local_store.clear()
    await h.close(fh)
    expected = _patched(base, first, late)
    assert await _cold_read(make_fs, local_store, "f") == expected


async def test_two_opens_for_writing_at_once_share_one_staged_file(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-WRITE-10: two opens for writing of one file that race share its one staged state:
    the writes through both land, and nothing is left in the staging directory after the
    closes (a second staged file would be orphaned there, its fd open, never committed)."""
    base = data_of(3 * CHUNK, seed=5)
    await (await make_fs(local_store)).write_file("f", base)
    h = await make_fs(local_store)
    inode = await h.lookup("f")
    handles: list[int] = []

    async def open_for_writing() -> None:
        handle, _keep, _direct = await h.fs.open(inode.ino, os.O_WRONLY)
        handles.append(h.fs.register(handle))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_for_writing)
        nursery.start_soon(open_for_writing)
    a, b = (0, b"a" * 10), (2 * CHUNK + 3, b"b" * 10)
    await h.write(handles[0], *a)
    await h.write(handles[1], *b)
    for fh in handles:
        await h.close(fh)
    assert await _cold_read(make_fs, local_store, "f") == _patched(base, a, b)
    assert sorted(p.name for p in h.staging_dir.iterdir()) == []


@pytest.mark.allow_logs("data not yet durable stays staged")
async def test_a_rewrite_whose_object_was_replaced_meanwhile_is_never_mixed(
    make_fs: FsFactory, s3_store: FaultyStore
) -> None:
    """S-WRITE-5: a rewrite whose unchanged parts are copied server-side, while another client
    replaced the object, fails (ESTALE) instead of completing an object that mixes the other
    client's bytes with ours: moto, like Ceph RGW 16, ignores the copy's If-Match."""
    from fusionfs.errors import Stale

    base = data_of(PART + 2 * CHUNK, seed=6)  # part 1 is copied, part 2 uploaded
    await (await make_fs(s3_store)).write_file("f", base)
    h = await make_fs(s3_store)
    fh = await h.open("f", os.O_RDWR)
    await h.write(fh, PART, data_of(2 * CHUNK, seed=8))  # all of part 2: nothing to fill
    theirs = data_of(PART + 2 * CHUNK, seed=7)
    await h.put("f", theirs)  # another client replaces the object
    with pytest.raises(Stale):
        await h.fs.fsync(fh)
    assert await h.get("f") == theirs, "the store's object was overwritten or mixed"
    await h.fs.release(fh)
