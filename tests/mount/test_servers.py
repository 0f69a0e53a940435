"""Real mounts on the S3 servers whose quirks fusionfs answers (``docs/SEMANTICS.md``,
"S3 servers' quirks"): each test names the servers it runs on through ``s3_server``.

s3rver is where the quirks are; moto (S3's reference semantics) checks that the normal path
is still the one taken there.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from mount_support import stats
from s3servers import S3Bucket

pytestmark = pytest.mark.mount


def _mount(fusion_mount: Any, bucket: S3Bucket, *args: str) -> Any:
    return fusion_mount(
        bucket.source, extra_args=("--endpoint-url", bucket.endpoint, *args), env=bucket.env
    )


def _log_text(mount: Any) -> str:
    return Path(mount.log_path).read_text(errors="replace")


@pytest.mark.parametrize("s3_server", ["s3rver", "moto"], indirect=True)
@pytest.mark.timeout(120)
def test_an_empty_file_reads_back_at_once_from_a_fresh_mount(
    server_bucket: S3Bucket, fusion_mount: Any
) -> None:
    """S-SRV-1: an empty file written through the mount is looked up and read on a fresh
    mount at once (s3rver answered the lookup's ranged GET with a body one byte short, on
    every attempt: 5 retries over about 30 s, then EIO), and its lookup is a HEAD, no GET."""
    m = _mount(fusion_mount, server_bucket)
    (m.path / "d").mkdir()
    (m.path / "d" / "__init__.py").write_bytes(b"")
    (m.path / "d" / "one").write_bytes(b"x")
    m = m.remount(fresh_cache=True)
    started = time.monotonic()
    names = sorted(os.listdir(m.path / "d"))
    assert names == ["__init__.py", "one"]
    assert os.stat(m.path / "d" / "__init__.py").st_size == 0
    assert (m.path / "d" / "__init__.py").read_bytes() == b""
    assert (m.path / "d" / "one").read_bytes() == b"x"
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"lookups and reads took {elapsed:.1f} s"
    counters = stats(m.path)
    requests = counters["requests"]
    assert requests.get("get_head", 0) == 1, requests  # "one" only: the empty file is HEADed
    assert counters["retries"] == 0


@pytest.mark.parametrize("s3_server", ["s3rver"], indirect=True)
@pytest.mark.timeout(180)
def test_a_directory_of_empty_files_hashes_at_once_on_a_fresh_mount(
    server_bucket: S3Bucket, fusion_mount: Any
) -> None:
    """S-SRV-1: hashing every file of a directory of 300 empty files (written by another
    client) on a fresh mount takes seconds (before: 30 s per file on s3rver)."""
    client, name = server_bucket.client, server_bucket.name
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=name, Key=f"many/{i:04d}.py", Body=b""),
                      range(300)))
    m = _mount(fusion_mount, server_bucket)
    started = time.monotonic()
    digests = {
        entry.name: hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
        for entry in os.scandir(m.path / "many")
    }
    elapsed = time.monotonic() - started
    assert len(digests) == 300
    assert set(digests.values()) == {hashlib.sha256(b"").hexdigest()}
    assert elapsed < 60, f"hashing 300 empty files took {elapsed:.1f} s"
    assert stats(m.path)["requests"].get("get_head", 0) == 0
