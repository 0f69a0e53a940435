"""The ``snap`` benchmark: snapstore checkpoint/restore through fusionfs, beside CRIU on local disk
and a direct boto3 upload of the same image files, on one S3 server.

For each size (256 MiB, 1 GiB and 4 GiB, each when free memory allows; ``--quick`` 256 MiB) and
each run, one task from ``tests/snap/memtask.py`` holding that much known memory is:

1. dumped by ``criu dump --leave-stopped`` to local disk (wall time; then the same plus an fsync
   of every image file and the directory: "until durable"), then resumed with SIGCONT;
2. left running while the same image files are uploaded with boto3 twice: one object per file
   (multipart, 8 threads x 16 MiB parts: the layout fusionfs writes, fs.py's direct reference),
   and as 8 MiB objects with 8 threads (parallel PUTs: the server's ceiling, DESIGN.md);
3. dumped by ``snapstore dump`` into a fusionfs mount of the server: the wall time of the command
   until it exits (the manifest is committed, so the snapshot is durable), with snapstore's own
   breakdown (CRIU's frozen time, CRIU's wall time, flush) in the details; snapstore kills it;
4. restored from the local images by CRIU alone, eagerly (``criu restore -d --restore-sibling``)
   and lazily (``criu lazy-pages`` + ``criu restore --lazy-pages``, as snapstore drives them),
   then, each on a fresh mount with an empty cache dir ("another machine"), by ``snapstore
   restore --eager`` and ``snapstore restore --lazy`` (``--detach --json``). After each
   restore the task verifies its whole memory (SIGUSR1 -> ``verify.json``) and is killed;
   Before them, ``snapstore verify --quick`` and ``snapstore verify`` (every chunk read once)
   each run on a fresh mount with an empty cache (the ``verify <size>`` rows);
5. restored again by ``snapstore restore --eager`` and ``--lazy`` on fresh mounts whose endpoint
   adds each other first-byte latency of ``--resume-latencies-ms`` (default 0 and
   ``--latency-ms`` when set, else 0 and 30): a proxy of its own with the run's bandwidth cap
   and error rate (or the server itself for 0 ms when nothing is emulated). These and the
   restores of step 4 (at the run's own ``--latency-ms``) form the ``resume vs latency, <size>``
   rows, plotted as time to resume against latency.

The dump-until-durable times per size also give the reclamation window fit
(``benchmarks/window.py``): the largest process whose checkpoint fits AWS's 120 s and GCP's 30 s
notice, a section of its own in results.md. With matplotlib, ``checkpoint_time.png`` and
``resume_latency.png`` are written into ``--out``.

Figures are seconds (lower is better), the median of ``--runs`` with min and max; ratios are
computed per run, then summarised. The naive way (dump to local disk, then upload) is the sum of
the durable local dump and the direct upload of the same run.

Caveats:
- "time to resume" of snapstore restores is snapstore's own ``resume_s`` (from the start of CRIU,
  lazy-pages daemon included, until ``criu restore`` returns); the command's wall time (Python
  start, manifest read, file checks) is in the details. "all pages in" is ``resume_s`` plus the
  time from the command's return until the lazy-pages daemon exited (we are its subreaper).
- "fetched before resume" is the mount's ``bytes_fetched`` (the counters ``fusionfs stats
  --json`` prints, read in-process through ``fusionfs.client.stats``) sampled every 5 ms while
  the restore runs, taken when CRIU's pidfile appears in snapstore's work dir (CRIU writes it at
  the end of the restore); the value after the command returned is in the details
  (``fetched_at_return_mb``): the lazy daemon pushes the remaining pages from the start, so that
  one over-counts.
- Before each restore the page cache is dropped (local images are read from disk); before the
  fusionfs restores the server's copy is warmed by an unmeasured direct GET of the snapshot's
  objects, so "empty cache" means the client side, as in fs.py.
- The benchmark makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``) so that restored
  tasks, lazy-pages daemons and fusionfs daemons become its children and are reaped at once:
  PID 1 reaps orphans slowly here, and a restore needs the task's original PID free.
- The store set-up (local s3rver, proxy, run prefix and its deletion) and the run's frame are
  ``benchmarks.base``'s, shared with the fs benchmark; the fusionfs mounter is
  ``benchmarks.mounters``'.
- Needs root, FUSE, a CRIU >= 4.0 (``$CRIU``, PATH or /opt/fusionfs/criu/bin/criu) and
  userfaultfd for the lazy rows.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
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
    delete_under,
    out_dir,
    proxy_address,
    proxy_args,
    run_in_store,
)
from benchmarks.harness import (
    CpuMeter,
    ProxyProcess,
    Results,
    cpu_parts,
    cpu_per_gib,
    drop_page_cache,
    last_line,
    run_cmd,
)
from benchmarks.mounters import Fusionfs, MountError, force_unmount
from fusionfs import chunked as _chunked
from fusionfs.chunked import codec as _codec

__all__ = ["SnapConfig", "run_snap"]

_MIB = 1 << 20
_GIB = 1 << 30
_REPO = Path(__file__).resolve().parent.parent
_MEMTASK = _REPO / "tests" / "snap" / "memtask.py"
_PR_SET_CHILD_SUBREAPER = 36
_PART = 16 * _MIB  # multipart part size of the direct reference (as fs.py)
_PIECE = 8 * _MIB  # object size of the parallel-PUT reference
_THREADS = 8
_CMD_TIMEOUT = 900.0
#: Each timed dump phase starts after ``os.sync()`` and this many quiet seconds. The phase
#: before it deletes a GiB or more (objects, a killed task's memory), and what follows a delete
#: (writeback, the journal, and on a guest with free page reporting the host taking the freed
#: memory back) otherwise lands in whichever phase comes next, so the order of the phases
#: decided part of their times. Measured here (Firecracker guest, page reporting on): writing
#: 1 GiB into the page cache cost 0.30 s of system time right after 1 GiB was freed, 0.61-0.72 s
#: 4 s later, 0.89-0.97 s 6-8 s later; and the direct 8 MiB PUTs, which had followed the delete
#: of the multipart object at once, took 5.09-5.77 s in three runs without the wait, 4.69-5.10 s
#: with it (snapstore's dump: 6.46-7.97 s, then 6.42-6.82 s, with other changes between).
_SETTLE_S = 8.0

# row names
_LOCAL = "criu dump, local disk"
_LOCAL_SYNC = "criu dump + fsync, local disk"
_UP_MP = "direct upload, multipart"
_UP_PUT = "direct upload, 8 MiB PUTs"
_NAIVE = "naive: dump + fsync + upload (multipart)"
_NAIVE_PUT = "naive: dump + fsync + upload (PUTs)"
_OURS = "snapstore dump via fusionfs"
_INC = "snapstore dump via fusionfs, incremental (10 % changed)"
_COMPRESSION = "compression: logical / stored bytes"
_R_LOCAL = "criu restore eager, local disk"
_R_LOCAL_LAZY = "criu restore lazy, local disk"
_R_LOCAL_PAGES = "criu lazy, local disk: all pages in"
_R_DIRECT = "direct GET of the images, 8 x 8 MiB"
_R_EAGER = "snapstore restore eager, fusionfs"
_R_LAZY = "snapstore restore lazy, fusionfs"
_R_PAGES = "snapstore lazy: all pages in"
_V_QUICK = "snapstore verify --quick, fusionfs"
_V_FULL = "snapstore verify (every chunk), fusionfs"
_R_LAZY_WALL = "snapstore restore lazy, fusionfs: command wall time"
_FULL_TARGET = "full dump until durable, 4 GiB target"
_CEILING = "ceiling: the machine's cores and the link"
_CEILING_SAMPLE_MIB = 256
_SERIES = "resume vs latency"  # scenario prefix of the resume-against-latency series


@dataclass
class SnapConfig(StoreSettings):
    memory: str = "random"  # memtask --content: random or fastq
    dump_only: bool = False  # only the snapstore dumps (full, then incremental)
    sizes_mib: list[int] = field(default_factory=list)
    resume_latencies_ms: list[float] = field(default_factory=list)

    def wanted_sizes(self) -> list[int]:
        if self.sizes_mib:
            return list(self.sizes_mib)
        return [256] if self.quick else [256, 1024, 4096]

    def resume_latencies(self) -> list[float]:
        """First-byte latencies the restores are run at for the resume-against-latency series:
        as given, else 0 and ``--latency-ms`` when that is set, else 0 and 30 ms."""
        if self.resume_latencies_ms:
            return sorted(set(self.resume_latencies_ms))
        return sorted({0.0, self.latency_ms}) if self.latency_ms else [0.0, 30.0]


def _label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def _mem_available() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _needed_memory(mib: int) -> int:
    """Memory a run of this size needs: the task, a restored copy being verified while the
    images sit in the page cache and the server buffers a part or two, plus headroom."""
    return int(2.5 * mib * _MIB) + _GIB


def _set_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _proc_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` ('' when gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _reap(pid: int, timeout: float) -> int | None:
    """Waits up to ``timeout`` s for ``pid`` to exit and reaps it if it is our child (it is once
    its parent died: we are a subreaper). Returns its exit code when we reaped it, else None.
    Returns as soon as /proc/PID is gone (reaped by someone else)."""
    end = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return None
        if time.monotonic() >= end:
            raise BenchError(f"process {pid} still exists after {timeout:.0f} s")
        time.sleep(0.005)


def _stderr(proc: subprocess.CompletedProcess[str]) -> str:
    """A failed command's whole error output on one line (snapstore's error line is followed by
    CRIU's log lines), bounded."""
    text = " | ".join(line.strip() for line in (proc.stderr or "").splitlines() if line.strip())
    return text[:1500] or last_line(proc)


