"""Rules of docs/SEMANTICS.md that no other test enforced, checked on the core without a kernel.

Each test names the rule it enforces (``[S-..]`` in its docstring; ``tests/unit/
test_semantics_doc.py`` keeps every rule quoted) and asserts what would break with it: the
objects in the store (through ``FaultyStore.inner``, what another client sees), the store calls
made (``FaultyStore.calls``), and the errors the kernel would be answered with (``errno_for``).
Where the rule is about what ``ops`` tells the kernel (entry lifetimes), the test calls
``FusionOperations`` over the harness's ``Filesystem``, without a mount.

Caveats: waits for a metadata TTL to pass poll the event itself (a lookup that finds the new
version) with a deadline; the harness's TTLs are short (0.2 s) so that these stay fast.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pyfuse3
import pytest
import trio
from fs_harness import CHUNK, FsFactory, data_of

from fusionfs import staging, writer
from fusionfs.errors import (
    InvalidArgument,
    NameTooLong,
    NoData,
    NotEmpty,
    OperationNotSupported,
    Stale,
    UploadFailed,
    errno_for,
)
from fusionfs.fs import ROOT_INODE, Kind
from fusionfs.ops import FusionOperations
from fusionfs.store import FaultyStore, Key, LocalStore, NotFound, Transient

_RENAME_EXCHANGE = 2  # linux/fs.h
# what the kernel's request would carry; the operations called here do not read it
_NO_CTX = cast(pyfuse3.RequestContext, None)


async def _eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


async def _head(store: FaultyStore, key: str) -> Any:
    """The object's ``ObjectInfo`` in the store, or None."""
    try:
        return await trio.to_thread.run_sync(store.inner.head, Key(key))
    except NotFound:
        return None


async def _errno(call: Awaitable[object]) -> int | None:
    try:
        await call
    except Exception as e:
        return errno_for(e)
    raise AssertionError("the call did not fail")


# -- key and path mapping -----------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_mkdir_makes_a_marker_that_keeps_an_empty_directory_and_rmdir_removes_it(
    make_fs: FsFactory, s3_store: FaultyStore
) -> None:
    """[S-MAP-2] A directory exists when some key starts with ``a/``; ``mkdir`` creates the
    zero-byte marker ``a/`` so that an empty directory survives; ``rmdir`` deletes it."""
    h = await make_fs(s3_store)
    await h.mkdir("empty")
    marker = await _head(s3_store, "empty/")
    assert marker is not None and marker.size == 0
    # another client (a fresh mount) sees the empty directory, from the marker alone
    h2 = await make_fs(s3_store)
    assert (await h2.listdir_kinds(""))["empty"] is Kind.DIR
    assert (await h2.stat("empty")).kind is Kind.DIR
    assert await h2.listdir("empty") == []
    await h2.rmdir("empty")
    assert await _head(s3_store, "empty/") is None
    # a key below a name makes a directory of it, with no marker at all
    await h2.put("implied/deeper/f", b"x")
    assert await _head(s3_store, "implied/") is None
    h3 = await make_fs(s3_store)
    assert (await h3.stat("implied")).kind is Kind.DIR
    assert (await h3.stat("implied/deeper")).kind is Kind.DIR
    assert await h3.listdir("implied") == ["deeper"]


@pytest.mark.timeout(30)
async def test_keys_that_cannot_be_names_are_not_listed_and_long_paths_are_enametoolong(
    make_fs: FsFactory, s3_store: FaultyStore
) -> None:
    """[S-MAP-4] Keys with an empty, ``.``, ``..`` or over-255-byte component are not listed;
    names must be UTF-8 (EINVAL), a name over 255 bytes or a path whose key would pass S3's
    1024 bytes is ENAMETOOLONG."""
    h = await make_fs(s3_store)
    for key in ("d/ok", "d/.", "d/..", "d/./x", "d/../y", "d//z", f"d/{'n' * 256}"):
        await h.put(key, b"v")
    assert await h.listdir("d") == ["ok"]
    d = await h.lookup("d")
    uid, gid = os.getuid(), os.getgid()
    bad_utf8 = b"caf\xe9"
    assert (
        await _errno(h.fs.create(d.ino, bad_utf8, stat.S_IFREG | 0o644, uid, gid)) == errno.EINVAL
    )
    assert await _errno(h.fs.mkdir(d.ino, b"n" * 256, 0o755, uid, gid)) == errno.ENAMETOOLONG
    # 4 levels of 250-byte names: 1006 bytes of key; a fifth name passes 1024
    path = "d"
    for i in range(4):
        path += "/" + str(i) * 250
        await h.mkdir(path)
    deep = await h.lookup(path)
    with pytest.raises(NameTooLong):
        await h.fs.create(deep.ino, b"x" * 30, stat.S_IFREG | 0o644, uid, gid)
    with pytest.raises(NameTooLong):
        await h.fs.mkdir(deep.ino, b"x" * 30, 0o755, uid, gid)
    # a name that still fits is fine
    fh = await h.create(path + "/fits")
    await h.close(fh)
    assert await _head(s3_store, path + "/fits") is not None


