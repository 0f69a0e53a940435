"""End-to-end integrity through real mounts on real S3 servers (``docs/SEMANTICS.md``,
S-INTEG-1 to S-INTEG-3, and the servers' measured answers in S-SRV-6).

What each server does with the CRC32C uploads carry is checked out of band with boto3; then a
byte is flipped where it would rot -- in the object in the bucket (rewritten with boto3, keeping
the original's checksum and metadata: corruption at rest) and in a chunk file of the disk cache
-- and a whole read through the mount must fail with EIO or return the right bytes, never the
flipped ones. (Corruption in flight, fetched again, is covered in ``tests/fs/test_faults.py``.)
"""

from __future__ import annotations

import base64
import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest
from awscrt import checksums
from mount_support import stats
from s3servers import S3Bucket

pytestmark = pytest.mark.mount

MiB = 1 << 20
SMALL = 3 * MiB  # one GET fetches it whole: checked before any byte is served
LARGE = 12 * MiB  # one PUT, several GETs: checked when read to its end (chunks folded)
MULTI = 20 * MiB  # a streamed multipart upload (16 MiB parts)


def _crc32c(data: bytes) -> str:
    return base64.b64encode(checksums.crc32c(data).to_bytes(4, "big")).decode()


def _mount(fusion_mount: Any, bucket: S3Bucket, *args: str) -> Any:
    return fusion_mount(
        bucket.source, extra_args=("--endpoint-url", bucket.endpoint, *args), env=bucket.env
    )


def _read_or_errno(path: Path) -> bytes | int:
    """The file read whole, sequentially (as ``cp`` does), or the errno that stopped it."""
    try:
        with open(path, "rb") as f:
            out = bytearray()
            while piece := f.read(1 << 20):
                out += piece
            return bytes(out)
    except OSError as err:
        assert err.errno is not None
        return err.errno