class _FetchSampler:
    """Reads the mount's ``bytes_fetched`` every few ms while a restore command runs and keeps
    the value seen when CRIU's pidfile appears in snapstore's work dir (CRIU writes it as the
    restored task is let go): the bytes fetched before the task resumed."""

    def __init__(self, bench: _Bench, mountpoint: Path, task_id: str) -> None:
        self._bench = bench
        self._mountpoint = mountpoint
        self._pattern = f"snapstore-restore-{task_id}-*/restore.pid"
        self._tmp = Path(tempfile.gettempdir())
        self._before = {p.parent for p in self._tmp.glob(self._pattern)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fetch-sampler", daemon=True)
        self.at_pidfile: int | None = None

    def __enter__(self) -> _FetchSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if any(p.parent not in self._before for p in self._tmp.glob(self._pattern)):
                # read after the pidfile was seen: an upper bound, at most one interval late
                self.at_pidfile = int(self._bench.stats(self._mountpoint).get("bytes_fetched", 0))
                return
            self._stop.wait(0.005)


class _RunFailed(Exception):
    """One step of one run failed: recorded, and the run goes on where it can."""


class _Bench(Bench):
    name = "snap"
    row_format = "{scenario:<18} {tool:<40} run {run}: {value:9.3f} {unit}"

    def __init__(
        self,
        cfg: SnapConfig,
        store: Store,
        results: Results,
        console: Console,
        work: Path,
        sizes: list[int],
    ) -> None:
        from snapstore.criu import find_criu
        from snapstore.errors import CriuUnavailable

        super().__init__(store, results, console, work)
        self.cfg = cfg
        self.sizes = sizes
        try:
            self.criu = find_criu()
        except CriuUnavailable as exc:
            raise BenchError(str(exc)) from None
        self.fusionfs = Fusionfs(store)
        # latency (ms) -> a fusionfs mounter whose endpoint adds it (the run's own: self.fusionfs)
        self.latency_mounters: dict[float, Fusionfs] = {}
        self.snapstore = [sys.executable, "-m", "snapstore"]
        self.client = store.client(pool=_THREADS * 2)
        self.setup_client = store.client(store.setup_url, pool=_THREADS * 2)
        self.can_drop = drop_page_cache()
        self.uffd = (
            Path("/proc/sys/vm/unprivileged_userfaultfd").exists()
            or Path("/dev/userfaultfd").exists()
        )
        self.last_wall = 0.0  # wall time of the last snapstore restore command
        self.live: set[int] = set()  # tasks we must kill and reap in the end
        self.mounts: list[tuple[Path, int]] = []  # (mountpoint, daemon pid)

    # -- bookkeeping ---------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(self.store.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        env.pop("SNAPSTORE_ROOT", None)
        env.pop("SNAPSTORE_ALLOW_ANY_ROOT", None)
        return env

    def settle(self) -> None:
        """Before a timed dump phase: dirty pages written back, then ``_SETTLE_S`` quiet."""
        os.sync()
        time.sleep(_SETTLE_S)

    # -- mounts --------------------------------------------------------------------------

    def cpu(self, mountpoint: Path | None = None) -> CpuMeter:
        """``Store.cpu_meter`` with the daemon of our mount at ``mountpoint``: children are
        ``snapstore`` and its CRIU, or CRIU alone."""
        daemons = [daemon for mnt, daemon in self.mounts if mnt == mountpoint and daemon]
        return self.store.cpu_meter(daemons[0] if daemons else None)

    @contextlib.contextmanager
    def mount(self, name: str, mounter: Fusionfs | None = None) -> Iterator[Path]:
        """A fresh fusionfs mount of the run prefix with an empty cache dir."""
        from fusionfs import client

        fusionfs = mounter or self.fusionfs

        cache = self.work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        mountpoint = Path(tempfile.mkdtemp(prefix=f"mnt-{name}-", dir=self.work))
        try:
            fusionfs.mount(mountpoint, cache)
        except BaseException:
            force_unmount(mountpoint)
            raise
        info = client.find_mount(mountpoint)
        entry = (mountpoint, info.pid if info else 0)
        self.mounts.append(entry)
        try:
            yield mountpoint
        finally:
            self.mounts.remove(entry)
            try:
                fusionfs.unmount(mountpoint)
            finally:
                if entry[1]:
                    with contextlib.suppress(BenchError):
                        _reap(entry[1], 30)
                with contextlib.suppress(OSError):
                    mountpoint.rmdir()
                shutil.rmtree(cache, ignore_errors=True)

    def stats(self, mountpoint: Path) -> dict[str, Any]:
        """The mount's counters (what ``fusionfs stats --json`` prints), read in-process: the
        command takes a few hundred ms to start, during which a lazy restore goes on fetching."""
        from fusionfs import client

        try:
            return client.stats(mountpoint)
        except (OSError, ValueError):
            return {}

    # -- the task ------------------------------------------------------------------------

    def start_task(self, mib: int, name: str) -> tuple[subprocess.Popen[bytes], Path]:
        state = self.work / f"task-{name}"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        argv = [sys.executable, str(_MEMTASK), "--state", str(state), "--mib", str(mib)]
        argv += ["--seed", str(SEED % 1000 + mib), "--content", self.cfg.memory]
        with open(state / "log", "wb") as log:
            # setsid and stdio to files: CRIU dumps a session leader with no terminal.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=state,
            )
        self.live.add(proc.pid)
        end = time.monotonic() + 120 + mib / 20
        while not (state / "ready").exists():
            if proc.poll() is not None:
                tail = (state / "log").read_text(errors="replace").strip().splitlines()[-1:]
                raise _RunFailed(f"memtask exited with status {proc.returncode}: {tail}")
            if time.monotonic() > end:
                raise _RunFailed(f"memtask did not fill {mib} MiB in time")
            time.sleep(0.05)
        return proc, state

    def verify_and_kill(self, pid: int, state: Path, mib: int, what: str) -> None:
        """SIGUSR1: the task checks its whole memory and writes verify.json; then SIGKILL."""
        result = state / "verify.json"
        result.unlink(missing_ok=True)
        try:
            os.kill(pid, signal.SIGUSR1)
            end = time.monotonic() + 60 + mib / 20
            while not result.exists():
                if not _proc_state(pid) or _proc_state(pid) == "Z":
                    raise _RunFailed(f"{what}: the restored task {pid} died before verifying")
                if time.monotonic() > end:
                    raise _RunFailed(f"{what}: task {pid} did not verify its memory in time")
                time.sleep(0.02)
            verdict = json.loads(result.read_text())
            if not verdict.get("ok") or verdict.get("pid") != pid:
                raise _RunFailed(
                    f"{what}: memory differs after restore (bad blocks "
                    f"{verdict.get('bad_blocks')}, pid {verdict.get('pid')})"
                )
        finally:
            self.kill(pid)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid, 30)
        self.live.discard(pid)

    def kill_all(self) -> None:
        for pid in list(self.live):
            with contextlib.suppress(BenchError):
                self.kill(pid)

    # -- references ----------------------------------------------------------------------

    def criu_dump_local(self, pid: int, images: Path) -> tuple[float, float, dict[str, int]]:
        """``criu dump`` to local disk: (seconds, seconds with the fsyncs, CRIU's stats)."""
        from snapstore.criu import read_stats

        images.mkdir(parents=True)
        args = ["dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4"]
        args.append("--leave-stopped")  # as snapstore does; resumed below
        t0 = time.perf_counter()
        proc = run_cmd(self.criu.argv(*args), timeout=_CMD_TIMEOUT)
        dumped = time.perf_counter() - t0
        try:
            if proc.returncode != 0:
                raise _RunFailed(f"criu dump failed ({proc.returncode}); log {images}/dump.log")
            for entry in os.scandir(images):
                fd = os.open(entry.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            durable = time.perf_counter() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return dumped, durable, read_stats(images / "stats-dump")

    def upload_multipart(self, images: Path, key_prefix: str) -> None:
        """Each image file as one object: multipart (16 MiB parts) above one part, else a PUT;
        8 threads over all parts and small files."""
        bucket = self.store.bucket
        files = sorted(p for p in images.iterdir() if p.is_file())
        uploads: list[tuple[str, str]] = []

        def put_small(path: Path) -> None:
            self.client.put_object(
                Bucket=bucket, Key=key_prefix + path.name, Body=path.read_bytes()
            )

        def put_part(key: str, upload_id: str, path: Path, n: int) -> dict[str, Any]:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), _PART, n * _PART)
            resp = self.client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n + 1, Body=data
            )
            return {"PartNumber": n + 1, "ETag": resp["ETag"]}

        try:
            with cf.ThreadPoolExecutor(_THREADS) as pool:
                small = [pool.submit(put_small, p) for p in files if p.stat().st_size <= _PART]
                big: list[tuple[str, str, list[cf.Future[dict[str, Any]]]]] = []
                for path in files:
                    size = path.stat().st_size
                    if size <= _PART:
                        continue
                    key = key_prefix + path.name
                    upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=key)[
                        "UploadId"
                    ]
                    uploads.append((key, upload_id))
                    parts = [
                        pool.submit(put_part, key, upload_id, path, n)
                        for n in range((size + _PART - 1) // _PART)
                    ]
                    big.append((key, upload_id, parts))
                for fut in small:
                    fut.result()
                for key, upload_id, parts in big:
                    done = [p.result() for p in parts]
                    self.client.complete_multipart_upload(
                        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
                    )
                    uploads.remove((key, upload_id))
        finally:
            for key, upload_id in uploads:
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    def upload_pieces(self, images: Path, key_prefix: str) -> None:
        """Each image file cut into 8 MiB objects, 8 PUTs at a time (the server's ceiling)."""
        bucket = self.store.bucket
        jobs = []
        for path in sorted(p for p in images.iterdir() if p.is_file()):
            size = path.stat().st_size
            for n in range(max(1, (size + _PIECE - 1) // _PIECE)):
                jobs.append((path, n))

        def put(job: tuple[Path, int]) -> None:
            path, n = job
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), _PIECE, n * _PIECE)
            key = f"{key_prefix}{path.name}.{n:05d}"
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

        with cf.ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(put, jobs))

    def delete_under(self, key_prefix: str) -> None:
        delete_under(self.setup_client, self.store.bucket, key_prefix)

    def _snapshot_objects(self, key_prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object a restore of the snapshots under ``key_prefix`` reads:
        the objects themselves and, for image files in the chunked layout (snapstore's root
        is chunked), the pack objects their manifests reference."""
        objects: list[tuple[str, int]] = []
        packs: set[bytes] = set()
        paginator = self.setup_client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.store.bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                objects.append((obj["Key"], obj["Size"]))
                head = self.setup_client.head_object(Bucket=self.store.bucket, Key=obj["Key"])
                if not _chunked.is_chunked(head.get("Metadata")):
                    continue
                body = self.setup_client.get_object(Bucket=self.store.bucket, Key=obj["Key"])
                manifest = _chunked.decode_manifest(body["Body"].read(), what=obj["Key"])
                packs.update(manifest.packs())
        for pack in sorted(packs):
            key = self.store.prefix + _chunked.pack_key(pack)
            head = self.setup_client.head_object(Bucket=self.store.bucket, Key=key)
            objects.append((key, int(head["ContentLength"])))
        return objects

    def warm_server(self, key_prefix: str, client: Any = None) -> None:
        """A parallel ranged GET (8 threads x 8 MiB) of every object under ``key_prefix``.
        Unmeasured after a page cache drop: the server's own files back in its cache ("cold"
        means the client side); timed, with ``client`` (through the proxy, if any), as the
        download reference of the restores."""
        jobs: list[tuple[str, int, int]] = []
        for key, size in self._snapshot_objects(key_prefix):
            for off in range(0, max(1, size), _PIECE):
                jobs.append((key, off, min(off + _PIECE, size) - 1))

        def get(job: tuple[str, int, int]) -> None:
            key, off, end = job
            if end < off:
                return
            body = (client or self.setup_client).get_object(
                Bucket=self.store.bucket, Key=key, Range=f"bytes={off}-{end}"
            )["Body"]
            for _chunk in body.iter_chunks(_MIB):
                pass

        with cf.ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(get, jobs))

    # -- one run ---------------------------------------------------------------------------

    def one_run(self, mib: int, run: int) -> None:
        label = _label(mib)
        name = f"{mib}m-r{run}"
        task_id = f"bench-{name}"
        dump_sc, dump_ratio = f"dump {label}", f"dump {label}: ratios"
        rest_sc, rest_ratio = f"restore {label}", f"restore {label}: ratios"
        images = self.work / f"images-{name}"
        direct_prefix = f"{self.store.prefix}direct/{task_id}/"
        snap_prefix = f"{self.store.prefix}snapshots/{task_id}"
        try:
            self.step(f"{label} run {run + 1}: starting a task holding {mib} MiB")
            proc, state = self.start_task(mib, name)
            pid = proc.pid
            if self.cfg.dump_only:
                self.dumps_only(mib, run, proc, task_id, name)
                return

            # 1. CRIU to local disk
            self.step(f"{label} run {run + 1}: criu dump to local disk")
            self.settle()
            with self.cpu() as cpu:
                local_s, local_sync_s, local_stats = self.criu_dump_local(pid, images)
            image_bytes = sum(p.stat().st_size for p in images.iterdir() if p.is_file())
            frozen = local_stats.get("frozen_time_us", 0) / 1e6
            self.record(dump_sc, _LOCAL, run, local_s, "s", frozen_s=frozen)
            self.record(
                dump_sc,
                _LOCAL_SYNC,
                run,
                local_sync_s,
                "s",
                image_mb=image_bytes / 1e6,
                **cpu.per_gib(image_bytes, {"children": "criu", "self": "bench"}),
            )

            # 2. the same image files uploaded directly
            self.step(f"{label} run {run + 1}: direct multipart upload of the images")
            self.settle()
            t0 = time.perf_counter()
            self.upload_multipart(images, direct_prefix + "mp/")
            up_mp = time.perf_counter() - t0
            self.record(dump_sc, _UP_MP, run, up_mp, "s", mb_per_s=image_bytes / up_mp / 1e6)
            self.delete_under(direct_prefix)
            self.step(f"{label} run {run + 1}: direct 8 MiB PUTs of the images")
            self.settle()
            with self.cpu() as cpu:
                t0 = time.perf_counter()
                self.upload_pieces(images, direct_prefix + "put/")
                up_put = time.perf_counter() - t0
            self.record(
                dump_sc,
                _UP_PUT,
                run,
                up_put,
                "s",
                mb_per_s=image_bytes / up_put / 1e6,
                **cpu.per_gib(image_bytes, {"self": "client"}),
            )
            self.delete_under(direct_prefix)
            naive = local_sync_s + up_mp
            self.record(dump_sc, _NAIVE, run, naive, "s")
            self.record(dump_sc, _NAIVE_PUT, run, local_sync_s + up_put, "s")

            # 3. snapstore through fusionfs
            self.step(f"{label} run {run + 1}: snapstore dump via fusionfs")
            ours, manifest, stats = self.snapstore_dump(proc, task_id, f"dump-{name}")
            storage = self.record_ours(mib, run, ours, manifest, stats)
            worst_mp, worst_put = max(local_sync_s, up_mp), max(local_sync_s, up_put)
            self.record(
                dump_ratio,
                "ours / max(dump+fsync, multipart upload)",
                run,
                ours / worst_mp,
                "x",
                target=1.25,
            )
            self.record(
                dump_ratio,
                "ours / max(dump+fsync, 8 MiB PUTs)",
                run,
                ours / worst_put,
                "x",
                target=1.25,
            )
            self.record(dump_ratio, "ours / naive sum (multipart)", run, ours / naive, "x")
            self.record(
                dump_ratio, "ours / naive sum (PUTs)", run, ours / (local_sync_s + up_put), "x"
            )
            self.advance()

            # 4. restores
            self.step(f"{label} run {run + 1}: criu restore from local disk")
            local_eager, _ = self.restore_local(images, pid, state, mib, lazy=False)
            self.record(rest_sc, _R_LOCAL, run, local_eager, "s")
            if self.uffd:
                self.step(f"{label} run {run + 1}: criu restore --lazy-pages from local disk")
                try:
                    local_lazy, local_pages = self.restore_local(images, pid, state, mib, lazy=True)
                    self.record(rest_sc, _R_LOCAL_LAZY, run, local_lazy, "s")
                    if local_pages is not None:
                        self.record(rest_sc, _R_LOCAL_PAGES, run, local_pages, "s")
                    self.record(
                        rest_ratio,
                        "lazy resume / eager resume (local disk)",
                        run,
                        local_lazy / local_eager,
                        "x",
                    )
                except _RunFailed as exc:
                    self.results.mark_unavailable(rest_sc, _R_LOCAL_LAZY, str(exc))
                    self.log(f"[red]{exc}")
            self.step(f"{label} run {run + 1}: snapstore verify, empty cache")
            try:
                self.verify_fusion(task_id, snap_prefix, manifest["total_bytes"], run, label)
            except _RunFailed as exc:
                self.results.mark_unavailable(f"verify {label}", _V_FULL, str(exc))
                self.log(f"[red]{exc}")
            eager = lazy = None
            self.step(f"{label} run {run + 1}: snapstore restore --eager, empty cache")
            try:
                eager = self.restore_fusion(
                    task_id,
                    snap_prefix,
                    pid,
                    state,
                    mib,
                    manifest["total_bytes"],
                    lazy=False,
                    run=run,
                    label=label,
                )
            except (_RunFailed, MountError, BenchError) as exc:
                self.results.mark_unavailable(rest_sc, _R_EAGER, str(exc))
                self.log(f"[red]{exc}")
            if self.uffd:
                self.step(f"{label} run {run + 1}: snapstore restore --lazy, empty cache")
                try:
                    lazy = self.restore_fusion(
                        task_id,
                        snap_prefix,
                        pid,
                        state,
                        mib,
                        manifest["total_bytes"],
                        lazy=True,
                        run=run,
                        label=label,
                    )
                except (_RunFailed, MountError, BenchError) as exc:
                    self.results.mark_unavailable(rest_sc, _R_LAZY, str(exc))
                    self.log(f"[red]{exc}")
            else:
                self.results.mark_unavailable(rest_sc, _R_LAZY, "no userfaultfd in this kernel")
            if eager is not None:
                self.record(
                    rest_ratio, "eager fusionfs / eager local disk", run, eager / local_eager, "x"
                )
            if eager is not None and lazy is not None:
                self.record(
                    rest_ratio,
                    "lazy command's own time (wall - resume) / eager resume (fusionfs)",
                    run,
                    (self.last_wall - lazy) / eager,
                    "x",
                    target=0.1,
                )
                self.record(
                    rest_ratio,
                    "lazy resume / eager resume (fusionfs)",
                    run,
                    lazy / eager,
                    "x",
                    target=0.1,
                )
            for latency, mounter in self.latency_mounters.items():
                for lazy_mode in (False, True) if self.uffd else (False,):
                    mode = "lazy" if lazy_mode else "eager"
                    self.step(
                        f"{label} run {run + 1}: snapstore restore --{mode} at {latency:g} ms"
                    )
                    try:
                        self.restore_fusion(
                            task_id,
                            snap_prefix,
                            pid,
                            state,
                            mib,
                            manifest["total_bytes"],
                            lazy=lazy_mode,
                            run=run,
                            label=label,
                            latency=latency,
                            mounter=mounter,
                        )
                    except (_RunFailed, MountError, BenchError) as exc:
                        self.results.mark_unavailable(
                            f"{_SERIES}, {label}", f"{mode} resume @ {latency:g} ms", str(exc)
                        )
                        self.log(f"[red]{exc}")
            # 5. an incremental snapshot (snapshot 2 of the task, after the restores of 1):
            # the same memory with 10 % of it rewritten
            self.incremental(mib, run, task_id, ours, storage)
            self.advance()
        finally:
            shutil.rmtree(images, ignore_errors=True)
            with contextlib.suppress(Exception):
                self.delete_under(direct_prefix)
            with contextlib.suppress(Exception):
                self.delete_under(snap_prefix)

    def record_ours(
        self, mib: int, run: int, ours: float, manifest: dict[str, Any], stats: dict[str, Any]
    ) -> dict[str, Any]:
        """The full dump's rows (time until durable with snapstore's breakdown, compression,
        the 30 s target of a 4 GiB task behind a link cap); returns the manifest's storage."""
        label = _label(mib)
        dump_sc = f"dump {label}"
        t = manifest["timings"]
        self.record(
            dump_sc,
            _OURS,
            run,
            ours,
            "s",
            frozen_s=t["frozen_s"],
            criu_s=t["criu_s"],
            flush_s=t["flush_s"],
            internal_total_s=t["total_s"],
            image_mb=manifest["total_bytes"] / 1e6,
            uploaded_mb=stats.get("bytes_uploaded", 0) / 1e6,
            **_cpu_extras(stats, manifest["total_bytes"]),
        )
        self.results.extra.setdefault("snapstore_dump", []).append(
            {"size_mib": mib, "run": run, "timings": t, "fusionfs_stats": stats}
        )
        storage: dict[str, Any] = manifest.get("storage") or {}
        if storage.get("stored_bytes"):
            self.record(
                dump_sc,
                _COMPRESSION,
                run,
                storage["logical_bytes"] / storage["stored_bytes"],
                "x",
                logical_mb=storage["logical_bytes"] / 1e6,
                stored_mb=storage["stored_bytes"] / 1e6,
            )
        if mib >= 4096 and self.cfg.link_mbps > 0:
            self.record(
                f"{dump_sc}: ratios",
                _FULL_TARGET,
                run,
                ours,
                "s",
                target=30.0,
            )
        stored = storage.get("new_stored_bytes") or storage.get("stored_bytes") or 0
        self.record_ceiling(mib, run, manifest["total_bytes"], stored)
        return storage

    def record_ceiling(self, mib: int, run: int, image_bytes: int, stored_bytes: int) -> None:
        """What no dump pipeline on this machine beats: the task's memory hashed (BLAKE3) and
        compressed (fusionfs's own chunk encoder, 128 KiB chunks) on all cores with no I/O,
        timed on a sample of the same content and scaled to the image size; and the stored
        bytes at the link cap. The row is the larger of the two; both are in the details."""
        import blake3

        from benchmarks.snapmem import memory_sample

        sample = memory_sample(self.cfg.memory, SEED % 1000 + mib, _CEILING_SAMPLE_MIB)
        chunk = 128 << 10
        view = memoryview(sample)
        pieces = [view[o : o + chunk] for o in range(0, len(sample), chunk)]

        def encode(piece: memoryview) -> int:
            blake3.blake3(piece).digest()
            return len(_codec.encode_chunk(piece, 1))

        cores = os.cpu_count() or 1
        with cf.ThreadPoolExecutor(cores) as pool:
            t0 = time.perf_counter()
            stored_sample = sum(pool.map(encode, pieces))
            cpu_s = (time.perf_counter() - t0) * image_bytes / len(sample)
        link = self.cfg.link_mbps * 1e6 / 8
        link_s = stored_bytes / link if link else 0.0
        self.record(
            f"dump {_label(mib)}",
            _CEILING,
            run,
            max(cpu_s, link_s),
            "s",
            encode_all_cores_s=cpu_s,
            link_s=link_s,
            cores=cores,
            sample_ratio=len(sample) / stored_sample,
        )

    def dumps_only(
        self, mib: int, run: int, proc: subprocess.Popen[bytes], task_id: str, name: str
    ) -> None:
        """``--dump-only``: the full snapstore dump of the task, then the incremental one."""
        self.step(f"{_label(mib)} run {run + 1}: snapstore dump via fusionfs")
        ours, manifest, stats = self.snapstore_dump(proc, task_id, f"dump-{name}")
        storage = self.record_ours(mib, run, ours, manifest, stats)
        self.advance()
        self.incremental(mib, run, task_id, ours, storage)
        self.advance()

    def snapstore_dump(
        self, proc: subprocess.Popen[bytes], task_id: str, mount_name: str
    ) -> tuple[float, dict[str, Any], dict[str, Any]]:
        """``snapstore dump`` of ``proc`` as a new snapshot of ``task_id`` through a fresh mount:
        seconds until it exits (committed), its manifest, the mount's stats. The task is gone
        after it (snapstore kills it after the commit)."""
        pid = proc.pid
        with self.mount(mount_name) as mnt:
            self.settle()
            with self.cpu(mnt) as cpu:
                t0 = time.perf_counter()
                root_args = ["--root", str(mnt / "snapshots")]
                res = run_cmd(
                    [*self.snapstore, "dump", str(pid), "--task", task_id, *root_args, "--json"],
                    timeout=_CMD_TIMEOUT,
                    env=self.env(),
                )
                seconds = time.perf_counter() - t0
            if res.returncode != 0:
                raise _RunFailed(f"snapstore dump exited {res.returncode}: {_stderr(res)}")
            manifest: dict[str, Any] = json.loads(res.stdout)
            stats = self.stats(mnt)
            # CPU seconds meanwhile: the server, the mount's daemon, snapstore with its CRIU
            stats["cpu_used_s"] = dict(cpu.used)
        proc.wait(30)
        self.live.discard(pid)
        _reap(pid, 30)
        return seconds, manifest, stats

    def incremental(
        self, mib: int, run: int, task_id: str, full_s: float, full_storage: dict[str, int]
    ) -> None:
        """Snapshot 2 of ``task_id``: a task with the same memory as snapshot 1 (memtask's
        content depends only on its seed), 10 % of it rewritten (SIGUSR2), dumped through a
        fresh mount with an empty cache, as a restored-then-reclaimed task would be. Records its
        time until durable and the bytes it uploaded (the chunks the store lacked)."""
        label = _label(mib)
        dump_sc = f"dump {label}"
        self.step(f"{label} run {run + 1}: incremental dump (10 % changed)")
        proc, state = self.start_task(mib, f"{mib}m-r{run}-inc")
        pid = proc.pid
        try:
            os.kill(pid, signal.SIGUSR2)
            end = time.monotonic() + 60 + mib / 20
            while not (state / "changed").exists():
                if proc.poll() is not None or time.monotonic() > end:
                    raise _RunFailed("memtask did not rewrite 10 % of its memory")
                time.sleep(0.05)
            inc_s, manifest, stats = self.snapstore_dump(proc, task_id, f"dump-inc-{mib}m-r{run}")
        except (_RunFailed, MountError, BenchError, OSError) as exc:
            self.results.mark_unavailable(dump_sc, _INC, str(exc))
            self.log(f"[red]{exc}")
            return
        storage = manifest.get("storage") or {}
        new = storage.get("new_stored_bytes", 0)
        t = manifest["timings"]
        self.record(
            dump_sc,
            _INC,
            run,
            inc_s,
            "s",
            frozen_s=t["frozen_s"],
            flush_s=t["flush_s"],
            image_mb=manifest["total_bytes"] / 1e6,
            new_stored_mb=new / 1e6,
            uploaded_mb=stats.get("bytes_uploaded", 0) / 1e6,
        )
        self.record(f"{dump_sc}: ratios", "incremental / full dump time", run, inc_s / full_s, "x")
        full_new = full_storage.get("new_stored_bytes") or full_storage.get("stored_bytes")
        if full_new:
            self.record(
                f"{dump_sc}: ratios",
                "incremental new bytes / full dump's",
                run,
                new / full_new * 100,
                "%",
            )
        if mib >= 4096 and (self.cfg.bandwidth_mbps > 0 or self.cfg.link_mbps > 0):
            self.record(
                f"{dump_sc}: ratios",
                "incremental dump until durable, 4 GiB target",
                run,
                inc_s,
                "s",
                target=30.0,
            )

    def restore_local(
        self, images: Path, pid: int, state: Path, mib: int, *, lazy: bool
    ) -> tuple[float, float | None]:
        """CRIU alone on the local images, as snapstore drives it: (time to resume, time until
        all pages are in (lazy) or None)."""
        _reap(pid, 30)
        if self.can_drop:
            drop_page_cache()
        workdir = Path(tempfile.mkdtemp(prefix="restore-local-", dir=self.work))
        args = ["restore", "-D", str(images), "-W", str(workdir), "-o", "restore.log", "-v4"]
        args += ["-d", "--restore-sibling", "--pidfile", "restore.pid"]
        daemon: subprocess.Popen[bytes] | None = None
        t0 = time.perf_counter()
        try:
            if lazy:
                daemon = self.start_lazy_daemon(images, workdir)
                args.append("--lazy-pages")
            proc = run_cmd(self.criu.argv(*args), timeout=_CMD_TIMEOUT)
            resumed = time.perf_counter()
            pidfile = workdir / "restore.pid"
            if proc.returncode != 0 or not pidfile.exists():
                raise _RunFailed(
                    f"criu restore failed ({proc.returncode}); log {workdir}/restore.log"
                )
            restored = int(pidfile.read_text().split()[0])
            self.live.add(restored)
            if restored != pid:
                self.kill(restored)
                raise _RunFailed(f"criu restored pid {restored}, expected {pid}")
            pages = None
            if daemon is not None:
                code = daemon.wait(_CMD_TIMEOUT)
                pages = time.perf_counter() - t0
                if code != 0:
                    raise _RunFailed(f"criu lazy-pages exited {code}; log {workdir}")
            self.verify_and_kill(restored, state, mib, "local restore")
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
                daemon.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
        return resumed - t0, pages

    def start_lazy_daemon(self, images: Path, workdir: Path) -> subprocess.Popen[bytes]:
        """``criu lazy-pages`` in its own session, returned once it reports ready (a NUL byte on
        its --status-fd), as snapstore starts it."""
        r, w = os.pipe()
        try:
            args = ["lazy-pages", "-D", str(images), "-W", str(workdir), "-o", "lazy-pages.log"]
            args += ["--status-fd", str(w)]
            with open(workdir / "lazy-pages.out", "wb") as log:
                daemon = subprocess.Popen(
                    self.criu.argv(*args),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(w,),
                    start_new_session=True,
                )
        finally:
            os.close(w)
        try:
            end = time.monotonic() + 30
            ready = False
            while not ready and (left := end - time.monotonic()) > 0:
                readable, _, _ = select.select([r], [], [], left)
                chunk = os.read(r, 16) if readable else b""
                if not chunk:
                    break
                ready = b"\0" in chunk
        finally:
            os.close(r)
        if not ready:
            daemon.kill()
            daemon.wait(30)
            raise _RunFailed(f"criu lazy-pages did not become ready; log {workdir}")
        return daemon

    def verify_fusion(
        self, task_id: str, snap_prefix: str, image_bytes: int, run: int, label: str
    ) -> None:
        """``snapstore verify --quick`` and ``snapstore verify`` (every chunk read once from the
        store), each on a fresh mount with an empty cache; wall time of the command."""
        scenario = f"verify {label}"
        for row, flags in ((_V_QUICK, ["--quick"]), (_V_FULL, [])):
            with self.mount(f"verify-{task_id}") as mnt:
                if self.can_drop:
                    drop_page_cache()
                self.warm_server(snap_prefix)
                t0 = time.perf_counter()
                res = run_cmd(
                    [
                        *self.snapstore,
                        "verify",
                        "--task",
                        task_id,
                        "--root",
                        str(mnt / "snapshots"),
                        "--json",
                        *flags,
                    ],
                    timeout=_CMD_TIMEOUT,
                    env=self.env(),
                )
                took = time.perf_counter() - t0
                if res.returncode != 0:
                    raise _RunFailed(
                        f"snapstore verify {flags} exited {res.returncode}: {_stderr(res)}"
                    )
                report = json.loads(res.stdout)
                self.record(
                    scenario,
                    row,
                    run,
                    took,
                    "s",
                    mb_per_s=image_bytes / took / 1e6,
                    chunks=report.get("chunks"),
                    packs=report.get("packs"),
                    read_mb=report.get("checked_bytes", 0) / 1e6,
                )

    def restore_fusion(
        self,
        task_id: str,
        snap_prefix: str,
        pid: int,
        state: Path,
        mib: int,
        image_bytes: int,
        *,
        lazy: bool,
        run: int,
        label: str,
        latency: float | None = None,
        mounter: Fusionfs | None = None,
    ) -> float:
        """``snapstore restore`` on a fresh mount with an empty cache; returns resume_s.

        With ``latency`` (and a ``mounter`` whose endpoint adds it) only the rows of the
        resume-against-latency series are recorded; without, the restore rows of the run's own
        endpoint, and the same figures as that series' points at ``--latency-ms``."""
        series = latency is not None
        rest_sc, rest_ratio = f"restore {label}", f"restore {label}: ratios"
        series_sc = f"{_SERIES}, {label}"
        at_ms = self.cfg.latency_ms if latency is None else latency
        mode = "lazy" if lazy else "eager"
        _reap(pid, 30)
        with self.mount(f"{mode}-{task_id}", mounter) as mnt:
            if self.can_drop:
                drop_page_cache()
            self.warm_server(snap_prefix)
            got = 0.0
            if not lazy and not series:  # the download ceiling of an eager restore, same run
                t0 = time.perf_counter()
                self.warm_server(snap_prefix, client=self.client)
                got = time.perf_counter() - t0
                self.record(rest_sc, _R_DIRECT, run, got, "s", mb_per_s=image_bytes / got / 1e6)
            os.sync()
            before = self.stats(mnt).get("bytes_fetched", 0)
            root_args = ["--root", str(mnt / "snapshots")]
            flags = [f"--{mode}", "--detach", "--json"]
            t0 = time.perf_counter()
            with _FetchSampler(self, mnt, task_id) as sampler:
                res = run_cmd(
                    [*self.snapstore, "restore", "--task", task_id, *root_args, *flags],
                    timeout=_CMD_TIMEOUT,
                    env=self.env(),
                )
                returned = time.perf_counter()
            wall = returned - t0
            fetched = self.stats(mnt).get("bytes_fetched", 0) - before
            if res.returncode != 0:
                raise _RunFailed(
                    f"snapstore restore --{mode} exited {res.returncode}: {_stderr(res)}"
                )
            out = json.loads(res.stdout)
            restored = int(out["pid"])
            self.live.add(restored)
            if out.get("lazy_pid"):
                self.live.add(int(out["lazy_pid"]))  # killed and reaped if anything fails
            if restored != pid:
                self.kill(restored)
                raise _RunFailed(f"snapstore restored pid {restored}, expected {pid}")
            resume = float(out["resume_s"])
            at_resume = fetched if sampler.at_pidfile is None else sampler.at_pidfile - before
            share = 100.0 * at_resume / image_bytes
            extras = {
                "wall_s": wall,
                "fetched_mb": at_resume / 1e6,
                "fetched_pct": share,
                "fetched_at_return_mb": fetched / 1e6,
            }
            try:
                if lazy:
                    lazy_pid = out.get("lazy_pid")
                    if lazy_pid:
                        code = _reap(int(lazy_pid), _CMD_TIMEOUT)
                        pages = resume + (time.perf_counter() - returned)
                        self.live.discard(int(lazy_pid))
                        if code not in (0, None):
                            raise _RunFailed(f"criu lazy-pages exited with status {code}")
                        total = self.stats(mnt).get("bytes_fetched", 0) - before
                        if not series:
                            self.record(rest_sc, _R_PAGES, run, pages, "s", fetched_mb=total / 1e6)
                        self.record(
                            series_sc,
                            f"lazy all pages in @ {at_ms:g} ms",
                            run,
                            pages,
                            "s",
                            latency_ms=at_ms,
                        )
                        shutil.rmtree(out.get("workdir") or "/nonexistent", ignore_errors=True)
                    if not series:
                        self.record(
                            rest_ratio,
                            "fetched before lazy resume / image",
                            run,
                            share,
                            "%",
                            target=10.0,
                        )
                if not series:
                    self.record(rest_sc, _R_LAZY if lazy else _R_EAGER, run, resume, "s", **extras)
                    if lazy:  # as a user times it: the command's start to the task running
                        self.record(
                            rest_sc,
                            _R_LAZY_WALL,
                            run,
                            wall,
                            "s",
                            resume_s=resume,
                            overhead_s=wall - resume,
                        )
                    self.last_wall = wall
                self.record(
                    series_sc,
                    f"{mode} resume @ {at_ms:g} ms",
                    run,
                    resume,
                    "s",
                    latency_ms=at_ms,
                    fetched_pct=share,
                )
                if not lazy and not series:
                    self.record(rest_ratio, "eager fusionfs / direct GET", run, resume / got, "x")
                self.verify_and_kill(restored, state, mib, f"{mode} restore")
            finally:
                if restored in self.live:
                    self.kill(restored)
            self.results.extra.setdefault("snapstore_restore", []).append(
                {
                    "size_mib": mib,
                    "run": run,
                    "mode": mode,
                    "latency_ms": at_ms,
                    "result": out,
                    "fusionfs_stats": self.stats(mnt),
                }
            )
        return resume

    # -- driver --------------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        with self.progress(2 * cfg.runs * len(self.sizes)):
            proxies = contextlib.ExitStack()
            try:
                reason = self.fusionfs.unavailable()
                if reason:
                    raise BenchError(f"fusionfs is not usable: {reason}")
                self.open_latency_endpoints(proxies)
                for mib in self.sizes:
                    for run in range(cfg.runs):
                        try:
                            what = f"{_label(mib)} run {run + 1}"
                            self.attempt(what, functools.partial(self.one_run, mib, run))
                        finally:
                            self.kill_all()
            finally:
                self.kill_all()
                for mountpoint, daemon in list(self.mounts):
                    with contextlib.suppress(Exception):
                        self.fusionfs.unmount(mountpoint)
                    if daemon:
                        with contextlib.suppress(BenchError):
                            _reap(daemon, 10)
                self.mounts.clear()
                proxies.close()

    def finish(self) -> None:
        _add_summary_notes(self.results)
        _add_cpu_notes(self.results)
        _add_window_fit(self.results, self.cfg)

    def open_latency_endpoints(self, stack: contextlib.ExitStack) -> None:
        """One endpoint per latency of the resume series other than the run's own: the server
        itself for 0 ms when nothing else is emulated, else a proxy with that latency and the
        run's bandwidth cap and error rate (closed by ``stack``)."""
        cfg = self.cfg
        for latency in cfg.resume_latencies():
            if latency == cfg.latency_ms:
                continue
            if latency == 0 and not cfg.bandwidth_mbps and not cfg.link_mbps and not cfg.error_rate:
                url = self.store.setup_url
            else:
                address = proxy_address(self.store.setup_url)
                if address is None:
                    self.results.notes.append(
                        f"resume at {latency:g} ms skipped: the proxy needs an http endpoint"
                    )
                    continue
                proxy = ProxyProcess(address, proxy_args(cfg, latency))
                stack.callback(self._keep_proxy_stats, proxy, latency)
                stack.enter_context(proxy)
                url = proxy.endpoint_url
            self.latency_mounters[latency] = Fusionfs(replace(self.store, url=url))

    def _keep_proxy_stats(self, proxy: ProxyProcess, latency: float) -> None:
        """Runs after the proxy stopped: its counters go into results.json."""
        stats = self.results.extra.setdefault("resume_proxy_stats", {})
        stats[f"{latency:g} ms"] = proxy.stats


