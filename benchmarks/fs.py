"""The ``fs`` benchmark: fusionfs against direct boto3, local disk and peers, on one S3 server.

Scenarios (each the median of ``--runs`` with min and max; data from a fixed seed):

- ``seq read cold``: one object (1 GiB; ``--quick`` 256 MiB) read sequentially in 1 MiB reads
  through a fresh mount with an empty cache dir; beside direct boto3 parallel ranged GETs
  (8 threads x 8 MiB) and the same bytes from a local file after dropping the page cache.
- ``seq read warm``: the same read after a remount on the same cache dir, page cache dropped:
  served by the mount's own disk cache (fusionfs chunk cache, rclone's VFS cache).
  Both sequential reads and the sequential write also run through ``fusionfs --direct-io``
  (row ``fusionfs --direct-io``: read-only and write-only opens bypass the kernel page cache,
  docs/SEMANTICS.md S-READ-4).
- ``rand read 4KiB`` / ``rand read 1MiB``: random aligned reads (pread, POSIX_FADV_RANDOM) through
  a fresh mount against single ranged GETs, one at a time: p50/p99 latency and throughput.
- ``seq write``: the same amount written in 1 MiB writes until durable: close returns once the
  object is committed (fusionfs, s3fs); rclone uploads after close, so its time runs until a HEAD
  shows the whole object; direct boto3 multipart upload (8 threads x 16 MiB); local disk with
  write + fsync.
- ``rewrite in place``: the written object patched as samtools, sqlite and tar patch files:
  a fresh mount (empty cache) opens it ``O_WRONLY``, ``pwrite``s 16 pieces of 1 B to 400 KB at
  scattered offsets (a fixed seed; some straddle two chunks), and closes until durable; every
  piece is then checked with a ranged GET. Against direct boto3 doing the same without a
  filesystem: parallel ranged GETs of the whole object, the pieces patched in memory, a multipart
  upload (8 threads x 16 MiB). Seconds (lower is better).
- ``stat objects`` / ``list objects``: stat of each of 10 000 small objects (quick: 2000), one
  after another, and one listing of their directory, each on a fresh mount; against HEAD of
  each / ``list_objects_v2``.
- ``small files create`` / ``small files read``: 10 000 files of 4 KiB (quick: 2000; distinct
  contents), by 8 workers at once for every tool: created through a mount until durable (each
  ``close`` returns once the object is committed; rclone's clock runs until a listing shows all
  of them), then read back (``listdir`` + read each) on a fresh mount with an empty cache dir;
  against direct boto3 (8 threads: PUT each, then LIST + GET each) and local disk (write +
  fsync each + fsync of the dir; read after dropping the page cache). Files per second; every
  byte read back is compared.
- Read sweeps, for the plot of read throughput against concurrency and chunk size (``--no-sweeps``
  skips them): ``read vs chunk size``: the cold sequential read through fusionfs mounted with
  ``--chunk-size`` 256K, 1M and 4M; ``read vs threads``: direct boto3 ranged GETs of 8 MiB with
  1, 2, 4, 8 and 16 threads; ``read vs readers``: 1, 2 and 4 files (each a quarter of the object
  size) read at once, each by its own thread in 1 MiB reads, through one fresh fusionfs mount:
  their total MB/s.

Caveats: against the local s3rver the server is the ceiling (DESIGN.md), and its multipart
completion is slow; the server's object file is warmed by an unmeasured GET before the cold reads
of each run, so cold means "client cold"; correctness of what mounts return is checked on 64
sampled 4 KiB blocks per read, not every byte; peers are run only when installed (``s3fs``,
``rclone``), not for stat/list.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.base import (
    SEED,
    Bench,
    BenchError,
    Store,
    StoreSettings,
    common_settings,
    count_objects,
    delete_under,
    out_dir,
    run_in_store,
)
from benchmarks.harness import (
    CpuMeter,
    Results,
    cpu_budget_note,
    drop_page_cache,
    last_line,
    mb_per_s,
    run_cmd,
)
from benchmarks.mounters import (
    FUSIONFS,
    Fusionfs,
    Mounter,
    MountError,
    Rclone,
    S3fs,
    force_unmount,
    mount_daemon_pid,
)

__all__ = ["FsConfig", "run_fs"]

_MIB = 1 << 20
_READ_BLOCK = _MIB
_LS_TIMEOUT = 180.0
_DIRECT = "direct boto3"
_DISK = "local disk"
_FUSIONFS = FUSIONFS
_FUSIONFS_DIO = "fusionfs --direct-io"  # the same mount, page cache bypassed (S-READ-4)
_LS_L = "ls -l {n} files, fresh mount"
_SMALL_CREATE = "small files create"
_SMALL_READ = "small files read"
_SMALL_SIZE = 4096
_SMALL_WORKERS = 8  # every tool gets the same number of files in flight
_SWEEP_CHUNK = "read vs chunk size"
_SWEEP_THREADS = "read vs threads"
_SWEEP_READERS = "read vs readers"
_CHUNK_SIZES_KIB = (256, 1024, 4096)
_THREAD_COUNTS = (1, 2, 4, 8, 16)
_READER_COUNTS = (1, 2, 4)


@dataclass
class FsConfig(StoreSettings):
    size_mib: int | None = None
    objects: int | None = None
    peers: bool = True
    small_files: int | None = None
    sweeps: bool = True

    @property
    def size(self) -> int:
        return (self.size_mib or (256 if self.quick else 1024)) * _MIB

    @property
    def n_objects(self) -> int:
        return self.objects or (2000 if self.quick else 10000)

    @property
    def n_small(self) -> int:
        return self.small_files or (2000 if self.quick else 10000)


# -- data -------------------------------------------------------------------------------------


def _make_data(size: int, seed: int = SEED) -> bytes:
    """``size`` incompressible bytes, the same for the same size and seed on every machine."""
    import blake3

    return bytes(blake3.blake3(seed.to_bytes(8, "little")).digest(length=size))


def small_files_figures(
    files: int, file_size: int, seconds: float, workers: int
) -> tuple[float, dict[str, float]]:
    """The primary figure (files per second) and the details of one small-files measurement."""
    if files <= 0 or seconds <= 0:
        raise ValueError(f"no small-files figure for {files} files in {seconds} s")
    details = {
        "seconds": seconds,
        "files": float(files),
        "mb_per_s": files * file_size / seconds / 1e6,
        "workers": float(workers),
    }
    return files / seconds, details


def cpu_notes(results: Results) -> list[str]:
    """Where the CPU went in the sequential reads, against the budget of the targets (issue:
    cold read 0.9x direct boto3; warm read 1 GB/s, as 1 GB/s against itself)."""
    cores = os.cpu_count() or 1
    notes = []
    for tool in (_FUSIONFS, _FUSIONFS_DIO):
        note = cpu_budget_note(
            results,
            "seq read cold",
            tool,
            _DIRECT,
            0.9,
            cores,
            mine=("cpu_daemon", "cpu_reader"),
            others=("cpu_server", "cpu_proxy"),
        )
        if note:
            notes.append(note)
    return notes


def small_files_summary(results: Results) -> list[str]:
    """One sentence per tool of the small-files scenarios: files/s (median) and how that
    compares with direct boto3 in the same runs. Pure: reads ``results.summary()`` only."""
    lines = []
    for row in results.summary():
        if row.scenario not in (_SMALL_CREATE, _SMALL_READ) or row.tool == _DIRECT:
            continue
        verb = "created until durable" if row.scenario == _SMALL_CREATE else "read back"
        files = int(row.extras.get("files", 0))
        text = f"{row.tool}: {files} files of 4 KiB {verb} at {row.median:.0f} files/s"
        ratio = row.ratios.get(_DIRECT)
        if ratio is not None:
            text += f" ({ratio[0]:.2f}x direct boto3"
            text += f", {ratio[1]:.2f}-{ratio[2]:.2f})" if row.runs > 1 else ")"
        lines.append(text)
    return lines


# -- the benchmark -----------------------------------------------------------------------------


class _Bench(Bench):
    name = "fs"

    def __init__(
        self, cfg: FsConfig, store: Store, results: Results, console: Console, work: Path
    ) -> None:
        super().__init__(store, results, console, work)
        self.cfg = cfg
        self.data = b""
        self.small_data = b""
        self.key = store.prefix + "seq/data.bin"
        self.src_file = work / "source.bin"
        self.client = store.client()
        self.setup_client = store.client(store.setup_url, pool=32)
        self.mounters: list[Mounter] = []
        self.direct_io_mounter: Mounter | None = None  # sequential reads and write
        self.mounted: list[tuple[Mounter, Path]] = []
        self.can_drop = drop_page_cache()

    # -- mounts --------------------------------------------------------------------------

    @contextlib.contextmanager
    def mount(self, mounter: Mounter, cache_dir: Path) -> Iterator[Path]:
        if mounter.broken:
            raise MountError(f"{mounter.name}: skipped after an earlier failure: {mounter.broken}")
        mountpoint = Path(tempfile.mkdtemp(prefix=f"mnt-{mounter.name}-", dir=self.work))
        try:
            mounter.mount(mountpoint, cache_dir)
        except BaseException as exc:
            # A failed mount can still have left a (hung) mount behind: never leave it there.
            force_unmount(mountpoint)
            mounter.broken = str(exc)
            raise
        self.mounted.append((mounter, mountpoint))
        try:
            yield mountpoint
        finally:
            self.mounted.remove((mounter, mountpoint))
            mounter.unmount(mountpoint)
            with contextlib.suppress(OSError):
                mountpoint.rmdir()

    def unmount_all(self) -> None:
        for mounter, mountpoint in reversed(self.mounted):
            with contextlib.suppress(Exception):
                mounter.unmount(mountpoint)
        self.mounted.clear()

    def fresh_dir(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # -- setup ---------------------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.cfg
        self.step("generating data")
        self.data = _make_data(cfg.size)
        self.src_file.write_bytes(self.data)
        self.small_data = _make_data(cfg.n_small * _SMALL_SIZE, SEED + 1)
        self.step(f"uploading the {cfg.size // _MIB} MiB test object")
        self._multipart(self.setup_client, self.key, 8, 16 * _MIB)
        if cfg.sweeps:
            self.step("uploading the objects of the concurrent-readers sweep")
            for k in range(max(_READER_COUNTS)):
                lo, hi = self._part_range(k)
                self.setup_client.put_object(
                    Bucket=self.store.bucket, Key=self._part_key(k), Body=self.data[lo:hi]
                )
        self.step(f"creating {cfg.n_objects} small objects")
        body = b"x" * 16

        def put(i: int) -> None:
            key = f"{self.store.prefix}many/f{i:05d}"
            self.setup_client.put_object(Bucket=self.store.bucket, Key=key, Body=body)

        with cf.ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(cfg.n_objects)))
        for cls in (Fusionfs, S3fs, Rclone):
            mounter = cls(self.store)
            if not cfg.peers and mounter.name != _FUSIONFS:
                continue
            reason = mounter.unavailable()
            if reason:
                for scenario in ("seq read cold", "seq write", _SMALL_CREATE):
                    self.results.mark_unavailable(scenario, mounter.name, reason)
                self.log(f"[yellow]{mounter.name}: not available: {reason}")
            else:
                self.mounters.append(mounter)
                if mounter.name == _FUSIONFS:
                    self.direct_io_mounter = Fusionfs(self.store, ["--direct-io"])
                    self.direct_io_mounter.name = _FUSIONFS_DIO

    def _multipart(self, client: Any, key: str, threads: int, part_size: int) -> None:
        bucket = self.store.bucket
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        view = memoryview(self.data)

        def part(n: int) -> dict[str, Any]:
            chunk = view[n * part_size : (n + 1) * part_size]
            resp = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n + 1, Body=bytes(chunk)
            )
            return {"PartNumber": n + 1, "ETag": resp["ETag"]}

        try:
            with cf.ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(part, range((len(self.data) + part_size - 1) // part_size)))
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    # -- primitives ----------------------------------------------------------------------

    def _read_file(self, path: Path, direct_io: bool = False) -> int:
        flags = os.O_RDONLY | (os.O_DIRECT if direct_io else 0)
        fd = os.open(path, flags)
        try:
            if direct_io:
                import mmap

                buf = mmap.mmap(-1, _READ_BLOCK)  # page-aligned, as O_DIRECT needs
            else:
                buf = bytearray(_READ_BLOCK)  # type: ignore[assignment]
            total = 0
            while True:
                n = os.readv(fd, [buf])
                if n == 0:
                    return total
                total += n
        finally:
            os.close(fd)

    def _verify(self, path: Path, run: int, span: tuple[int, int] | None = None) -> None:
        """64 sampled 4 KiB blocks of ``path`` against ``self.data[span]`` (default: all)."""
        rng = random.Random(SEED + run)
        base, end = span or (0, len(self.data))
        size = end - base
        with open(path, "rb", buffering=0) as f:
            for _ in range(64):
                off = rng.randrange(0, size - 4096) // 4096 * 4096
                got = os.pread(f.fileno(), 4096, off)
                if got != self.data[base + off : base + off + 4096]:
                    raise MountError(f"{path.name}: wrong bytes at offset {off}")

    def _get_range(
        self, client: Any, off: int, end: int, keep: bool = False, key: str | None = None
    ) -> tuple[int, bytes]:
        """One ranged GET; botocore retries the request, but not a body cut by a reset, so
        the body is retried here (bounded), as any real client must."""
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ResponseStreamingError

        for attempt in range(5):
            try:
                resp = client.get_object(
                    Bucket=self.store.bucket, Key=key or self.key, Range=f"bytes={off}-{end}"
                )
                if keep:
                    data = resp["Body"].read()
                    return len(data), data
                n = 0
                for chunk in resp["Body"].iter_chunks(_MIB):
                    n += len(chunk)
                return n, b""
            except (ResponseStreamingError, BotoConnectionError, OSError):
                if attempt == 4:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _direct_read(
        self,
        client: Any,
        threads: int = 8,
        part: int = 8 * _MIB,
        key: str | None = None,
        span: tuple[int, int] | None = None,
    ) -> int:
        """Parallel ranged GETs of the whole object ``key`` (default: the test object), whose
        size is that of ``span`` of the data (default: all)."""
        size = (span[1] - span[0]) if span else len(self.data)

        def get(off: int) -> int:
            return self._get_range(client, off, min(off + part, size) - 1, key=key)[0]

        with cf.ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(get, range(0, size, part)))

    def _drop(self) -> None:
        if self.can_drop:
            drop_page_cache()

    def _cpu(self, mountpoint: Path | None = None) -> CpuMeter:
        """``Store.cpu_meter`` with the daemon of the mount at ``mountpoint`` (the process
        whose command line names it)."""
        return self.store.cpu_meter(mount_daemon_pid(mountpoint) if mountpoint else None)

    # -- scenarios -----------------------------------------------------------------------

    def seq_reads(self, run: int) -> None:
        size = len(self.data)
        self.step(f"run {run + 1}: local disk read")
        if self.can_drop:
            self._drop()
            t0 = time.perf_counter()
            n = self._read_file(self.src_file)
        else:
            t0 = time.perf_counter()
            n = self._read_file(self.src_file, direct_io=True)
        self.record("seq read cold", _DISK, run, mb_per_s(n, time.perf_counter() - t0), "MB/s")
        self.step(f"run {run + 1}: warming the server, direct read")
        self._direct_read(self.client)  # unmeasured: the server's own file back into its cache
        with self._cpu() as cpu:
            t0 = time.perf_counter()
            n = self._direct_read(self.client)
            dt = time.perf_counter() - t0
        self.record(
            "seq read cold",
            _DIRECT,
            run,
            mb_per_s(n, dt),
            "MB/s",
            **cpu.per_gib(n, {"self": "client"}),
        )
        assert n == size
        extra = [self.direct_io_mounter] if self.direct_io_mounter is not None else []
        for mounter in [*self.mounters, *extra]:
            self.step(f"run {run + 1}: {mounter.name} cold + warm read")
            try:
                self._mount_seq_read(mounter, run)
            except (MountError, OSError) as exc:
                self.results.mark_unavailable("seq read cold", mounter.name, str(exc))
                self.log(f"[red]{exc}")

    def _mount_seq_read(self, mounter: Mounter, run: int) -> None:
        cache = self.fresh_dir(f"cache-{mounter.name}")
        rel = self.key[len(self.store.prefix) :]
        with self.mount(mounter, cache) as mnt:
            with self._cpu(mnt) as cpu:
                t0 = time.perf_counter()
                n = self._read_file(mnt / rel)
                dt = time.perf_counter() - t0
            if n != len(self.data):
                raise MountError(f"{mounter.name}: read {n} bytes, expected {len(self.data)}")
            self.record(
                "seq read cold",
                mounter.name,
                run,
                mb_per_s(n, dt),
                "MB/s",
                **cpu.per_gib(n, {"self": "reader"}),
            )
            self._verify(mnt / rel, run)
            stats = mounter.stats(mnt)
            if stats:
                self.results.extra.setdefault("fusionfs_stats", []).append(
                    {"run": run, "tool": mounter.name, **stats}
                )
        if not mounter.has_cache:
            return
        self._drop()
        with self.mount(mounter, cache) as mnt:
            with self._cpu(mnt) as cpu:
                t0 = time.perf_counter()
                n = self._read_file(mnt / rel)
                dt = time.perf_counter() - t0
            extra = cpu.per_gib(n, {"self": "reader"})
            stats = mounter.stats(mnt)
            if stats and n:  # what the cache did not hold: fetched again from the store
                extra["refetched_pct"] = 100 * stats.get("bytes_fetched", 0) / n
            self.record("seq read warm", mounter.name, run, mb_per_s(n, dt), "MB/s", **extra)
            self._verify(mnt / rel, run)
        shutil.rmtree(cache, ignore_errors=True)

    def random_reads(self, run: int) -> None:
        for size, count, label in ((4096, 300, "rand read 4KiB"), (_MIB, 100, "rand read 1MiB")):
            if self.cfg.quick:
                count //= 2
            rng = random.Random(SEED + run * 7 + size)
            offsets = [rng.randrange(0, len(self.data) - size) // 4096 * 4096 for _ in range(count)]
            self.step(f"run {run + 1}: {label} direct")
            lat = []
            for off in offsets:
                t0 = time.perf_counter()
                body = self._get_range(self.client, off, off + size - 1, keep=True)[1]
                lat.append(time.perf_counter() - t0)
                if body != self.data[off : off + size]:
                    raise BenchError(f"direct ranged GET returned wrong bytes at {off}")
            self._record_lat(label, _DIRECT, run, size, lat)
            for mounter in self.mounters:
                self.step(f"run {run + 1}: {label} {mounter.name}")
                try:
                    self._mount_random(mounter, run, label, size, offsets)
                except (MountError, OSError) as exc:
                    self.results.mark_unavailable(label, mounter.name, str(exc))
                    self.log(f"[red]{exc}")

    def _mount_random(
        self, mounter: Mounter, run: int, label: str, size: int, offsets: list[int]
    ) -> None:
        cache = self.fresh_dir(f"cache-{mounter.name}")
        rel = self.key[len(self.store.prefix) :]
        with self.mount(mounter, cache) as mnt:
            fd = os.open(mnt / rel, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                lat = []
                for off in offsets:
                    t0 = time.perf_counter()
                    got = os.pread(fd, size, off)
                    lat.append(time.perf_counter() - t0)
                    if got != self.data[off : off + size]:
                        raise MountError(f"{mounter.name}: wrong bytes at offset {off}")
            finally:
                os.close(fd)
        shutil.rmtree(cache, ignore_errors=True)
        self._record_lat(label, mounter.name, run, size, lat)

    def _record_lat(self, label: str, tool: str, run: int, size: int, lat: list[float]) -> None:
        lat_sorted = sorted(lat)
        p50 = statistics.median(lat_sorted) * 1000
        p99 = lat_sorted[min(len(lat_sorted) - 1, int(len(lat_sorted) * 0.99))] * 1000
        total = sum(lat)
        self.record(
            label,
            tool,
            run,
            mb_per_s(size * len(lat), total),
            "MB/s",
            p50_ms=p50,
            p99_ms=p99,
            ops_per_s=len(lat) / total,
        )

    def seq_writes(self, run: int) -> None:
        size = len(self.data)
        view = memoryview(self.data)
        self.step(f"run {run + 1}: local disk write + fsync")
        path = self.work / "write.bin"
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for off in range(0, size, _MIB):
                f.write(view[off : off + _MIB])
            os.fsync(f.fileno())
        self.record("seq write", _DISK, run, mb_per_s(size, time.perf_counter() - t0), "MB/s")
        path.unlink()
        self.step(f"run {run + 1}: direct multipart upload")
        key = f"{self.store.prefix}write/direct-{run}.bin"
        t0 = time.perf_counter()
        self._multipart(self.client, key, 8, 16 * _MIB)
        self.record("seq write", _DIRECT, run, mb_per_s(size, time.perf_counter() - t0), "MB/s")
        self.setup_client.delete_object(Bucket=self.store.bucket, Key=key)
        try:
            self._direct_rewrite(run)
        except (MountError, OSError) as exc:
            self.results.mark_unavailable("rewrite in place", _DIRECT, str(exc))
        extra = [self.direct_io_mounter] if self.direct_io_mounter is not None else []
        for mounter in [*self.mounters, *extra]:
            self.step(f"run {run + 1}: {mounter.name} write until durable")
            try:
                self._mount_write(mounter, run)
            except (MountError, OSError) as exc:
                self.results.mark_unavailable("seq write", mounter.name, str(exc))
                self.log(f"[red]{mounter.name}: write failed: {exc}")

    def _mount_write(self, mounter: Mounter, run: int) -> None:
        size = len(self.data)
        view = memoryview(self.data)
        cache = self.fresh_dir(f"cache-{mounter.name}")
        rel = f"write/{mounter.name}-{run}.bin"
        key = self.store.prefix + rel
        with self.mount(mounter, cache) as mnt:
            (mnt / "write").mkdir(exist_ok=True)
            t0 = time.perf_counter()
            with open(mnt / rel, "wb", buffering=0) as f:
                for off in range(0, size, _MIB):
                    f.write(view[off : off + _MIB])
            mounter.after_close(key, size)
            dt = time.perf_counter() - t0
            head = self.setup_client.head_object(Bucket=self.store.bucket, Key=key)
            if head["ContentLength"] != size:
                raise MountError(
                    f"{mounter.name}: after close the object has {head['ContentLength']} bytes"
                )
            self.record("seq write", mounter.name, run, mb_per_s(size, dt), "MB/s")
        shutil.rmtree(cache, ignore_errors=True)
        if mounter.name == _FUSIONFS:
            self._mount_rewrite(mounter, run, rel)
        self.setup_client.delete_object(Bucket=self.store.bucket, Key=key)

    def _rewrite_pieces(self, run: int) -> list[tuple[int, bytes]]:
        rng = random.Random(SEED + 1000 + run)
        size = len(self.data)
        pieces = []
        for _ in range(16):
            n = rng.choice([1, 4096, 70_000, 400_000])
            off = rng.randrange(0, size - n)
            if rng.random() < 0.4:  # straddle a 1 MiB chunk boundary
                off = max(0, off // _MIB * _MIB - n // 2)
            pieces.append((off, rng.randbytes(n)))
        return pieces

    def _mount_rewrite(self, mounter: Mounter, run: int, rel: str) -> None:
        """``rewrite in place`` through ``mounter`` (the object ``rel`` holds ``self.data``)."""
        pieces = self._rewrite_pieces(run)
        key = self.store.prefix + rel
        self.step(f"run {run + 1}: {mounter.name} rewrite in place")
        cache = self.fresh_dir(f"cache-{mounter.name}-rewrite")
        with self.mount(mounter, cache) as mnt:
            t0 = time.perf_counter()
            fd = os.open(mnt / rel, os.O_WRONLY)
            try:
                for off, piece in pieces:
                    os.pwrite(fd, piece, off)
            finally:
                os.close(fd)
            dt = time.perf_counter() - t0
        shutil.rmtree(cache, ignore_errors=True)
        self._check_pieces(key, pieces, mounter.name)
        self.record("rewrite in place", mounter.name, run, dt, "s", pieces=len(pieces))

    def _direct_rewrite(self, run: int) -> None:
        pieces = self._rewrite_pieces(run)
        key = f"{self.store.prefix}write/direct-rewrite-{run}.bin"
        self._multipart(self.setup_client, key, 8, 16 * _MIB)
        self.step(f"run {run + 1}: direct rewrite (GET all, patch, multipart upload)")
        t0 = time.perf_counter()
        size = len(self.data)
        buf = bytearray(size)

        def get(off: int) -> None:
            end = min(off + 8 * _MIB, size)
            buf[off:end] = self._get_range(self.client, off, end - 1, keep=True, key=key)[1]

        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(get, range(0, size, 8 * _MIB)))
        for off, piece in pieces:
            buf[off : off + len(piece)] = piece
        saved, self.data = self.data, bytes(buf)
        try:
            self._multipart(self.client, key, 8, 16 * _MIB)
        finally:
            self.data = saved
        dt = time.perf_counter() - t0
        self._check_pieces(key, pieces, _DIRECT)
        self.record("rewrite in place", _DIRECT, run, dt, "s", pieces=len(pieces))
        self.setup_client.delete_object(Bucket=self.store.bucket, Key=key)

    def _check_pieces(self, key: str, pieces: list[tuple[int, bytes]], who: str) -> None:
        for off, piece in pieces:
            got = self._get_range(self.setup_client, off, off + len(piece) - 1, keep=True, key=key)[
                1
            ]
            if got != piece:
                raise MountError(f"{who}: a rewritten piece at offset {off} did not persist")

    def metadata(self, run: int) -> None:
        n = self.cfg.n_objects
        keys = [f"{self.store.prefix}many/f{i:05d}" for i in range(n)]
        self.step(f"run {run + 1}: direct HEAD x {n}")
        t0 = time.perf_counter()
        for key in keys:
            self.client.head_object(Bucket=self.store.bucket, Key=key)
        dt = time.perf_counter() - t0
        self.record("stat objects", _DIRECT, run, n / dt, "ops/s", seconds=dt, objects=n)
        self.step(f"run {run + 1}: direct list")
        t0 = time.perf_counter()
        listed = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(
            Bucket=self.store.bucket, Prefix=self.store.prefix + "many/"
        ):
            listed += len(page.get("Contents", []))
        dt = time.perf_counter() - t0
        if listed != n:
            raise BenchError(f"listing returned {listed} objects, expected {n}")
        self.record("list objects", _DIRECT, run, n / dt, "entries/s", seconds=dt, objects=n)
        for mounter in self.mounters:
            if mounter.name != _FUSIONFS:
                continue
            self.step(f"run {run + 1}: {mounter.name} stat + list")
            try:
                self._mount_metadata(mounter, run, n)
            except (MountError, OSError) as exc:
                self.results.mark_unavailable("stat objects", mounter.name, str(exc))
                self.log(f"[red]{mounter.name}: {exc}")

    def _mount_metadata(self, mounter: Mounter, run: int, n: int) -> None:
        cache = self.fresh_dir(f"cache-{mounter.name}")
        with self.mount(mounter, cache) as mnt:
            t0 = time.perf_counter()
            for i in range(n):
                os.stat(mnt / "many" / f"f{i:05d}")
            dt = time.perf_counter() - t0
            self.record("stat objects", mounter.name, run, n / dt, "ops/s", seconds=dt, objects=n)
        with self.mount(mounter, cache) as mnt:
            t0 = time.perf_counter()
            names = os.listdir(mnt / "many")
            dt = time.perf_counter() - t0
            if len(names) != n:
                raise MountError(f"{mounter.name}: listing has {len(names)} entries, expected {n}")
            self.record(
                "list objects", mounter.name, run, n / dt, "entries/s", seconds=dt, objects=n
            )
        # a listing followed by a stat of every entry, as ls -l, find -size and rsync do: the
        # entries' metadata is probed ahead concurrently (S-MAP-9), not one lookup at a time
        cache = self.fresh_dir(f"cache-{mounter.name}")
        with self.mount(mounter, cache) as mnt:
            t0 = time.perf_counter()
            out = run_cmd(["ls", "-l", str(mnt / "many")], timeout=_LS_TIMEOUT)
            dt = time.perf_counter() - t0
            lines = [ln for ln in out.stdout.splitlines() if not ln.startswith("total")]
            if out.returncode != 0 or len(lines) != n:
                raise MountError(
                    f"{mounter.name}: ls -l gave {len(lines)} entries (exit {out.returncode}), "
                    f"expected {n}: {last_line(out)}"
                )
            self.record(_LS_L.format(n=n), mounter.name, run, dt, "s", objects=n)
        shutil.rmtree(cache, ignore_errors=True)

    # -- read sweeps (for the read-throughput plot) ---------------------------------------

    def _part_key(self, k: int) -> str:
        return f"{self.store.prefix}seq/part-{k}.bin"

    def _part_range(self, k: int) -> tuple[int, int]:
        q = len(self.data) // max(_READER_COUNTS)
        return k * q, (k + 1) * q

    def read_sweeps(self, run: int) -> None:
        if not self.cfg.sweeps:
            return
        size = len(self.data)
        self.step(f"run {run + 1}: read sweeps: warming the server")
        self._drop()
        self._direct_read(self.client)  # unmeasured, as before the cold reads
        for threads in _THREAD_COUNTS:
            self.step(f"run {run + 1}: read vs threads: direct boto3, {threads} threads")
            t0 = time.perf_counter()
            n = self._direct_read(self.client, threads=threads)
            if n != size:
                raise BenchError(f"direct read with {threads} threads got {n} of {size} bytes")
            value = mb_per_s(n, time.perf_counter() - t0)
            self.record(
                _SWEEP_THREADS,
                f"direct boto3, {threads} thread{'s' if threads > 1 else ''}",
                run,
                value,
                "MB/s",
                threads=threads,
            )
        fusion = next((m for m in self.mounters if m.name == _FUSIONFS), None)
        if fusion is None:
            return
        rel = self.key[len(self.store.prefix) :]
        for kib in _CHUNK_SIZES_KIB:
            tool = (
                f"fusionfs --chunk-size {kib // 1024}M"
                if kib >= 1024
                else f"fusionfs --chunk-size {kib}K"
            )
            self.step(f"run {run + 1}: read vs chunk size: {tool}")
            mounter = Fusionfs(self.store, ["--chunk-size", f"{kib}K"])
            cache = self.fresh_dir("cache-sweep")
            try:
                with self.mount(mounter, cache) as mnt:
                    t0 = time.perf_counter()
                    n = self._read_file(mnt / rel)
                    dt = time.perf_counter() - t0
                    if n != size:
                        raise MountError(f"{tool}: read {n} bytes, expected {size}")
                    self._verify(mnt / rel, run)
                self.record(_SWEEP_CHUNK, tool, run, mb_per_s(n, dt), "MB/s", chunk_kib=kib)
            except (MountError, OSError) as exc:
                self.results.mark_unavailable(_SWEEP_CHUNK, tool, str(exc))
                self.log(f"[red]{exc}")
        for k in range(max(_READER_COUNTS)):  # unmeasured: warm the server's copies
            self._direct_read(self.client, key=self._part_key(k), span=self._part_range(k))
        for readers in _READER_COUNTS:
            tool = f"fusionfs, {readers} file{'s' if readers > 1 else ''} at once"
            self.step(f"run {run + 1}: read vs readers: {tool}")
            cache = self.fresh_dir("cache-sweep")
            try:
                with self.mount(fusion, cache) as mnt:
                    t0 = time.perf_counter()
                    with cf.ThreadPoolExecutor(readers) as pool:
                        paths = [
                            mnt / self._part_key(k)[len(self.store.prefix) :]
                            for k in range(readers)
                        ]
                        n = sum(pool.map(self._read_file, paths))
                    dt = time.perf_counter() - t0
                    lo, hi = self._part_range(0)
                    if n != readers * (hi - lo):
                        raise MountError(f"{tool}: read {n} bytes, expected {readers * (hi - lo)}")
                    for k in range(readers):
                        self._verify(paths[k], run, span=self._part_range(k))
                self.record(_SWEEP_READERS, tool, run, mb_per_s(n, dt), "MB/s", readers=readers)
            except (MountError, OSError) as exc:
                self.results.mark_unavailable(_SWEEP_READERS, tool, str(exc))
                self.log(f"[red]{exc}")
        shutil.rmtree(self.work / "cache-sweep", ignore_errors=True)

    # -- many small files ----------------------------------------------------------------

    def _small_names(self) -> list[str]:
        return [f"f{i:05d}" for i in range(self.cfg.n_small)]

    def _small_body(self, i: int) -> bytes:
        return self.small_data[i * _SMALL_SIZE : (i + 1) * _SMALL_SIZE]

    def _record_small(self, scenario: str, tool: str, run: int, seconds: float) -> None:
        value, details = small_files_figures(self.cfg.n_small, _SMALL_SIZE, seconds, _SMALL_WORKERS)
        self.record(scenario, tool, run, value, "files/s", **details)

    def _parallel(self, fn: Callable[[int], None]) -> None:
        """``fn(i)`` for every small file, ``_SMALL_WORKERS`` at a time; the first error raises."""
        with cf.ThreadPoolExecutor(_SMALL_WORKERS) as pool:
            for fut in [pool.submit(fn, i) for i in range(self.cfg.n_small)]:
                fut.result()

    def _check_small(self, names: list[str], where: str) -> None:
        if sorted(names) != self._small_names():
            raise MountError(
                f"{where}: listing has {len(names)} entries, expected the {self.cfg.n_small} files"
            )

    def small_files(self, run: int) -> None:
        n = self.cfg.n_small
        names = self._small_names()
        # local disk: write + fsync each file, then the dir; read after a page-cache drop
        self.step(f"run {run + 1}: small files, local disk create x {n}")
        local = self.fresh_dir(f"small-local-{run}")

        def write_local(i: int) -> None:
            fd = os.open(local / names[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, self._small_body(i))
                os.fsync(fd)
            finally:
                os.close(fd)

        t0 = time.perf_counter()
        self._parallel(write_local)
        dfd = os.open(local, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._record_small(_SMALL_CREATE, _DISK, run, time.perf_counter() - t0)
        self._drop()
        self.step(f"run {run + 1}: small files, local disk read x {n}")
        t0 = time.perf_counter()
        self._check_small(os.listdir(local), "local disk")
        self._parallel(lambda i: self._read_small(local / names[i], i, "local disk"))
        self._record_small(_SMALL_READ, _DISK, run, time.perf_counter() - t0)
        shutil.rmtree(local, ignore_errors=True)

        # direct boto3: PUT each, then LIST + GET each, same number in flight
        bucket = self.store.bucket
        prefix = f"{self.store.prefix}small-direct-{run}/"
        self.step(f"run {run + 1}: small files, direct boto3 PUT x {n}")

        def put(i: int) -> None:
            self.client.put_object(Bucket=bucket, Key=prefix + names[i], Body=self._small_body(i))

        t0 = time.perf_counter()
        self._parallel(put)
        self._record_small(_SMALL_CREATE, _DIRECT, run, time.perf_counter() - t0)
        self.step(f"run {run + 1}: small files, direct boto3 LIST + GET x {n}")

        def get(i: int) -> None:
            body = self.client.get_object(Bucket=bucket, Key=prefix + names[i])["Body"].read()
            if body != self._small_body(i):
                raise BenchError(f"direct GET of {names[i]} returned wrong bytes")

        t0 = time.perf_counter()
        listed = [
            o["Key"][len(prefix) :]
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for o in page.get("Contents", [])
        ]
        self._check_small(listed, "direct LIST")
        self._parallel(get)
        self._record_small(_SMALL_READ, _DIRECT, run, time.perf_counter() - t0)
        delete_under(self.setup_client, bucket, prefix)

        for mounter in self.mounters:
            self.step(f"run {run + 1}: small files, {mounter.name} create x {n}")
            stage = [_SMALL_CREATE]
            try:
                self._mount_small(mounter, run, stage)
            except (MountError, OSError) as exc:
                self.results.mark_unavailable(stage[0], mounter.name, str(exc))
                self.log(f"[red]{mounter.name}: {stage[0]}: {exc}")
            finally:
                with contextlib.suppress(Exception):
                    delete_under(self.setup_client, bucket, f"{self.store.prefix}small-")

    def _read_small(self, path: Path, i: int, who: str) -> None:
        with open(path, "rb", buffering=0) as f:
            got = f.read()
        if got != self._small_body(i):
            raise MountError(f"{who}: {path.name} has wrong contents ({len(got)} bytes)")

    def _mount_small(self, mounter: Mounter, run: int, stage: list[str]) -> None:
        """Creates the files through one mount, then reads them back through a fresh one;
        ``stage[0]`` says which scenario is going (for the error report)."""
        names = self._small_names()
        # One level below the run prefix: s3rver 3.7.1 lists a common prefix only when objects
        # lie directly in it, so rclone would not find small/<tool>/ on a fresh mount.
        rel = f"small-{mounter.name}-{run}"
        prefix = f"{self.store.prefix}{rel}/"
        cache = self.fresh_dir(f"cache-{mounter.name}")
        with self.mount(mounter, cache) as mnt:
            (mnt / rel).mkdir(exist_ok=True)

            def create(i: int) -> None:
                with open(mnt / rel / names[i], "wb", buffering=0) as f:
                    f.write(self._small_body(i))

            t0 = time.perf_counter()
            self._parallel(create)  # close returns once committed (fusionfs, s3fs)
            mounter.after_close_all(prefix, self.cfg.n_small, _SMALL_SIZE)  # rclone: uploaded
            dt = time.perf_counter() - t0
        stored = count_objects(self.setup_client, self.store.bucket, prefix, _SMALL_SIZE)
        if stored != self.cfg.n_small:
            raise MountError(f"{mounter.name}: {stored} of {self.cfg.n_small} files in the bucket")
        self._record_small(_SMALL_CREATE, mounter.name, run, dt)
        stage[0] = _SMALL_READ
        self.step(f"run {run + 1}: small files, {mounter.name} read x {self.cfg.n_small}")
        cache = self.fresh_dir(f"cache-{mounter.name}")
        self._drop()
        with self.mount(mounter, cache) as mnt:
            t0 = time.perf_counter()
            self._check_small(os.listdir(mnt / rel), mounter.name)
            self._parallel(lambda i: self._read_small(mnt / rel / names[i], i, mounter.name))
            dt = time.perf_counter() - t0
        self._record_small(_SMALL_READ, mounter.name, run, dt)
        shutil.rmtree(cache, ignore_errors=True)

    # -- driver --------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        phases: list[Callable[[int], None]] = [
            self.seq_reads,
            self.random_reads,
            self.seq_writes,
            self.metadata,
            self.small_files,
            self.read_sweeps,
        ]
        with self.progress(1 + cfg.runs * len(phases)):
            try:
                self.prepare()
                self.advance()
                for run in range(cfg.runs):
                    for phase in phases:
                        what = f"run {run + 1}: {phase.__name__}"
                        self.attempt(what, functools.partial(phase, run))
                        self.advance()
            finally:
                self.unmount_all()

    def finish(self) -> None:
        results, cfg = self.results, self.cfg
        results.extra["verified"] = (
            "64 sampled 4 KiB blocks per mounted read; every byte of every small file"
        )
        results.notes.append(
            f"small files: {cfg.n_small} files of 4 KiB, {_SMALL_WORKERS} at a time for "
            "every tool; create until durable (close commits; rclone: until a listing "
            "shows all), read back = listdir + read each on a fresh mount, empty cache"
        )
        results.notes += small_files_summary(results)
        results.notes += cpu_notes(results)


def _settings(cfg: FsConfig) -> dict[str, Any]:
    settings = {**asdict(cfg), **common_settings(cfg)}
    settings["size_bytes"] = cfg.size
    settings["n_objects"] = cfg.n_objects
    settings["n_small_files"] = cfg.n_small
    settings["small_file_bytes"] = _SMALL_SIZE
    settings["small_files_workers"] = _SMALL_WORKERS
    settings["seed"] = SEED
    return settings


def run_fs(cfg: FsConfig, console: Console) -> int:
    """Runs the whole ``fs`` benchmark; returns the process exit status."""
    results = Results("fs", _settings(cfg))
    for scenario in ("seq read cold", "seq write", "rand read 4KiB", "rand read 1MiB"):
        results.references[scenario] = [_DIRECT, _DISK]
    results.references["seq read warm"] = [
        f"seq read cold::{_DISK}",
        f"seq read cold::{_DIRECT}",
        f"seq read cold::{_FUSIONFS}",
    ]
    for scenario in ("stat objects", "list objects", "rewrite in place"):
        results.references[scenario] = [_DIRECT]
    for scenario in (_SMALL_CREATE, _SMALL_READ):
        results.references[scenario] = [_DIRECT, _DISK]

    def make(store: Store, work: Path) -> Bench:
        bench = _Bench(cfg, store, results, console, work)
        results.notes.append(
            "local disk reads: page cache dropped (echo 3 > /proc/sys/vm/drop_caches)"
            if bench.can_drop
            else "local disk reads: O_DIRECT (could not drop the page cache)"
        )
        results.notes.append(
            "cold reads: the server's copy is warmed by one unmeasured direct read per run; "
            "the client side starts empty (fresh mount, empty cache dir)"
        )
        results.notes.append(
            "warm reads: remount on the same cache dir after dropping the page cache; "
            "references are the same run's cold direct and disk reads"
        )
        results.notes.append("MB = 10**6 bytes; ratios are per run, then median (min-max)")
        if cfg.proxied:
            results.notes.append(
                f"through benchmarks.proxy: latency {cfg.latency_ms} ms, "
                f"{cfg.bandwidth_mbps} Mbit/s per connection, {cfg.link_mbps} Mbit/s for "
                f"all connections together, error rate {cfg.error_rate}"
            )
        return bench

    return run_in_store(
        cfg, results, console, work_prefix="fusionfs-bench-", out=out_dir(cfg), make=make
    )
