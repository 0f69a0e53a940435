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
        list(
            pool.map(
                lambda i: client.put_object(Bucket=name, Key=f"many/{i:04d}.py", Body=b""),
                range(300),
            )
        )
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


_FALLBACK_LOGGED = "the server cannot do CopyObject of some keys"


@pytest.mark.parametrize("s3_server", ["s3rver", "moto"], indirect=True)
@pytest.mark.timeout(120)
def test_chmod_and_rename_of_names_holding_equals_signs(
    s3_server: Any, server_bucket: S3Bucket, fusion_mount: Any
) -> None:
    """S-SRV-2: Snakemake's pattern on names ending in "=" (base64 padding): stat (ENOENT),
    create, write, close, chmod; then renames from and to such names, of a file and of a
    directory. s3rver answers CopyObject from such a key with NoSuchKey (chmod was ENOENT 20
    times of 20): the copy goes through this host, logged once per mount; moto copies
    server-side and logs nothing of it."""
    m = _mount(fusion_mount, server_bucket)
    meta = m.path / ".snakemake" / "metadata"
    meta.mkdir(parents=True)
    names = [f"cmVzdWx0cy9{i}LnR4dA==" for i in range(3)]
    for name in names:
        p = meta / name
        with pytest.raises(FileNotFoundError):
            os.stat(p)
        with open(p, "w") as f:
            f.write('{"rule": "align"}')
        os.chmod(p, 0o660)
        assert os.stat(p).st_mode & 0o777 == 0o660
    os.rename(meta / names[0], meta / "plain")
    os.rename(meta / "plain", meta / "again=")
    os.utime(meta / "again=", (1_700_000_000, 1_700_000_000))
    os.rename(m.path / ".snakemake", m.path / "moved=")
    m = m.remount(fresh_cache=True)
    moved = m.path / "moved=" / "metadata"
    assert sorted(os.listdir(moved)) == sorted(["again=", *names[1:]])
    for name in ["again=", *names[1:]]:
        assert (moved / name).read_text() == '{"rule": "align"}'
        assert os.stat(moved / name).st_mode & 0o777 == 0o660
    # (checked in the object: a stat after a listing on a fresh mount shows LastModified,
    # a separate bug noted in the report)
    head = server_bucket.client.head_object(Bucket=server_bucket.name, Key="moved=/metadata/again=")
    assert float(head["Metadata"]["mtime"]) == 1_700_000_000
    logged = _log_text(m).count(_FALLBACK_LOGGED)
    first_mount_logged = (
        sum(
            Path(p).read_text(errors="replace").count(_FALLBACK_LOGGED)
            for p in sorted(m.log_path.parent.glob("mount*.log"))
        )
        - logged
    )
    assert first_mount_logged == (1 if s3_server.name == "s3rver" else 0)


@pytest.mark.parametrize("s3_server", ["s3rver"], indirect=True)
@pytest.mark.timeout(180)
def test_ls_l_of_a_fresh_directory_probes_its_entries_concurrently(
    server_bucket: S3Bucket, fusion_mount: Any
) -> None:
    """S-MAP-9: ``ls -l`` (a readdir, then an lstat of each entry in turn) of 300 files on a
    fresh mount, through a proxy adding 20 ms per request: the entries' metadata is fetched
    ahead, several requests at once, one request per entry (before: 9.4 s, one lookup after
    another; after: 1.2-2.0 s here), and every entry shows the mode its metadata holds."""
    from benchmarks.harness import ProxyProcess  # importable: s3rver_server put the repo first

    client, name = server_bucket.client, server_bucket.name
    n = 300

    def put(i: int) -> None:
        client.put_object(
            Bucket=name,
            Key=f"many/f{i:04d}",
            Body=b"x" * (i % 3),
            Metadata={"mode": str(0o100640), "mtime": f"{1_600_000_000 + i}.000000000"},
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(n)))
    host, port = server_bucket.endpoint.rsplit("//", 1)[1].split(":")
    with ProxyProcess((host, int(port)), ["--latency-ms", "20"]) as proxy:
        m = fusion_mount(
            server_bucket.source,
            extra_args=("--endpoint-url", proxy.endpoint_url),
            env={**server_bucket.env, "AWS_ENDPOINT_URL": proxy.endpoint_url},
        )
        started = time.monotonic()
        entries = {e.name: os.lstat(e.path) for e in os.scandir(m.path / "many")}
        elapsed = time.monotonic() - started
        requests = stats(m.path)["requests"]
        m.unmount()
    assert len(entries) == n
    for i in range(n):
        st = entries[f"f{i:04d}"]
        assert (st.st_mode & 0o777, st.st_size) == (0o640, i % 3)
    assert elapsed < 4, f"ls -l of {n} files took {elapsed:.1f} s ({requests})"
    assert requests.get("head", 0) + requests.get("get_head", 0) <= n + 20, requests