def _settings(cfg: SnapConfig, sizes: list[int]) -> dict[str, Any]:
    settings = {**asdict(cfg), **common_settings(cfg)}
    settings["sizes_mib_run"] = sizes
    settings["resume_latencies_ms"] = cfg.resume_latencies()
    settings["threads"] = _THREADS
    settings["multipart_part_bytes"] = _PART
    settings["put_object_bytes"] = _PIECE
    return settings


def _choose_sizes(cfg: SnapConfig, results: Results, console: Console) -> list[int]:
    available = _mem_available()
    chosen = []
    for mib in cfg.wanted_sizes():
        need = _needed_memory(mib)
        if available and need > available:
            why = (
                f"needs about {need / _GIB:.1f} GiB of free memory, "
                f"{available / _GIB:.1f} GiB available"
            )
            results.mark_unavailable(f"dump {_label(mib)}", _OURS, why)
            console.print(f"[yellow]{_label(mib)}: skipped: {why}")
        else:
            chosen.append(mib)
    return chosen


def _preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("the snap benchmark needs root (CRIU, FUSE mounts)")
    if not _MEMTASK.is_file():
        raise BenchError(f"the test task {_MEMTASK} is missing")
    if not Path("/dev/fuse").exists():
        raise BenchError("/dev/fuse is missing: FUSE is not available")


