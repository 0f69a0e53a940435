"""Slurm: what ``snapstore run`` does differently inside a Slurm job.

Slurm requeues a preempted job (``PreemptMode=REQUEUE``) only if it is still running when its
``GraceTime`` ends; a job that exits before, as ``snapstore run`` does once its checkpoint is
committed, ends FAILED and never comes back. So after a final checkpoint (committed or not)
inside a Slurm job, ``snapstore run`` requeues the job itself with ``scontrol requeue Incomplete
$SLURM_JOB_ID``; the batch script then runs again from the top and the same ``snapstore run
--task ID`` line resumes the task. Facts this relies on (Slurm 22.05, measured with
``tests/slurm.py``; see also ``../shared/DESIGN.md``):

- ``scontrol requeue`` of the job's own running batch job is allowed to its owner; Slurm marks
  it pending at once, sends SIGTERM to all the job's processes (SIGKILL after ``KillWait``),
  and starts the script again after ``AuthInfo=cred_expire`` (120 s by default) with
  ``SLURM_RESTART_COUNT`` and the job's ``Restarts`` one higher. A job submitted with
  ``--no-requeue`` (or under ``JobRequeue=0`` without ``--requeue``) is refused ("Requested
  operation is presently disabled").
- With ``Incomplete`` a job that is already ending (cancelled, timed out, or being requeued by
  Slurm itself at the end of its grace time) is left alone, and scontrol still answers 0. So
  whether the job will run again is read from its ``Restarts`` afterwards, never from the answer.
- The batch script hears SIGTERM when the grace period starts only if the job was submitted with
  ``--signal=B:TERM@N`` and the site sets ``SlurmctldParameters=preempt_send_user_signal``;
  otherwise only job steps (``srun``) hear it then, and the batch script hears SIGTERM when the
  job is killed (grace over: Slurm has already requeued it; ``scancel``; time limit), with
  ``KillWait`` seconds until SIGKILL.

Hence the window (when ``--window`` is not given): while the job still runs, until its
``EndTime`` (which Slurm sets to the preemption time plus ``GraceTime``, or the time limit) or
the end of its partition's ``GraceTime``, whichever comes first (``EndTime`` may not show the
preemption yet when the signal arrives: measured); when it is already being killed,
``KillWait``. When the job cannot be requeued (no scontrol,
controller unreachable, ``--no-requeue``) and is still running, ``snapstore run`` stays alive
until Slurm ends the job (the next SIGTERM), so that Slurm's own preemption requeues it, for at
most the window plus ``STAY_SLACK_S``. A task killed by SIGTERM or SIGKILL while Slurm ends the
job (a preemption's grace over without a signal to the batch script alone, ``scancel``, the time
limit: Slurm signals every process of the job) did not end by itself: its snapshots are kept
(exit 175), so the rerun resumes from the latest periodic one.

Every scontrol call ignores SIGTERM (Slurm sends it to every process of the job when it is
requeued) and has a timeout; a failure is one line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping

__all__ = [
    "STAY_SLACK_S",
    "Outcome",
    "SlurmJob",
    "detect",
    "ending",
    "settle",
    "window",
]

STAY_SLACK_S = 60.0  # slurmctld checks grace periods about every 30 s, then KillWait
_SCONTROL_TIMEOUT_S = 15.0
_LOOKUP_TIMEOUT_S = 3.0  # the window's look-ups: they run inside the window
_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """The Slurm job ``snapstore run`` runs in, from its environment."""

    job_id: str  # SLURM_JOB_ID: for an array task its own id, which requeue takes
    restarts: int  # SLURM_RESTART_COUNT: how often the job was requeued before this run
    array_task: str | None  # "ARRAYJOB_TASK" for an array task

    def __str__(self) -> str:
        name = f"Slurm job {self.job_id}"
        if self.array_task is not None:
            name += f" (array task {self.array_task})"
        return name


def detect(environ: Mapping[str, str]) -> SlurmJob | None:
    """The Slurm job we run in, or None outside Slurm (no numeric ``SLURM_JOB_ID``)."""
    job_id = environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        return None
    restarts_text = environ.get("SLURM_RESTART_COUNT", "0")
    restarts = int(restarts_text) if restarts_text.isdigit() else 0
    array_job, array_index = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    array_task = f"{array_job}_{array_index}" if array_job and array_index else None
    return SlurmJob(job_id, restarts, array_task)


def _ignore_sigterm() -> None:  # in the child, before exec: SIG_IGN survives exec
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _scontrol(*args: str, timeout: float = _SCONTROL_TIMEOUT_S) -> tuple[str | None, str]:
    """Run scontrol; return (stdout, "") or (None, one line saying why it failed)."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None, "scontrol is not on PATH"
    try:
        result = subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            preexec_fn=_ignore_sigterm,  # a thread-safe call: signal() only
        )
    except subprocess.TimeoutExpired:
        return None, f"scontrol {' '.join(args)} did not answer in {timeout:g} s"
    except OSError as err:
        return None, f"cannot run scontrol: {err.strerror or err}"
    if result.returncode != 0:
        why = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        return None, f"scontrol {' '.join(args)}: {why}"
    return result.stdout, ""


