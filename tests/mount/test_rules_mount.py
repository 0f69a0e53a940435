"""Rules of docs/SEMANTICS.md about what programs see on a real mount, that no other test
enforced: the key a path is stored under, what ``fusionfs unmount`` and SIGTERM do with data that
is not durable yet, and extended attributes.

Each test names the rule it enforces (``[S-..]`` in its docstring; ``tests/unit/
test_semantics_doc.py`` keeps every rule quoted). The store's failure is made real: the bucket
is deleted under the mount (every PUT then fails at once, with no retry to wait for) and made
again, so that the only way the data reaches it is the flush the rule promises.

Caveat: the mount's background retry of failed commits (S-FAIL-3, every 30 s) could also bring
the data in; each test here finishes well within that interval of the bucket coming back.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Any

import pytest
from helpers import wait_for
from mount_support import Target, cli, is_mounted

pytestmark = pytest.mark.mount


def _write_fails(path: os.PathLike[str], data: bytes) -> int:
    """Write ``data`` to a new file and close it; the errno its close (or write) failed with."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        assert e.errno is not None
        return e.errno
    raise AssertionError(f"writing {path} did not fail")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prefix", ["", "pre/fix"])
def test_a_path_is_the_object_under_the_prefix(
    fusion_mount: Any, s3_target: Target, prefix: str
) -> None:
    """[S-MAP-1] The file ``a/b.txt`` under the mount is the object ``PREFIX/a/b.txt``, where
    ``PREFIX`` is the part after the bucket in ``s3://BUCKET/PREFIX``; nothing outside the
    prefix shows."""
    base = f"{prefix}/" if prefix else ""
    s3_target.put("outside.txt", b"not under the prefix")
    s3_target.put(f"{base}made/elsewhere.txt", b"made by another tool")
    source = f"{s3_target.source}/{prefix}" if prefix else s3_target.source
    m = fusion_mount(source, s3_target.mount_args)
    os.mkdir(m.path / "a")
    (m.path / "a" / "b.txt").write_bytes(b"written here")
    assert s3_target.get(f"{base}a/b.txt") == b"written here"
    assert (m.path / "made" / "elsewhere.txt").read_bytes() == b"made by another tool"
    if prefix:
        assert sorted(os.listdir(m.path)) == ["a", "made"]
        assert not (m.path / "outside.txt").exists()
        assert all(k.startswith(base) for k in s3_target.keys() - {"outside.txt"})
    else:
        assert sorted(os.listdir(m.path)) == ["a", "made", "outside.txt"]


@pytest.mark.timeout(60)
def test_a_path_is_the_file_under_a_local_directory(
    fusion_mount: Any, local_target: Target
) -> None:
    """[S-MAP-1] For a local-directory source, the file ``a/b.txt`` is the file
    ``DIR/a/b.txt``."""
    assert local_target.root is not None
    local_target.put("x/c.txt", b"made beside the mount")
    m = fusion_mount(local_target.source, local_target.mount_args)
    os.mkdir(m.path / "a")
    (m.path / "a" / "b.txt").write_bytes(b"written here")
    assert (local_target.root / "a" / "b.txt").read_bytes() == b"written here"
    assert (m.path / "x" / "c.txt").read_bytes() == b"made beside the mount"


# the daemon's own log (for when mount tests check it, issue 21 item 4)
@pytest.mark.allow_logs("NoSuchBucket", "data not yet durable")
@pytest.mark.timeout(120)
def test_unmount_makes_data_durable_first_or_says_so_and_stays_up(
    fusion_mount: Any, s3_target: Target
) -> None:
    """[S-DUR-3] ``fusionfs unmount`` makes everything durable first; if some data cannot be,
    it says so, exits non-zero and leaves the mount up; once the store is back, the unmount
    makes the data durable and succeeds."""
    m = fusion_mount(s3_target.source, s3_target.mount_args)
    s3_target.client.delete_bucket(Bucket=s3_target.bucket)
    try:
        assert _write_fails(m.path / "precious", b"precious bytes") == errno.EIO
        result = m.unmount(check=False)
        err = result.stderr.strip()
        assert result.returncode != 0
        assert "could not be made durable" in err and "Traceback" not in result.stderr, err
        assert len(err.splitlines()) == 1, err
        assert is_mounted(m.path) and m.proc.poll() is None, "the mount went away"
        assert (m.path / "precious").read_bytes() == b"precious bytes"  # still staged here
    finally:
        s3_target.client.create_bucket(Bucket=s3_target.bucket)
    m.unmount()
    assert s3_target.get("precious") == b"precious bytes"


