"""The dump flow: checkpoint a running task with CRIU into a new snapshot and commit it.

Steps (each timed; the manifest records the timings):
1. check the input (PID exists, is not snapstore itself or an ancestor, CRIU is usable);
2. flush the mount, so what the task wrote to files on it is durable before the freeze;
3. claim snapshot n (``mkdir ROOT/ID/n``) and run ``criu dump -t PID -D ROOT/ID/n``
   with ``--leave-stopped`` (or ``--leave-running``), killed at the deadline;
4. fsync every image file and the directories, and flush the mount again (the task's files,
   now that it is stopped), so everything the snapshot refers to is durable; CRIU's log is
   copied into the images dir meanwhile (it is not one of the snapshot's files);
5. record a digest of every image file (``verify.record_digests``: for a file in fusionfs's
   chunked layout the digest of its chunked manifest, one GET; for the others their BLAKE3)
   and write the manifest ``ROOT/ID/n.json``, with a digest of itself (the commit point);
6. kill the (stopped) task, unless ``--leave-running``.

Why ``--leave-stopped`` and not CRIU's default (kill at the end of the dump): until the
manifest is committed, any failure (a deadline passed while flushing, a flush error, snapstore
interrupted) can still give the task back with SIGCONT, untouched, instead of losing it. And a
stopped task cannot write to its files between the dump and the kill, so the files match the
offsets CRIU recorded.

Caveats: if snapstore itself is SIGKILLed between CRIU's end and the commit, the task stays
stopped (``kill -CONT PID`` resumes it). A blocking fsync cannot be interrupted, so a deadline
that passes during the flush is noticed when that fsync returns.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from snapstore import pidns
from snapstore.catalog import Catalog, ImageFile, Manifest, fsync_dir, fsync_file, utc_now
from snapstore.criu import (
    KILL_GRACE_S,
    Criu,
    CriuRun,
    DumpKillGate,
    find_criu,
    log_excerpt,
    read_stats,
)
from snapstore.errors import (
    CriuUnavailable,
    DumpFailed,
    SnapstoreError,
    UsageError,
    os_error_text,
)
from snapstore.root import Root
from snapstore.verify import record_digests

__all__ = ["DumpOptions", "DumpResult", "dump"]

_LOG_NAME = "dump.log"
_SAID_NAME = "criu.out"  # CRIU's own stdout and stderr, beside the local log
_US = 1e-6


@dataclasses.dataclass(frozen=True)
class DumpOptions:
    leave_running: bool = False
    tcp_established: bool = False
    shell_job: bool = False
    file_locks: bool = False
    deadline: float | None = None  # seconds from the start of the command


@dataclasses.dataclass(frozen=True)
class DumpResult:
    manifest: Manifest
    manifest_path: Path
    images_dir: Path


def _check_pid(pid: int) -> psutil.Process:
    if pid <= 0:
        raise UsageError(f"invalid PID {pid}")
    me = psutil.Process()
    if pid == me.pid or pid in {p.pid for p in me.parents()}:
        raise UsageError(f"PID {pid} is snapstore itself or one of its parents; cannot dump it")
    try:
        proc = psutil.Process(pid)
        status = proc.status()
    except psutil.NoSuchProcess:
        raise UsageError(f"no process with PID {pid}") from None
    except psutil.AccessDenied:
        raise UsageError(f"no permission to inspect PID {pid} (run as root)") from None
    if status == psutil.STATUS_ZOMBIE:
        raise UsageError(f"PID {pid} has already exited (zombie); nothing to dump")
    return proc


def _tree(proc: psutil.Process) -> tuple[list[psutil.Process], list[int]]:
    """The process and its descendants, and every thread id among them."""
    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    tids: list[int] = []
    for p in procs:
        try:
            tids += [t.id for t in p.threads()]
        except psutil.NoSuchProcess:
            continue
    return procs, sorted(set(tids))


def _signal_all(procs: list[psutil.Process], signo: signal.Signals) -> None:
    for p in procs:
        try:
            p.send_signal(signo)
        except psutil.NoSuchProcess:
            continue


def _resume(proc: psutil.Process) -> None:
    """SIGCONT the task and its descendants (after a failed or abandoned dump)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    _signal_all(procs, signal.SIGCONT)


def _task_fate(proc: psutil.Process, run: CriuRun) -> str:
    """What became of the task after CRIU was stopped at a deadline, in words."""
    try:
        alive = proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        alive = False
    if alive:
        return "the task left running"
    if run.kill_forced:
        return (
            f"and the task did NOT survive: CRIU stayed {KILL_GRACE_S:g} s in a phase where it "
            "changes the task and was killed there"
        )
    return "and the task did NOT survive"


