"""The fusionfs core under injected store faults (``FaultyStore``), without a kernel.

What must hold: a failing store call becomes an error that maps to an errno (never wrong bytes,
never a hang past ``store_timeout``); data that could not be made durable stays staged and a later
flush commits it; a server without UploadPartCopy still gets the right content; a daemon that died
leaves its staged data to be recovered, not uploaded; a byte flipped on the way from the store,
at rest in it, or in a cache file is EIO or fetched again, never served as the object's
(S-INTEG-2), where the object has a stored checksum (``FaultyStore.keep_checksums``).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import trio
from fs_harness import CHUNK, PART, FsFactory, KiB, data_of
from helpers import wait_until

from fusionfs import writer
from fusionfs.errors import UploadFailed, errno_for
from fusionfs.staging import recover_leftovers
from fusionfs.store import FaultyStore, Key, LocalStore, NotFound, NotSupported, Transient


async def _head_or_none(store: FaultyStore, key: str) -> object:
    try:
        return await trio.to_thread.run_sync(store.inner.head, Key(key))
    except NotFound:
        return None


# -- reads --------------------------------------------------------------------------------------


@pytest.mark.allow_logs("fetching f chunks")
@pytest.mark.timeout(30)
async def test_transient_get_error_is_eio_then_a_retry_reads_right(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    data = data_of(4 * CHUNK, seed=1)
    await h.put("f", data)
    fh = await h.open("f")
    any_store.fail("get_range", Transient, times=1)
    with pytest.raises(Exception) as info:
        await h.read(fh, CHUNK + 10, 1000)
    assert errno_for(info.value) == errno.EIO
    # the failure is not remembered: the next read fetches again and gets the right bytes
    assert await h.read(fh, CHUNK + 10, 1000) == data[CHUNK + 10 : CHUNK + 1010]
    await h.close(fh)
    assert await h.read_file("f") == data


@pytest.mark.allow_logs("fetching f chunks")
@pytest.mark.timeout(60)
async def test_random_get_errors_give_eio_or_right_bytes_never_wrong_ones(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-FAIL-1] what still fails after the store's retries reaches the caller as EIO, never as
    wrong bytes."""
    # no disk cache use across reads: read_memory small and a new object version per round
    h = await make_fs(local_store, read_memory=0)
    data = data_of(32 * CHUNK + 99, seed=2)
    await h.put("f", data)
    local_store.fail_rate("get_range", 0.3, Transient, seed=7)
    ok = failed = 0
    fh = await h.open("f")
    for i in range(200):
        off = (i * 104_729) % len(data)
        size = 1 + (i * 7_919) % (3 * CHUNK)
        try:
            got = await h.read(fh, off, size)
        except Exception as e:  # every failure must be a known, EIO-mapped error
            assert errno_for(e) == errno.EIO, repr(e)
            failed += 1
        else:
            assert got == data[off : off + size], (off, size)
            ok += 1
    local_store.clear()
    await h.close(fh)
    assert ok > 0 and failed > 0, (ok, failed)
    assert await h.read_file("f") == data


@pytest.mark.allow_logs("fetching f chunks", "no answer from the store")
@pytest.mark.timeout(30)
async def test_stalled_store_read_fails_within_call_timeout(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-FAIL-2] a store call that does not answer within the call timeout fails the read with EIO,
    and the file reads again once the store answers."""
    h = await make_fs(local_store, store_timeout=1.0)
    data = data_of(2 * CHUNK, seed=3)
    await h.put("f", data)
    fh = await h.open("f")
    local_store.stall("get_range")  # until released: the store never answers
    start = trio.current_time()
    with trio.fail_after(5):  # the guard: a hang fails here, not at the test timeout
        with pytest.raises(Transient) as info:
            await h.read(fh, 0, 100)
    elapsed = trio.current_time() - start
    assert 0.9 <= elapsed < 3.0, elapsed
    assert errno_for(info.value) == errno.EIO
    assert "no answer" in str(info.value)
    assert local_store.waiting("get_range") >= 1
    local_store.release("get_range")
    with trio.fail_after(5):
        assert await h.read(fh, 0, 100) == data[:100]
    await h.close(fh)


@pytest.mark.timeout(30)
async def test_stalled_store_listing_fails_within_call_timeout(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-FAIL-2] a LIST that does not answer in time is EIO, not a hang."""
    h = await make_fs(local_store, store_timeout=1.0)
    await h.put("f", b"x")
    local_store.stall("list")
    with trio.fail_after(5), pytest.raises(Transient) as info:
        await h.listdir("")
    assert errno_for(info.value) == errno.EIO
    local_store.clear()
    with trio.fail_after(5):
        assert await h.listdir("") == ["f"]