@pytest.mark.timeout(30)
async def test_attributes_live_in_user_metadata_and_default_without_it(
    make_fs: FsFactory, s3_store: FaultyStore
) -> None:
    """[S-MAP-6] ``mode``, ``uid``, ``gid`` are user metadata (s3fs's names); ``mtime`` is the
    object's LastModified unless ``utimens`` stored it as ``mtime`` (decimal seconds, exact to
    the nanosecond); objects without metadata are 0644 (directories 0755), owned by the user
    who mounted."""
    h = await make_fs(s3_store)
    await h.put("plain", b"from another tool")
    await h.put("dir/inner", b"x")
    info = await _head(s3_store, "plain")
    f = await h.stat("plain")
    assert (f.mode, f.uid, f.gid) == (0o644, os.getuid(), os.getgid())
    assert f.mtime_ns == info.mtime_ns  # LastModified
    d = await h.stat("dir")
    assert (d.kind, d.mode, d.uid, d.gid) == (Kind.DIR, 0o755, os.getuid(), os.getgid())

    await h.fs.setattr(f.ino, mode=0o640, uid=1234, gid=4321)
    mtime = 1_500_000_000_123_456_789
    await h.fs.setattr(f.ino, mtime_ns=mtime)
    md = (await _head(s3_store, "plain")).metadata
    assert md["mode"] == str(stat.S_IFREG | 0o640)
    assert (md["uid"], md["gid"]) == ("1234", "4321")
    assert md["mtime"] == "1500000000.123456789"
    # an object whose metadata another tool wrote (s3fs) is read by the same names
    await h.put(
        "s3fs-made",
        b"y",
        {
            "mode": str(stat.S_IFREG | 0o600),
            "uid": "7",
            "gid": "8",
            "mtime": "1234567890.000000001",
        },
    )
    h2 = await make_fs(s3_store)
    other = await h2.stat("s3fs-made")
    assert (other.mode, other.uid, other.gid, other.mtime_ns) == (
        0o600,
        7,
        8,
        1_234_567_890_000_000_001,
    )
    assert (await h2.stat("plain")).mtime_ns == mtime


# -- reads -------------------------------------------------------------------------------------