def _criu_args(pid: int, images: Path, log: Path, opts: DumpOptions) -> list[str]:
    # The log goes to local disk while CRIU runs: at -v4 it is tens of thousands of small
    # write(2)s, and on a FUSE file every write(2) costs the kernel a GETXATTR round trip to
    # the daemon (security.capability, ~0.12 ms here) on top of the write: measured 37 000 of
    # them for two 1 GiB dumps. It is copied next to the images in one go afterwards.
    args = ["dump", "-t", str(pid), "-D", str(images), "-o", str(log), "-v4"]
    args.append("--leave-running" if opts.leave_running else "--leave-stopped")
    if opts.tcp_established:
        args.append("--tcp-established")
    if opts.shell_job:
        args.append("--shell-job")
    if opts.file_locks:
        args.append("--file-locks")
    return args


def _keep_log(local: Path, images: Path) -> Path:
    """Move CRIU's log from its local temporary dir into the images dir (with the snapshot,
    committed or not) and remove that dir; if the copy fails the log stays where it is (the
    dir is kept) and that path is returned."""
    kept = images / _LOG_NAME
    try:
        shutil.copyfile(local, kept)
    except OSError:
        if not local.exists():  # CRIU never wrote one: nothing to keep
            shutil.rmtree(local.parent, ignore_errors=True)
        return local
    shutil.rmtree(local.parent, ignore_errors=True)
    return kept


def _criu_said(path: Path, most: int = 10) -> list[str]:
    """The last lines CRIU printed on its stdout/stderr (what it says before its log is open:
    an images dir it cannot open), as ``criu: LINE``; none if it printed nothing."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [f"criu: {line.rstrip()}" for line in lines if line.strip()][-most:]


def _hints(excerpt: list[str]) -> list[str]:
    text = "\n".join(excerpt)
    hints = []
    if "shell-job" in text or "session leader" in text.lower() or "tty" in text:
        hints.append(
            "hint: the task shares a session or terminal with processes outside it: start it "
            "with setsid and stdin/stdout/stderr redirected to files (or pass --shell-job)"
        )
    if "file-locks" in text or "file lock" in text.lower():
        hints.append("hint: the task holds file locks: pass --file-locks")
    if "established" in text.lower() and "tcp" in text.lower():
        hints.append("hint: the task has established TCP connections: pass --tcp-established")
    return hints


def _keep_log_meanwhile(local: Path, images: Path) -> threading.Thread:
    """``_keep_log`` in a thread, beside the sync and commit of a dump whose CRIU run succeeded:
    on the mount, creating the log costs a lookup and a PUT that would otherwise wait behind
    the last pack uploads (0.12 s of a 5 s dump of 1 GiB on local s3rver). The log is not one
    of the snapshot's files (``_sync_images`` leaves it out): only the return waits for it."""
    thread = threading.Thread(
        target=_keep_log, args=(local, images), name="keep-dump-log", daemon=True
    )
    thread.start()
    return thread


def _sync_images(images: Path) -> list[ImageFile]:
    files = []
    for entry in sorted(os.scandir(images), key=lambda e: e.name):
        if entry.name == _LOG_NAME or not entry.is_file(follow_symlinks=False):
            continue
        fsync_file(Path(entry.path))
        files.append(ImageFile(entry.name, entry.stat(follow_symlinks=False).st_size))
    fsync_dir(images)
    fsync_dir(images.parent)
    return files


def dump(
    pid: int,
    task: str,
    root: Root,
    opts: DumpOptions,
    progress: Callable[[str], None] = lambda _msg: None,
) -> DumpResult:
    """Checkpoint PID as a new snapshot of ``task`` under ``root``; see the module docstring.

    Every failure is ``DumpFailed``: an ``OSError`` from the root (a mount that died, a full
    disk) too, whatever step it came from (the task is resumed if CRIU had stopped it)."""
    try:
        return _dump(pid, task, root, opts, progress)
    except OSError as err:
        raise DumpFailed(f"snapshot of {task!r} not committed: {os_error_text(err)}") from None