def _show(*what: str, timeout: float = _SCONTROL_TIMEOUT_S) -> tuple[dict[str, str] | None, str]:
    out, why = _scontrol("-o", "show", *what, timeout=timeout)
    if out is None:
        return None, why
    return dict(_FIELD.findall(out)), ""


def _job(job: SlurmJob, timeout: float = _SCONTROL_TIMEOUT_S) -> tuple[dict[str, str] | None, str]:
    return _show("job", job.job_id, timeout=timeout)


def _seconds_until(stamp: str, now: float) -> float | None:
    try:
        when = datetime.datetime.fromisoformat(stamp)  # Slurm prints local time
    except ValueError:  # "Unknown", "None"
        return None
    return when.timestamp() - now


def _grace_time(partition: str) -> float | None:
    """The partition's preemption GraceTime (0 when none), None if unknown."""
    if not partition or "," in partition:
        return None
    info, _ = _show("partition", partition, timeout=_LOOKUP_TIMEOUT_S)
    text = info.get("GraceTime", "") if info is not None else ""
    return float(text) if text.isdigit() else None


def _kill_wait() -> float | None:
    out, _ = _scontrol("show", "config", timeout=_LOOKUP_TIMEOUT_S)
    if out is None:
        return None
    found = re.search(r"^KillWait\s*=\s*(\d+)", out, re.MULTILINE)
    return float(found.group(1)) if found else None


def window(job: SlurmJob, now: float) -> tuple[float | None, str]:
    """The seconds left at a SIGTERM (``now``: ``time.time()``) and a line saying why; the
    seconds are None when unknown (the line then says why).

    A job still running may run until its ``EndTime`` (the preemption time plus GraceTime, or
    the time limit); a job already ending has ``KillWait`` before SIGKILL."""
    info, why = _job(job, _LOOKUP_TIMEOUT_S)
    if info is None:
        return None, f"cannot tell how long {job} may run ({why})"
    state = info.get("JobState", "")
    if state == "RUNNING":
        bounds: list[tuple[float, str]] = []
        left = _seconds_until(info.get("EndTime", ""), now)
        if left is not None and left < 365 * 86400:
            bounds.append((left, "its EndTime"))
        grace = _grace_time(info.get("Partition", ""))
        if grace:  # EndTime may not show the preemption yet when the signal arrives
            since = _seconds_until(info.get("PreemptTime", ""), now)
            bounds.append((grace + min(0.0, since or 0.0), f"GraceTime {grace:g} s"))
        if not bounds:
            return None, f"{job} has no end in sight (EndTime={info.get('EndTime')})"
        left, cause = min(bounds)
        left = max(1.0, float(math.floor(left)))  # Slurm's times have whole seconds
        return left, f"{job} may run {left:g} s more ({cause})"
    kill_wait = _kill_wait()
    if kill_wait is None:
        return None, f"{job} is {state.lower() or 'ending'}; its KillWait is unknown"
    return kill_wait, f"{job} is {state.lower() or 'ending'}: KillWait {kill_wait:g} s to SIGKILL"


def ending(job: SlurmJob) -> bool:
    """Whether Slurm is ending the job (no longer RUNNING), or its state cannot be read."""
    info, _ = _job(job)
    return info is None or info.get("JobState") != "RUNNING"


@dataclasses.dataclass(frozen=True)
class Outcome:
    requeued: bool  # Slurm will run the job's script again
    stay: bool  # the job still runs and could not be requeued: wait for Slurm to end it


def _restarts(info: dict[str, str] | None) -> int | None:
    if info is None or not info.get("Restarts", "").isdigit():
        return None
    return int(info["Restarts"])


def settle(job: SlurmJob, task: str, resumes_from: str, note: Callable[[str], None]) -> Outcome:
    """After the final checkpoint: make sure the job runs again, and tell the user what happened.

    ``resumes_from`` says what the next run resumes from (for the one line). Requeues the job
    unless it is already ending; reports in one line whether it will run again and what to do.
    """
    _, requeue_error = _scontrol("requeue", "Incomplete", job.job_id)
    info, show_error = _job(job)
    restarts = _restarts(info)
    again = f"its script runs again and `snapstore run --task {task}` {resumes_from}"
    if restarts is not None and restarts > job.restarts:
        note(f"{job} requeued (restart {restarts}): {again}")
        return Outcome(requeued=True, stay=False)
    state = info.get("JobState", "") if info is not None else ""
    if state == "RUNNING" or info is None:
        why = requeue_error or show_error or "scontrol requeue did not requeue it"
        note(
            f"cannot requeue {job} ({why}); staying alive until Slurm ends the job (a preempted "
            "job still running when its GraceTime ends is requeued); if it does not come back "
            f"(--no-requeue, PreemptMode=CANCEL), submit the script again: `snapstore run --task "
            f"{task}` {resumes_from}"
        )
        return Outcome(requeued=False, stay=True)
    note(
        f"{job} is ending ({state}) without being requeued: submit the same script again, "
        f"`snapstore run --task {task}` {resumes_from}"
    )
    return Outcome(requeued=False, stay=False)