def run_snap(cfg: SnapConfig, console: Console) -> int:
    """Runs the whole ``snap`` benchmark; returns the process exit status."""
    out = out_dir(cfg, "snap-")
    try:
        _preflight()
    except BenchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    results = Results("snap", {})
    sizes = _choose_sizes(cfg, results, console)
    results.settings = _settings(cfg, sizes)
    if not sizes:
        console.print("[red]error:[/red] no size fits in the free memory")
        return 1
    if not _set_subreaper():
        results.notes.append(
            "could not become a child subreaper: restored tasks are reaped by PID 1 (slowly)"
        )
    _compile_bytecode()

    def make(store: Store, work: Path) -> Bench:
        bench = _Bench(cfg, store, results, console, work, sizes)
        results.extra["criu"] = {"path": str(bench.criu.path), "version": bench.criu.version}
        results.notes += _notes(cfg, bench.can_drop)
        return bench

    return run_in_store(cfg, results, console, work_prefix="snapstore-bench-", out=out, make=make)


def _compile_bytecode() -> None:
    """Byte-compile snapstore and fusionfs, as ``pip install`` does for an installed package:
    a checkout run with ``PYTHONDONTWRITEBYTECODE`` (or read-only) otherwise compiles every
    module at every command's start, 50-100 ms of the lazy restore's wall time that no user
    of an installed snapstore pays. Failures only cost that time."""
    import compileall

    for package in ("snapstore", "fusionfs"):
        with contextlib.suppress(OSError):
            compileall.compile_dir(_REPO / package, quiet=2)