def _dump(
    pid: int,
    task: str,
    root: Root,
    opts: DumpOptions,
    progress: Callable[[str], None],
) -> DumpResult:
    started = time.monotonic()
    deadline_at = started + opts.deadline if opts.deadline is not None else None
    catalog = Catalog(root.path)
    catalog.task_dir(task)  # validates the id
    proc = _check_pid(pid)
    own_pid_ns = pidns.is_namespace_init(pid)
    try:
        criu: Criu = find_criu()
    except CriuUnavailable as err:
        raise DumpFailed(str(err)) from None
    try:
        command = proc.cmdline()
    except psutil.Error:
        command = []

    t = time.monotonic()
    try:
        root.flush()
    except SnapstoreError as err:
        raise DumpFailed(f"before the dump: {err}") from None
    preflush_s = time.monotonic() - t

    previous = catalog.latest(task)
    try:
        root.use_chunked_layout()
    except SnapstoreError as err:
        raise DumpFailed(str(err)) from None
    n = catalog.reserve(task)
    images = catalog.images_dir(task, n)
    try:
        root.write_behind(images)
    except SnapstoreError as err:
        raise DumpFailed(str(err)) from None
    if previous is not None:  # upload only what changed since the last snapshot
        problem = root.dedup_from(images, catalog.images_dir(task, previous))
        if problem is not None:
            progress(problem)
    progress(f"dumping PID {pid} into {images}")
    timeout = None
    if deadline_at is not None:
        timeout = deadline_at - time.monotonic()
        if timeout <= 0:
            raise DumpFailed(
                f"deadline of {opts.deadline:g} s passed before CRIU started (flushing the "
                f"mount took {preflush_s:.2f} s); task {pid} left running, nothing committed"
            )
    local_log = Path(tempfile.mkdtemp(prefix="snapstore-dump-")) / _LOG_NAME  # 0700
    try:
        gate = DumpKillGate(local_log)
        said = local_log.with_name(_SAID_NAME)
        args = _criu_args(pid, images, local_log, opts)
        run = criu.run(args, timeout=timeout, gate=gate, output=said)
    except BaseException:  # interrupted: CRIU was killed, so the task must not stay stopped
        _resume(proc)
        _keep_log(local_log, images)
        raise
    if run.returncode == 0 and not run.timed_out:
        keeper = _keep_log_meanwhile(local_log, images)
    else:
        excerpt = log_excerpt(local_log) if not run.timed_out else []
        excerpt += _criu_said(said)
        log = _keep_log(local_log, images)
    if run.timed_out:
        _resume(proc)
        how = f"CRIU was stopped after {run.seconds:.2f} s"
        if run.kill_wait >= 0.01 and not run.kill_forced:
            how += f" ({run.kill_wait:.2f} s past the deadline, at a phase safe for the task)"
        raise DumpFailed(
            f"deadline of {opts.deadline:g} s passed while CRIU was dumping PID {pid}; {how}, "
            f"{_task_fate(proc, run)}, nothing committed (partial images and log in {images})"
        )
    if run.returncode != 0:
        _resume(proc)
        raise DumpFailed(
            f"CRIU could not dump PID {pid} (criu exit status {run.returncode}); nothing "
            f"committed; log: {log}",
            details=excerpt + _hints(excerpt),
        )

    # From here the task is stopped (or running, with --leave-running) and complete images
    # exist; any failure before the commit gives the task back.
    try:
        procs, tids = _tree(proc)
        t = time.monotonic()
        files = _sync_images(images)
        root.flush()
        flush_s = time.monotonic() - t
        t = time.monotonic()
        files = record_digests(root, images, files)
        digest_s = time.monotonic() - t
        if deadline_at is not None and time.monotonic() > deadline_at:
            raise DumpFailed(
                f"deadline of {opts.deadline:g} s passed while making the snapshot durable "
                f"(CRIU {run.seconds:.2f} s, flush {flush_s:.2f} s); task {pid} left running, "
                f"nothing committed"
            )
        stats = read_stats(images / "stats-dump")
        total_s = time.monotonic() - started
        manifest = Manifest(
            task=task,
            snapshot=n,
            created=utc_now(),
            host=socket.gethostname(),
            pid=pid,
            pids=sorted(p.pid for p in procs),
            tids=tids,
            command=command,
            criu_version=criu.version,
            kernel=platform.release(),
            arch=platform.machine(),
            options={
                "leave_running": opts.leave_running,
                "tcp_established": opts.tcp_established,
                "shell_job": opts.shell_job,
                "file_locks": opts.file_locks,
                # restored in a new PID namespace: no PID of the restoring machine matters
                "pid_namespace": own_pid_ns,
            },
            files=files,
            total_bytes=sum(f.size for f in files),
            timings={
                "preflush_s": round(preflush_s, 6),
                "freeze_s": round(stats.get("freezing_time_us", 0) * _US, 6),
                "frozen_s": round(stats.get("frozen_time_us", 0) * _US, 6),
                "memdump_s": round(stats.get("memdump_time_us", 0) * _US, 6),
                "memwrite_s": round(stats.get("memwrite_time_us", 0) * _US, 6),
                "criu_s": round(run.seconds, 6),
                "flush_s": round(flush_s, 6),
                "digest_s": round(digest_s, 6),
                "total_s": round(total_s, 6),
            },
            criu_stats=stats,
            storage=root.chunk_stats(images),
        )
        path = catalog.commit(manifest)
    except DumpFailed:
        _resume(proc)
        raise
    except (SnapstoreError, OSError) as err:
        _resume(proc)
        raise DumpFailed(
            f"snapshot {n} of {task!r} not committed, task {pid} resumed: {err}"
        ) from None
    except BaseException:
        _resume(proc)
        raise
    finally:
        keeper.join()
    if not opts.leave_running:
        _signal_all(procs, signal.SIGKILL)
    return DumpResult(manifest, path, images)
