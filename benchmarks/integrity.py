"""What checking reads against a stored checksum costs (S-INTEG-2): one object read through
fusionfs with and without a stored full-object checksum, cold and warm, alternating.

``python -m benchmarks.integrity [--size-mib 256] [--runs 5]``: starts a local s3rver, puts the
same bytes twice, ``plain`` (no checksum: s3rver keeps none, as for any other tool's upload)
and ``checked`` (its CRC32C recorded in metadata, as fusionfs's own single PUT records it on
such servers: the mount then checks every whole read of it), and reads each through a fresh
mount with an empty cache (cold) and then through a new mount on the kept cache (warm), with
the page cache dropped before each read. Prints MB/s and the daemon's CPU seconds per read;
``objects_verified`` of the mount confirms the check ran. Needs root and fuse3, as the fs suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from awscrt import checksums

from benchmarks.harness import drop_page_cache, process_cpu_s
from benchmarks.mounters import mount_daemon_pid
from benchmarks.s3rver import LocalS3rver

_MiB = 1 << 20


def _fusionfs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fusionfs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def _read_once(
    mnt: Path, name: str, cache: Path, server: LocalS3rver, env: dict[str, str]
) -> tuple[float, float, int]:
    mount = _fusionfs(
        "mount",
        f"s3://{server.bucket}",
        str(mnt),
        "--cache-dir",
        str(cache),
        "--endpoint-url",
        server.endpoint_url,
        env=env,
    )
    if mount.returncode != 0:
        raise SystemExit(f"error: fusionfs mount failed: {mount.stderr.strip()[-300:]}")
    try:
        pid = mount_daemon_pid(mnt)
        drop_page_cache()
        cpu0 = process_cpu_s(pid) if pid else None
        started = time.perf_counter()
        with open(mnt / name, "rb", buffering=0) as f:
            while f.read(8 * _MiB):
                pass
        elapsed = time.perf_counter() - started
        cpu1 = process_cpu_s(pid) if pid else None
        stats: dict[str, Any] = json.loads(_fusionfs("stats", str(mnt), "--json", env=env).stdout)
        cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else float("nan")
        return elapsed, cpu, int(stats.get("objects_verified", 0))
    finally:
        _fusionfs("unmount", str(mnt), env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.integrity", description=__doc__)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args(argv)
    if a.size_mib <= 0 or a.runs <= 0:
        print("error: --size-mib and --runs must be positive", file=sys.stderr)
        return 2
    size = a.size_mib * _MiB
    data = os.urandom(size)
    crc = checksums.crc32c(data).to_bytes(4, "big")
    import base64

    import boto3

    server = LocalS3rver("bench")
    server.start()
    work = Path(tempfile.mkdtemp(prefix="bench-integrity-"))
    try:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
        )
        client.put_object(Bucket="bench", Key="plain", Body=data)
        client.put_object(
            Bucket="bench",
            Key="checked",
            Body=data,
            Metadata={"fusion-crc32c": base64.b64encode(crc).decode()},
        )
        mnt = work / "mnt"
        mnt.mkdir()
        rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for run in range(a.runs):
            for name in ("plain", "checked") if run % 2 == 0 else ("checked", "plain"):
                cache = work / f"cache-{name}-{run}"
                for kind in ("cold", "warm"):
                    elapsed, cpu, verified = _read_once(mnt, name, cache, server, env)
                    rows.setdefault((kind, name), []).append((elapsed, cpu))
                    print(
                        f"run {run + 1} {kind:4s} {name:7s}: {size / elapsed / 1e6:7.1f} MB/s, "
                        f"daemon cpu {cpu:.2f} s, objects_verified {verified}",
                        flush=True,
                    )
                shutil.rmtree(cache, ignore_errors=True)
        print(f"\n{a.size_mib} MiB, {a.runs} runs each, medians (min-max):")
        for (kind, name), got in sorted(rows.items()):
            speeds = [size / e / 1e6 for e, _ in got]
            cpus = [c for _, c in got]
            print(
                f"| seq read {kind} | {name} | {statistics.median(speeds):.0f} "
                f"({min(speeds):.0f}-{max(speeds):.0f}) MB/s | daemon cpu "
                f"{statistics.median(cpus):.2f} ({min(cpus):.2f}-{max(cpus):.2f}) s |"
            )
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
