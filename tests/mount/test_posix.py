"""POSIX behaviour of a real fusionfs mount, driven with plain ``os`` calls.

Each test mounts a local directory and/or a bucket on the moto S3 server in a subprocess
(``fusion_mount`` from tests/conftest.py) and checks the result both through the mount and
out of band (the directory itself, or boto3), which is what another machine would see.

Caveats: the daemon's own log is not checked for warnings (it is another process); timing-based
checks (metadata TTL) poll with a bound instead of sleeping a fixed time; the CLI error tests
run ``fusionfs mount`` without ``--foreground`` so the forking path and its error report are
what is tested.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, missing, wait_for
from mount_support import Target, cli, cli_env, is_mounted, stats

pytestmark = pytest.mark.mount

MiB = 1 << 20


def _mount(fusion_mount: Any, target: Target, *extra: str, cache_dir: Path | None = None) -> Any:
    return fusion_mount(target.source, (*target.mount_args, *extra), cache_dir=cache_dir)


def _errno_of(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except OSError as err:
        assert err.errno is not None
        return err.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args!r} did not fail")


def _blob(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ at every offset (so a shifted or spliced read is caught)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


# --------------------------------------------------------------------------------------------
# basic file and directory operations


@pytest.mark.timeout(60)
def test_create_write_read_back(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    data = _blob(300_000)
    (m.path / "f.bin").write_bytes(data)
    (m.path / "empty").write_bytes(b"")
    assert (m.path / "f.bin").read_bytes() == data
    assert os.stat(m.path / "f.bin").st_size == len(data)
    assert (m.path / "empty").read_bytes() == b""
    assert sorted(os.listdir(m.path)) == ["empty", "f.bin"]
    assert target.get("f.bin") == data
    assert target.get("empty") == b""
    m.remount(fresh_cache=True)
    assert (m.path / "f.bin").read_bytes() == data


@pytest.mark.timeout(120)
def test_listing_of_1000_plus_objects_made_out_of_band(fusion_mount: Any, target: Target) -> None:
    names = {f"obj-{i:05d}" for i in range(1234)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: target.put(f"big/{n}", n.encode()), sorted(names)))
    target.put("big/sub/inner", b"x")
    m = _mount(fusion_mount, target)
    listed = os.listdir(m.path / "big")
    assert len(listed) == len(set(listed)), "duplicate entries in the listing"
    assert set(listed) == names | {"sub"}
    assert (m.path / "big" / "obj-01233").read_bytes() == b"obj-01233"
    assert stat.S_ISDIR(os.stat(m.path / "big" / "sub").st_mode)
    with os.scandir(m.path / "big") as entries:
        assert sum(1 for _ in entries) == len(names) + 1


@pytest.mark.timeout(60)
def test_mkdir_rmdir(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    d = m.path / "d"
    os.mkdir(d)
    assert stat.S_ISDIR(os.stat(d).st_mode)
    assert _errno_of(os.mkdir, d) == errno.EEXIST
    (d / "inner.txt").write_bytes(b"inner")
    assert _errno_of(os.rmdir, d) == errno.ENOTEMPTY
    assert (d / "inner.txt").read_bytes() == b"inner", "a failed rmdir lost a file"
    os.unlink(d / "inner.txt")
    os.rmdir(d)
    assert "d" not in os.listdir(m.path)
    assert _errno_of(os.stat, d) == errno.ENOENT
    assert target.keys("d") == set()
    assert _errno_of(os.rmdir, m.path / "nope") == errno.ENOENT
    (m.path / "file").write_bytes(b"")
    assert _errno_of(os.rmdir, m.path / "file") == errno.ENOTDIR


@pytest.mark.timeout(60)
def test_rmdir_of_directory_with_out_of_band_child(fusion_mount: Any, target: Target) -> None:
    target.put("d/x", b"x")
    m = _mount(fusion_mount, target)
    assert _errno_of(os.rmdir, m.path / "d") == errno.ENOTEMPTY
    assert target.get("d/x") == b"x"


@pytest.mark.timeout(60)
def test_unlink(fusion_mount: Any, target: Target) -> None:
    target.put("oob.txt", b"made elsewhere")
    m = _mount(fusion_mount, target)
    (m.path / "mine.txt").write_bytes(b"mine")
    os.unlink(m.path / "mine.txt")
    os.unlink(m.path / "oob.txt")
    assert os.listdir(m.path) == []
    assert _errno_of(os.stat, m.path / "mine.txt") == errno.ENOENT
    assert _errno_of(os.unlink, m.path / "mine.txt") == errno.ENOENT
    assert target.get("mine.txt") is None
    assert target.get("oob.txt") is None
    os.mkdir(m.path / "dir")
    assert _errno_of(os.unlink, m.path / "dir") in (errno.EISDIR, errno.EPERM)


@pytest.mark.timeout(60)
def test_rename_file(fusion_mount: Any, target: Target) -> None:
    target.put("old.txt", b"old content")
    target.put("victim.txt", b"replaced")
    m = _mount(fusion_mount, target)
    os.rename(m.path / "old.txt", m.path / "new.txt")
    assert (m.path / "new.txt").read_bytes() == b"old content"
    assert _errno_of(os.stat, m.path / "old.txt") == errno.ENOENT
    # over an existing file, and into a directory
    os.mkdir(m.path / "d")
    os.rename(m.path / "new.txt", m.path / "victim.txt")
    os.rename(m.path / "victim.txt", m.path / "d" / "moved.txt")
    assert sorted(os.listdir(m.path)) == ["d"]
    assert (m.path / "d" / "moved.txt").read_bytes() == b"old content"
    assert target.get("d/moved.txt") == b"old content"
    for gone in ("old.txt", "new.txt", "victim.txt"):
        assert target.get(gone) is None, f"{gone} is still in the store"
    m.remount(fresh_cache=True)
    assert sorted(os.listdir(m.path)) == ["d"]
    assert (m.path / "d" / "moved.txt").read_bytes() == b"old content"


@pytest.mark.timeout(60)
def test_rename_open_file_written_here(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    with open(m.path / "a", "wb") as f:
        f.write(b"first ")
        os.rename(m.path / "a", m.path / "b")
        f.write(b"second")
    assert (m.path / "b").read_bytes() == b"first second"
    assert target.get("b") == b"first second"
    assert target.get("a") is None


@pytest.mark.timeout(60)
def test_rename_directory(fusion_mount: Any, target: Target) -> None:
    tree = {"src/a.txt": b"a", "src/sub/b.txt": b"b" * 5000, "src/sub/deeper/c": b"c"}
    for key, data in tree.items():
        target.put(key, data)
    m = _mount(fusion_mount, target)
    (m.path / "src" / "local.txt").write_bytes(b"written here")
    os.rename(m.path / "src", m.path / "dst")
    assert sorted(os.listdir(m.path)) == ["dst"]
    assert _errno_of(os.stat, m.path / "src") == errno.ENOENT
    assert sorted(os.listdir(m.path / "dst")) == ["a.txt", "local.txt", "sub"]
    assert (m.path / "dst" / "sub" / "b.txt").read_bytes() == b"b" * 5000
    assert (m.path / "dst" / "local.txt").read_bytes() == b"written here"
    assert target.keys("src") == set()
    file_keys = {k for k in target.keys("dst") if not k.endswith("/")}
    assert file_keys == {"dst/a.txt", "dst/sub/b.txt", "dst/sub/deeper/c", "dst/local.txt"}
    assert target.get("dst/sub/deeper/c") == b"c"
    # a directory onto a non-empty directory is refused
    os.mkdir(m.path / "other")
    (m.path / "other" / "x").write_bytes(b"x")
    assert _errno_of(os.rename, m.path / "dst", m.path / "other") in (
        errno.ENOTEMPTY,
        errno.EEXIST,
    )


@pytest.mark.timeout(60)
def test_symlink(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    (m.path / "real.txt").write_bytes(b"pointed at")
    os.symlink("real.txt", m.path / "link")
    os.symlink("../nowhere/at/all", m.path / "dangling")
    assert os.readlink(m.path / "link") == "real.txt"
    assert stat.S_ISLNK(os.lstat(m.path / "link").st_mode)
    assert (m.path / "link").read_bytes() == b"pointed at"
    assert _errno_of(os.symlink, "x", m.path / "link") == errno.EEXIST
    m = m.remount(fresh_cache=True)
    assert stat.S_ISLNK(os.lstat(m.path / "link").st_mode)
    assert os.readlink(m.path / "link") == "real.txt"
    assert os.readlink(m.path / "dangling") == "../nowhere/at/all"
    assert (m.path / "link").read_bytes() == b"pointed at"
    assert sorted(os.listdir(m.path)) == ["dangling", "link", "real.txt"]
    if target.kind == "s3":  # the target is the body, so a LIST-only client keeps it
        assert target.get("link") == b"real.txt"


@pytest.mark.timeout(60)
def test_special_files_are_made_listed_changed_and_removed(
    fusion_mount: Any, target: Target
) -> None:
    """S-SPECIAL-1: mkfifo and mknod (FIFO, socket, character and block devices) make objects
    that keep their type, mode, owner and rdev across a cold remount, and that rename, chmod,
    chown, utime and unlink like files; the kernel, not the store, serves the FIFO's data."""
    m = _mount(fusion_mount, target)
    os.mkfifo(m.path / "fifo", 0o640)
    os.mknod(m.path / "sock", stat.S_IFSOCK | 0o600)
    os.mknod(m.path / "chr", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    os.mknod(m.path / "blk", stat.S_IFBLK | 0o600, os.makedev(8, 1))
    assert _errno_of(os.mkfifo, m.path / "fifo") == errno.EEXIST
    os.chmod(m.path / "fifo", 0o604)
    os.chown(m.path / "chr", 1234, 5678)
    os.utime(m.path / "blk", ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    os.rename(m.path / "sock", m.path / "sock2")
    # a FIFO on the mount is a FIFO: the kernel connects its reader and writer
    fd = os.open(m.path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        wfd = os.open(m.path / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.write(wfd, b"through the pipe")
        os.close(wfd)
        assert os.read(fd, 100) == b"through the pipe"
    finally:
        os.close(fd)
    if target.kind == "s3":
        assert target.get("fifo") == b""
        assert stat.S_ISFIFO(int(target.metadata("fifo")["mode"]))
    m = m.remount(fresh_cache=True)
    assert sorted(os.listdir(m.path)) == ["blk", "chr", "fifo", "sock2"]
    fifo, sock, chr_, blk = (os.lstat(m.path / n) for n in ("fifo", "sock2", "chr", "blk"))
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o604
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_ISCHR(chr_.st_mode) and chr_.st_rdev == os.makedev(1, 3)
    assert (chr_.st_uid, chr_.st_gid) == (1234, 5678)
    assert stat.S_ISBLK(blk.st_mode) and blk.st_rdev == os.makedev(8, 1)
    assert blk.st_mtime_ns == 1_500_000_000_000_000_000
    for name in ("fifo", "sock2", "chr", "blk"):
        os.unlink(m.path / name)
    assert os.listdir(m.path) == []
    m = m.remount(fresh_cache=True)
    assert os.listdir(m.path) == []


@pytest.mark.timeout(60)
def test_chmod_chown_utime_persist_across_remount(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    f = m.path / "f"
    f.write_bytes(b"data")
    os.chmod(f, 0o640)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    before = os.stat(f)
    assert stat.S_IMODE(before.st_mode) == 0o640
    assert (before.st_uid, before.st_gid) == (1234, 5678)
    m = m.remount(fresh_cache=True)
    after = os.stat(m.path / "f")
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert stat.S_ISREG(after.st_mode)
    assert (after.st_uid, after.st_gid) == (1234, 5678)
    assert abs(after.st_mtime_ns - 1_500_000_000_987_654_321) < 1000
    assert (m.path / "f").read_bytes() == b"data"
    if target.kind == "s3":
        md = target.metadata("f")
        assert stat.S_IMODE(int(md["mode"])) == 0o640 and md["uid"] == "1234"


@pytest.mark.timeout(60)
def test_directory_mode_persists_across_remount(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    os.mkdir(m.path / "d", 0o750)
    os.chmod(m.path / "d", 0o701)
    assert stat.S_IMODE(os.stat(m.path / "d").st_mode) == 0o701
    if target.kind == "s3":  # it is in the store ...
        assert stat.S_IMODE(int(target.metadata("d/")["mode"])) == 0o701
    m = m.remount(fresh_cache=True)
    assert stat.S_ISDIR(os.stat(m.path / "d").st_mode)
    assert stat.S_IMODE(os.stat(m.path / "d").st_mode) == 0o701  # ... but not read back


@pytest.mark.timeout(60)
def test_chmod_of_open_file_then_write(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    with open(m.path / "f", "wb") as fh:
        fh.write(b"abc")
        os.chmod(m.path / "f", 0o600)
    m = m.remount(fresh_cache=True)
    assert stat.S_IMODE(os.stat(m.path / "f").st_mode) == 0o600
    assert (m.path / "f").read_bytes() == b"abc"


@pytest.mark.timeout(60)
def test_truncate(fusion_mount: Any, target: Target) -> None:
    data = _blob(100_000)
    target.put("t", data)
    m = _mount(fusion_mount, target)
    os.truncate(m.path / "t", 1000)
    assert (m.path / "t").read_bytes() == data[:1000]
    assert target.get("t") == data[:1000]
    os.truncate(m.path / "t", 5000)  # extending fills with zeros
    assert (m.path / "t").read_bytes() == data[:1000] + bytes(4000)
    with open(m.path / "t", "r+b") as f:
        os.ftruncate(f.fileno(), 10)
        f.seek(0)
        assert f.read() == data[:10]
    assert target.get("t") == data[:10]
    os.truncate(m.path / "t", 0)
    assert os.stat(m.path / "t").st_size == 0
    m = m.remount(fresh_cache=True)
    assert (m.path / "t").read_bytes() == b""
    assert target.get("t") == b""


@pytest.mark.timeout(60)
def test_append_to_existing_file(fusion_mount: Any, target: Target) -> None:
    head = _blob(3 * MiB + 17)
    target.put("log", head)
    m = _mount(fusion_mount, target)
    with open(m.path / "log", "ab") as f:
        f.write(b"appended line\n")
    with open(m.path / "log", "ab") as f:
        f.write(b"and another\n")
    expected = head + b"appended line\nand another\n"
    assert (m.path / "log").read_bytes() == expected
    assert target.get("log") == expected
    m = m.remount(fresh_cache=True)
    assert (m.path / "log").read_bytes() == expected


@pytest.mark.timeout(60)
def test_rewrite_in_the_middle(fusion_mount: Any, target: Target) -> None:
    data = bytearray(_blob(2 * MiB + 1234))
    target.put("r", bytes(data))
    m = _mount(fusion_mount, target)
    with open(m.path / "r", "r+b") as f:
        f.seek(MiB - 3)  # across a chunk boundary
        f.write(b"PATCHED!")
        f.seek(10)
        assert f.read(5) == data[10:15]
    data[MiB - 3 : MiB + 5] = b"PATCHED!"
    assert (m.path / "r").read_bytes() == data
    assert target.get("r") == bytes(data)
    assert os.stat(m.path / "r").st_size == len(data)
    m = m.remount(fresh_cache=True)
    assert (m.path / "r").read_bytes() == data


@pytest.mark.timeout(60)
def test_o_excl_on_existing_name(fusion_mount: Any, target: Target) -> None:
    target.put("oob", b"there")
    m = _mount(fusion_mount, target)
    (m.path / "mine").write_bytes(b"mine")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert _errno_of(os.open, m.path / "mine", flags) == errno.EEXIST
    assert _errno_of(os.open, m.path / "oob", flags) == errno.EEXIST
    os.mkdir(m.path / "d")
    assert _errno_of(os.open, m.path / "d", flags) == errno.EEXIST
    with pytest.raises(FileExistsError):
        open(m.path / "mine", "xb")
    assert (m.path / "mine").read_bytes() == b"mine"
    assert target.get("oob") == b"there"
    fd = os.open(m.path / "fresh", flags, 0o600)
    os.close(fd)
    assert target.get("fresh") == b""


@pytest.mark.timeout(60)
def test_statfs(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    st = os.statvfs(m.path)
    assert st.f_namemax == 255
    assert st.f_bsize > 0 and st.f_frsize > 0
    assert st.f_bavail > 0 and st.f_blocks >= st.f_bavail
    assert os.statvfs(m.path).f_namemax == 255


@pytest.mark.timeout(60)
def test_hard_link_is_eperm(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    (m.path / "a").write_bytes(b"a")
    assert _errno_of(os.link, m.path / "a", m.path / "b") == errno.EPERM
    assert os.listdir(m.path) == ["a"]
    assert target.get("b") is None


@pytest.mark.timeout(60)
def test_a_file_unlinked_while_open_has_no_links(fusion_mount: Any, target: Target) -> None:
    """S-LINK-1: without hard links a file has one name, so st_nlink is 1, and 0 once it is
    unlinked while still open (fstat, as pjdfstest's unlink/14.t checks). With a zero
    metadata TTL the kernel asks fusionfs for every fstat instead of keeping its own count."""
    m = _mount(fusion_mount, target, "--metadata-ttl", "0")
    (m.path / "a").write_bytes(b"hello")
    assert os.stat(m.path / "a").st_nlink == 1
    fd = os.open(m.path / "a", os.O_RDONLY)
    try:
        os.unlink(m.path / "a")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_directory_read_as_file_is_eisdir(fusion_mount: Any, target: Target) -> None:
    target.put("d/x", b"x")
    m = _mount(fusion_mount, target)
    fd = os.open(m.path / "d", os.O_RDONLY)
    try:
        assert _errno_of(os.read, fd, 10) == errno.EISDIR
    finally:
        os.close(fd)
    assert _errno_of(os.open, m.path / "d", os.O_WRONLY) == errno.EISDIR
    with pytest.raises(IsADirectoryError):
        (m.path / "d").read_bytes()


@pytest.mark.timeout(60)
def test_name_length_limit(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    longest = "n" * 253 + "é"  # 255 bytes
    assert len(longest.encode()) == 255
    (m.path / longest).write_bytes(b"long")
    assert (m.path / longest).read_bytes() == b"long"
    assert os.listdir(m.path) == [longest]
    assert target.get(longest) == b"long"
    os.mkdir(m.path / ("d" * 255))
    too_long = "n" * 256
    assert _errno_of(os.open, m.path / too_long, os.O_WRONLY | os.O_CREAT) == errno.ENAMETOOLONG
    assert _errno_of(os.mkdir, m.path / too_long) == errno.ENAMETOOLONG
    assert _errno_of(os.stat, m.path / too_long) == errno.ENAMETOOLONG
    assert _errno_of(os.rename, m.path / longest, m.path / too_long) == errno.ENAMETOOLONG
    assert sorted(os.listdir(m.path)) == sorted([longest, "d" * 255])
    m = m.remount(fresh_cache=True)
    assert (m.path / longest).read_bytes() == b"long"


# --------------------------------------------------------------------------------------------
# consistency and durability


@pytest.mark.timeout(60)
def test_out_of_band_changes_show_up_after_metadata_ttl(fusion_mount: Any, target: Target) -> None:
    target.put("f", b"version one")
    m = _mount(fusion_mount, target, "--metadata-ttl", "0.5")
    assert (m.path / "f").read_bytes() == b"version one"
    assert os.listdir(m.path) == ["f"]
    target.put("f", b"version two, longer")
    target.put("new", b"new object")
    wait_for(
        lambda: (m.path / "f").read_bytes() == b"version two, longer",
        5,
        "the out-of-band overwrite to show",
    )
    wait_for(
        lambda: sorted(os.listdir(m.path)) == ["f", "new"], 5, "the out-of-band object to be listed"
    )
    assert (m.path / "new").read_bytes() == b"new object"
    target.put("f", b"version 3, same len")  # same size as version two: needs the ETag
    wait_for(
        lambda: (m.path / "f").read_bytes() == b"version 3, same len",
        5,
        "a same-size out-of-band overwrite to show",
    )
    target.delete("new")
    wait_for(lambda: not (m.path / "new").exists(), 5, "the out-of-band delete to show")
    wait_for(lambda: os.listdir(m.path) == ["f"], 5, "the deleted object to leave the listing")


@pytest.mark.timeout(60)
def test_out_of_band_overwrite_seen_first_by_getattr_is_not_torn(
    fusion_mount: Any, target: Target
) -> None:
    """Shrunk from the flaky TTL test: a getattr (fstat of an open handle) is the first to see
    the new version, instead of a lookup; then a new open of the path reads a torn file."""
    target.put("f", b"version one")
    m = _mount(fusion_mount, target, "--metadata-ttl", "0.5")
    with open(m.path / "f", "rb") as old:
        assert old.read() == b"version one"
        target.put("f", b"version two, longer")
        # not synchronisation: the case needs both the kernel's and the daemon's caches
        # expired (the daemon's clock is its own), so that the getattr below is the first to
        # ask the store
        time.sleep(1.0)
        os.fstat(old.fileno())  # FUSE getattr of the old inode
        first = (m.path / "f").read_bytes()
    time.sleep(1.0)  # the same: what a later lookup sees once the TTLs passed again
    later = (m.path / "f").read_bytes()
    assert (first, later) == (b"version two, longer",) * 2


@pytest.mark.timeout(60)
def test_closed_file_is_whole_in_the_store_at_once(fusion_mount: Any, target: Target) -> None:
    """[S-WRITE-2] close returns only after the whole file is committed in the store (an empty new
    file included)."""
    m = _mount(fusion_mount, target, "--part-size", "5M")
    for i, size in enumerate([0, 1, 4096, 5 * MiB, 12 * MiB + 7]):
        data = _blob(size, seed=i)
        with open(m.path / f"f{i}", "wb") as f:
            f.write(data)
        got = target.get(f"f{i}")  # right after close returned: no waiting
        assert got is not None, f"f{i} ({size} bytes) not in the store after close"
        assert len(got) == size and got == data, f"f{i} ({size} bytes) not whole after close"
    # an overwrite of an existing object, too
    with open(m.path / "f1", "wb") as f:
        f.write(b"replaced")
    assert target.get("f1") == b"replaced"


@pytest.mark.timeout(90)
def test_fsync_then_kill_keeps_the_data(fusion_mount: Any, target: Target) -> None:
    """[S-DUR-1] [S-WRITE-2] data acknowledged by fsync is in the store when fsync returns, and
    survives the daemon being killed: a new mount with an empty cache reads it whole."""
    m = _mount(fusion_mount, target, "--part-size", "5M")
    data = _blob(11 * MiB + 5)
    fd = os.open(m.path / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    assert target.get("synced") == data, "fsync returned before the data was in the store"
    m.kill()
    try:
        os.close(fd)
    except OSError:
        pass  # the daemon is gone: close cannot flush anything
    m = m.remount(fresh_cache=True)
    assert os.stat(m.path / "synced").st_size == len(data)
    assert (
        hashlib.sha256((m.path / "synced").read_bytes()).digest() == hashlib.sha256(data).digest()
    )


@pytest.mark.timeout(90)
def test_file_being_written_is_never_torn(fusion_mount: Any, target: Target) -> None:
    """[S-WRITE-4] until its commit, a file's new content is not visible under its key: the store
    shows the previous version or nothing, never a partial file, even while parts stream and when
    the daemon dies."""
    old = b"the old version, whole"
    target.put("over", old)
    m = _mount(fusion_mount, target, "--part-size", "5M")
    new = _blob(17 * MiB)
    f_new = open(m.path / "fresh", "wb")  # kept open on purpose
    f_over = open(m.path / "over", "wb")
    try:
        for f in (f_new, f_over):
            f.write(new)
            f.flush()  # to the daemon, but no fsync and no close
        # parts are streaming meanwhile: the name must not show a torn object
        # look after each part streamed: never a torn object under the final names
        for sent in range(2, 7):  # 17 MiB in 5 MiB parts: three whole parts per file
            wait_for(
                lambda sent=sent: stats(m.path)["requests"].get("upload_part", 0) >= sent,
                30,
                f"{sent} parts to stream",
            )
            assert target.get("fresh") in (None, new), "a torn object under its final name"
            assert target.get("over") in (old, new), "a torn object under its final name"
        m.kill()
    finally:
        for f in (f_new, f_over):
            try:
                f.close()
            except OSError:
                pass
    assert target.get("fresh") in (None, new), "a torn object under its final name"
    assert target.get("over") in (old, new), "a torn object under its final name"


@pytest.mark.timeout(180)
def test_large_sequential_write_streams_as_multipart(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)  # default part size 16M
    size = 64 * MiB
    digest = hashlib.sha256()
    block = 1 * MiB
    with open(m.path / "big", "wb") as f:
        for i in range(size // block):
            chunk = _blob(block, seed=i) if i % 8 == 0 else bytes([i % 251]) * block
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        # streaming: parts go up before close
        wait_for(
            lambda: stats(m.path)["requests"].get("upload_part", 0) >= 3,
            60,
            "parts to be uploaded before close",
        )
    s = stats(m.path)
    assert s["requests"].get("create_multipart", 0) >= 1
    assert s["requests"].get("upload_part", 0) >= 4
    assert s["requests"].get("complete_multipart", 0) >= 1
    assert s["bytes_uploaded"] >= size
    got = target.get("big")
    assert got is not None and len(got) == size
    assert hashlib.sha256(got).hexdigest() == digest.hexdigest()
    m = m.remount(fresh_cache=True)
    h = hashlib.sha256()
    with open(m.path / "big", "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    assert h.hexdigest() == digest.hexdigest()


@pytest.mark.timeout(90)
def test_chunk_cache_survives_remount(fusion_mount: Any, target: Target) -> None:
    data = _blob(5 * MiB + 3)
    target.put("cached", data)
    m = _mount(fusion_mount, target)
    assert (m.path / "cached").read_bytes() == data
    first = stats(m.path)
    assert first["bytes_fetched"] >= len(data)
    m = m.remount()  # same cache directory
    assert (m.path / "cached").read_bytes() == data
    second = stats(m.path)
    assert second["cache_hits"] > 0
    assert second["bytes_fetched"] == 0
    assert second["requests"].get("get_range", 0) == 0
    assert second["requests"].get("get_into", 0) == 0


@pytest.mark.timeout(60)
def test_unmount_with_file_open_for_writing_is_refused(fusion_mount: Any, target: Target) -> None:
    m = _mount(fusion_mount, target)
    f = open(m.path / "busy", "wb")  # kept open on purpose
    try:
        f.write(b"still writing")
        f.flush()
        result = m.unmount(check=False)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        err = result.stderr.strip()
        assert "busy" in err.lower(), f"unclear message: {err!r}"
        assert len(err.splitlines()) == 1, f"not one line: {err!r}"
        assert is_mounted(m.path) and m.proc.poll() is None, "the mount went away"
        f.write(b", then done")
    finally:
        f.close()
    assert (m.path / "busy").read_bytes() == b"still writing, then done"
    m.unmount()
    assert target.get("busy") == b"still writing, then done"


# --------------------------------------------------------------------------------------------
# CLI errors: one line on stderr, non-zero exit, no traceback, quickly


def _mount_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    cache = tmp_path / f"cli-cache-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "fusionfs", "mount", *args, "--cache-dir", str(cache)]
    start = time.monotonic()
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - start
    return result, elapsed


def _assert_cli_error(
    result: subprocess.CompletedProcess[str], elapsed: float, mountpoint: Path, *words: str
) -> None:
    try:
        err = result.stderr.strip()
        assert result.returncode != 0, f"exit 0; stderr {err!r}"
        assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
        assert len(err.splitlines()) == 1, f"not one line on stderr: {err!r}"
        for word in words:
            assert word.lower() in err.lower(), f"{word!r} not in {err!r}"
        assert elapsed < 15, f"took {elapsed:.1f} s"
    finally:
        if mountpoint.exists() and os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, timeout=15)


@pytest.mark.timeout(60)
def test_cli_mountpoint_missing(tmp_path: Path, local_target: Target) -> None:
    mp = tmp_path / "no-such-dir"
    result, elapsed = _mount_cli(tmp_path, local_target.source, str(mp))
    _assert_cli_error(result, elapsed, mp, "does not exist", str(mp))


@pytest.mark.timeout(60)
def test_cli_already_mounted(fusion_mount: Any, tmp_path: Path, local_target: Target) -> None:
    m = _mount(fusion_mount, local_target)
    result, elapsed = _mount_cli(tmp_path, local_target.source, str(m.path))
    _assert_cli_error(result, elapsed, tmp_path / "unused", "already")
    assert m.proc.poll() is None and is_mounted(m.path)
    (m.path / "still-works").write_bytes(b"ok")
    assert local_target.get("still-works") == b"ok"


@pytest.mark.timeout(60)
def test_cli_bucket_does_not_exist(tmp_path: Path, s3_target: Target) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    bucket = f"{s3_target.bucket}-missing"
    result, elapsed = _mount_cli(tmp_path, f"s3://{bucket}", str(mp), *s3_target.mount_args)
    _assert_cli_error(result, elapsed, mp, bucket)
    assert not is_mounted(mp)


@pytest.mark.timeout(60)
def test_cli_unreachable_endpoint(tmp_path: Path, s3_target: Target) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    port = free_port()  # nothing listens there
    result, elapsed = _mount_cli(
        tmp_path, "s3://some-bucket", str(mp), "--endpoint-url", f"http://127.0.0.1:{port}"
    )
    _assert_cli_error(result, elapsed, mp, f"127.0.0.1:{port}")
    assert not is_mounted(mp)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "source", ["s3://", "s3://bucket?x=1", "file://relative/path", "ftp://host/dir"]
)
def test_cli_bad_source(tmp_path: Path, source: str) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    result, elapsed = _mount_cli(tmp_path, source, str(mp))
    _assert_cli_error(result, elapsed, mp, source)
    assert not is_mounted(mp)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", ["--cache-size", "--chunk-size", "--part-size"])
def test_cli_bad_size(tmp_path: Path, local_target: Target, option: str) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    result, elapsed = _mount_cli(tmp_path, local_target.source, str(mp), option, "12Q")
    _assert_cli_error(result, elapsed, mp, "12Q")
    assert not is_mounted(mp)


@pytest.mark.timeout(60)
def test_cli_unmount_and_stats_of_a_plain_directory(tmp_path: Path) -> None:
    for args in (["unmount", str(tmp_path)], ["stats", str(tmp_path), "--json"]):
        result = cli(*args, timeout=30)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert "not mounted" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# --direct-io (S-READ-4)


@pytest.mark.timeout(90)
def test_direct_io_reads_bypass_the_page_cache(fusion_mount: Any, local_target: Target) -> None:
    """S-READ-4: with --direct-io every read(2) of a read-only open reaches the daemon (twice the
    same bytes: twice the read calls), unaligned reads return the right bytes, MAP_PRIVATE works
    and MAP_SHARED is refused; read-write opens keep the page cache, every write(2) of a
    write-only open reaches the daemon. Without the flag the second read is served by the page
    cache."""
    import mmap

    data = _blob(3 * MiB + 123, seed=5)
    local_target.put("d.bin", data)

    def read_calls_for_two_reads(m: Any) -> int:
        before = stats(m.path)["read_calls"]
        for _ in range(2):
            with open(m.path / "d.bin", "rb", buffering=0) as f:
                assert f.read() == data
        return int(stats(m.path)["read_calls"] - before)

    plain = _mount(fusion_mount, local_target)
    cached_calls = read_calls_for_two_reads(plain)
    plain.unmount()

    m = _mount(fusion_mount, local_target, "--direct-io")
    direct_calls = read_calls_for_two_reads(m)
    assert direct_calls >= 2 * 4, direct_calls  # both reads, at least one call per MiB
    assert direct_calls > cached_calls, (direct_calls, cached_calls)
    fd = os.open(m.path / "d.bin", os.O_RDONLY)
    try:
        for off, n in ((0, 1), (4095, 4097), (MiB - 7, 2 * MiB + 19), (len(data) - 5, 100)):
            assert os.pread(fd, n, off) == data[off : off + n], (off, n)
        with mmap.mmap(fd, len(data), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mp:
            assert mp[MiB : MiB + 4096] == data[MiB : MiB + 4096]
        with pytest.raises(OSError) as err:
            mmap.mmap(fd, len(data), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert err.value.errno == errno.ENODEV
    finally:
        os.close(fd)
    with open(m.path / "d.bin", "r+b") as f:  # read-write: page cache as usual, shared mmap too
        with mmap.mmap(f.fileno(), 0) as mp:
            mp[:5] = b"HELLO"
    assert (m.path / "d.bin").read_bytes() == b"HELLO" + data[5:]
    assert local_target.get("d.bin") == b"HELLO" + data[5:]
    before = stats(m.path)["write_calls"]
    with open(m.path / "w.bin", "wb", buffering=0) as f:  # write-only: every write(2) goes up
        for i in range(64):
            f.write(data[i * 4096 : (i + 1) * 4096])
    assert stats(m.path)["write_calls"] - before >= 64
    assert local_target.get("w.bin") == data[: 64 * 4096]


# --------------------------------------------------------------------------------------------
# write-only opens below a write-behind directory (S-WRITE-8)


@pytest.mark.timeout(90)
def test_write_only_files_below_a_write_behind_dir_bypass_the_page_cache(
    fusion_mount: Any, local_target: Target, tmp_path: Path
) -> None:
    """S-WRITE-8: below a write-behind directory, write-only opens (create or open) send every
    write(2) to the daemon (no page cache to gather them in); read-write opens there and
    write-only opens elsewhere keep the page cache. Every byte arrives, whatever the path the
    write takes (write, pwrite at offsets, sendfile from a local file)."""
    import shutil

    from fusionfs.client import flush, set_write_behind

    m = _mount(fusion_mount, local_target)
    (m.path / "imgs").mkdir()
    (m.path / "plain").mkdir()
    set_write_behind(m.path / "imgs")
    blocks = [_blob(4096, seed=100 + i) for i in range(256)]
    data = b"".join(blocks)

    def write_calls(path: Path, flags: int) -> int:
        before = stats(m.path)["write_calls"]
        fd = os.open(path, flags | os.O_CREAT, 0o644)
        try:
            for i, block in enumerate(blocks):
                os.pwrite(fd, block, i * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert path.read_bytes() == data
        return int(stats(m.path)["write_calls"] - before)

    created = write_calls(m.path / "imgs" / "a.img", os.O_WRONLY)
    reopened = write_calls(m.path / "imgs" / "a.img", os.O_WRONLY | os.O_TRUNC)
    read_write = write_calls(m.path / "imgs" / "b.img", os.O_RDWR)
    elsewhere = write_calls(m.path / "plain" / "c.img", os.O_WRONLY)
    assert created >= 256 and reopened >= 256, (created, reopened)  # one per write(2)
    assert read_write < 64 and elsewhere < 64, (read_write, elsewhere)  # gathered by the kernel

    local = tmp_path / "local.bin"
    local.write_bytes(_blob(3 * MiB + 17, seed=9))
    shutil.copyfile(local, m.path / "imgs" / "log.txt")  # sendfile(2) into a direct-io file
    flush(m.path)
    for name, want in (("a.img", data), ("b.img", data), ("log.txt", local.read_bytes())):
        assert (m.path / "imgs" / name).read_bytes() == want, name
        assert local_target.get(f"imgs/{name}") == want, name


@pytest.mark.timeout(90)
def test_read_only_files_below_a_read_once_dir_bypass_the_page_cache(
    fusion_mount: Any, local_target: Target
) -> None:
    """S-READ-5: below a read-once directory every read(2) of a read-only open reaches the
    daemon (twice the same bytes: twice the read calls), and what it fetches is not written to
    the chunk cache; elsewhere the second read is served by the page cache, and the chunks
    are cached. The mark is a directory's, 0 or 1, and reads
    back."""
    from fusionfs.client import set_read_once

    data = _blob(2 * MiB + 77, seed=11)
    local_target.put("imgs/p.img", data)
    local_target.put("other/p.img", data)
    m = _mount(fusion_mount, local_target)
    set_read_once(m.path / "imgs")
    assert os.getxattr(m.path / "imgs", "user.fusionfs.read-once") == b"1"
    assert os.getxattr(m.path / "other", "user.fusionfs.read-once") == b"0"
    with pytest.raises(OSError) as err:
        os.setxattr(m.path / "imgs" / "p.img", "user.fusionfs.read-once", b"1")
    assert err.value.errno == errno.EINVAL

    def read_calls_for_two_reads(path: Path) -> int:
        before = stats(m.path)["read_calls"]
        for _ in range(2):
            with open(path, "rb", buffering=0) as f:
                assert f.read() == data
        return int(stats(m.path)["read_calls"] - before)

    once = read_calls_for_two_reads(m.path / "imgs" / "p.img")
    assert stats(m.path)["bytes_fetched"] >= len(data)
    cached = read_calls_for_two_reads(m.path / "other" / "p.img")
    assert once >= 2 * 3, once  # both reads, at least one call per MiB
    assert once > cached, (once, cached)
    # the cache writes of other/p.img, started after any of imgs/p.img would have been, are
    # done: only its chunks are there (2 MiB + 77 bytes: three 1 MiB chunks)
    wait_for(lambda: stats(m.path)["cache_chunks"] >= 3, 10, "other/p.img to be cached")
    assert stats(m.path)["cache_chunks"] == 3


@pytest.mark.timeout(90)
def test_reads_below_a_no_cache_dir_keep_the_page_cache_but_not_the_chunk_cache(
    fusion_mount: Any, local_target: Target
) -> None:
    """S-READ-6: below a no-cache directory reads fill the kernel page cache as usual (a second
    read of the same bytes reaches the daemon at most once) but nothing they fetch is written
    to the chunk cache. The mark is a directory's, 0 or 1, and reads back."""
    from fusionfs.client import set_no_cache

    data = _blob(2 * MiB + 77, seed=12)
    local_target.put("imgs/p.img", data)
    local_target.put("elsewhere.img", data[: MiB + 1])
    m = _mount(fusion_mount, local_target)
    set_no_cache(m.path / "imgs")
    assert os.getxattr(m.path / "imgs", "user.fusionfs.no-cache") == b"1"
    assert os.getxattr(m.path, "user.fusionfs.no-cache") == b"0"
    with pytest.raises(OSError) as err:
        os.setxattr(m.path / "imgs" / "p.img", "user.fusionfs.no-cache", b"1")
    assert err.value.errno == errno.EINVAL
    with open(m.path / "imgs" / "p.img", "rb", buffering=0) as f:
        assert f.read() == data
    before = stats(m.path)["read_calls"]
    with open(m.path / "imgs" / "p.img", "rb", buffering=0) as f:
        assert f.read() == data
    assert stats(m.path)["read_calls"] - before <= 1  # the page cache answered
    # a file elsewhere is cached; its cache writes start after any of imgs/p.img would have,
    # so once they are done, only its two chunks are there
    assert (m.path / "elsewhere.img").read_bytes() == data[: MiB + 1]
    wait_for(lambda: stats(m.path)["cache_chunks"] >= 2, 10, "elsewhere.img to be cached")
    assert stats(m.path)["cache_chunks"] == 2
    set_no_cache(m.path / "imgs", False)
    assert os.getxattr(m.path / "imgs", "user.fusionfs.no-cache") == b"0"


@pytest.mark.timeout(60)
def test_kernel_read_ahead_is_raised_for_the_mount(fusion_mount: Any, local_target: Target) -> None:
    # [S-READ-2] the kernel's read-ahead of the mount: 1 MiB requests, 64 of them in flight
    if os.geteuid() != 0:
        missing("root", "the kernel's per-mount FUSE settings are root-only")
    m = _mount(fusion_mount, local_target, "--max-readahead", "64M")
    conns = Path("/sys/fs/fuse/connections")
    if not any(conns.iterdir()) and os.environ.get("CI") != "true":
        pytest.skip("fusectl is not mounted on /sys/fs/fuse/connections")
    dev = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(m.path):
            dev = fields[2]
    assert dev is not None, "mount not in /proc/self/mountinfo"
    major, minor = (int(x) for x in dev.split(":"))
    conn = conns / str(os.makedev(major, minor))

    def tuned() -> bool:
        return (conn / "max_background").read_text().strip() == "64"

    wait_for(tuned, timeout=10, what="max_background raised")  # tuned just after INIT
    assert (conn / "congestion_threshold").read_text().strip() == "48"
    assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == str(64 * 1024 // 4)


@pytest.mark.timeout(60)
def test_atime_set_by_utime_is_kept(fusion_mount: Any, target: Target) -> None:
    """S-ATTR-5: an atime set with utimensat is kept in metadata and survives a cold remount;
    a file never given one shows its mtime (pjdfstest utimensat/*)."""
    m = _mount(fusion_mount, target)
    f = m.path / "f"
    f.write_bytes(b"x")
    st = os.stat(f)
    assert st.st_atime_ns == st.st_mtime_ns
    os.utime(f, ns=(1_900_000_000_000_000_000, 1_950_000_000_000_000_000))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_900_000_000_000_000_000,
        1_950_000_000_000_000_000,
    )
    fd = os.open(f, os.O_RDONLY)
    try:  # a new mtime with the atime it has: the atime stays
        os.utime(fd, ns=(os.stat(f).st_atime_ns, 1_960_000_000_000_000_000))
    finally:
        os.close(fd)
    m = m.remount(fresh_cache=True)
    st = os.stat(m.path / "f")
    assert st.st_atime_ns == 1_900_000_000_000_000_000
    assert st.st_mtime_ns == 1_960_000_000_000_000_000
