"""Real mounts on Ceph RGW (``rgw_server``): what RGW answers differently from moto.

RGW 16.2 (Debian bookworm) sends an empty ``<ETag></ETag>`` in CompleteMultipartUpload's answer
and unquoted ETags in CopyObject's and UploadPartCopy's (HEAD, GET and LIST quote them), so a
client that keeps the ETag a write returned and pins later reads to it (``If-Match``) must not
take those answers as they are (S-STORE-1). Also here, on moto too: symlinks after a cold
remount (S-MAP-5) and the log of a write lost to a changed object (S-FAIL-4). Each test here
failed before its fix.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import zlib
from typing import Any

import pytest
from helpers import missing
from s3servers import S3Bucket

_MIB = 1 << 20


def _mount(fusion_mount: Any, bucket: S3Bucket, **kwargs: Any) -> Any:
    return fusion_mount(
        bucket.source, ("--endpoint-url", bucket.endpoint), env=bucket.env, **kwargs
    )


def _pattern(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    block = rng.randbytes(_MIB)
    return b"".join(block[i % 7 :] + block[: i % 7] for i in range(size // _MIB))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("s3_server", ["rgw"], indirect=True)
def test_a_multipart_file_reads_back_after_close(
    fusion_mount: Any, server_bucket: S3Bucket
) -> None:
    """[S-STORE-1] 96 MiB written through the mount (a multipart upload), closed, reads back
    whole through the same mount and through a fresh one (RGW answered the completion with an
    empty ETag: every read of the new version failed with ESTALE)."""
    m = _mount(fusion_mount, server_bucket)
    data = _pattern(96 * _MIB, 1)
    with open(m.path / "big", "wb") as f:
        f.write(data)
    with open(m.path / "big", "rb") as f:
        assert zlib.crc32(f.read()) == zlib.crc32(data)
    m = m.remount(fresh_cache=True)
    assert zlib.crc32((m.path / "big").read_bytes()) == zlib.crc32(data)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("s3_server", ["rgw"], indirect=True)
def test_fio_write_then_verify(fusion_mount: Any, server_bucket: S3Bucket) -> None:
    """[S-STORE-1] ``fio --rw=write --bs=1M --size=96M --verify=crc32c`` passes: it writes the
    file sequentially (one multipart upload), then reads all of it back to verify."""
    fio = shutil.which("fio")
    if fio is None:
        missing("fio", "not on PATH (scripts/setup.sh installs Debian's fio)")
    m = _mount(fusion_mount, server_bucket)
    result = subprocess.run(
        [
            fio,
            "--name=verify",
            f"--directory={m.path}",
            "--rw=write",
            "--bs=1M",
            "--size=96M",
            "--verify=crc32c",
            "--ioengine=psync",
            "--end_fsync=1",
        ],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
        cwd=m.path.parent,  # fio leaves its verify state file in its working directory
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "verify" in result.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("s3_server", ["moto", "rgw"], indirect=True)
def test_a_symlink_survives_a_cold_remount(fusion_mount: Any, server_bucket: S3Bucket) -> None:
    """[S-MAP-5] A symlink is a symlink again after a remount with an empty cache, whether the
    first thing to see it is a directory listing (``ls -l``, ``find``, ``os.walk``: the kernel
    takes the type from READDIRPLUS) or a lookup of its name."""
    m = _mount(fusion_mount, server_bucket)
    (m.path / "target").write_bytes(b"t")
    os.symlink("tgt/x", m.path / "link")  # a 5-byte target, as in the report
    os.symlink("target", m.path / "near")
    m = m.remount(fresh_cache=True)
    kinds = {entry.name: entry.is_symlink() for entry in os.scandir(m.path)}
    assert kinds == {"target": False, "link": True, "near": True}
    for name, target in (("link", "tgt/x"), ("near", "target")):
        st = os.lstat(m.path / name)
        assert stat.S_ISLNK(st.st_mode), f"{name}: mode {st.st_mode:o}"
        assert os.readlink(m.path / name) == target
    assert (m.path / "near").read_bytes() == b"t"
    m = m.remount(fresh_cache=True)  # and a lookup first
    assert os.readlink(m.path / "link") == "tgt/x"
    assert stat.S_ISLNK(os.lstat(m.path / "near").st_mode)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("s3_server", ["rgw"], indirect=True)
def test_in_place_rewrites_close_cleanly(fusion_mount: Any, server_bucket: S3Bucket) -> None:
    """[S-STORE-1] [S-WRITE-5] Files of 8-32 MiB rewritten in place (reopened O_WRONLY, a few
    pwrites of 1 B-400 KB at scattered offsets) close without error and read back with every
    piece, from a fresh mount too (on RGW the commit's UploadPartCopy and completion ETags
    made the close fail with EIO)."""
    rng = random.Random(22)
    m = _mount(fusion_mount, server_bucket)
    expected: dict[str, bytearray] = {}
    for i in range(5):
        name = f"f{i}"
        size = rng.randrange(8 * _MIB, 32 * _MIB)
        expected[name] = bytearray(_pattern(size + _MIB, i)[:size])
        with open(m.path / name, "wb") as f:
            f.write(expected[name])
    for name, want in expected.items():
        fd = os.open(m.path / name, os.O_WRONLY)
        try:
            for _ in range(rng.randrange(2, 6)):
                piece = rng.randbytes(rng.choice([1, rng.randrange(1, 400_000)]))
                off = rng.randrange(0, len(want) - len(piece))
                assert os.pwrite(fd, piece, off) == len(piece)
                want[off : off + len(piece)] = piece
        finally:
            os.close(fd)  # EIO here was the failure
    for name, want in expected.items():
        assert (m.path / name).read_bytes() == want, name
    m = m.remount(fresh_cache=True)
    for name, want in expected.items():
        assert (m.path / name).read_bytes() == want, name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("s3_server", ["moto", "rgw"], indirect=True)
@pytest.mark.allow_logs("write failed with ESTALE")  # what the test wants to see logged
def test_a_lost_in_place_write_is_an_error_and_a_warning(
    fusion_mount: Any, server_bucket: S3Bucket
) -> None:
    """[S-FAIL-4] An in-place rewrite of a file that another client replaced meanwhile cannot
    be merged: ``close`` fails (the kernel reports the failed writeback as EIO) and the daemon's
    log says why at WARNING (it held nothing above INFO when RGW's ETags caused the same, with
    ESTALE from the WRITEs)."""
    m = _mount(fusion_mount, server_bucket)
    size = 12 * _MIB
    (m.path / "f").write_bytes(_pattern(size, 3))
    other = _pattern(size + _MIB, 4)[1 : size + 1]
    server_bucket.client.put_object(Bucket=server_bucket.name, Key="f", Body=other)
    fd = os.open(m.path / "f", os.O_WRONLY)
    failed = None
    try:
        os.pwrite(fd, b"x" * 1000, 7 * _MIB)
    except OSError as err:
        failed = err
    finally:
        try:
            os.close(fd)
        except OSError as err:
            failed = failed or err
    log = m.log_path.read_text(errors="replace")
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    if failed is None:  # the open saw the new version: nothing was lost
        body = server_bucket.client.get_object(Bucket=server_bucket.name, Key="f")["Body"]
        merged = body.read()
        assert merged[7 * _MIB : 7 * _MIB + 1000] == b"x" * 1000
        assert merged[: 7 * _MIB] == other[: 7 * _MIB]
        return
    assert failed.errno == errno.EIO, failed
    assert any("write failed with ESTALE" in line for line in warnings), (
        f"close failed ({failed}) but the log does not say why at WARNING:\n{log[-3000:]}"
    )
