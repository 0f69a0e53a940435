"""The spot supervisor (``snapstore run``): run a task, checkpoint it when the machine goes away.

``run(opts)`` does, in order:

1. If ``ROOT/<task>/.finished`` exists (a previous run ended and its cleanup was cut short),
   finish that cleanup: the old snapshots must never resurrect a finished task.
2. If the task has a committed snapshot: rewind the files it had open for writing to their
   sizes at that snapshot (below), restore the latest snapshot (lazily where userfaultfd
   exists) as our child (``--restore-sibling``). Otherwise start COMMAND in its own session
   (``setsid``), stdin ``/dev/null``, stdout and stderr to ``LOGDIR/<task>.stdout`` and
   ``.stderr`` (truncated), LOGDIR defaulting to ``ROOT/.logs``: CRIU cannot dump a task that
   shares our terminal or holds a pipe to us, and the files must be on the mount so that the
   restored task finds them on the next machine. A thread copies what the task appends to them
   to our own stdout and stderr, so a workflow engine still sees the task's output.
3. While the task runs: poll the provider's notice (``snapstore.metadata``) in a thread; treat
   SIGTERM the same way (Kubernetes, AWS Batch, ECS send it). SIGINT and SIGHUP are forwarded
   to the task. With ``checkpoint_interval``, take a ``--leave-running`` snapshot every so many
   seconds and keep the last ``keep`` committed ones.
4. On a notice: checkpoint with ``dump`` (not leave-running) under a deadline of the window
   (AWS 120 s, GCP 30 s, SIGTERM 30 s, or ``window``) minus ``deadline_margin``, counted from
   when the notice was seen (and never past AWS's announced stop time minus the margin). A
   periodic snapshot in progress is abandoned at once (its CRIU killed, the task resumed) so the
   final one gets the whole window. Committed: exit ``EXIT_CHECKPOINTED`` (75). Failed: exit 175
   and leave the task running (the machine is going away anyway; the last periodic snapshot, if
   any, is what the next run resumes). In a Slurm job the job then requeues itself, since
   Slurm requeues a preempted job only if it still runs when its grace time ends
   (``snapstore.slurm``; the hook is ``_settle_slurm``).
5. When the task ends by itself: write ``ROOT/<task>/.finished``, remove the task's snapshots
   (manifests first; the marker goes last), and exit with the task's status (128+N for signal
   N). A later run of the same line starts COMMAND afresh. Except in a Slurm job, for a task
   killed by SIGTERM or SIGKILL while Slurm ends the job: its snapshots stay (exit 175).

Rewinding files: a snapshot older than the task's last state (a periodic one, after a failed
final checkpoint) describes files shorter than they are now. CRIU refuses to restore a file
whose size differs from the recorded one, except files opened write-only with O_APPEND, which it
does not check at all, and the task would then append after output it is about to produce again.
So before a restore every regular file the task had open for writing is truncated back to the
size CRIU recorded (for O_APPEND files: the task's file offset, when it is not 0). That is exact
for files the task only appends to (logs, results written sequentially); bytes rewritten in
place after the snapshot are not undone (CRIU does not snapshot file contents).

Snapshots that do not verify: before its files are rewound, a snapshot gets ``verify``'s
quick check; one that fails it (177) is reported and the previous committed snapshot is tried,
down to the oldest, then 177. A lazily restored task whose daemon meets a bad chunk after the
resume is ended, and the same fallback applies (its files are rewound again, to the older
snapshot). Each snapshot is checked through its own manifests, so one that reuses a bad chunk
of its parent fails too.

PID namespace: unless ``pid_namespace`` is off (``--no-pid-namespace``), COMMAND runs under a
small init as PID 1 of a PID namespace of its own (``snapstore.pidns``): the task keeps its PIDs
on every machine, and a restore never needs any PID of the machine free. Without it, a snapshot
must be restored under the task's original PIDs, which must then be free on the next machine.

Caveats: only one supervisor may run per task id at a time (nothing locks it). A supervisor that
is SIGKILLed leaves the task running without its guard. The task's working directory and every
file it has open must exist on the next machine: keep them on the mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from snapstore import _warm, pidns, slurm
from snapstore.attempts import AttemptLog, summary_line
from snapstore.catalog import Catalog, Manifest, fsync_dir, utc_now, validate_task_id
from snapstore.criu import read_reg_files
from snapstore.defaults import DEFAULT_KEEP, PROVIDERS, SIGTERM_WINDOW_S, default_margin
from snapstore.dump import DumpOptions, dump
from snapstore.errors import (
    EXIT_CHECKPOINTED,
    EXIT_DUMP_FAILED,
    SnapshotCorrupt,
    SnapstoreError,
    UsageError,
    os_error_text,
)
from snapstore.interval import AutoInterval
from snapstore.metadata import (
    AwsSpot,
    AzureScheduledEvents,
    GcpPreemption,
    MetadataError,
    Notice,
    NoticeSource,
    Poller,
    detect,
)
from snapstore.restore import RestoreResult, end_task, lazy_failed, lazy_failure, restore
from snapstore.root import Root, open_root
from snapstore.slurm import SlurmJob
from snapstore.verify import verify_snapshot

__all__ = [
    "DEFAULT_KEEP",
    "PROVIDERS",
    "SIGTERM_WINDOW_S",
    "RunOptions",
    "default_margin",
    "log_paths",
    "rewind_files",
    "run",
]

FINISHED_MARKER = ".finished"
_DEFAULT_POLL_S = {"aws": 5.0, "gcp": 1.0, "azure": 1.0}
_FORWARD_EVERY_S = 0.2
_REAP_WAIT_S = 10.0
_PAGES_WAIT_S = 30.0


class _Preempted(BaseException):
    """Raised in the main thread to abandon a periodic checkpoint when a notice arrives."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    task: str
    command: list[str]
    root: Path | None = None
    provider: str = "auto"
    checkpoint_interval: float | None = None
    auto_interval: bool = False  # --checkpoint-interval auto (snapstore.interval)
    window: float | None = None
    deadline_margin: float | None = None
    keep: int = DEFAULT_KEEP
    poll_interval: float | None = None
    log_dir: Path | None = None
    lazy: bool | None = None
    aws_endpoint: str | None = None
    gcp_host: str | None = None
    azure_endpoint: str | None = None
    pid_namespace: bool = True  # run the task under an init in a PID namespace of its own


