"""The restore flow: bring a committed snapshot back to life with CRIU, lazily or eagerly.

- ``lazy`` (the default where the kernel has userfaultfd): start ``criu lazy-pages`` on the
  images dir (before the quick check, which its start-up then overlaps; a failed check stops
  it; started with ``likely_criu`` while CRIU's version check runs, and started again if the
  check picks another binary), wait until it reports ready (``--status-fd``), then ``criu
  restore --lazy-pages``: the task resumes before its memory is read; the daemon serves page
  faults from the image files (on the mount: fetched from the store as touched) and pushes the
  remaining pages in the background, exiting once all are in. "time to resume" is when ``criu
  restore`` returns; "all pages in" is when the daemon exits.
- ``eager``: plain ``criu restore``; every page is read before the task resumes.

CRIU always runs with ``-d --restore-sibling``: CRIU detaches, and the restored task is created
as a sibling of CRIU, that is as a child of snapstore. So without ``--detach`` snapstore can
``waitpid`` the task and exit with its real exit status (128+N for a task killed by signal N,
as shells report it). A plain foreground ``criu restore`` would only report CRIU's own status.

CRIU's logs, pidfile, stats and the lazy-pages socket go to a local work directory (never the
images dir on the mount: the snapshot stays read-only, and FUSE need not support sockets).

The ``restore`` and ``run`` commands warm the mount up while they import (``_warm``): the
restore takes the latest snapshot number from that walk, does not list the images dir again,
and the quick check takes the chunked files' answers it got ahead (judged as its own).

Before CRIU starts, the snapshot gets ``verify``'s quick check (manifest digest, files, sizes,
small files' digests, chunked manifests and their packs); a snapshot that fails it is
``SnapshotCorrupt`` (177) and CRIU never runs. A chunk that fails fusionfs's own check while
CRIU reads it is EIO: an eager restore then fails, a lazy one loses its daemon after the task
resumed; either way the whole snapshot is read once to name the bad part (177), and a lazily
restored task is killed at once (``wait_task``), never left to run on with a hole in its memory.

Caveats: CRIU restores the task under its original PIDs and thread ids. For a task that is the
init of a PID namespace of its own (what ``snapstore run`` starts: ``snapstore.pidns``) those
are the namespace's PIDs, and CRIU makes a fresh namespace: nothing on this machine can collide.
For any other task they are the machine's PIDs, so they must be free (checked first; a
just-killed task's zombie is waited for up to a few seconds). With ``--detach`` nobody waits for
the lazy-pages daemon: if it dies before all pages are in, the task dies on its next fault of a
missing page (SIGSEGV or SIGBUS) and nobody reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from snapstore import _warm
from snapstore.catalog import Catalog, Manifest
from snapstore.criu import Criu, find_criu, likely_criu, log_excerpt, read_stats
from snapstore.errors import (
    CriuUnavailable,
    RestoreFailed,
    SnapshotCorrupt,
    SnapstoreError,
    os_error_text,
)
from snapstore.root import Root
from snapstore.verify import verify_snapshot

__all__ = ["RestoreResult", "restore", "uffd_available", "wait_task"]

_READY_TIMEOUT_S = 30.0
_PID_WAIT_S = 5.0
_US = 1e-6


def uffd_available() -> bool:
    """Whether this kernel has userfaultfd (needed by ``criu lazy-pages``)."""
    return (
        Path("/proc/sys/vm/unprivileged_userfaultfd").exists() or Path("/dev/userfaultfd").exists()
    )


@dataclasses.dataclass
class RestoreResult:
    task: str
    snapshot: int
    manifest: Manifest
    pid: int
    lazy: bool
    resume_s: float  # from the start of the restore until the task runs
    workdir: Path
    lazy_pid: int | None
    stats: dict[str, int]
    pages_s: float | None = None  # until the lazy-pages daemon exited (all pages in)
    lazy_status: int | None = None
    root: Root | None = None  # for the check after a failure (``lazy_failure``)
    ended: bool = False  # the task was killed because its lazy-pages daemon failed


def _busy(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


def _describe(pid: int) -> str:
    import psutil  # only when a PID is busy: the restore command's start-up stays small

    try:
        proc = psutil.Process(pid)
        return f"{proc.name()!r}, {proc.status()}"
    except psutil.Error:
        return "gone now"


def _check_pids_free(manifest: Manifest) -> None:
    wanted = sorted(set(manifest.pids) | set(manifest.tids) | {manifest.pid})
    deadline = time.monotonic() + _PID_WAIT_S
    busy = _busy(wanted)
    while busy and time.monotonic() < deadline:  # a dead task's zombie may linger a moment
        time.sleep(0.05)
        busy = _busy(wanted)
    if busy:
        which = ", ".join(f"{p} ({_describe(p)})" for p in busy[:5])
        raise RestoreFailed(
            f"cannot restore task {manifest.task!r}: CRIU restores it under its original "
            f"PID(s), and {which} {'is' if len(busy) == 1 else 'are'} in use on this machine"
        )


@dataclasses.dataclass
class _Spawned:
    """A ``criu lazy-pages`` started but maybe not ready yet: its status pipe is still open."""

    pid: int
    status_fd: int
    out: Path


def _list_quietly(path: Path, done: list[bool]) -> None:
    with contextlib.suppress(OSError):
        os.listdir(path)
        done.append(True)


def _checked_criu() -> Criu:
    try:
        return find_criu()
    except CriuUnavailable as err:
        raise RestoreFailed(str(err)) from None


def _spawn_lazy_daemon(criu: Criu, images: Path, workdir: Path) -> _Spawned:
    """Spawn ``criu lazy-pages`` in its own session; ``_await_ready`` waits until it serves.

    Spawned before the snapshot's quick check, so that its start (it reads the process tree
    image through the mount) overlaps the check instead of following it."""
    r, w = os.pipe()
    try:
        os.set_inheritable(w, True)
        out = workdir / "lazy-pages.out"
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(out), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        argv = criu.argv(
            "lazy-pages",
            "-D",
            str(images),
            "-W",
            str(workdir),
            "-o",
            "lazy-pages.log",
            "--status-fd",
            str(w),
        )
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsid=True)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return _Spawned(pid, r, out)


def _abandon(spawned: _Spawned) -> None:
    """Stop a spawned daemon that will not be used (the check before CRIU failed)."""
    os.close(spawned.status_fd)
    _stop_daemon(spawned.pid)


def _await_ready(spawned: _Spawned, workdir: Path) -> int:
    """Wait (bounded) until the spawned daemon reports ready on its status pipe; its pid."""
    r = spawned.status_fd
    try:
        ready = False
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([r], [], [], left)
            if not readable:
                break
            chunk = os.read(r, 16)
            if not chunk:
                break
            if b"\0" in chunk:
                ready = True
                break
    finally:
        os.close(r)
    if not ready:
        _stop_daemon(spawned.pid)
        log = workdir / "lazy-pages.log"
        details = log_excerpt(log) if log.exists() else []
        try:  # what CRIU printed before it had a log (option or work dir errors)
            details += spawned.out.read_text(errors="replace").strip().splitlines()[-5:]
        except OSError:
            pass
        raise RestoreFailed(f"criu lazy-pages did not become ready; log: {log}", details=details)
    return spawned.pid


def _stop_daemon(pid: int) -> None:
    """Kill a lazy-pages daemon and what it forked (its own session and process group: stopped
    while it starts, a probe CRIU forks for its kernel checks would outlive it), and reap it."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            break
        except ProcessLookupError:
            continue
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def restore(
    task: str,
    root: Root,
    snapshot: int | None,
    lazy: bool | None,
    progress: Callable[[str], None] = lambda _msg: None,
    *,
    verified: bool = False,
) -> RestoreResult:
    """Restore snapshot ``snapshot`` (default: the latest) of ``task``; the task runs on return.

    ``lazy`` None means lazy where userfaultfd is available, else eager. An ``OSError`` from
    the root (a mount that died) is ``RestoreFailed``, like every other failure. ``verified``:
    the caller ran the quick check already (``run``, before it rewound the task's files).
    """
    try:
        return _restore(task, root, snapshot, lazy, progress, verified)
    except OSError as err:
        raise RestoreFailed(f"snapshot of {task!r} not restored: {os_error_text(err)}") from None