def _rot(bucket: S3Bucket, key: str) -> bytes:
    """Flip one byte of ``key`` in the bucket, keeping the original's metadata and checksum
    (moto stores a given checksum without checking it, as a rotted disk would leave it)."""
    client = bucket.client
    head = client.head_object(Bucket=bucket.name, Key=key, ChecksumMode="ENABLED")
    body = client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    bad = bytearray(body)
    bad[len(bad) // 3] ^= 0x10
    extra: dict[str, Any] = {}
    if head.get("ChecksumCRC32C") and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        extra = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": head["ChecksumCRC32C"]}
    client.put_object(
        Bucket=bucket.name, Key=key, Body=bytes(bad), Metadata=head.get("Metadata", {}), **extra
    )
    return body


@pytest.mark.parametrize("s3_server", ["moto", "s3rver", "rgw"], indirect=True)
@pytest.mark.timeout(240)
def test_uploads_carry_a_crc32c_that_the_server_keeps_or_metadata_records(
    server_bucket: S3Bucket, fusion_mount: Any
) -> None:
    """S-INTEG-1, S-SRV-6: what each server keeps of the CRC32C an upload carries. moto keeps
    it (and a multipart upload's FULL_OBJECT CRC32C); s3rver 3.7.1 and Ceph RGW 16 ignore it,
    so a single PUT records it in metadata (``fusion-crc32c``) and a multipart object has none."""
    m = _mount(fusion_mount, server_bucket)
    rng = random.Random(1)
    small, multi = rng.randbytes(SMALL), rng.randbytes(MULTI)
    (m.path / "small").write_bytes(small)
    (m.path / "multi").write_bytes(multi)
    client, name, server = server_bucket.client, server_bucket.name, server_bucket.server
    assert server is not None
    one = client.head_object(Bucket=name, Key="small", ChecksumMode="ENABLED")
    parts = client.head_object(Bucket=name, Key="multi", ChecksumMode="ENABLED")
    if server.name == "moto":
        assert one.get("ChecksumCRC32C") == _crc32c(small)
        assert parts.get("ChecksumCRC32C") == _crc32c(multi)
        assert parts.get("ChecksumType") == "FULL_OBJECT"
    else:
        assert "ChecksumCRC32C" not in one and "ChecksumCRC32C" not in parts
        assert one["Metadata"].get("fusion-crc32c") == _crc32c(small)
        assert "fusion-crc32c" not in parts["Metadata"]
    # the record is the store's own: never shown as a user attribute
    assert "user.fusion-crc32c" not in os.listxattr(m.path / "small")


@pytest.mark.parametrize("s3_server", ["moto", "s3rver", "rgw"], indirect=True)
@pytest.mark.allow_logs(
    "the object does not match its stored checksum",  # the first GET: fetched again
    "does not match its stored CRC32C",  # ... on two fetches: EIO
    "read bytes do not match the stored CRC32C",  # a whole read's fold: EIO
    "do not match the object's CRC32C",  # ... its cached chunks are dropped
)
@pytest.mark.timeout(240)
def test_a_byte_flipped_in_the_bucket_is_eio_never_served_and_the_fixed_object_reads_right(
    server_bucket: S3Bucket, fusion_mount: Any
) -> None:
    """S-INTEG-2: objects written through the mount get a byte flipped in the bucket by another
    client that keeps their checksum (corruption at rest). On a fresh mount every whole read
    fails with EIO (the small object before any byte is served); once the object is put right,
    the same mount reads the right bytes (nothing wrong was cached). Lookups never fail for it:
    the corrupt file can be listed, stat'ed and removed. On moto a multipart
    object is checked too (its FULL_OBJECT CRC32C); on s3rver and RGW it has none (S-INTEG-3)."""
    m = _mount(fusion_mount, server_bucket, "--metadata-ttl", "0.2")
    server = server_bucket.server
    assert server is not None
    rng = random.Random(2)
    files = {
        "tiny": rng.randbytes(100_000),  # looked up and read by one GET (S-MAP-8)
        "small": rng.randbytes(SMALL),
        "large": rng.randbytes(LARGE),
    }
    if server.name == "moto":
        files["multi"] = rng.randbytes(MULTI)
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    m = m.remount(fresh_cache=True)
    originals = {name: _rot(server_bucket, name) for name in files}
    assert originals == files
    for name, data in files.items():
        assert os.stat(m.path / name).st_size == len(data)  # the lookup does not fail
        assert _read_or_errno(m.path / name) == errno.EIO, name
        assert _read_or_errno(m.path / name) == errno.EIO, name  # every time
    with open(m.path / "small", "rb") as f:  # not one byte of the small object
        with pytest.raises(OSError) as info:
            f.read(4096)
        assert info.value.errno == errno.EIO
    counters = stats(m.path)
    assert counters["checksum_mismatches"] >= len(files) * 2
    assert counters["objects_verified"] == 0
    for name, data in files.items():  # put right by another client: read right
        server_bucket.client.put_object(Bucket=server_bucket.name, Key=name, Body=data)
    for name, data in files.items():
        assert _read_or_errno(m.path / name) == data, name


@pytest.mark.parametrize("s3_server", ["moto", "s3rver"], indirect=True)
@pytest.mark.allow_logs(
    "read bytes do not match the stored CRC32C",  # the read served from the flipped file: EIO
    "do not match the object's CRC32C",  # ... its cached chunks are dropped
)
@pytest.mark.timeout(240)
def test_a_byte_flipped_in_a_cache_file_is_eio_then_fetched_again(
    server_bucket: S3Bucket, fusion_mount: Any
) -> None:
    """S-INTEG-2 over the disk cache: after a clean unmount (whose CLEAN marker spares the
    cache's own XXH3 pass at the next mount), a byte is flipped in every cached chunk file of a
    file. The next mount's whole read fails with EIO and drops those chunks; the read after
    fetches the right bytes again."""
    m = _mount(fusion_mount, server_bucket)
    data = random.Random(3).randbytes(LARGE)
    (m.path / "f").write_bytes(data)
    m = m.remount(fresh_cache=True)
    assert _read_or_errno(m.path / "f") == data
    assert stats(m.path)["objects_verified"] == 1
    cache_dir = m.cache_dir
    m.unmount()
    chunk_files = [p for p in (cache_dir / "cache" / "chunks").rglob("*") if p.is_file()]
    assert len(chunk_files) == LARGE // MiB
    for path in chunk_files:
        with open(path, "r+b") as f:
            f.seek(4096 + 12345)
            byte = f.read(1)
            f.seek(4096 + 12345)
            f.write(bytes([byte[0] ^ 0x01]))
    m = m.remount()  # the same cache directory
    assert _read_or_errno(m.path / "f") == errno.EIO
    assert _read_or_errno(m.path / "f") == data
    counters = stats(m.path)
    assert counters["checksum_mismatches"] == 1 and counters["objects_verified"] == 1