class _RangeRecorder(FaultyStore):
    """Remembers the byte range of every GET."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.ranges: list[tuple[int, int]] = []

    def get_range(self, key: Key, start: int, length: int, etag: Any = None) -> bytes:
        self.ranges.append((start, start + length))
        return super().get_range(key, start, length, etag)

    def get_into(self, key: Key, start: int, length: int, out: Any, etag: Any = None) -> int:
        self.ranges.append((start, start + length))
        return super().get_into(key, start, length, out, etag)


@pytest.mark.timeout(30)
async def test_a_read_fetches_only_the_chunks_it_touches_and_caches_them(
    make_fs: FsFactory, tmp_path: os.PathLike[str]
) -> None:
    """[S-READ-1] ``read`` fetches only the chunks it touches, with ranged GETs, and keeps them
    in the on-disk cache for later reads and later mounts on the same cache directory."""
    root = os.path.join(tmp_path, "ranges-store")
    os.mkdir(root)
    store = _RangeRecorder(LocalStore(root))
    h = await make_fs(store)
    data = data_of(32 * CHUNK, seed=21)
    await h.put("big", data)
    fh = await h.open("big")
    lo, hi = 10 * CHUNK, 12 * CHUNK
    assert await h.read(fh, lo, hi - lo) == data[lo:hi]
    assert store.ranges, "nothing was fetched"
    for start, end in store.ranges:
        assert lo <= start < end <= hi, (start, end, "outside the chunks the read touched")
    assert sum(end - start for start, end in store.ranges) == hi - lo
    await h.close(fh)
    etag = (await h.stat("big")).etag
    assert etag is not None

    def cached() -> bool:
        return all(h.cache.contains(Key("big"), etag, CHUNK, i) for i in (10, 11))

    with trio.fail_after(5):
        while not cached():
            await trio.sleep(0.01)
    assert not h.cache.contains(Key("big"), etag, CHUNK, 9)
    await h.shutdown()
    # a later mount on the same cache directory reads them without a GET
    again = _RangeRecorder(LocalStore(root))
    h2 = await make_fs(again, cache_dir=h.cache_dir)
    fh = await h2.open("big")
    assert await h2.read(fh, lo + 5, 1000) == data[lo + 5 : lo + 1005]
    await h2.close(fh)
    assert again.ranges == []


@pytest.mark.timeout(30)
async def test_a_file_deleted_or_unlinked_while_open_is_estale_for_chunks_not_yet_read(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """[S-READ-3] [S-UNLINK-1] An open file reads the version it opened; once the object is
    deleted in the store, by another client or by ``unlink`` here, reads of chunks not cached
    fail with ESTALE, and what was read before is still served."""
    h = await make_fs(any_store)
    contents = {"oob": data_of(8 * CHUNK, seed=1), "mine": data_of(8 * CHUNK, seed=2)}
    for name, data in contents.items():
        await h.put(name, data)
    handles = {name: await h.open(name) for name in contents}
    for name, fh in handles.items():
        assert await h.read(fh, 0, 100) == contents[name][:100]
    await trio.to_thread.run_sync(any_store.inner.delete, Key("oob"))  # another client
    await h.unlink("mine")
    assert await _head(any_store, "mine") is None  # deleted at once
    for name, fh in handles.items():
        with pytest.raises(Stale):
            await h.read(fh, 5 * CHUNK, 100)  # not read before: never fetched
        assert await h.read(fh, 0, 100) == contents[name][:100]
        await h.close(fh)


@pytest.mark.timeout(30)
async def test_a_file_unlinked_while_open_for_writing_is_never_uploaded(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """[S-UNLINK-1] ``unlink`` deletes the object at once, and a file unlinked while open for
    writing is never uploaded: neither its close nor a flush of everything brings it back."""
    h = await make_fs(any_store)
    await h.write_file("existing", b"old bytes")
    fh_old = await h.open("existing", os.O_WRONLY)
    await h.write(fh_old, 0, b"new")
    fh_new = await h.create("fresh")
    await h.write(fh_new, 0, data_of(3 * CHUNK, seed=3))
    puts = any_store.calls["put"] + any_store.calls["create_multipart"]
    await h.unlink("existing")
    await h.unlink("fresh")
    assert await _head(any_store, "existing") is None
    await h.close(fh_old)
    await h.close(fh_new)
    await h.fs.flush_all()
    assert await _head(any_store, "existing") is None
    assert await _head(any_store, "fresh") is None
    assert any_store.calls["put"] + any_store.calls["create_multipart"] == puts
    assert await h.listdir("") == []


# -- writes ------------------------------------------------------------------------------------


@pytest.mark.allow_logs("staging", "not yet durable", "close failed")
@pytest.mark.timeout(30)
async def test_a_failed_write_to_the_staging_file_is_eio_at_the_next_write_and_at_close(
    make_fs: FsFactory, local_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[S-WRITE-1] A failure to write the staging file (a full disk) is reported by the next
    ``write``, ``fsync`` or ``close`` as EIO (never a silent loss), and nothing is committed."""
    h = await make_fs(local_store)
    real_batch = staging.write_batch
    failures: list[int] = []

    def full_disk(fd: int, batch: Any, dfd: int = -1) -> bool:
        failures.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    fh = await h.create("f")
    monkeypatch.setattr(staging, "write_batch", full_disk)
    # past what a new file may hold in memory (S-WRITE-9): its writes go to the staging file
    data = data_of(writer._HOLD_MAX + 4 * CHUNK, seed=7)
    failed_write = None
    for off in range(0, len(data), 2 * CHUNK):
        try:
            await h.write(fh, off, data[off : off + 2 * CHUNK])
        except UploadFailed as e:  # the failure may be reported by a write already
            failed_write = e
            break
    with trio.fail_after(5):  # the staging file is written in the background
        while not failures:
            await trio.sleep(0.01)
    # the calls after the failure report it
    with pytest.raises(UploadFailed) as info:
        await h.fs.fsync(fh)
    assert errno_for(info.value) == errno.EIO
    assert failed_write is None or errno_for(failed_write) == errno.EIO
    with pytest.raises(UploadFailed):
        await h.write(fh, 0, b"more")
    monkeypatch.setattr(staging, "write_batch", real_batch)
    with pytest.raises(UploadFailed) as info:
        await h.close(fh)
    assert errno_for(info.value) == errno.EIO
    assert await _head(local_store, "f") is None