def log_paths(log_dir: Path, task: str) -> tuple[Path, Path]:
    return log_dir / f"{task}.stdout", log_dir / f"{task}.stderr"


def rewind_files(images: Path) -> list[tuple[str, int, int]]:
    """Truncate files the snapshot's task had open for writing back to their recorded sizes.

    Returns (path, size before, size after) for each file truncated. Files that are missing,
    not regular, or not longer than recorded are left alone (CRIU reports what it cannot
    restore). See the module docstring for why and the limits.
    """
    try:
        files = read_reg_files(images)
    except ValueError as err:
        raise SnapstoreError(f"cannot read the open files of the snapshot: {err}") from None
    done: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    for f in files:
        if f.flags & os.O_ACCMODE == os.O_RDONLY or f.name in seen:
            continue
        if f.size is not None:
            target = f.size
        elif f.flags & os.O_APPEND and f.pos > 0:
            target = f.pos
        else:
            continue
        try:
            st = os.stat(f.name)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size <= target:
            continue
        seen.add(f.name)
        try:
            os.truncate(f.name, target)
        except OSError as err:
            raise SnapstoreError(
                f"cannot rewind {f.name} to its size at the snapshot ({target} bytes): "
                f"{err.strerror}"
            ) from None
        done.append((f.name, st.st_size, target))
    return done


def _exit_code(status: int) -> int:
    """A returncode / waitstatus_to_exitcode value as a shell reports it (128+N for signal N)."""
    return 128 - status if status < 0 else status


