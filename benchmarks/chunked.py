"""Chunked layout through a real mount on a local s3rver: write time and request counts.

Run as root: ``python -m benchmarks.chunked [--gib 1] [--data random|memory]``. Starts s3rver
(``benchmarks/s3rver.py``), mounts fusionfs on it, and measures, in one run:

1. ``plain``: a file of the given size written into a plain directory (streaming multipart),
   time until close + flush returned (durable);
2. ``chunked``: the same bytes into a chunked directory (packs), same measure;
3. ``chunked, 10 % changed``: the bytes with 10 % of the pages rewritten (1 MiB stretches),
   into a new chunked directory primed with ``dedup-from`` the previous one;
4. a cold read of the chunked file after a remount with an empty cache;
5. for reference, the same bytes PUT directly as 8 MiB objects with 8 threads (boto3).

For each: seconds, MB/s of logical bytes, and the store requests by kind (``fusionfs stats``).
Caveat: a 2-core machine shared with other work: run it several times and compare ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.s3rver import LocalS3rver

MiB = 1 << 20
PAGE = 4096


def _data(size: int, kind: str, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    if kind == "random":
        return b"".join(rng.randbytes(64 * MiB) for _ in range(0, size, 64 * MiB))[:size]
    out = bytearray()
    run = 64 * PAGE
    while len(out) < size:  # a third each: text, zeros, noise (about 3x compressible)
        k = rng.randrange(3)
        if k == 0:
            line = f"record {len(out)} {rng.randrange(10**9)}\n".encode()
            out += (line * (run // len(line) + 1))[:run]
        elif k == 1:
            out += bytes(run)
        else:
            out += rng.randbytes(run)
    return bytes(out[:size])


def _change(data: bytes, fraction: float, seed: int = 2) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    n, run = len(data) // PAGE, 256
    for _ in range(int(n * fraction) // run):
        start = rng.randrange(0, n - run)
        out[start * PAGE : (start + run) * PAGE] = rng.randbytes(run * PAGE)
    return bytes(out)


def _stats(mnt: Path) -> dict[str, Any]:
    from fusionfs import client

    return client.stats(mnt)


def _requests_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    b, a = before.get("requests", {}), after.get("requests", {})
    return {k: a[k] - b.get(k, 0) for k in a if a[k] - b.get(k, 0)}


def _write(mnt: Path, path: Path, data: bytes) -> float:
    from fusionfs import client

    started = time.monotonic()
    with open(path, "wb") as f:
        for off in range(0, len(data), MiB):
            f.write(data[off : off + MiB])
    client.flush(mnt)  # close committed it; nothing left to flush
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--data", choices=["random", "memory"], default="random")
    args = parser.parse_args()
    from fusionfs import client

    size = int(args.gib * 1024) * MiB
    data = _data(size, args.data)
    changed = _change(data, 0.10)
    results: dict[str, Any] = {"bytes": size, "data": args.data}
    with LocalS3rver() as server, tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID=server.access_key,
            AWS_SECRET_ACCESS_KEY=server.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
        )
        mnt, cache = Path(tmp) / "mnt", Path(tmp) / "cache"
        mnt.mkdir()

        def mount() -> None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fusionfs",
                    "mount",
                    f"s3://{server.bucket}",
                    str(mnt),
                    "--cache-dir",
                    str(cache),
                    "--endpoint-url",
                    server.endpoint_url,
                ],
                env=env,
                check=True,
                timeout=60,
            )

        def unmount() -> None:
            subprocess.run(
                [sys.executable, "-m", "fusionfs", "unmount", str(mnt)], check=True, timeout=300
            )

        mount()
        try:
            (mnt / "plain").mkdir()
            (mnt / "snaps").mkdir()
            client.set_layout(mnt / "snaps")
            (mnt / "snaps" / "1").mkdir()
            (mnt / "snaps" / "2").mkdir()
            for name, path, blob in [
                ("plain", mnt / "plain" / "pages-1.img", data),
                ("chunked", mnt / "snaps" / "1" / "pages-1.img", data),
                ("chunked, 10 % changed", mnt / "snaps" / "2" / "pages-1.img", changed),
            ]:
                if name.startswith("chunked, 10"):
                    t = time.monotonic()
                    client.dedup_from(mnt / "snaps" / "2", mnt / "snaps" / "1")
                    results["dedup_from_s"] = round(time.monotonic() - t, 3)
                before = _stats(mnt)
                seconds = _write(mnt, path, blob)
                after = _stats(mnt)
                row: dict[str, Any] = {
                    "s": round(seconds, 3),
                    "MB/s": round(size / seconds / 1e6, 1),
                    "requests": _requests_delta(before, after),
                }
                if name != "plain":
                    row["chunk_stats"] = client.chunk_stats(path.parent)
                results[name] = row
            unmount()
            import shutil

            shutil.rmtree(cache)
            mount()
            for name, path in [
                ("cold read, chunked", mnt / "snaps" / "1" / "pages-1.img"),
                ("cold read, plain", mnt / "plain" / "pages-1.img"),
            ]:
                before = _stats(mnt)
                t = time.monotonic()
                with open(path, "rb") as f:
                    n = 0
                    while chunk := f.read(4 * MiB):
                        n += len(chunk)
                seconds = time.monotonic() - t
                assert n == size
                results[name] = {
                    "s": round(seconds, 3),
                    "MB/s": round(size / seconds / 1e6, 1),
                    "requests": _requests_delta(before, _stats(mnt)),
                }
        finally:
            subprocess.run(
                [sys.executable, "-m", "fusionfs", "unmount", str(mnt)], timeout=300, check=False
            )
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
        )
        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: s3.put_object(
                        Bucket=server.bucket,
                        Key=f"direct/{i}",
                        Body=data[i * 8 * MiB : (i + 1) * 8 * MiB],
                    ),
                    range(size // (8 * MiB)),
                )
            )
        seconds = time.monotonic() - t
        results["direct 8 MiB PUTs x 8 threads"] = {
            "s": round(seconds, 3),
            "MB/s": round(size / seconds / 1e6, 1),
        }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