@pytest.mark.timeout(30)
async def test_writers_on_one_machine_see_each_other_and_the_last_commit_wins_whole(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """[S-WRITE-6] Writers on one machine see each other's writes at once (before any close);
    concurrent writers on two machines: the last commit wins, whole."""
    h = await make_fs(any_store)
    writer_fh = await h.create("shared")
    reader_fh = await h.open("shared", os.O_RDWR)
    await h.write(writer_fh, 0, b"written, not closed")
    assert await h.read(reader_fh, 0, 100) == b"written, not closed"
    await h.write(reader_fh, 0, b"WRITTEN")
    assert await h.read(writer_fh, 0, 100) == b"WRITTEN, not closed"
    await h.close(reader_fh)
    await h.close(writer_fh)

    other = await make_fs(any_store)  # another machine
    first, second = data_of(3 * CHUNK, seed=4), data_of(2 * CHUNK + 7, seed=5)
    fh_a = await h.open("shared", os.O_WRONLY | os.O_TRUNC)
    fh_b = await other.open("shared", os.O_WRONLY | os.O_TRUNC)
    await h.write(fh_a, 0, first)
    await other.write(fh_b, 0, second)
    await other.close(fh_b)
    assert await h.get("shared") == second
    await h.close(fh_a)  # the later commit
    assert await h.get("shared") == first


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.allow_logs("no answer from the store", "fetching stuck chunks")
@pytest.mark.timeout(30)
async def test_a_stalled_store_call_is_eio_in_time_and_other_requests_answer_meanwhile(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-FAIL-2] A store call that does not answer within the store timeout fails its request
    with EIO, and the filesystem stays responsive meanwhile: requests that need another call
    of the store, or none, are answered while it hangs."""
    h = await make_fs(local_store, store_timeout=2.0)
    await h.put("stuck", data_of(2 * CHUNK, seed=8))
    await h.write_file("other", b"other file")
    fh = await h.open("stuck")
    local_store.stall("get_range")  # the store never answers a GET
    failed: list[BaseException] = []
    done = trio.Event()

    async def stuck_read() -> None:
        try:
            await h.read(fh, 0, 100)
        except Exception as e:
            failed.append(e)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck_read)
        with trio.fail_after(5):
            while local_store.waiting("get_range") < 1:
                await trio.sleep(0.01)
        start = trio.current_time()
        with trio.fail_after(1.0):  # well within the 2 s the stuck read is allowed
            assert sorted(await h.listdir("")) == ["other", "stuck"]
            assert (await h.stat("other")).size == len(b"other file")
            await h.write_file("new", b"made while the GET hangs")
        assert not done.is_set()
        with trio.fail_after(5):
            await done.wait()
        elapsed = trio.current_time() - start
    assert len(failed) == 1 and errno_for(failed[0]) == errno.EIO, failed
    assert elapsed < 3.0, elapsed
    local_store.release("get_range")
    await h.close(fh)


# -- directories and consistency ------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_listing_is_fetched_whole_at_the_start_of_a_pass_and_used_for_all_of_it(
    make_fs: FsFactory, local_store: FaultyStore
) -> None:
    """[S-DIR-1] A directory read from its start fetches its whole listing (every page), and
    the rest of that ``readdir`` pass uses it: no LIST after the first call, and an object
    created meanwhile is not in this pass (the next pass has it)."""
    h = await make_fs(local_store, metadata_ttl=0.05)
    names = [f"e{i:04d}" for i in range(2100)]  # three LIST pages
    store = local_store.inner
    await trio.to_thread.run_sync(lambda: [store.put(Key(f"d/{n}"), b"", None) for n in names])
    d = await h.lookup("d")
    fh = h.fs.opendir(d.ino)
    try:
        lists = local_store.calls["list"]
        first = await h.fs.readdir(fh, 0)
        assert local_store.calls["list"] - lists >= 3  # every page, at the first call
        lists = local_store.calls["list"]
        await h.put("d/a-late-comer", b"")
        seen = [n for n, _ in first]
        while True:
            batch = await h.fs.readdir(fh, len(seen))
            if not batch:
                break
            seen += [n for n, _ in batch]
        assert local_store.calls["list"] == lists
        assert [os.fsdecode(n) for n in seen] == names
    finally:
        h.fs.releasedir(fh)
    assert "a-late-comer" in await h.listdir("d")


@pytest.mark.timeout(30)
async def test_attributes_from_a_listing_alone_are_given_to_the_kernel_with_no_lifetime(
    make_fs: FsFactory, s3_store: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[S-CONS-3] An entry known only from a listing (no metadata yet: a directory in a
    READDIRPLUS reply) is handed to the kernel with a zero entry and attribute lifetime, so its
    next `stat` comes back to fusionfs, which asks the store (HEAD of the marker) and answers
    with the stored attributes, and the TTL from then on."""
    await trio.to_thread.run_sync(
        s3_store.inner.put, Key("d/"), b"", {"mode": str(stat.S_IFDIR | 0o700), "uid": "77"}
    )
    await trio.to_thread.run_sync(s3_store.inner.put, Key("d/f"), b"x", None)
    h = await make_fs(s3_store, metadata_ttl=30.0)
    ops = FusionOperations(h.fs)
    replies: dict[bytes, pyfuse3.EntryAttributes] = {}

    def readdir_reply(
        token: object, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int
    ) -> bool:
        replies[bytes(name)] = attrs
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)
    root = pyfuse3.InodeT(ROOT_INODE)
    fh = await ops.opendir(root, _NO_CTX)
    # READDIRPLUS: a LIST, no metadata for d yet
    await ops.readdir(fh, 0, cast(pyfuse3.ReaddirToken, None))
    await ops.releasedir(fh)
    listed = replies[b"d"]
    assert (listed.entry_timeout, listed.attr_timeout) == (0, 0)
    assert stat.S_IMODE(listed.st_mode) == 0o755  # the default: nothing better is known yet
    heads = s3_store.calls["head"]
    entry = await ops.lookup(root, pyfuse3.FileNameT(b"d"), _NO_CTX)  # the kernel's next stat
    assert s3_store.calls["head"] == heads + 1
    assert (stat.S_IMODE(entry.st_mode), entry.st_uid) == (0o700, 77)
    assert (entry.entry_timeout, entry.attr_timeout) == (30.0, 30.0)
    again = await ops.getattr(entry.st_ino, _NO_CTX)
    assert stat.S_IMODE(again.st_mode) == 0o700 and s3_store.calls["head"] == heads + 1