def _restore(
    task: str,
    root: Root,
    snapshot: int | None,
    lazy: bool | None,
    progress: Callable[[str], None],
    verified: bool,
) -> RestoreResult:
    catalog = Catalog(root.path)
    # the command's warm-up (_warm) listed the task dir while the program imported
    n = _warm.latest(str(root.path), task) if snapshot is None else None
    if n is None:
        n = catalog.resolve(task, snapshot)
    images = catalog.images_dir(task, n)
    # the images dir's listing (the quick check's first step) overlaps the manifest's read: on a
    # fresh mount each is a round trip to the store; the warm-up may have it in flight already
    listing, listed = None, list[bool]()
    if not _warm.covers(str(images)):
        listing = threading.Thread(target=_list_quietly, args=(images, listed), daemon=True)
        listing.start()
    manifest = catalog.load(task, n)
    # its version check (prefetched by the command) is awaited after the snapshot's check
    criu = likely_criu()
    if criu is None or not os.access(criu.path, os.X_OK):
        criu = _checked_criu()  # raises, naming what was tried
    if manifest.arch and manifest.arch != os.uname().machine:
        raise RestoreFailed(
            f"snapshot {n} of {task!r} was taken on {manifest.arch}; this machine is "
            f"{os.uname().machine}"
        )
    if lazy is None:
        lazy = uffd_available()
    elif lazy and not uffd_available():
        raise RestoreFailed("--lazy needs userfaultfd, which this kernel does not offer")
    workdir = Path(tempfile.mkdtemp(prefix=f"snapstore-restore-{task}-{n}-"))
    spawned: _Spawned | None = None
    try:
        if lazy:  # every page is read once: past the chunk cache, but with the page cache
            root.no_cache(images)
            spawned = _spawn_lazy_daemon(criu, images, workdir)  # its start overlaps the check
        # the quick check (verify.py): files, sizes, small files' digests, chunked manifests
        # and their packs; it also reads the small images ahead, in parallel, before CRIU
        # needs them. Nothing is restored unless it passes.
        if not verified:
            if listing is not None:
                listing.join()
            primed = bool(listed) or _warm.covers(str(images))
            verify_snapshot(
                root, task, n, full=False, manifest=manifest, listed=primed, ahead=_warm.checked
            )
        checked = _checked_criu()
        if checked.path != criu.path and spawned is not None:  # not the CRIU it will use
            _abandon(spawned)
            spawned = None
            spawned = _spawn_lazy_daemon(checked, images, workdir)
        criu = checked
        if not manifest.options.get("pid_namespace"):
            _check_pids_free(manifest)
    except BaseException:
        if spawned is not None:
            _abandon(spawned)
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    if not lazy:  # every page is read once, in large reads (the lazy daemon reads small runs)
        root.read_once(images)
    # from here to the task running is the resume (a lazy daemon's start before the check,
    # which the check hid, is not in it)
    started = time.monotonic()
    lazy_pid = _await_ready(spawned, workdir) if spawned is not None else None
    args = [
        "restore",
        "-D",
        str(images),
        "-W",
        str(workdir),
        "-o",
        "restore.log",
        "-v4",
        "-d",
        "--restore-sibling",
        "--pidfile",
        "restore.pid",
    ]
    if lazy:
        args.append("--lazy-pages")
    for option, flag in (
        ("tcp_established", "--tcp-established"),
        ("shell_job", "--shell-job"),
        ("file_locks", "--file-locks"),
    ):
        if manifest.options.get(option):
            args.append(flag)
    progress(f"restoring {'lazily' if lazy else 'eagerly'} from {images}")
    try:
        run = criu.run(args)
    except BaseException:
        if lazy_pid is not None:
            _stop_daemon(lazy_pid)
        raise
    resume_s = time.monotonic() - started
    pidfile = workdir / "restore.pid"
    if run.returncode != 0 or not pidfile.exists():
        if lazy_pid is not None:
            _stop_daemon(lazy_pid)
        _reap_restored(manifest)
        log = workdir / "restore.log"
        details = log_excerpt(log)
        # a chunk that fails fusionfs's check is EIO to CRIU: tell that from other failures
        _raise_if_corrupt(
            root, task, n, manifest, f"CRIU could not restore it; log: {log}", details, progress
        )
        raise RestoreFailed(
            f"CRIU could not restore snapshot {n} of {task!r} (criu exit status "
            f"{run.returncode}); log: {log}",
            details=details,
        )
    pid = int(pidfile.read_text().split()[0])
    stats = read_stats(workdir / "stats-restore")
    return RestoreResult(
        task=task,
        snapshot=n,
        manifest=manifest,
        pid=pid,
        lazy=lazy,
        resume_s=resume_s,
        workdir=workdir,
        lazy_pid=lazy_pid,
        stats=stats,
        root=root,
    )


