"""What ``snapstore run`` did, attempt by attempt: the record behind ``show`` and ``report``.

Every run of ``snapstore run --task ID`` is one *attempt*, recorded as
``ROOT/.attempts/ID/NNNNNN.json`` (numbered from 1, claimed with ``O_EXCL``). The record is
written when the attempt starts and rewritten (to a temporary name, fsync'd, renamed over) after
each step that changes it: the restore, every committed checkpoint, the end. It lives beside the
task's snapshots, not among them, so it outlives the task: a finished task's snapshots are
removed, its history is not.

A record holds the host, start and end times (UTC), how the attempt began (``started`` afresh
or ``restored`` from snapshot N, with the restore's duration and bytes), every checkpoint it
committed (kind ``periodic``, ``early`` or ``final``; duration, logical bytes, bytes uploaded,
and the task's CPU and run time up to it), and how it ended (``outcome``):

- ``finished``: the task ended by itself (``task_status``);
- ``checkpointed``: a notice came (``notice``), the final checkpoint committed, exit 75;
- ``checkpoint-failed``: the final checkpoint did not commit (exit 175);
- ``killed``: Slurm killed the task with its job before a final checkpoint (exit 175, the
  snapshots kept for the rerun); counted with the failed checkpoints;
- ``error``: the attempt failed before or during the restore or start (exit code and message);
- ``running``: nothing recorded the end: the attempt still runs, or its machine went away
  without a word (SIGKILL, power loss). ``report`` counts these as lost.

CPU time: a restored process starts with zero CPU time in the kernel's accounting (CRIU cannot
set it), so each checkpoint records the task's total CPU time so far: what was carried into the
attempt by its restore plus what the process tree (``psutil``: user + system of every process,
plus what reaped children used) has used since. The CPU time carried into a restore is the
compute a restart from zero would have done again: ``report`` sums it as *compute saved*.

Writing a record never fails the run: the task matters more than its accounting. A failed write
is one warning line, and the next write tries again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fusionfs import client as fusion_client
from snapstore.catalog import fsync_dir, utc_now

__all__ = [
    "ATTEMPTS_DIR",
    "AttemptLog",
    "TaskSummary",
    "load_attempts",
    "recorded_tasks",
    "summarize",
    "summary_line",
    "task_cpu_seconds",
]

ATTEMPTS_DIR = ".attempts"
RECORD_FORMAT = 1
_CLAIM_TRIES = 1000


def task_cpu_seconds(pid: int) -> float:
    """CPU seconds used by the process tree under ``pid`` (0.0 if it is gone).

    User plus system time of every live process in the tree, plus the time of the children
    each of them has reaped (``children_user``/``children_system``), so nothing is counted twice.
    """
    import psutil  # only the supervisor needs it (not a restore's start-up)

    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _records_dir(root: Path, task: str) -> Path:
    return root / ATTEMPTS_DIR / task


def load_attempts(root: Path, task: str) -> list[dict[str, Any]]:
    """The task's attempt records, oldest first (unreadable ones are skipped)."""
    found: list[dict[str, Any]] = []
    try:
        entries = sorted(_records_dir(root, task).glob("[0-9]*.json"))
    except OSError:
        return []
    for path in entries:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == RECORD_FORMAT:
            found.append(data)
    found.sort(key=lambda r: int(r.get("attempt", 0)))
    return found


def recorded_tasks(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in (root / ATTEMPTS_DIR).iterdir() if p.is_dir())
    except OSError:
        return []


def _checkpoint_of(records: Iterable[dict[str, Any]], snapshot: int) -> dict[str, Any] | None:
    """The newest checkpoint entry that committed ``snapshot`` (numbers are never reused while
    the task lives, but a finished task's numbers start again: the newest wins)."""
    hit: dict[str, Any] | None = None
    for rec in records:
        for cp in rec.get("checkpoints", []):
            if cp.get("snapshot") == snapshot:
                hit = cp
    return hit


