"""``snapstore run`` under Slurm preemption: a real single-node Slurm (``tests/slurmcluster.py``).

A batch job in the preemptible partition ``low`` runs ``snapstore run --task job -- sh -c 'echo
...; exec memtask.py ...'`` (the counter task of ``test_run.py``) with its files on a fusionfs
mount of a moto bucket; a job in ``high`` needing the node preempts it. The ``low`` job was
submitted as docs/spot.md says (``--requeue --signal=B:TERM@60 --open-mode=append``), so the
batch script hears SIGTERM when the grace period (``GraceTime=10``) starts: ``snapstore run``
checkpoints, requeues the job, Slurm runs the script again (after ``cred_expire=10`` s) and the
same line resumes the task from its snapshot; the task's output file must read 1..N as after an
uninterrupted run, and the job's own output must carry the task's stdout once.

Slurm is started once per session (about a second) by the ``slurm`` fixture and stopped at its
end; each test has a timeout and waits on deadlines.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import MEMTASK, SnapEnv, Tasks, read_counts
from helpers import missing, wait_for
from slurmcluster import SlurmCluster, SlurmError, missing_programs

pytestmark = [pytest.mark.criu, pytest.mark.mount, pytest.mark.s3]

_T = TypeVar("_T")
_GREETING = "memtask-starting"
_GRACE_S = 10


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node Slurm (munged, slurmctld, slurmd) on loopback, started once."""
    if os.geteuid() != 0:
        missing("Slurm", "the test cluster runs its daemons as root")
    absent = missing_programs()
    if absent:
        missing(
            "Slurm", f"{', '.join(absent)} not on PATH (scripts/setup.sh installs slurm-wlm munge)"
        )
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), grace_s=_GRACE_S)
    try:
        started = time.monotonic()
        try:
            cluster.start()
        except SlurmError as err:
            pytest.fail(f"Slurm did not start: {err}", pytrace=False)
        print(f"Slurm up in {time.monotonic() - started:.2f} s")
        yield cluster
    finally:
        problems = cluster.stop()
    if problems:
        pytest.fail("stopping Slurm needed force: " + "; ".join(problems), pytrace=False)


def _job_script(
    env: SnapEnv, tmp_path: Path, exit_at: int, sbatch: list[str], options: list[str]
) -> Path:
    """The batch script of docs/spot.md: ``exec snapstore run --task job -- TASK``."""
    state = tmp_path / "state"  # local: ready, verify.json (the task never keeps them open)
    state.mkdir()
    task = [sys.executable, str(MEMTASK), "--state", str(state), "--mib", "32",
            "--out", str(env.work / "out.txt"), "--interval", "0.02",
            "--exit-at", str(exit_at), "--exit-code", "0"]  # fmt: skip
    shell = f"echo {_GREETING}; exec {shlex.join(task)}"
    line = [sys.executable, "-m", "snapstore", "run", "--task", "job", "--root", str(env.root),
            "--provider", "none", *options, "--", "sh", "-c", shell]  # fmt: skip
    directives = "".join(f"#SBATCH {option}\n" for option in sbatch)
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"{directives}"
        'echo "script starts: restart ${SLURM_RESTART_COUNT:-0}"\n'
        f"exec {shlex.join(line)}\n"
    )
    return script


@dataclasses.dataclass
class _Run:
    job: int
    fields: dict[str, str]  # the job's at its end
    text: str  # the job's output (both runs: --open-mode=append)
    timings: str


def _preempt_and_resume(
    slurm: SlurmCluster, snap: SnapEnv, tasks: Tasks, tmp_path: Path, exit_at: int,
    job_env: dict[str, str] | None = None, *, signal: bool = True, options: list[str] | None = None,
) -> _Run:  # fmt: skip
    """Submit the docs/spot.md job to ``low``, preempt it from ``high``, wait until it ends."""
    output = tmp_path / "job.out"
    sbatch = ["--partition=low", "--requeue", "--open-mode=append", f"--output={output}"]
    if signal:
        sbatch.append("--signal=B:TERM@60")
    script = _job_script(snap, tmp_path, exit_at, sbatch, options or [])
    env = dict(snap.env)
    env.update(job_env or {})
    submitted = time.monotonic()
    job = slurm.sbatch(str(script), env=env, cwd=tmp_path)
    try:
        pid = int(wait_for(lambda: _ready(tmp_path), 90, "the task to fill its memory"))
        tasks.adopt(pid)
        started = time.monotonic()
        wait_for(lambda: len(read_counts(snap.work / "out.txt")) >= 20, 60, "20 lines")

        preempted = time.monotonic()
        high = slurm.sbatch("--partition=high", f"--output={tmp_path / 'high.out'}",
                            "--wrap", "sleep 1", cwd=tmp_path)  # fmt: skip
        wait_for(lambda: _requeued(slurm, job, output), 120, f"job {job} to be requeued")
        requeued = time.monotonic()
        _wait(lambda: "restored snapshot" in _tail(output), 120, f"job {job} to resume", output)
        resumed = time.monotonic()
        assert slurm.job(high).get("JobState") == "COMPLETED"
        fields = _wait(
            lambda: f if (f := slurm.job(job)).get("JobState") in _DONE else None,
            120, f"job {job} to end", output,
        )  # fmt: skip
        ended = time.monotonic()
    finally:
        slurm.run("scancel", str(job), check=False)
    timings = (
        f"submit to task running {started - submitted:.1f} s; preempt to requeued "
        f"{requeued - preempted:.1f} s; requeued to resumed {resumed - requeued:.1f} s; "
        f"resumed to done {ended - resumed:.1f} s"
    )
    print(timings)
    return _Run(job, fields, output.read_text(errors="replace"), timings)