def _reap_restored(manifest: Manifest) -> None:
    """Reap what a failed ``--restore-sibling`` restore left as our children (CRIU kills the
    half-restored tasks; they are zombies of ours), so their PIDs are free for another try
    (``run`` falling back to an older snapshot) within this process."""
    deadline = time.monotonic() + _PID_WAIT_S
    pending = set(manifest.pids) | {manifest.pid}
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours (or gone already)
                pending.discard(pid)
                continue
            if done:
                pending.discard(pid)
        if pending:
            time.sleep(0.01)


def _raise_if_corrupt(
    root: Root,
    task: str,
    n: int,
    manifest: Manifest,
    context: str,
    details: list[str],
    progress: Callable[[str], None],
) -> None:
    """After a failed restore: read the whole snapshot once (``verify_snapshot(full=True)``)
    and raise ``SnapshotCorrupt`` if it does not verify; return if it does, or if it cannot be
    told (the mount is gone: that is the failure to report)."""
    progress(f"checking every chunk of snapshot {n} of {task!r} to tell why")
    try:
        verify_snapshot(root, task, n, full=True, manifest=manifest)
    except SnapshotCorrupt as err:
        raise SnapshotCorrupt(f"{err}; {context}", details=details) from None
    except (SnapstoreError, OSError):
        return