@pytest.mark.timeout(30)
async def test_a_new_version_made_elsewhere_gets_a_new_inode_and_an_open_file_keeps_its_own(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """[S-CONS-4] A new version of an object, made by another client, gets a new inode number
    when it is first seen (a stat of the old inode is ESTALE, so the kernel looks the name up
    again); a file still open keeps its inode and the version it opened."""
    h = await make_fs(any_store, metadata_ttl=0.2)
    await h.put("f", b"version one")
    await h.put("g", b"version one")
    f_old = await h.lookup("f")
    g_old = await h.lookup("g")
    fh = await h.open("f")
    assert await h.read(fh, 0, 100) == b"version one"
    await h.put("f", b"version two, longer")
    await h.put("g", b"version two, longer")

    async def g_is_stale() -> bool:
        try:
            await h.fs.getattr(g_old.ino)
        except Stale:
            return True
        return False

    await _eventually(g_is_stale, "a stat of g's old inode to be ESTALE")
    g_new = await h.stat("g")
    assert g_new.ino != g_old.ino and g_new.size == len(b"version two, longer")

    f_new = await h.stat("f")
    assert f_new.ino != f_old.ino and f_new.size == len(b"version two, longer")
    # the open file: its inode still answers, for the version it opened
    assert (await h.fs.getattr(f_old.ino)).size == len(b"version one")
    assert await h.read(fh, 0, 100) == b"version one"
    await h.close(fh)
    assert await h.read_file("f") == b"version two, longer"


# -- renames -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_rename_commits_unsaved_data_copies_with_metadata_and_refuses_exchange(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """[S-RENAME-1] Renaming a file commits it if it has unsaved data, copies it server-side to
    the new key with its metadata, and deletes the old key; ``RENAME_NOREPLACE`` is honoured
    and ``RENAME_EXCHANGE`` is EINVAL."""
    h = await make_fs(any_store)
    fh = await h.create("a", mode=0o600)
    data = data_of(2 * CHUNK + 5, seed=6)
    await h.write(fh, 0, data)
    copies = any_store.calls["copy"]
    await h.rename("a", "b")
    assert any_store.calls["copy"] == copies + 1  # server-side, not through this host
    assert await h.get("b") == data  # committed before the copy
    assert await _head(any_store, "a") is None
    await h.write(fh, len(data), b"!")  # the open file follows its new name
    await h.close(fh)
    assert await h.get("b") == data + b"!"
    h2 = await make_fs(any_store)
    assert (await h2.stat("b")).mode == 0o600  # metadata kept

    await h.write_file("c", b"c")
    with pytest.raises(InvalidArgument) as info:
        await h.rename("c", "b", flags=_RENAME_EXCHANGE)
    assert errno_for(info.value) == errno.EINVAL
    assert await _errno(h.rename("c", "b", flags=1)) == errno.EEXIST  # RENAME_NOREPLACE
    assert (await h.get("b"), await h.get("c")) == (data + b"!", b"c")


@pytest.mark.allow_logs("injected failure")
@pytest.mark.timeout(30)
async def test_a_directory_rename_copies_each_object_and_a_failure_deletes_nothing(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """[S-RENAME-2] Renaming a directory copies every object below it (one copy each), then
    deletes the old ones; a failure part-way deletes nothing, and leaves what was copied; onto
    a non-empty directory it is ENOTEMPTY."""
    h = await make_fs(any_store)
    tree = {f"d/f{i}": data_of(100 + i, seed=i) for i in range(6)} | {"d/sub/g": b"g"}
    for key, data in tree.items():
        await h.put(key, data)
    await h.mkdir("full")
    await h.write_file("full/x", b"x")
    with pytest.raises(NotEmpty):
        await h.rename("d", "full")
    assert all([await _head(any_store, k) is not None for k in tree])

    any_store.fail("copy", Transient, nth=4)
    with pytest.raises(Exception) as info:
        await h.rename("d", "e")
    assert errno_for(info.value) == errno.EIO
    for key, data in tree.items():
        assert await h.get(key) == data, f"{key} deleted by a failed rename"
        copied = await _head(any_store, "e" + key[1:])
        assert copied is None or await h.get("e" + key[1:]) == data

    objects = await trio.to_thread.run_sync(
        lambda: any_store.inner.list(Key("d/"), delimiter=None).objects
    )  # the files, and on a local store the directories below d too
    copies = any_store.calls["copy"]
    await h.rename("d", "e2")
    assert any_store.calls["copy"] - copies == len(objects) >= len(tree)
    for key, data in tree.items():
        assert await _head(any_store, key) is None
        assert await h.get("e2" + key[1:]) == data


# -- extended attributes ------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_extended_attributes_are_not_stored(
    make_fs: FsFactory, any_store: FaultyStore
) -> None:
    """[S-XATTR-1] ``setxattr`` of anything but a control attribute is EOPNOTSUPP (nothing is
    stored), ``getxattr`` of one is ENODATA, and a file lists none."""
    h = await make_fs(any_store)
    await h.write_file("f", b"content")
    await h.mkdir("d")
    before = await _head(any_store, "f")
    for path in ("f", "d", ""):
        ino = (await h.lookup(path)).ino
        with pytest.raises(OperationNotSupported) as info:
            await h.fs.setxattr(ino, b"user.comment", b"hello")
        assert errno_for(info.value) == errno.EOPNOTSUPP
        with pytest.raises(NoData) as nodata:
            h.fs.getxattr(ino, b"user.comment")
        assert errno_for(nodata.value) == errno.ENODATA
        assert h.fs.listxattr(ino) == []
    after = await _head(any_store, "f")
    assert (after.etag, after.metadata) == (before.etag, before.metadata)