class AttemptLog:
    """The record of the current attempt; every method persists it (best effort)."""

    def __init__(
        self, root: Path, task: str, warn: Callable[[str], None], on_fusion: bool = False
    ) -> None:
        self.root = root
        self._on_fusion = on_fusion
        self.task = task
        self._warn = warn
        self._dir = _records_dir(root, task)
        self._path: Path | None = None
        self._cpu_base = 0.0  # CPU carried into this attempt by its restore
        self._wall_base = 0.0
        self._began = time.monotonic()
        self.previous = load_attempts(root, task)
        self.data: dict[str, Any] = {
            "format": RECORD_FORMAT,
            "task": task,
            "attempt": 0,
            "host": socket.gethostname(),
            "started": utc_now(),
            "ended": None,
            "how": None,
            "restoring": None,
            "restored_from": None,
            "restore": None,
            "cpu_carried_s": 0.0,
            "wall_carried_s": 0.0,
            "checkpoints": [],
            "outcome": "running",
            "exit_code": None,
            "task_status": None,
            "notice": None,
            "error": None,
            "task_cpu_s": None,
        }
        self._claim()

    # -- persistence

    def _claim(self) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            if self._on_fusion:  # small JSON rewritten in place: plain objects, not packs
                for d in (self._dir.parent, self._dir):
                    with contextlib.suppress(OSError):
                        fusion_client.set_layout(d, "plain")
            n = max((int(r.get("attempt", 0)) for r in self.previous), default=0) + 1
            for _ in range(_CLAIM_TRIES):
                path = self._dir / f"{n:06d}.json"
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except FileExistsError:
                    n += 1
                    continue
                os.close(fd)
                self._path = path
                self.data["attempt"] = n
                break
        except OSError as err:
            self._warn(f"warning: cannot record this attempt in {self._dir}: {err.strerror}")
            return
        self._save()

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_name(f".{self._path.name}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
            fsync_dir(self._dir)
        except OSError as err:
            self._warn(f"warning: cannot update the attempt record {self._path}: {err.strerror}")

    # -- what happened

    @property
    def number(self) -> int:
        return int(self.data["attempt"])

    @property
    def cpu_base(self) -> float:
        return self._cpu_base

    def started(self) -> None:
        self.data["how"] = "started"
        self._began = time.monotonic()
        self._save()

    def restoring(self, snapshot: int) -> None:
        """A restore of ``snapshot`` begins (an attempt that ends here failed to restore)."""
        self.data["restoring"] = snapshot

    def restored(self, snapshot: int, seconds: float, lazy: bool, nbytes: int) -> None:
        """The task came back from ``snapshot``: carry its CPU and run time forward."""
        cp = _checkpoint_of(self.previous, snapshot)
        self._cpu_base = float(cp.get("cpu_s", 0.0)) if cp else 0.0
        self._wall_base = float(cp.get("wall_s", 0.0)) if cp else 0.0
        self._began = time.monotonic()
        self.data.update(
            how="restored",
            restored_from=snapshot,
            restore={"seconds": round(seconds, 3), "lazy": lazy, "bytes": nbytes},
            cpu_carried_s=round(self._cpu_base, 3),
            wall_carried_s=round(self._wall_base, 3),
        )
        if cp is None:
            self.data["restore"]["unrecorded"] = True  # its checkpoint's record is gone
        self._save()

    def task_totals(self, pid: int) -> tuple[float, float]:
        """The task's CPU and run time so far, across every restore."""
        return (
            self._cpu_base + task_cpu_seconds(pid),
            self._wall_base + (time.monotonic() - self._began),
        )

    def checkpoint(
        self,
        kind: str,
        snapshot: int,
        seconds: float,
        nbytes: int,
        uploaded: int,
        cpu_s: float,
        wall_s: float,
    ) -> None:
        self.data["checkpoints"].append(
            {
                "kind": kind,
                "snapshot": snapshot,
                "at": utc_now(),
                "seconds": round(seconds, 3),
                "bytes": nbytes,
                "uploaded": uploaded,
                "cpu_s": round(cpu_s, 3),
                "wall_s": round(wall_s, 3),
            }
        )
        self._save()

    def ended(
        self,
        outcome: str,
        exit_code: int,
        *,
        task_status: int | None = None,
        notice: tuple[str, str] | None = None,
        error: str | None = None,
        task_cpu_s: float | None = None,
    ) -> None:
        self.data.update(
            ended=utc_now(),
            outcome=outcome,
            exit_code=exit_code,
            task_status=task_status,
            notice={"source": notice[0], "detail": notice[1]} if notice else None,
            error=error,
            task_cpu_s=None if task_cpu_s is None else round(task_cpu_s, 3),
        )
        self._save()


# -- summing up


@dataclasses.dataclass
class TaskSummary:
    task: str
    attempts: int = 0
    finished: bool = False
    task_status: int | None = None
    reclaims: int = 0  # attempts that ended checkpointed
    restores: int = 0  # attempts that resumed from a snapshot
    lost: int = 0  # attempts with no recorded end that are not the newest
    failed_checkpoints: int = 0
    failed_restores: int = 0
    cpu_saved_s: float = 0.0
    checkpoints: int = 0
    checkpoint_s: float = 0.0
    restore_s: float = 0.0
    bytes_uploaded: int = 0
    bytes_stored: int = 0
    last_outcome: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(task: str, records: list[dict[str, Any]], stored: int = 0) -> TaskSummary:
    s = TaskSummary(task=task, attempts=len(records), bytes_stored=stored)
    for i, rec in enumerate(records):
        outcome = str(rec.get("outcome", "running"))
        if rec.get("how") == "restored":
            s.restores += 1
            s.cpu_saved_s += float(rec.get("cpu_carried_s") or 0.0)
            s.restore_s += float((rec.get("restore") or {}).get("seconds", 0.0))
        for cp in rec.get("checkpoints", []):
            s.checkpoints += 1
            s.checkpoint_s += float(cp.get("seconds", 0.0))
            s.bytes_uploaded += int(cp.get("uploaded", 0))
        if outcome == "checkpointed":
            s.reclaims += 1
        elif outcome in ("checkpoint-failed", "killed"):
            s.failed_checkpoints += 1
        elif outcome == "error" and rec.get("restoring") is not None and rec.get("how") is None:
            s.failed_restores += 1
        elif outcome == "running" and i < len(records) - 1:
            s.lost += 1
        if outcome == "finished":
            s.finished = True
            s.task_status = rec.get("task_status")
        s.last_outcome = outcome
    return s


def duration(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``6.7s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    h, rest = divmod(whole, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def age(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        when = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return when.strftime("%Y-%m-%d %H:%M:%S")


def summary_line(log: AttemptLog) -> str:
    """One line for the end of ``snapstore run`` (a workflow engine keeps it in the task log)."""
    d = log.data
    current = dict(d)
    s = summarize(log.task, [*log.previous, current])
    outcome = str(d.get("outcome"))
    what = {
        "finished": f"finished with status {d.get('task_status')}",
        "checkpointed": "checkpointed",
        "checkpoint-failed": "checkpoint failed",
        "error": f"failed (exit {d.get('exit_code')})",
        "killed": f"killed with its Slurm job (status {d.get('task_status')}; snapshots kept)",
    }.get(outcome, outcome)
    cps = [cp for cp in d.get("checkpoints", []) if cp.get("kind") == "final"]
    if cps:
        cp = cps[-1]
        what += (
            f" as snapshot {cp['snapshot']} ({cp['bytes'] / 1e6:.1f} MB, "
            f"{cp['uploaded'] / 1e6:.1f} MB uploaded, in {cp['seconds']:.1f} s)"
        )
    if d.get("how") == "restored":
        begun = f"resumed from snapshot {d.get('restored_from')}"
    elif d.get("how") == "started":
        begun = "started afresh"
    else:
        begun = "did not start"
    return (
        f"summary: task {log.task!r} attempt {log.number} on {d.get('host')}: {begun}, {what}; "
        f"over {s.attempts} attempt(s): {s.reclaims} reclaim(s) survived, "
        f"{duration(s.cpu_saved_s)} of CPU time carried across {s.restores} restore(s), "
        f"{s.bytes_uploaded / 1e6:.1f} MB uploaded by {s.checkpoints} checkpoint(s)"
    )