def _cpu_extras(stats: dict[str, Any], nbytes: int) -> dict[str, float]:
    """The CPU a ``snapstore dump`` took (``stats["cpu_used_s"]``) as per-GiB extras."""
    used = {k: v for k, v in (stats.get("cpu_used_s") or {}).items() if k != "self"}
    return cpu_per_gib(used, nbytes, {"children": "snapstore_criu"})


def _add_cpu_notes(results: Results) -> None:
    """Where the CPU went in each full dump, against the budget of the 1.25x target."""
    cores = os.cpu_count() or 1
    rows = results.summary()
    for row in rows:
        if not row.scenario.startswith("dump ") or row.tool != _OURS:
            continue
        ref = {r.tool: r for r in rows if r.scenario == row.scenario}
        local, puts = ref.get(_LOCAL_SYNC), ref.get(_UP_PUT)
        if local is None or puts is None or "cpu_daemon" not in row.extras:
            continue
        image_mb = row.extras.get("image_mb") or 0
        if image_mb <= 0:
            continue
        gib = image_mb * 1e6 / (1 << 30)
        slower = max(local.median, puts.median)
        budget = cores * 1.25 * slower / gib  # CPU-s per GiB the whole machine may spend
        rest = row.extras.get("cpu_server", 0.0) + row.extras.get("cpu_proxy", 0.0)
        own = row.extras["cpu_daemon"] + row.extras.get("cpu_snapstore_criu", 0.0)
        results.notes.append(
            f"{row.scenario}, CPU seconds per GiB of images (medians): {_LOCAL_SYNC} "
            f"{cpu_parts(local)}; {_UP_PUT} {cpu_parts(puts)}; {_OURS} {cpu_parts(row)}. 1.25x "
            f"the slower of the first two ({1.25 * slower:.2f} s) on {cores} cores allows at most "
            f"{budget:.2f} CPU-s per GiB in all; the server took {rest:.2f} during our dump, "
            f"leaving {budget - rest:.2f} for the daemon, snapstore and CRIU, which used "
            f"{own:.2f}"
        )