@pytest.mark.timeout(30)
async def test_store_error_during_lookup_maps_to_eio(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    await h.put("f", b"x")
    local_store.fail("head", Transient, times=1)
    with pytest.raises(Exception) as info:
        await h.lookup("f")
    assert errno_for(info.value) == errno.EIO, repr(info.value)


@pytest.mark.timeout(30)
async def test_stalled_store_lookup_fails_within_call_timeout_with_eio(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-FAIL-2] a HEAD that does not answer in time is EIO, not a hang."""
    h = await make_fs(local_store, store_timeout=1.0)
    await h.put("f", b"x")
    local_store.stall("head")
    with trio.fail_after(5), pytest.raises(Exception) as info:
        await h.lookup("f")
    assert errno_for(info.value) == errno.EIO, repr(info.value)


@pytest.mark.timeout(30)
async def test_store_error_during_directory_rename_maps_to_eio(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-RENAME-2] a directory rename that fails part-way deletes nothing."""
    h = await make_fs(local_store)
    await h.put("d/a", b"a")
    await h.put("d/b", b"b")
    local_store.fail("copy", Transient, times=1)
    with pytest.raises(Exception) as info:
        await h.rename("d", "e")
    assert errno_for(info.value) == errno.EIO, repr(info.value)
    # nothing was deleted: the old tree is whole
    assert sorted(await h.listdir("d")) == ["a", "b"]


@pytest.mark.allow_logs("not yet durable", "no answer from the store", "close failed")
@pytest.mark.timeout(30)
async def test_stalled_store_flush_fails_within_call_timeout_and_keeps_data(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-FAIL-2] [S-WRITE-2] a commit whose PUT does not answer in time makes close return EIO
    (within the call timeout), and the data stays staged for a later flush."""
    h = await make_fs(local_store, store_timeout=1.0)
    fh = await h.create("f")
    await h.write(fh, 0, b"precious")
    local_store.stall("put")
    with trio.fail_after(5):
        with pytest.raises(UploadFailed) as info:
            await h.close(fh)
    assert errno_for(info.value) == errno.EIO
    local_store.clear()
    await h.fs.flush_all()
    assert await h.get("f") == b"precious"


# -- integrity (S-INTEG-2, S-INTEG-3) ------------------------------------------------------------


async def _put_with_checksum(h: object, store: FaultyStore, key: str, data: bytes) -> None:
    """Write ``key`` through the wrapper that keeps checksums, as an upload through a server
    that keeps them would."""
    store.keep_checksums()
    await trio.to_thread.run_sync(store.put, Key(key), data, None)


async def _read_or_eio(h: object, path: str) -> bytes | None:
    """The whole file read sequentially, or None when the read failed with EIO."""
    try:
        return await h.read_file(path)  # type: ignore[attr-defined, no-any-return]
    except Exception as e:
        assert errno_for(e) == errno.EIO, repr(e)
        return None


async def _cached(h: object, key: str) -> bool:
    cache = h.cache  # type: ignore[attr-defined]
    etag = (await h.stat(key)).etag  # type: ignore[attr-defined]
    return any(cache.contains(Key(key), etag, CHUNK, i) for i in range(64))


@pytest.mark.allow_logs("does not match its stored checksum")
@pytest.mark.timeout(30)
async def test_corrupt_data_from_the_store_is_refetched_when_one_get_holds_the_object(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-INTEG-2: an object that one GET fetches whole (here 3 chunks, a request is 4) is
    checked before any byte is served or cached: a byte flipped on the way is fetched again,
    and the reader gets the right bytes. (Was ``test_corrupt_data_from_the_store_is_served_
    undetected``: the flipped byte was served, cached, and outlived a remount.)
    [S-FAIL-1b] plain objects with a stored checksum are checked end to end."""
    h = await make_fs(local_store)
    data = data_of(3 * CHUNK - 5, seed=4)
    await _put_with_checksum(h, local_store, "f", data)
    local_store.corrupt("get_range", times=1)
    assert await h.read_file("f") == data
    assert h.stats.checksum_mismatches == 1 and h.stats.objects_verified == 1
    await h.shutdown()
    h2 = await make_fs(local_store, cache_dir=h.cache_dir)
    assert await h2.read_file("f") == data  # what the cache kept is the right bytes


@pytest.mark.allow_logs("do not match the object's", "fetching f chunks")
@pytest.mark.timeout(30)
async def test_corrupt_data_from_the_store_fails_the_read_that_completes_the_file(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-INTEG-2: a file fetched in several GETs and read from start to end: the read that
    completes it fails with EIO when the bytes do not add up to the stored checksum, its
    chunks are dropped from memory and disk, and a re-read fetches them again: right bytes."""
    h = await make_fs(local_store)
    data = data_of(20 * CHUNK + 7, seed=5)
    await _put_with_checksum(h, local_store, "f", data)
    local_store.corrupt("get_range", times=1)
    fh = await h.open("f")
    with pytest.raises(Exception) as info:
        await h.read_fh(fh)
    assert errno_for(info.value) == errno.EIO
    assert h.stats.checksum_mismatches == 1
    assert not await _cached(h, "f")
    # the kernel retries a failed read-ahead page with a read of its own on the same handle:
    # it fails too (the pages before it hold bytes the check refused)
    with pytest.raises(Exception) as info:
        await h.read(fh, len(data) - 10, 10)
    assert errno_for(info.value) == errno.EIO
    await h.close(fh)
    assert await h.read_file("f") == data  # a new open: fetched again
    assert h.stats.objects_verified == 1


@pytest.mark.allow_logs(
    "does not match its stored checksum", "do not match the object's", "fetching f chunks"
)
@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunks", [3, 20])
async def test_an_object_corrupt_at_rest_is_eio_on_every_read_never_its_bytes(
    make_fs: FsFactory, local_store: FaultyStore, chunks: int
) -> None:
    """S-INTEG-2: the stored object has a byte flipped but keeps the original's checksum
    (corruption at rest): every whole read fails with EIO, however often it is retried, and a
    read of a small object serves none of its bytes."""
    h = await make_fs(local_store)
    data = data_of(chunks * CHUNK - 1, seed=6)
    await _put_with_checksum(h, local_store, "f", data)
    await trio.to_thread.run_sync(local_store.rot, Key("f"))
    for _ in range(2):
        assert await _read_or_eio(h, "f") is None
    if chunks == 3:
        fh = await h.open("f")
        with pytest.raises(Exception) as info:
            await h.read(fh, 0, 100)
        assert errno_for(info.value) == errno.EIO
        await h.close(fh)


@pytest.mark.allow_logs("do not match the object's")
@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunks", [1, 6])
async def test_a_byte_flipped_in_a_cache_file_is_eio_then_refetched(
    make_fs: FsFactory, local_store: FaultyStore, chunks: int
) -> None:
    """S-INTEG-2 over the disk cache: a byte flipped in a chunk file while no mount runs,
    after a clean shutdown (whose CLEAN marker spares the XXH3 pass, docs/design/cache.md):
    the read that completes the file fails with EIO, the cached chunks are dropped, the next
    read fetches the right bytes.
    [S-FAIL-1b] what the chunk cache holds is checked too: a flipped byte in it is never served as
    the object's."""
    h = await make_fs(local_store)
    data = data_of(chunks * CHUNK, seed=7)
    await _put_with_checksum(h, local_store, "f", data)
    assert await h.read_file("f") == data
    with trio.fail_after(5):
        while not await _cached(h, "f"):
            await trio.sleep(0.01)
    await h.shutdown()
    files = sorted(p for p in (h.cache_dir / "cache" / "chunks").rglob("*") if p.is_file())
    assert files
    for path in files:  # every chunk of the one object cached
        with open(path, "r+b") as f:
            f.seek(4096 + 100)
            byte = f.read(1)
            f.seek(4096 + 100)
            f.write(bytes([byte[0] ^ 0x01]))
    h2 = await make_fs(local_store, cache_dir=h.cache_dir)
    assert await _read_or_eio(h2, "f") is None
    assert h2.stats.checksum_mismatches == 1
    assert await h2.read_file("f") == data


@pytest.mark.timeout(30)
async def test_without_a_stored_checksum_corrupt_data_is_not_caught(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-INTEG-3, the limit: an object with no stored checksum (LocalStore keeps none; on
    S3 servers: objects another tool wrote to a server that keeps none) is served as it
    comes. Were a check added for these, this test would change."""
    h = await make_fs(local_store)
    data = data_of(CHUNK, seed=4)
    await h.put("f", data)
    local_store.corrupt("get_range", times=1)
    got = await h.read_file("f")
    assert [i for i in range(len(data)) if got[i] != data[i]] == [len(data) // 2]
    assert h.stats.checksum_mismatches == 0 and h.stats.objects_verified == 0


# -- writes -------------------------------------------------------------------------------------


@pytest.mark.allow_logs("close failed", "not yet durable")
@pytest.mark.timeout(30)
async def test_failed_put_at_flush_keeps_data_staged_until_a_later_flush(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    h = await make_fs(any_store)
    data = data_of(300 * KiB, seed=5)
    fh = await h.create("f")
    for off in range(0, len(data), 64 * KiB):
        await h.write(fh, off, data[off : off + 64 * KiB])
    any_store.fail("put", Transient, times=1)
    with pytest.raises(UploadFailed) as info:
        await h.fs.flush(fh)
    assert errno_for(info.value) == errno.EIO
    inode = await h.lookup("f")
    assert inode.staged is not None and inode.staged.dirty
    assert inode.staged.path.exists()
    assert await _head_or_none(any_store, "f") is None  # nothing half-visible
    assert await h.read(fh, 0, len(data)) == data  # still readable from staging

    await h.fs.flush(fh)  # the fault has cleared: the same handle's next flush commits
    await h.fs.release(fh)
    assert inode.staged is None
    assert await h.get("f") == data
    assert list(h.staging_dir.iterdir()) == []


@pytest.mark.allow_logs("not yet durable")
@pytest.mark.timeout(30)
async def test_failed_close_keeps_data_staged_and_flush_all_commits_it(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    local_store.fail("put", Transient, times=3)
    with pytest.raises(UploadFailed):
        await h.write_file("f", b"keep me")
    assert await _head_or_none(local_store, "f") is None
    assert (await h.stat("f")).size == 7  # still there, served from staging
    assert await h.read_file("f") == b"keep me"
    assert await h.listdir("") == ["f"]
    local_store.clear()
    await h.fs.flush_all()
    assert await h.get("f") == b"keep me"
    assert list(h.staging_dir.iterdir()) == []


@pytest.mark.allow_logs("not yet durable", "streaming upload of big failed")
@pytest.mark.timeout(60)
async def test_failed_multipart_completion_keeps_data_and_retries_right(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    data = data_of(2 * PART + 123 * KiB, seed=6)
    # the streamed upload's completion fails, and so does the whole-file fallback's
    local_store.fail("complete_multipart", Transient, times=2)
    with pytest.raises(UploadFailed):
        await h.write_file("big", data)
    assert await _head_or_none(local_store, "big") is None
    local_store.clear()
    await h.fs.flush_all()
    assert await h.get("big") == data
    assert await h.read_file("big") == data
    # the failed uploads were aborted, not left to hold parts in the store
    with trio.fail_after(5):
        while local_store.calls["abort_multipart"] < 2:
            await trio.sleep(0.01)
    uploads = os.path.join(local_store.inner.root, ".fusionfs-tmp", "uploads")  # type: ignore[attr-defined]
    assert not os.path.isdir(uploads) or os.listdir(uploads) == []


@pytest.mark.timeout(60)
async def test_no_upload_part_copy_falls_back_to_uploading(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    # s3rver answers 501 to UploadPartCopy: the unchanged parts must then be uploaded
    h = await make_fs(local_store)
    base = data_of(2 * PART + 7 * CHUNK + 5, seed=7)  # three parts
    await h.put("big", base)
    local_store.fail("upload_part_copy", NotSupported, times=100)
    fh = await h.open("big", os.O_WRONLY | os.O_APPEND)
    tail = data_of(200 * KiB, seed=8)
    await h.write(fh, len(base), tail)
    await h.close(fh)
    assert local_store.calls["upload_part_copy"] >= 1
    assert h.uploader.part_copy_supported is False
    assert local_store.calls["upload_part"] >= 3
    assert await h.get("big") == base + tail
    h2 = await make_fs(local_store)
    assert await h2.read_file("big") == base + tail


# -- crash recovery -----------------------------------------------------------------------------


@pytest.mark.allow_logs("unsaved data")
@pytest.mark.timeout(60)
async def test_crash_recovery_keeps_staged_data_and_aborts_the_upload(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-DUR-2] data not acknowledged when the daemon died is moved to CACHE_DIR/recovered/ by the
    next start on that cache directory, reported, not uploaded; the multipart upload it had started
    is aborted."""
    h = await make_fs(local_store)
    big = data_of(2 * PART + 50 * KiB, seed=9)
    fh = await h.create("big")
    for off in range(0, len(big), 128 * KiB):
        await h.write(fh, off, big[off : off + 128 * KiB])
    small_fh = await h.create("small")
    await h.write(small_fh, 0, b"small and unsaved")
    held_at = trio.current_time()
    records: dict[str, dict[str, object]] = {}
    # the streaming upload has started and its id is on record; the small file, held in
    # memory at first, is staged with its record within writer._HOLD_S
    with trio.fail_after(5):
        while local_store.calls["upload_part"] < 2 or set(records) != {"big", "small"}:
            await trio.sleep(0.01)
            records = {}
            for p in h.staging_dir.glob("*.json"):
                record = json.loads(p.read_text())
                records[record["key"]] = record
    assert trio.current_time() - held_at < writer._HOLD_S + 1
    upload_id = records["big"]["upload_id"]
    assert upload_id
    assert records["small"]["upload_id"] is None

    # the daemon dies: nothing is flushed, the files are never closed
    await h.shutdown()
    uploads = os.path.join(local_store.inner.root, ".fusionfs-tmp", "uploads")  # type: ignore[attr-defined]
    assert os.listdir(uploads) != []

    # the next start on the same cache directory recovers
    aborts = local_store.calls["abort_multipart"]
    h2 = await make_fs(local_store, cache_dir=h.cache_dir)
    assert len(h2.recovered) == 2
    assert any("'big'" in m for m in h2.recovered)
    assert local_store.calls["abort_multipart"] == aborts + 1
    assert os.listdir(uploads) == []
    assert list(h2.staging_dir.iterdir()) == []
    recovered = h.cache_dir / "recovered"
    kept = {}
    for p in recovered.glob("*.json"):
        record = json.loads(p.read_text())
        kept[record["key"]] = (recovered / record["data"]).read_bytes()
    assert kept == {"big": big, "small": b"small and unsaved"}
    # not uploaded: that could overwrite a newer version written elsewhere
    assert await h2.listdir("") == []
    assert await _head_or_none(local_store, "big") is None


@pytest.mark.timeout(30)
def test_recover_leftovers_with_a_broken_record(tmp_path: Path) -> None:
    staging = os.path.join(tmp_path, "staging")
    os.mkdir(staging)
    with open(os.path.join(staging, "abc.json"), "w") as f:
        f.write("{not json")
    with open(os.path.join(staging, "abc.data"), "wb") as f:
        f.write(b"orphan bytes")
    with open(os.path.join(staging, "stray.tmp"), "wb") as f:
        f.write(b"junk")
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    store = FaultyStore(LocalStore(root))
    messages = recover_leftovers(Path(staging), Path(tmp_path) / "recovered", store)
    assert len(messages) == 1 and "'?'" in messages[0]
    assert os.listdir(staging) == []
    assert (Path(tmp_path) / "recovered" / "abc.data").read_bytes() == b"orphan bytes"
    assert store.calls["abort_multipart"] == 0


@pytest.mark.allow_logs("not yet durable")
@pytest.mark.timeout(60)
async def test_failed_part_of_a_rewrite_is_upload_failed_and_kept(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    h = await make_fs(local_store)
    size = 2 * PART + 3 * CHUNK
    expected = bytearray(data_of(size, seed=11))
    await h.put("big", bytes(expected))
    fh = await h.open("big", os.O_WRONLY)
    await h.write(fh, PART + 100, b"changed")  # part 2 changes: uploaded, parts 1, 3 copied
    expected[PART + 100 : PART + 107] = b"changed"
    local_store.fail("upload_part", Transient, times=1)
    with pytest.raises(UploadFailed):
        await h.fs.flush(fh)
    await h.fs.flush(fh)
    await h.fs.release(fh)
    assert await h.get("big") == bytes(expected)


@pytest.mark.allow_logs("not yet durable")
@pytest.mark.timeout(30)
async def test_a_failed_commit_keeps_its_directory_known_when_the_kernel_forgets_both(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-FAIL-3: data whose commit failed stays staged and is retried; the kernel may forget
    the file and its directory meanwhile, and the retry must still find the file's key (it
    was a KeyError that ended the daemon: pjdfstest open/25.t's 2 GiB upload on moto, then
    the retry after its directory was forgotten)."""
    h = await make_fs(local_store)
    d = await h.mkdir("d")
    fh = await h.create("d/f")
    await h.write(fh, 0, b"kept")
    local_store.fail("put", Transient, times=1)
    with pytest.raises(UploadFailed):
        await h.fs.flush(fh)
    await h.fs.release(fh)
    f = await h.lookup("d/f")
    h.fs.forget([(f.ino, f.lookups)])
    h.fs.forget([(d.ino, d.lookups)])  # the kernel forgets the directory after the file
    await h.fs.flush_all()
    assert await h.get("d/f") == b"kept"
    assert await h.read_file("d/f") == b"kept"


@pytest.mark.allow_logs("not yet durable", "d/f: still not durable")
@pytest.mark.timeout(30)
async def test_the_retry_loop_commits_what_a_close_could_not_with_no_flush_asked(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """S-FAIL-3: a failed commit leaves the data staged; it is retried in the background until
    it is in, even after the kernel forgot the file and its directory. Nothing here asks for a
    flush after the failed close: only the core's retry loop (started by ``build_core``) can
    make the file durable, and its first retry fails too."""
    h = await make_fs(local_store, retry_interval=0.2)
    d = await h.mkdir("d")
    puts = local_store.calls["put"]
    local_store.fail("put", Transient, times=2)  # the close, then the first retry
    with pytest.raises(UploadFailed):
        await h.write_file("d/f", b"kept by the retry loop")
    assert await _head_or_none(local_store, "d/f") is None
    f = await h.lookup("d/f")
    h.fs.forget([(f.ino, f.lookups)])
    h.fs.forget([(d.ino, d.lookups)])

    async def committed() -> bool:
        return await _head_or_none(local_store, "d/f") is not None

    await wait_until(committed, 10, "the retry loop to commit d/f")
    assert local_store.calls["put"] == puts + 3  # the close, a failed retry, the one that worked
    assert await h.get("d/f") == b"kept by the retry loop"
    await wait_until(lambda: not list(h.staging_dir.iterdir()), 10, "d/f to leave staging")
    assert await h.read_file("d/f") == b"kept by the retry loop"
