"""Data at rest: server-side encryption on every upload (S3), and local files private to root.

Snapshot images hold process memory, so whatever the mount writes (objects, parts, copies,
directory markers) carries the SSE settings, and chunk cache and staging files are 0600 in 0700
directories (README, "Security").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from mount_support import Target

_MIB = 1 << 20


def _keys(target: Target) -> list[str]:
    pages = target.client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.mark.timeout(120)
def test_sse_aes256_applies_to_puts_multipart_copies_and_markers(
    fusion_mount: Any, s3_target: Target
) -> None:
    m = fusion_mount(
        s3_target.source,
        (*s3_target.mount_args, "--sse", "AES256"),
    )
    (m.path / "small").write_bytes(b"x" * 1000)  # one PUT
    big = os.urandom(40 * _MIB)  # streamed as a multipart upload (16 MiB parts)
    (m.path / "big").write_bytes(big)
    (m.path / "dir").mkdir()  # a directory marker
    os.rename(m.path / "small", m.path / "dir" / "moved")  # a server-side copy
    os.sync()
    keys = _keys(s3_target)
    assert sorted(keys) == ["big", "dir/", "dir/moved"]
    for key in keys:
        head = s3_target.client.head_object(Bucket=s3_target.bucket, Key=key)
        assert head.get("ServerSideEncryption") == "AES256", (key, head)
    assert s3_target.get("big") == big


@pytest.mark.timeout(60)
def test_sse_kms_key_id_is_passed_through(fusion_mount: Any, s3_target: Target) -> None:
    key_id = "arn:aws:kms:us-east-1:123456789012:key/fusionfs-test"
    m = fusion_mount(
        s3_target.source,
        (*s3_target.mount_args, "--sse", "aws:kms", "--sse-kms-key-id", key_id),
    )
    (m.path / "secret").write_bytes(b"memory pages")
    head = s3_target.client.head_object(Bucket=s3_target.bucket, Key="secret")
    assert head.get("ServerSideEncryption") == "aws:kms"
    assert head.get("SSEKMSKeyId") == key_id


def _modes(root: Path) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = ("dir", stat.S_IMODE(p.stat().st_mode))
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = ("file", stat.S_IMODE(p.lstat().st_mode))
    return out


@pytest.mark.timeout(60)
def test_cache_and_staging_files_are_private(
    fusion_mount: Any, local_target: Target, tmp_path: Path
) -> None:
    cache = tmp_path / "private-cache"
    old = os.umask(0)  # the daemon must not depend on a restrictive umask
    try:
        m = fusion_mount(local_target.source, local_target.mount_args, cache_dir=cache)
    finally:
        os.umask(old)
    data = os.urandom(3 * _MIB)
    local_target.put("read-me", data)
    assert (m.path / "read-me").read_bytes() == data  # fills the chunk cache
    with open(m.path / "being-written", "wb") as f:  # staged while open
        f.write(data)
        f.flush()
        # the kernel hands the writes over now: 3 MiB is past what a new file may hold in
        # memory (S-WRITE-9), so its staging file exists from here until the close
        os.fsync(f.fileno())
        seen = _modes(cache)
    seen.update(_modes(cache))
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    kinds = {kind for kind, _ in seen.values()}
    assert kinds == {"dir", "file"}, seen
    chunk_files = [p for p in seen if p.startswith("cache/chunks/") and seen[p][0] == "file"]
    staged = [p for p in seen if p.startswith("staging/") and p.endswith(".data")]
    assert chunk_files and staged, seen
    loose = {
        p: mode
        for p, (kind, mode) in seen.items()
        if (kind == "dir" and mode != 0o700) or (kind == "file" and mode & 0o077)
    }
    assert loose == {}, f"readable by others: {loose}"