class _Forwarder:
    """Copies what the task appends to its log files to our own stdout and stderr.

    A log file that cannot be read any more (its mount died: ENOTCONN) is dropped quietly:
    the supervisor reports the failure where it matters (the checkpoint), never as a
    traceback from this thread or from ``stop``."""

    def __init__(self, files: list[tuple[Path, int, int]]) -> None:
        """``files``: (log file, our fd to copy it to, offset to start at)."""
        self._files: list[tuple[Any, int]] = []
        for path, fd, offset in files:
            try:
                f = open(path, "rb")  # closed in stop()
            except OSError:
                continue
            f.seek(offset)
            self._files.append((f, fd))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-forwarder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _pump(self) -> None:
        for f, fd in self._files:
            if f.closed:
                continue
            while True:
                try:
                    data = f.read(1 << 20)
                except OSError:  # the log's mount is gone: nothing more to forward from it
                    with contextlib.suppress(OSError):
                        f.close()
                    break
                if not data:
                    break
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError:  # our stdout closed: the log file still has everything
                    break

    def _run(self) -> None:
        while not self._stop.wait(_FORWARD_EVERY_S):
            self._pump()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pump()
        for f, _ in self._files:
            with contextlib.suppress(OSError):
                f.close()


class _Supervisor:
    def __init__(self, opts: RunOptions, note: Callable[[str], None]) -> None:
        self.opts = opts
        self.note = note
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.root: Root | None = None
        self.catalog: Catalog | None = None
        self.source: NoticeSource | None = None
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.restored: RestoreResult | None = None
        self.exited = threading.Event()
        self.status = 0
        self.pages_in = threading.Event()
        self.periodic_on = False
        self.poller: Poller | None = None
        self.forwarder: _Forwarder | None = None
        self.log_offsets: dict[Path, int] = {}
        self.main_ident = threading.get_ident()
        self.attempt: AttemptLog | None = None
        self.early_done = False
        self.child_cpu = 0.0  # the ended task's CPU time (wait4's rusage)
        self.slurm: SlurmJob | None = None
        self.ended = False  # the task ended by itself (``_finished`` ran)
        self.settled = False  # the Slurm job was told to run again (or not): SIGTERM is moot
        self.slurm_window: float | None = None

    # -- notices and signals

    def _on_notice(self, notice: Notice) -> None:  # poller thread
        self.events.put(("notice", notice))
        if self.periodic_on and not notice.early:  # the final checkpoint gets the whole window
            signal.pthread_kill(self.main_ident, signal.SIGUSR2)

    def _on_poll_error(self, message: str | None) -> None:
        assert self.source is not None
        if message is None:
            self.note(f"{self.source.name} metadata answers again")
        else:
            self.note(f"warning: cannot poll {self.source.name} notices ({message}); retrying")

    def _sigterm(self, _signo: int, _frame: FrameType | None) -> None:
        self.events.put(("notice", Notice("SIGTERM", "SIGTERM received", time.monotonic())))
        if self.periodic_on:
            raise _Preempted

    def _sigusr2(self, _signo: int, _frame: FrameType | None) -> None:
        if self.periodic_on:
            raise _Preempted

    def _forward(self, signo: int, _frame: FrameType | None) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signo)
            except ProcessLookupError:
                pass

    # -- setting up

    def _resolve_source(self) -> NoticeSource | None:
        o = self.opts
        if o.provider == "aws":
            return AwsSpot(o.aws_endpoint)
        if o.provider == "gcp":
            return GcpPreemption(o.gcp_host)
        if o.provider == "azure":
            return AzureScheduledEvents(o.azure_endpoint)
        if o.provider == "none":
            return None
        found = detect()
        if found is None:
            self.note("no cloud metadata service answered: only SIGTERM triggers a checkpoint")
        return found

    def _window(self, notice: Notice | None) -> float:
        """The notice's window (None: the window the provider's notice would give)."""
        if self.opts.window is not None:
            return self.opts.window
        if notice is not None and notice.source == "SIGTERM" and self.slurm is not None:
            seconds, why = slurm.window(self.slurm, time.time() - (time.monotonic() - notice.seen))
            self.note(why)
            if seconds is not None:
                self.slurm_window = seconds
                return seconds
        if (notice is not None and notice.source == "SIGTERM") or self.source is None:
            return SIGTERM_WINDOW_S
        return self.source.window

    def _budget(self, window: float) -> float:
        if self.opts.deadline_margin is not None:
            return window - self.opts.deadline_margin
        return window - default_margin(window)

    def _finish_old_run(self) -> None:
        assert self.catalog is not None
        task_dir = self.catalog.task_dir(self.opts.task)
        if (task_dir / FINISHED_MARKER).exists():
            self.note(f"task {self.opts.task!r} finished before; removing its old snapshots")
            self.catalog.remove(self.opts.task, None)

    def _start_command(self, log_dir: Path) -> None:
        out, err = log_paths(log_dir, self.opts.task)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fds: list[int] = []
        try:
            for path in (out, err):
                fds.append(os.open(path, flags, 0o644))
            if self.opts.pid_namespace:
                self.proc, self.pid = pidns.start(self.opts.command, fds[0], fds[1])
            else:
                self.proc = subprocess.Popen(
                    self.opts.command,
                    stdin=subprocess.DEVNULL,
                    stdout=fds[0],
                    stderr=fds[1],
                    start_new_session=True,
                    close_fds=True,
                )
                self.pid = self.proc.pid
        except OSError as exc:
            raise UsageError(
                f"cannot start {self.opts.command[0]!r}: {exc.strerror or exc}"
            ) from None
        finally:
            for fd in fds:
                os.close(fd)
        proc = self.proc

        def wait() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.child_cpu = usage.ru_utime + usage.ru_stime
            self.status = _exit_code(proc.returncode)
            self.exited.set()
            self.events.put(("exit", self.status))

        threading.Thread(target=wait, name="task-waiter", daemon=True).start()
        self.pages_in.set()
        if self.attempt is not None:
            self.attempt.started()
        where = " (init of its own PID namespace)" if self.opts.pid_namespace else ""
        self.note(f"started task {self.opts.task!r}: pid {self.pid}{where}, output in {out}, {err}")

    def _restore(self, n: int, logs: tuple[Path, Path]) -> None:
        assert self.catalog is not None and self.root is not None
        images = self.catalog.images_dir(self.opts.task, n)
        # before files.img is trusted; the command's warm-up (_warm) may have checked ahead
        verify_snapshot(self.root, self.opts.task, n, full=False, ahead=_warm.checked)
        for path, before, after in rewind_files(images):
            self.note(f"rewound {path} from {before} to {after} bytes (its size at snapshot {n})")
        for log in logs:  # forward only what the restored task adds (earlier runs did the rest)
            try:
                self.log_offsets[log] = log.stat().st_size
            except OSError:
                pass
        started = time.monotonic()
        if self.attempt is not None:
            self.attempt.restoring(n)
        result = restore(self.opts.task, self.root, n, self.opts.lazy, verified=True)
        self.restored = result
        self.pid = result.pid
        if self.attempt is not None:
            self.attempt.restored(n, result.resume_s, result.lazy, result.manifest.total_bytes)
        how = "lazily" if result.lazy else "eagerly"
        self.note(
            f"restored snapshot {n} of task {self.opts.task!r} {how}: pid {self.pid} running "
            f"after {result.resume_s:.3f} s"
        )

        def wait() -> None:
            _, status, usage = os.wait4(result.pid, 0)
            self.child_cpu = usage.ru_utime + usage.ru_stime
            self.status = _exit_code(os.waitstatus_to_exitcode(status))
            self.exited.set()
            self.events.put(("exit", self.status))

        threading.Thread(target=wait, name="task-waiter", daemon=True).start()
        if result.lazy_pid is None:
            self.pages_in.set()
            return
        lazy_pid = result.lazy_pid

        def reap() -> None:
            _, status = os.waitpid(lazy_pid, 0)
            result.pages_s = time.monotonic() - started
            result.lazy_status = os.waitstatus_to_exitcode(status)
            if result.lazy_status != 0:
                end_task(result)  # it must not run on with a hole in its memory
                self.note(
                    f"criu lazy-pages exited with status {result.lazy_status} before all pages "
                    f"were in; log: {result.workdir / 'lazy-pages.log'}"
                )
            self.pages_in.set()

        threading.Thread(target=reap, name="lazy-pages-reaper", daemon=True).start()

    # -- checkpoints

    def _prune(self) -> None:
        assert self.catalog is not None
        task = self.opts.task
        committed = self.catalog.committed(task)
        kept = committed[-self.opts.keep :] if self.opts.keep > 0 else []
        removed = False
        for n in committed:
            if n not in kept:
                self.catalog.remove(task, n)
                removed = True
        oldest = kept[0] if kept else 0
        for n in self.catalog.uncommitted(task):
            if n < oldest:
                self.catalog.remove(task, n)
                removed = True
        if removed and self.root is not None:
            summary = self.root.collect_garbage()
            if summary is not None:
                self.note(summary)

    def _record_checkpoint(
        self, kind: str, manifest: Manifest, cpu_s: float, wall_s: float
    ) -> None:
        if self.attempt is None:
            return
        self.attempt.checkpoint(
            kind,
            manifest.snapshot,
            manifest.timings.get("total_s", 0.0),
            manifest.storage.get("logical_bytes", manifest.total_bytes),
            manifest.storage.get("new_stored_bytes", manifest.total_bytes),
            cpu_s,
            wall_s,
        )

    def _totals(self) -> tuple[float, float]:
        if self.attempt is None:
            return 0.0, 0.0
        return self.attempt.task_totals(self.pid)

    def _periodic(self, kind: str = "periodic") -> Manifest | None:
        """A ``--leave-running`` checkpoint; its manifest, or None when none committed."""
        assert self.root is not None
        if not self.pages_in.is_set():
            self.note(f"{kind} checkpoint skipped: the lazy restore is still fetching pages")
            return None
        try:
            self.periodic_on = True
            try:
                cpu_s, wall_s = self._totals()
                result = dump(self.pid, self.opts.task, self.root, DumpOptions(leave_running=True))
            finally:
                self.periodic_on = False
            self._record_checkpoint(kind, result.manifest, cpu_s, wall_s)
            self._prune()
        except _Preempted:
            self.note(f"{kind} checkpoint abandoned for the final one")
            return None
        except (SnapstoreError, OSError) as err:
            if not self.exited.wait(0.2):
                self.note(f"warning: periodic checkpoint failed, task still running: {err}")
            else:
                self.note(f"periodic checkpoint failed as the task ended: {err}")
            if isinstance(err, SnapstoreError):
                for line in err.details:
                    self.note(f"    {line}")
            return None
        t = result.manifest.timings.get("total_s", 0.0)
        self.note(f"{kind} snapshot {result.manifest.snapshot} committed in {t:.2f} s")
        return result.manifest

    def _early(self, notice: Notice) -> None:
        """An early warning (AWS's rebalance recommendation): checkpoint now, keep running."""
        if self.early_done:
            return
        self.early_done = True
        self.note(f"{notice.detail}: checkpointing now, the task keeps running")
        self._periodic("early")

    def _final(self, notice: Notice) -> int:
        assert self.root is not None
        window = self._window(notice)
        margin = (
            self.opts.deadline_margin
            if self.opts.deadline_margin is not None
            else default_margin(window)
        )
        end = notice.seen + window - margin
        if notice.stop_at is not None:
            end = min(end, notice.stop_at - margin)
        self.note(
            f"{notice.detail}: checkpointing task {self.pid} within {end - time.monotonic():.1f} s"
            f" (window {window:g} s, margin {margin:g} s)"
        )
        if not self.pages_in.is_set():  # CRIU must read every page anyway: let them arrive
            self.pages_in.wait(max(0.0, end - time.monotonic()))
        remaining = end - time.monotonic()
        cpu_s, wall_s = self._totals()
        try:
            if remaining <= 0:
                raise SnapstoreError(
                    f"no time left for a checkpoint ({-remaining:.2f} s past the deadline); "
                    "nothing committed"
                )
            result = dump(self.pid, self.opts.task, self.root, DumpOptions(deadline=remaining))
        except (SnapstoreError, OSError) as err:
            text = os_error_text(err) if isinstance(err, OSError) else str(err)
            ended = self.exited.wait(0.5)
            if ended:
                self.note("the task ended during the checkpoint")
                try:
                    return self._finished()
                except OSError as gone:  # the mount died under the checkpoint: one line
                    text = f"{text}; then {os_error_text(gone)}"
            self.note(f"error: checkpoint failed: {text}")
            for line in getattr(err, "details", []):
                self.note(f"    {line}")
            self.note(
                f"task {self.pid} "
                + (
                    f"ended, its end not recorded (exit {EXIT_DUMP_FAILED})"
                    if ended
                    else f"left running (exit {EXIT_DUMP_FAILED})"
                )
                + "; the next run resumes from the latest committed snapshot, if any, else "
                "starts afresh"
            )
            if self.attempt is not None:
                self.attempt.ended(
                    "checkpoint-failed",
                    EXIT_DUMP_FAILED,
                    notice=(notice.source, notice.detail),
                    error=text,
                    task_cpu_s=cpu_s,
                )
            return EXIT_DUMP_FAILED
        self.exited.wait(_REAP_WAIT_S)  # dump killed the task after the commit
        self._drop_workdir()
        m = result.manifest
        self._record_checkpoint("final", m, cpu_s, wall_s)
        if self.attempt is not None:
            self.attempt.ended(
                "checkpointed",
                EXIT_CHECKPOINTED,
                notice=(notice.source, notice.detail),
                task_cpu_s=cpu_s,
            )
        self.note(
            f"snapshot {m.snapshot} of task {m.task!r} committed in "
            f"{m.timings.get('total_s', 0.0):.2f} s ({m.total_bytes / 1e6:.1f} MB); exit "
            f"{EXIT_CHECKPOINTED}: run the same command again to resume"
        )
        try:
            self._prune()
        except (SnapstoreError, OSError) as err:
            self.note(f"warning: could not prune old snapshots: {err}")
        return EXIT_CHECKPOINTED

    def _settle_slurm(self, job: SlurmJob, code: int, notice: Notice | None) -> None:
        """After the final checkpoint in a Slurm job: have the job run again (``snapstore.slurm``).

        If it can be neither requeued nor seen ending, stay alive until Slurm's next SIGTERM
        (its own preemption requeues a job still running when the grace ends), at most the
        window plus ``slurm.STAY_SLACK_S`` from the notice."""
        assert self.catalog is not None
        latest = self.catalog.latest(self.opts.task)
        if code == EXIT_CHECKPOINTED and latest is not None:
            resumes = f"resumes from snapshot {latest}"
        elif latest is not None:
            resumes = f"resumes from snapshot {latest}, the latest committed"
        else:
            resumes = "starts the task afresh (no snapshot)"
        outcome = slurm.settle(job, self.opts.task, resumes, self.note)
        self.settled = True
        if not outcome.stay:
            return
        window = self.opts.window or self.slurm_window or SIGTERM_WINDOW_S
        seen = notice.seen if notice is not None else time.monotonic()
        until = seen + window + slurm.STAY_SLACK_S
        while (left := until - time.monotonic()) > 0:
            try:
                kind, _ = self.events.get(timeout=left)
            except queue.Empty:
                break
            if kind == "notice":
                self.note(f"SIGTERM again: {job} is ending")
                return
        self.note(f"{job} was not ended by Slurm in time; exiting")

    def _drop_workdir(self) -> None:
        """Remove the restore's local work dir once CRIU's lazy-pages daemon is done with it."""
        r = self.restored
        if r is not None and self.pages_in.is_set() and r.lazy_status in (None, 0):
            shutil.rmtree(r.workdir, ignore_errors=True)

    def _killed_with_slurm_job(self) -> bool:
        """Whether the task was killed (SIGTERM, SIGKILL) because Slurm is ending the job: then
        it did not end by itself and its snapshots must stay for the rerun."""
        if self.slurm is None or self.status not in (128 + signal.SIGTERM, 128 + signal.SIGKILL):
            return False
        if not slurm.ending(self.slurm):
            return False
        self.note(
            f"task {self.pid} was killed (status {self.status}) as Slurm ends {self.slurm}: "
            f"its snapshots are kept (exit {EXIT_DUMP_FAILED})"
        )
        return True

    def _finished(self) -> int:
        """The task ended by itself: mark it finished, drop its snapshots, report its status."""
        assert self.catalog is not None
        cpu_s = self.attempt.cpu_base + self.child_cpu if self.attempt is not None else 0.0
        if self._killed_with_slurm_job():
            if self.attempt is not None:
                self.attempt.ended(
                    "killed", EXIT_DUMP_FAILED, task_status=self.status, task_cpu_s=cpu_s
                )
            return EXIT_DUMP_FAILED
        if self.restored is not None and self.restored.lazy_pid is not None:
            self.pages_in.wait(_PAGES_WAIT_S)
        self._drop_workdir()
        task = self.opts.task
        task_dir = self.catalog.task_dir(task)
        if task_dir.is_dir():
            marker = task_dir / FINISHED_MARKER
            marker.write_text(json.dumps({"status": self.status, "finished": utc_now()}))
            fsync_dir(task_dir)
            self.catalog.remove(task, None)
        self.ended = True
        self.note(f"task {self.pid} exited with status {self.status}")
        if self.attempt is not None:
            self.attempt.ended("finished", self.status, task_status=self.status, task_cpu_s=cpu_s)
        return self.status

    # -- the whole run

    def run(self) -> int:
        o = self.opts
        validate_task_id(o.task)
        if not o.command:
            raise UsageError("no command given: snapstore run --task ID ... -- COMMAND [ARGS...]")
        if o.provider not in PROVIDERS:
            raise UsageError(f"unknown provider {o.provider!r}: one of {', '.join(PROVIDERS)}")
        self.root = open_root(o.root, create=True)
        self.catalog = Catalog(self.root.path)
        log_dir = o.log_dir if o.log_dir is not None else self.root.path / ".logs"
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create the log dir {log_dir}: {err.strerror}") from None
        self.slurm = slurm.detect(os.environ)
        self.source = self._resolve_source()
        self.attempt = AttemptLog(
            self.root.path, o.task, self.note, on_fusion=self.root.mountpoint is not None
        )
        handlers: dict[signal.Signals, Any] = {
            signal.SIGTERM: self._sigterm,
            signal.SIGUSR2: self._sigusr2,
            signal.SIGINT: self._forward,
            signal.SIGHUP: self._forward,
        }
        previous = {s: signal.signal(s, h) for s, h in handlers.items()}
        try:
            return self._supervise(log_dir)
        except SnapstoreError as err:
            self.attempt.ended("error", err.exit_code, error=str(err))
            raise
        except OSError as err:  # the mount died under us: the CLI says so in one line
            self.attempt.ended("error", 1, error=os_error_text(err))
            raise
        finally:
            if self.poller is not None:
                self.poller.stop()
            if self.forwarder is not None:
                self.forwarder.stop()
            for s, h in previous.items():
                signal.signal(s, h)
            if self.settled:  # Slurm's SIGTERM to the requeued job must not look like a failure
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.note(summary_line(self.attempt))

    def _resume(self, logs: tuple[Path, Path], below: int | None = None) -> None:
        """Restore the newest committed snapshot (below ``below``) that verifies; each one that
        does not is reported and the previous one tried (its files rewound to their sizes at
        that snapshot); ``SnapshotCorrupt`` (177) when none is left."""
        assert self.catalog is not None
        candidates = [
            n for n in self.catalog.committed(self.opts.task) if below is None or n < below
        ]
        for i, n in enumerate(reversed(candidates)):
            try:
                self._restore(n, logs)
                return
            except SnapshotCorrupt as err:
                older = candidates[-i - 2] if i + 1 < len(candidates) else None
                if older is None:
                    raise
                self.note(f"{err}: falling back to snapshot {older}")

    def _lazy_failure(self, logs: tuple[Path, Path]) -> int | None:
        """The restored task ended because its lazy-pages daemon failed (and ended it): fall
        back to an older snapshot if the failure was a bad chunk (None: a task runs again),
        else the exit code (the snapshots are kept: the task did not finish)."""
        r = self.restored
        if r is None or r.lazy_pid is None:
            return 0
        self.pages_in.wait(_PAGES_WAIT_S)
        if not lazy_failed(r, -1 if self.status >= 128 else self.status):
            return 0
        err = lazy_failure(r)
        if isinstance(err, SnapshotCorrupt):
            older = (
                [n for n in self.catalog.committed(self.opts.task) if n < r.snapshot]
                if self.catalog is not None
                else []
            )
            if older:
                self.note(f"{err}: falling back to snapshot {older[-1]}")
                self.exited.clear()
                self.pages_in.clear()
                self.restored = None
                self._resume(logs, below=r.snapshot)
                return None
        raise err

    def _supervise(self, log_dir: Path) -> int:
        assert self.catalog is not None
        o = self.opts
        self._finish_old_run()
        latest = self.catalog.latest(o.task)
        if self.slurm is not None:
            self.note(
                f"in {self.slurm}"
                + (f", restart {self.slurm.restarts}" if self.slurm.restarts else "")
                + ": after a final checkpoint the job requeues itself"
            )
            if self.slurm.restarts and latest is None:
                self.note(f"warning: task {o.task!r} has no snapshot to resume: starting it afresh")
        if latest is not None:
            self._resume(log_paths(log_dir, o.task))
        else:
            self._start_command(log_dir)
        out, err = log_paths(log_dir, o.task)
        self.forwarder = _Forwarder(
            [(out, 1, self.log_offsets.get(out, 0)), (err, 2, self.log_offsets.get(err, 0))]
        )
        self.forwarder.start()
        if self.source is not None:
            interval = o.poll_interval or _DEFAULT_POLL_S.get(self.source.name, 5.0)
            self.poller = Poller(self.source, interval, self._on_notice, self._on_poll_error)
            self.poller.start()
        planner: AutoInterval | None = None
        next_periodic = time.monotonic() + o.checkpoint_interval if o.checkpoint_interval else None
        if o.auto_interval:
            planner = AutoInterval(self._budget(self._window(None)))
            plan = planner.first()
            next_periodic = time.monotonic() + plan.interval
            self.note(f"auto checkpoint interval: {plan.reason}")
        while True:
            timeout = None if next_periodic is None else max(0.0, next_periodic - time.monotonic())
            try:
                kind, value = self.events.get(timeout=timeout)
            except queue.Empty:
                began = time.monotonic()
                manifest = self._periodic()
                if planner is None:
                    assert o.checkpoint_interval is not None
                    next_periodic = time.monotonic() + o.checkpoint_interval
                    continue
                if manifest is None:
                    plan = planner.first()
                else:
                    st = manifest.storage
                    plan = planner.after(
                        began,
                        st.get("new_stored_bytes", manifest.total_bytes),
                        st.get("stored_bytes", manifest.total_bytes),
                        manifest.timings.get("total_s", time.monotonic() - began),
                    )
                next_periodic = time.monotonic() + plan.interval
                self.note(f"auto checkpoint interval: {plan.reason}")
                continue
            if kind == "exit":
                if self._lazy_failure(log_paths(log_dir, o.task)) is None:
                    continue  # fell back to an older snapshot: its task runs now
                code = self._finished()
                if self.slurm is not None and not self.ended:
                    self._settle_slurm(self.slurm, code, None)
                return code
            if kind == "notice" and value.early:
                self._early(value)
                continue
            if kind == "notice":
                if self.poller is not None:
                    self.poller.stop()
                try:
                    code = self._final(value)
                finally:
                    self._acknowledge(value)
                if self.slurm is not None and not self.ended:
                    self._settle_slurm(self.slurm, code, value)
                return code

    def _acknowledge(self, notice: Notice) -> None:
        """Let the provider proceed (Azure), now that the checkpoint committed or failed."""
        if self.source is None or notice.source != self.source.name:
            return
        try:
            self.source.acknowledge(notice)
        except MetadataError as err:
            self.note(f"warning: could not acknowledge the {notice.source} event: {err}")


def run(opts: RunOptions, note: Callable[[str], None]) -> int:
    """Supervise ``opts.command`` as task ``opts.task``; return the exit code for the CLI.

    ``note`` gets snapstore's own one-line messages (the CLI prints them on stderr).
    """
    return _Supervisor(opts, note).run()
