"""The chunked layout inside the filesystem core (docs/SEMANTICS.md, S-CHUNK rules).

Files created below a directory marked ``user.fusionfs.layout = chunked`` are stored as a
manifest object plus shared pack objects under ``.fusion/packs/``; reading follows the object's
metadata, not the directory's flag. Runs over LocalStore and S3Store (moto) with files of a few
MiB (one or two packs), and over LocalStore only for the larger streaming test.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
from pathlib import Path

import pytest
import trio
from fs_harness import FsFactory, Harness, MiB
from helpers import wait_until
from trio.testing import MockClock

from fusionfs.chunked import (
    FOSSILS_PREFIX,
    LAYOUT_METADATA,
    PACKS_PREFIX,
    SIZE_METADATA,
    CorruptChunk,
    LayoutError,
    is_chunked,
    pack_key,
    read_manifest,
)
from fusionfs.errors import InvalidArgument, NoEntry, UploadFailed, errno_for
from fusionfs.store import FaultyStore, Key, Transient


@pytest.fixture(autouse=True)
def _chunk_small_files_too(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests use files of a few hundred KiB: chunk them (production keeps files under
    1 MiB plain, S-CHUNK-8, which its own test checks)."""
    if "real_min_size" not in request.keywords:
        monkeypatch.setattr("fusionfs.writer.CHUNKED_MIN_SIZE", 0)