# the daemon's own log (for when mount tests check it, issue 21 item 4)
@pytest.mark.allow_logs("NoSuchBucket", "data not yet durable", "unsaved data of 'precious'")
@pytest.mark.timeout(120)
def test_unmount_force_leaves_the_data_staged_for_the_next_mount_to_report(
    fusion_mount: Any, s3_target: Target
) -> None:
    """[S-DUR-3] [S-DUR-2] ``fusionfs unmount --force`` unmounts with data that cannot be made
    durable; the data stays staged, and the next mount on that cache directory moves it to
    ``recovered/`` and logs where it is, without uploading it."""
    m = fusion_mount(s3_target.source, s3_target.mount_args)
    s3_target.client.delete_bucket(Bucket=s3_target.bucket)
    try:
        assert _write_fails(m.path / "precious", b"precious bytes") == errno.EIO
        result = cli("unmount", "--force", str(m.path))
        assert result.returncode == 0, result.stderr
        assert "could not be made durable" in result.stderr
        m.proc.wait(30)
        assert not is_mounted(m.path)
        staged = [p for p in (m.cache_dir / "staging").glob("*.data")]
        assert [p.read_bytes() for p in staged] == [b"precious bytes"]
    finally:
        s3_target.client.create_bucket(Bucket=s3_target.bucket)
    m = m.remount()
    recovered = m.cache_dir / "recovered"
    assert [p.read_bytes() for p in recovered.glob("*.data")] == [b"precious bytes"]
    assert (
        f"unsaved data of 'precious' from an earlier run kept in {recovered}"
        in m.log_path.read_text()
    )
    assert s3_target.get("precious") is None
    assert os.listdir(m.path) == []


# the daemon's own log (for when mount tests check it, issue 21 item 4)
@pytest.mark.allow_logs("NoSuchBucket", "data not yet durable")
@pytest.mark.timeout(120)
def test_sigterm_makes_data_durable_before_the_daemon_unmounts(
    fusion_mount: Any, s3_target: Target
) -> None:
    """[S-DUR-3] SIGTERM to the daemon makes everything durable before it unmounts: data whose
    commit failed while the store was away reaches the store on the way out."""
    m = fusion_mount(s3_target.source, s3_target.mount_args)
    s3_target.client.delete_bucket(Bucket=s3_target.bucket)
    try:
        assert _write_fails(m.path / "precious", b"precious bytes") == errno.EIO
    finally:
        s3_target.client.create_bucket(Bucket=s3_target.bucket)
    assert s3_target.get("precious") is None
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(60) == 0
    wait_for(lambda: not is_mounted(m.path), 15, "the mount to go away")
    assert s3_target.get("precious") == b"precious bytes"
    assert "making data durable, then unmounting" in m.log_path.read_text()


@pytest.mark.timeout(60)
def test_extended_attributes_are_not_stored(fusion_mount: Any, target: Target) -> None:
    """[S-XATTR-1] ``setxattr`` of anything but the control attributes is EOPNOTSUPP,
    ``getxattr`` of one is ENODATA, and files list none."""
    m = fusion_mount(target.source, target.mount_args)
    f = m.path / "f"
    f.write_bytes(b"content")
    os.mkdir(m.path / "d")
    for path in (f, m.path / "d"):
        with pytest.raises(OSError) as info:
            os.setxattr(path, "user.comment", b"hello")
        assert info.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as info:
            os.getxattr(path, "user.comment")
        assert info.value.errno == errno.ENODATA
        assert os.listxattr(path) == []
    assert f.read_bytes() == b"content"