def end_task(result: RestoreResult) -> None:
    """SIGKILL a lazily restored task whose lazy-pages daemon died: the pages it has not
    touched yet will never come, and it must not run on with a hole in its memory."""
    result.ended = True
    try:
        os.kill(result.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def lazy_failed(result: RestoreResult, task_status: int) -> bool:
    """Whether the lazy restore failed under the task: its daemon exited with an error and the
    task did not end by itself first (it was ended for it, or killed by a signal: the fault of
    a page that never came). A task that exits normally keeps its own status."""
    if result.lazy_status in (None, 0):
        return False
    return result.ended or task_status < 0


def lazy_failure(result: RestoreResult) -> SnapstoreError:
    """The error for a lazy restore whose daemon exited before all pages were in (the task has
    been ended): ``SnapshotCorrupt`` if the snapshot does not verify (a chunk failed its check:
    fusionfs answered EIO to the daemon), else ``RestoreFailed``."""
    log = result.workdir / "lazy-pages.log"
    context = (
        f"criu lazy-pages stopped with status {result.lazy_status} before all pages were in, "
        f"and task {result.pid} was ended; log: {log}"
    )
    if result.root is not None:
        try:
            _raise_if_corrupt(
                result.root,
                result.task,
                result.snapshot,
                result.manifest,
                context,
                [],
                lambda _m: None,
            )
        except SnapshotCorrupt as err:
            return err
    return RestoreFailed(
        f"snapshot {result.snapshot} of {result.task!r} not restored: {context}",
        details=log_excerpt(log) if log.exists() else [],
    )


def wait_task(
    result: RestoreResult,
    on_pages_in: Callable[[RestoreResult], None] = lambda _r: None,
    started: float | None = None,
) -> int:
    """Wait for the restored task (our child) and return its exit code (128+N on signal N).

    SIGINT, SIGTERM and SIGHUP sent to snapstore meanwhile are forwarded to the task. In lazy
    mode a thread reaps the lazy-pages daemon, fills ``result.pages_s`` and calls
    ``on_pages_in``. The work directory is removed if everything went well.

    A lazy-pages daemon that exits with an error ends the task at once (``end_task``) and
    makes this raise ``lazy_failure``: ``SnapshotCorrupt`` (177) when a chunk did not verify,
    never the task's own status after a silent death.
    """
    origin = started if started is not None else time.monotonic() - result.resume_s
    waiter: threading.Thread | None = None
    if result.lazy_pid is not None:
        lazy_pid = result.lazy_pid

        def reap() -> None:
            _, status = os.waitpid(lazy_pid, 0)
            result.pages_s = time.monotonic() - origin
            result.lazy_status = os.waitstatus_to_exitcode(status)
            if result.lazy_status != 0:
                end_task(result)
            on_pages_in(result)

        waiter = threading.Thread(target=reap, name="lazy-pages-reaper", daemon=True)
        waiter.start()

    def forward(signo: int, _frame: FrameType | None) -> None:
        try:
            os.kill(result.pid, signo)
        except ProcessLookupError:
            pass

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        _, status = os.waitpid(result.pid, 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = os.waitstatus_to_exitcode(status)
    stuck = False
    if waiter is not None:
        waiter.join(_READY_TIMEOUT_S)
        if waiter.is_alive() and result.lazy_pid is not None:  # daemon stuck after the task
            stuck = True
            try:
                os.kill(result.lazy_pid, signal.SIGKILL)  # the reaper thread reaps it
            except ProcessLookupError:
                pass
            waiter.join()
    if not stuck and lazy_failed(result, code):
        raise lazy_failure(result)
    if code < 0:
        code = 128 - code
    if result.lazy_status not in (None, 0):
        return code
    shutil.rmtree(result.workdir, ignore_errors=True)
    return code


def restore_stats_seconds(stats: dict[str, int]) -> dict[str, float]:
    """CRIU's own restore timings, in seconds."""
    return {
        "forking_s": stats.get("forking_time_us", 0) * _US,
        "restore_s": stats.get("restore_time_us", 0) * _US,
    }