@pytest.mark.real_min_size
@pytest.mark.timeout(60)
async def test_small_files_in_a_chunked_directory_stay_plain(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-CHUNK-8: below 1 MiB a file is one plain object (one round trip to read back)."""
    h = await make_fs(any_store)
    await chunked_dir(h, "snap")
    small, big = pages(100, seed=8), pages(400, seed=9)  # 400 KiB and 1.6 MiB
    await h.write_file("snap/core-1.img", small)
    await h.write_file("snap/pages-1.img", big)
    info = await trio.to_thread.run_sync(h.store.inner.head, Key("snap/core-1.img"))
    assert not is_chunked(info.metadata) and info.size == len(small)
    info = await trio.to_thread.run_sync(h.store.inner.head, Key("snap/pages-1.img"))
    assert is_chunked(info.metadata)
    fresh = await make_fs(any_store)
    assert await fresh.read_file("snap/core-1.img") == small
    assert await fresh.read_file("snap/pages-1.img") == big


PAGE = 4096


def pages(n: int, seed: int) -> bytes:
    """``n`` pages of compressible but distinct content (text, zeros, small ints, noise)."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            line = f"record {i} {rng.randrange(10**6)} {seed}\n".encode()
            out += (line * (PAGE // len(line) + 1))[:PAGE]
        elif kind == 1:
            out += bytes(PAGE - 8) + i.to_bytes(8, "little")
        elif kind == 2:
            out += bytes(b & 15 for b in rng.randbytes(PAGE))
        else:
            out += rng.randbytes(PAGE)
    return bytes(out)


def change_pages(data: bytes, fraction: float, seed: int, run: int = 64) -> bytes:
    """Rewrite ``fraction`` of the pages, in runs of ``run`` pages."""
    rng = random.Random(seed)
    out = bytearray(data)
    n = len(data) // PAGE
    for _ in range(int(n * fraction) // run):
        start = rng.randrange(0, n - run)
        out[start * PAGE : (start + run) * PAGE] = rng.randbytes(run * PAGE)
    return bytes(out)


async def chunked_dir(h: Harness, path: str) -> None:
    inode = await h.mkdir(path)
    await h.fs.setxattr(inode.ino, b"user.fusionfs.layout", b"chunked")


async def packs(h: Harness) -> list[str]:
    pages_ = await trio.to_thread.run_sync(
        lambda: list(h.store.inner.list(Key(PACKS_PREFIX), None, None, 1000).objects)
    )
    return [o.key for o in pages_ if not o.key.endswith("/")]


@pytest.mark.timeout(60)
async def test_files_in_a_chunked_dir_are_stored_chunked(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-CHUNK-1, S-CHUNK-3, S-CHUNK-4."""
    h = await make_fs(any_store)
    await chunked_dir(h, "snap")
    data = pages(700, seed=1) + b"tail"  # 2.8 MB, not page-aligned at the end
    await h.write_file("snap/pages-1.img", data)
    await h.write_file("plain.txt", b"hello")
    info = await trio.to_thread.run_sync(h.store.inner.head, Key("snap/pages-1.img"))
    assert is_chunked(info.metadata) and info.metadata is not None
    assert info.metadata[SIZE_METADATA] == str(len(data))
    assert info.size < len(data) // 50  # the object is the manifest
    assert not is_chunked(
        (await trio.to_thread.run_sync(h.store.inner.head, Key("plain.txt"))).metadata
    )
    assert len(await packs(h)) == 1
    assert (await h.stat("snap/pages-1.img")).size == len(data)
    assert await h.read_file("snap/pages-1.img") == data
    assert sorted(await h.listdir("")) == ["plain.txt", "snap"]  # .fusion hidden
    with pytest.raises(NoEntry):
        await h.lookup(".fusion")
    with pytest.raises(InvalidArgument):
        await h.mkdir(".fusion")
    value = h.fs.getxattr((await h.lookup("snap")).ino, b"user.fusionfs.chunk-stats")
    st = json.loads(value)
    assert st["files"] == 1 and st["logical_bytes"] == len(data)
    assert 0 < st["stored_bytes"] == st["new_stored_bytes"] < len(data)


@pytest.mark.timeout(60)
async def test_another_mount_reads_chunked_files_and_keeps_the_flag(
    make_fs: FsFactory, any_store: FaultyStore, clock: MockClock
) -> None:
    """S-CHUNK-1 (the flag is persisted), S-CHUNK-2 (reading follows the object), S-CHUNK-3."""
    h = await make_fs(any_store)
    await chunked_dir(h, "snap")
    data = pages(300, seed=2)
    await h.write_file("snap/a.img", data)
    other = await make_fs(any_store)  # fresh cache, fresh index
    assert sorted(await other.listdir("snap")) == ["a.img"]
    assert (await other.stat("snap/a.img")).size == len(data)
    assert await other.read_file("snap/a.img") == data
    snap = await other.lookup("snap")
    assert other.fs.getxattr(snap.ino, b"user.fusionfs.layout") == b"chunked"
    await other.write_file("snap/b.img", data[:100_000])
    info = await trio.to_thread.run_sync(other.store.inner.head, Key("snap/b.img"))
    assert is_chunked(info.metadata)
    clock.jump(0.25)  # h's listing of snap/ (made there) answers for metadata_ttl (S-MAP-7)
    assert await h.read_file("snap/b.img") == data[:100_000]


@pytest.mark.timeout(60)
async def test_chunks_read_below_a_read_once_dir_are_not_cached(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-READ-5: what reads of a file below a read-once directory fetch (an eager restore
    reading its images) is not written to the chunk cache; chunks cached before are used."""
    h = await make_fs(any_store)
    await chunked_dir(h, "snap")
    data = pages(400, seed=5)
    await h.write_file("snap/a.img", data)
    await h.write_file("snap/b.img", data[: 300 * PAGE] + pages(100, seed=6))
    other = await make_fs(any_store)  # another machine: empty cache
    assert await other.read_file("snap/a.img") == data  # not read-once: cached
    await other.settle()  # cache writes run in the background
    await other.shutdown()
    again = await make_fs(any_store, cache_dir=other.cache_dir)  # its memory gone, cache kept
    cached = again.stats.cache_chunks
    assert cached > 0
    snap = await again.lookup("snap")
    await again.fs.setxattr(snap.ino, b"user.fusionfs.read-once", b"1")
    assert await again.read_file("snap/b.img") == data[: 300 * PAGE] + pages(100, seed=6)
    await again.settle()  # no cache write is pending
    assert again.stats.cache_chunks == cached  # the last 100 pages' chunks were not cached
    assert again.stats.cache_hits > 0  # the first 300 pages' came from the cache


@pytest.mark.timeout(60)
async def test_rewrite_append_truncate_and_rename_of_a_chunked_file(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-CHUNK-5: rewrites read the base through the chunked reader; rename copies the
    manifest."""
    h = await make_fs(any_store)
    await chunked_dir(h, "snap")
    data = bytearray(pages(200, seed=3))
    await h.write_file("snap/f.img", bytes(data))
    fh = await h.open("snap/f.img", os.O_RDWR)
    await h.write(fh, 100_000, b"X" * 5000)
    await h.write(fh, len(data), b"appended")
    await h.close(fh)
    data[100_000:105_000] = b"X" * 5000
    data += b"appended"
    assert await h.read_file("snap/f.img") == bytes(data)
    await h.truncate("snap/f.img", 50_001)
    assert await h.read_file("snap/f.img") == bytes(data[:50_001])
    await h.rename("snap/f.img", "snap/g.img")
    assert (await h.stat("snap/g.img")).size == 50_001
    assert await h.read_file("snap/g.img") == bytes(data[:50_001])
    info = await trio.to_thread.run_sync(h.store.inner.head, Key("snap/g.img"))
    assert info.metadata is not None and LAYOUT_METADATA in info.metadata
    fresh = await make_fs(any_store)
    assert await fresh.read_file("snap/g.img") == bytes(data[:50_001])


@pytest.mark.timeout(60)
async def test_dedup_from_a_previous_snapshot_stores_few_new_bytes(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-CHUNK-6: ``dedup-from`` primes the index; no HEAD per chunk."""
    first = await make_fs(any_store)
    await chunked_dir(first, "snaps")
    await first.mkdir("snaps/1")
    data = pages(1024, seed=4)  # 4 MiB
    await first.write_file("snaps/1/pages-1.img", data)
    h = await make_fs(any_store)  # another mount: empty index
    d2 = await h.mkdir("snaps/2")
    await h.fs.setxattr(d2.ino, b"user.fusionfs.dedup-from", b"snaps/1")
    heads = any_store.calls["head"]
    changed = change_pages(data, 0.10, seed=5)
    await h.write_file("snaps/2/pages-1.img", changed)
    st = json.loads(h.fs.getxattr(d2.ino, b"user.fusionfs.chunk-stats"))
    st1 = json.loads(
        first.fs.getxattr((await first.lookup("snaps/1")).ino, b"user.fusionfs.chunk-stats")
    )
    assert st["new_stored_bytes"] <= 0.3 * st1["new_stored_bytes"], (st, st1)
    assert any_store.calls["head"] - heads < 20  # lookups, not one per chunk
    # read back on a third mount (the first one's listing of snaps/ may still be fresh, S-MAP-7)
    third = await make_fs(any_store)
    assert await third.read_file("snaps/2/pages-1.img") == changed


@pytest.mark.timeout(60)
async def test_a_big_file_streams_into_packs_before_close(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    data = random.Random(6).randbytes(40 * MiB)
    fh = await h.create("snap/pages-1.img")
    for off in range(0, len(data), 1 * MiB):
        await h.write(fh, off, data[off : off + MiB])

    async def two_packs() -> bool:
        return len(await packs(h)) >= 2

    await wait_until(two_packs, 20, "two packs sent before close")
    await h.close(fh)
    assert len(await packs(h)) >= 5
    fresh = await make_fs(local_store)
    assert await fresh.read_file("snap/pages-1.img", block=1 * MiB) == data


@pytest.mark.timeout(60)
@pytest.mark.allow_logs(
    "streaming", "background commit failed", "not yet durable", "fetching chunks failed"
)
async def test_a_failed_pack_upload_is_an_error_and_the_data_stays_staged(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    data = pages(300, seed=7)
    fh = await h.create("snap/f.img")
    await h.write(fh, 0, data)
    local_store.fail("put", Transient("injected"), times=5)
    with pytest.raises(UploadFailed):
        await h.fs.flush(fh)
    local_store.clear()
    await h.fs.fsync(fh)
    await h.close(fh)
    fresh = await make_fs(local_store)
    assert await fresh.read_file("snap/f.img") == data


@pytest.mark.timeout(60)
@pytest.mark.allow_logs("failed verification", "fetching chunks failed")
async def test_a_corrupt_pack_is_eio_never_bad_data(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-CHUNK-2: corrupt data is EIO, never returned."""
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    await h.write_file("snap/f.img", random.Random(8).randbytes(300_000))
    fresh = await make_fs(local_store)
    await fresh.stat("snap/f.img")
    local_store.corrupt("get_range")  # manifest and pack ranges alike
    with pytest.raises(LayoutError) as info:
        await fresh.read_file("snap/f.img")
    assert errno_for(info.value) == errno.EIO


@pytest.mark.timeout(60)
@pytest.mark.allow_logs("failed verification", "fetching chunks failed")
async def test_a_tampered_chunk_is_eio_and_the_chunks_around_it_are_served(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-CHUNK-2 through the core: a chunk whose stored bytes no longer hash to its digest is EIO
    (after one re-fetch), wherever a read meets it; the chunks before it are served."""
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    data = random.Random(12).randbytes(1 << 20)  # raw chunks: easy to tamper with in place
    await h.write_file("snap/f.img", data)
    inner = local_store.inner
    manifest = await trio.to_thread.run_sync(read_manifest, inner, Key("snap/f.img"))
    assert len(manifest.chunks) > 3
    victim = manifest.chunks[2]
    path = Path(inner.root) / pack_key(victim.pack)  # type: ignore[attr-defined]
    tampered = bytearray(path.read_bytes())
    tampered[victim.offset + 7] ^= 0x40
    path.write_bytes(bytes(tampered))
    fresh = await make_fs(local_store)
    fh = await fresh.open("snap/f.img")
    try:
        assert await fresh.read(fh, 0, manifest.offset(2)) == data[: manifest.offset(2)]
        with pytest.raises(CorruptChunk) as info:
            await fresh.read(fh, manifest.offset(2) + 5, 10)
        assert errno_for(info.value) == errno.EIO
    finally:
        await fresh.close(fh)
    with pytest.raises(CorruptChunk):  # also inside a read that spans it
        await (await make_fs(local_store)).read_file("snap/f.img")


@pytest.mark.timeout(60)
async def test_a_verified_file_is_read_through_the_manifest_the_check_read(
    make_fs: FsFactory, local_store: FaultyStore, clock: MockClock
) -> None:
    """S-CHUNK-10: the quick check of a chunked file (before every restore) hands the manifest
    it read to the reads that follow, so the first read needs no manifest GET of its own and
    reads the version that was checked: here the object is replaced in the store after the
    check, and the read still serves the checked version's bytes (within metadata_ttl, the
    version the mount knows, S-MAP-7)."""
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    data = pages(200, seed=21)
    await h.write_file("snap/f.img", data)
    fresh = await make_fs(local_store)
    ino = (await fresh.lookup("snap/f.img")).ino
    await fresh.fs.setxattr(ino, b"user.fusionfs.verify", b"quick")
    assert json.loads(fresh.fs.getxattr(ino, b"user.fusionfs.verify"))["ok"]
    await trio.to_thread.run_sync(local_store.inner.put, Key("snap/f.img"), b"replaced", {})
    gets = local_store.calls["get_range"]
    assert await fresh.read_file("snap/f.img") == data
    assert local_store.calls["get_range"] > gets  # the packs were read, not a cache


@pytest.mark.timeout(60)
async def test_a_file_whose_packs_were_set_aside_is_read_from_the_fossils(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """A pack that garbage collection set aside (a dump reused its chunks meanwhile) is still
    read, through the core, from its fossil."""
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    data = pages(300, seed=13)
    await h.write_file("snap/f.img", data)
    inner = local_store.inner
    manifest = await trio.to_thread.run_sync(read_manifest, inner, Key("snap/f.img"))
    for pack in manifest.packs():
        await trio.to_thread.run_sync(
            inner.copy, pack_key(pack), pack_key(pack, FOSSILS_PREFIX), {}
        )
        await trio.to_thread.run_sync(inner.delete, pack_key(pack))
    assert await packs(h) == []
    fresh = await make_fs(local_store)
    assert await fresh.read_file("snap/f.img") == data


@pytest.mark.timeout(60)
async def test_gc_control_frees_the_packs_of_removed_files(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """S-CHUNK-7: two runs a grace period apart free packs no manifest references."""
    h = await make_fs(any_store)
    await chunked_dir(h, "snaps")
    await h.write_file("snaps/keep.img", pages(100, seed=9))
    await h.write_file("snaps/gone.img", pages(100, seed=10))
    assert len(await packs(h)) == 2
    await h.unlink("snaps/gone.img")
    root = 1
    await h.fs.setxattr(root, b"user.fusionfs.gc", b"3600")
    first = json.loads(h.fs.getxattr(root, b"user.fusionfs.gc"))
    assert first["referenced"] == 1 and first["kept_young"] == 1 and first["fossilized"] == 0
    await trio.sleep(1.1)  # S3 LastModified has one-second resolution
    await h.fs.setxattr(root, b"user.fusionfs.gc", b"0")
    assert json.loads(h.fs.getxattr(root, b"user.fusionfs.gc"))["fossilized"] == 1
    assert len(await packs(h)) == 1
    await trio.sleep(1.1)  # the same: a wall-clock resolution, not synchronisation
    await h.fs.setxattr(root, b"user.fusionfs.gc", b"0")
    last = json.loads(h.fs.getxattr(root, b"user.fusionfs.gc"))
    assert last["deleted"] == 1 and last["missing"] == 0
    fresh = await make_fs(any_store)
    assert await fresh.read_file("snaps/keep.img") == pages(100, seed=9)
    assert await fresh.listdir("") == ["snaps"]


@pytest.mark.timeout(60)
async def test_a_write_behind_the_streamed_part_restarts_the_stream_at_commit(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """A byte already fed to the chunk writer changes: the commit feeds the file again whole."""
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    data = bytearray(random.Random(11).randbytes(24 * MiB))
    fh = await h.create("snap/f.img")
    for off in range(0, len(data), MiB):
        await h.write(fh, off, bytes(data[off : off + MiB]))

    async def a_pack() -> bool:
        return bool(await packs(h))

    await wait_until(a_pack, 20, "the stream to feed (and pack) the head")
    await h.write(fh, 5, b"rewritten")
    data[5:14] = b"rewritten"
    await h.close(fh)
    fresh = await make_fs(local_store)
    assert await fresh.read_file("snap/f.img", block=MiB) == bytes(data)


@pytest.mark.timeout(90)
async def test_writes_wait_for_a_lagging_chunk_feed_instead_of_reading_back_staging(
    make_fs: FsFactory, local_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S-CHUNK-9: while the packs cannot go out, a new file's writes are held back once the
    chunk feed is a window behind, so the feed takes every byte from memory, never from the
    staging file; nothing is lost and the file commits whole once the store answers."""
    h = await make_fs(local_store)
    await chunked_dir(h, "snap")
    staged_reads: list[int] = []
    real_pread = os.pread

    def spy(fd: int, length: int, off: int) -> bytes:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(h.staging_dir)):
                staged_reads.append(length)
        return real_pread(fd, length, off)

    monkeypatch.setattr(os, "pread", spy)
    local_store.stall("put")
    data = random.Random(12).randbytes(192 * MiB)
    fh = await h.create("snap/pages-1.img")
    written = 0

    async def write_all() -> None:
        nonlocal written
        for off in range(0, len(data), MiB):
            await h.write(fh, off, data[off : off + MiB])
            written = off + MiB

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_all)
        # the writer stops moving while the packs cannot go out. What is tested is that it
        # stops, i.e. that it does not move for a second: the sleep below is that second, not
        # a wait for something to happen
        with trio.fail_after(40):
            last = -1
            while written != last:
                last = written
                await trio.sleep(1.0)
        assert 0 < written < len(data)
        local_store.release("put")
    await h.close(fh)
    assert staged_reads == []
    fresh = await make_fs(local_store)
    assert await fresh.read_file("snap/pages-1.img", block=4 * MiB) == data