def _resumed_intact(run: _Run, snap: SnapEnv, exit_at: int) -> None:
    """The job ran twice and the task's output is that of an uninterrupted run."""
    assert run.fields["JobState"] == "COMPLETED" and run.fields["Restarts"] == "1", run
    assert read_counts(snap.work / "out.txt") == list(range(1, exit_at + 1)), run.text
    assert re.search(r"restored snapshot \d+ of task 'job'", run.text), run.text
    assert run.text.count(_GREETING) == 1, "the task's stdout is forwarded once over both runs"
    assert run.text.count("script starts") == 2, run.text
    assert not (snap.root / "job").exists(), "a finished task's snapshots must go"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("snap_env", ["fusion-s3"], indirect=True)
def test_preempted_job_requeues_itself_and_resumes(
    slurm: SlurmCluster, snap_env: SnapEnv, tasks: Tasks, tmp_path: Path
) -> None:
    """SIGTERM at the start of the grace period: checkpoint, ``scontrol requeue``, resume.

    Before: ``snapstore run`` exited 75 and Slurm marked the job FAILED, never to run again."""
    run = _preempt_and_resume(slurm, snap_env, tasks, tmp_path, exit_at=600)
    window = re.search(
        rf"Slurm job {run.job} may run (\d+) s more \(GraceTime {_GRACE_S} s\)", run.text
    )
    assert window is not None and _GRACE_S - 5 <= int(window.group(1)) <= _GRACE_S, run.text
    assert f"Slurm job {run.job} requeued (restart 1)" in run.text, run.text
    _resumed_intact(run, snap_env, 600)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("snap_env", ["fusion-s3"], indirect=True)
def test_job_that_cannot_requeue_itself_stays_until_slurm_requeues_it(
    slurm: SlurmCluster, snap_env: SnapEnv, tasks: Tasks, tmp_path: Path
) -> None:
    """scontrol fails (here: one that cannot reach the controller comes first on PATH):
    ``snapstore run`` stays alive after its checkpoint until Slurm ends the job when the grace
    time is over, so Slurm's own preemption requeues it; the rerun resumes."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    (fake / "scontrol").chmod(0o755)
    path = f"{fake}{os.pathsep}{snap_env.env['PATH']}"
    run = _preempt_and_resume(slurm, snap_env, tasks, tmp_path, 600, {"PATH": path})
    assert f"cannot requeue Slurm job {run.job} (scontrol requeue Incomplete" in run.text
    assert "Unable to contact slurm controller" in run.text and "staying alive" in run.text
    assert f"SIGTERM again: Slurm job {run.job} is ending" in run.text, run.text
    _resumed_intact(run, snap_env, 600)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("snap_env", ["fusion-s3"], indirect=True)
def test_job_killed_with_its_task_resumes_from_a_periodic_snapshot(
    slurm: SlurmCluster, snap_env: SnapEnv, tasks: Tasks, tmp_path: Path
) -> None:
    """Without ``--signal=B:TERM``, the batch script hears nothing until the grace ends; then
    Slurm (having requeued the job) sends SIGTERM to every process of the job, the task
    included. Its periodic snapshots must stay (before: the task's death by SIGTERM counted as
    its own end and they were removed), and the rerun resumes from the latest."""
    run = _preempt_and_resume(
        slurm, snap_env, tasks, tmp_path, 1600, signal=False,
        options=["--checkpoint-interval", "4"],
    )  # fmt: skip
    assert f"as Slurm ends Slurm job {run.job}: its snapshots are kept" in run.text, run.text
    assert f"Slurm job {run.job} requeued (restart 1)" in run.text, run.text
    assert "rewound" in run.text, run.text
    _resumed_intact(run, snap_env, 1600)


_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY")


def _requeued(slurm: SlurmCluster, job: int, output: Path) -> dict[str, str] | None:
    """The job's fields once it was requeued; fails at once if it ended without that."""
    fields = slurm.job(job)
    if int(fields.get("Restarts", "0")) >= 1:
        return fields
    if fields.get("JobState") in _DONE:
        raise AssertionError(
            f"job {job} ended {fields['JobState']} without being requeued:\n{_tail(output)}"
        )
    return None


def _wait(predicate: Callable[[], _T], timeout: float, what: str, output: Path) -> _T:
    """``wait_for``, with the job's output in the failure."""
    try:
        return wait_for(predicate, timeout, what)
    except AssertionError as err:
        raise AssertionError(f"{err}; the job's output:\n{_tail(output, 60)}") from None


def _ready(tmp_path: Path) -> int:
    try:
        return int((tmp_path / "state" / "ready").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} absent)"