def _add_window_fit(results: Results, cfg: SnapConfig) -> None:
    """The reclamation-window table (benchmarks/window.py) as its own section of results.md."""
    from benchmarks import window

    link = {"bandwidth_mbps": cfg.bandwidth_mbps, "link_mbps": cfg.link_mbps}
    rows = window.fit_rows(results.measurements, connections=_THREADS, **link)
    if rows:
        results.sections.append(window.markdown(rows, connections=_THREADS, **link))
        results.extra["window_fit"] = [asdict(row) for row in rows]
    # the same table for incremental snapshots (10 % of the memory changed since the last)
    incremental = [replace(m, tool=_OURS) for m in results.measurements if m.tool == _INC] + [
        m for m in results.measurements if m.tool != _OURS and m.tool != _INC
    ]
    rows = window.fit_rows(incremental, connections=_THREADS, **link)
    if rows:
        text = window.markdown(rows, connections=_THREADS, **link)
        results.sections.append(
            text.replace(
                "## Reclamation window fit",
                "## Reclamation window fit, incremental snapshots (10 % of memory changed)",
                1,
            )
        )
        results.extra["window_fit_incremental"] = [asdict(row) for row in rows]


def _notes(cfg: SnapConfig, can_drop: bool) -> list[str]:
    notes = [
        "seconds: lower is better; ratios are per run, then median (min-max)",
        "dump rows: criu dump --leave-stopped -v4 to local disk (then + fsync of every image "
        "file and the dir); direct uploads of the same files with boto3, 8 threads; "
        "snapstore dump: wall time of the command until it exits (manifest committed)",
        "restore rows: criu restore -d --restore-sibling from the local images; snapstore "
        "restore --detach --json on a fresh mount with an empty cache dir: its resume_s "
        "(command wall time in wall_s); all pages in = resume_s + time until the lazy-pages "
        "daemon exited after the command returned",
        "fetched_pct: bytes_fetched (fusionfs stats) when CRIU's pidfile appeared (end of the "
        "restore), over the image size; fetched_at_return_mb: the same once the command "
        "returned (the lazy daemon keeps fetching meanwhile)",
        "every restored task verified its whole memory (SIGUSR1 -> verify.json) and was killed",
    ]
    notes.append(
        "before each restore the page cache was dropped; the server's copy was warmed by one "
        "unmeasured direct GET before the fusionfs restores"
        if can_drop
        else "the page cache could not be dropped: local restores read cached images"
    )
    notes.append(
        f"each timed dump phase started after os.sync() and {_SETTLE_S:g} quiet seconds, so "
        "none inherits the previous phase's deletes, writeback or freed memory (see _SETTLE_S "
        "in benchmarks/snap.py)"
    )
    if cfg.proxied:
        notes.append(
            f"through benchmarks.proxy: latency {cfg.latency_ms} ms, "
            f"{cfg.bandwidth_mbps} Mbit/s per connection, {cfg.link_mbps} Mbit/s for all "
            f"connections together, error rate {cfg.error_rate}"
        )
    notes.append(
        "resume vs latency: the same snapshot restored eagerly and lazily on a fresh mount at "
        f"each first-byte latency in {cfg.resume_latencies()} ms (the run's own endpoint for "
        f"{cfg.latency_ms:g} ms, a proxy with the run's bandwidth cap and error rate otherwise)"
    )
    return notes


def _add_summary_notes(results: Results) -> None:
    """One line per target: met or not, from the medians."""
    for row in results.summary():
        target = row.extras.get("target")
        if target is None:
            continue
        met = row.median <= target
        results.notes.append(
            f"target {row.scenario} / {row.tool}: median {row.median:.3g} "
            f"{'<=' if met else '>'} {target:g}: {'met' if met else 'NOT met'}"
        )
