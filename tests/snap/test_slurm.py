"""``snapstore run`` under Slurm preemption: a real single-node Slurm (``tests/slurmcluster.py``).

A batch job in the preemptible partition ``low`` runs ``snapstore run --task job -- sh -c 'echo
...; exec memtask.py ...'`` (the counter task of ``test_run.py``) with its files on a fusionfs
mount of a moto bucket; a job in ``high`` needing the node preempts it. The ``low`` job was
submitted as docs/spot.md says (``--requeue --signal=B:TERM@60 --open-mode=append``), so the
batch script hears SIGTERM when the grace period (``GraceTime=20``) starts: ``snapstore run``
checkpoints, requeues the job, Slurm runs the script again (after ``cred_expire=10`` s) and the
same line resumes the task from its snapshot; the task's output file must read 1..N as after an
uninterrupted run, and the job's own output must carry the task's stdout once.

Slurm is started once per session (about a second) by the ``slurm`` fixture and stopped at its
end; each test has a timeout and waits on deadlines.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MEMTASK, SnapEnv, Tasks, read_counts
from helpers import missing, wait_for
from slurmcluster import SlurmCluster, SlurmError, missing_programs

pytestmark = [pytest.mark.criu, pytest.mark.mount, pytest.mark.s3]

_GREETING = "memtask-starting"
_GRACE_S = 20


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


def _job_script(env: SnapEnv, tmp_path: Path, exit_at: int, sbatch: list[str]) -> Path:
    """The batch script of docs/spot.md: ``exec snapstore run --task job -- TASK``."""
    state = tmp_path / "state"  # local: ready, verify.json (the task never keeps them open)
    state.mkdir()
    task = [sys.executable, str(MEMTASK), "--state", str(state), "--mib", "32",
            "--out", str(env.work / "out.txt"), "--interval", "0.02",
            "--exit-at", str(exit_at), "--exit-code", "0"]  # fmt: skip
    shell = f"echo {_GREETING}; exec {shlex.join(task)}"
    line = [sys.executable, "-m", "snapstore", "run", "--task", "job", "--root", str(env.root),
            "--provider", "none", "--", "sh", "-c", shell]  # fmt: skip
    directives = "".join(f"#SBATCH {option}\n" for option in sbatch)
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"{directives}"
        'echo "script starts: restart ${SLURM_RESTART_COUNT:-0}"\n'
        f"exec {shlex.join(line)}\n"
    )
    return script


@pytest.mark.timeout(300)
@pytest.mark.parametrize("snap_env", ["fusion-s3"], indirect=True)
def test_preempted_job_requeues_itself_and_resumes(
    slurm: SlurmCluster, snap_env: SnapEnv, tasks: Tasks, tmp_path: Path
) -> None:
    exit_at = 1500  # 30 s of counting at 0.02 s: preempted long before the end
    output = tmp_path / "job.out"
    script = _job_script(
        snap_env, tmp_path, exit_at,
        ["--partition=low", "--requeue", "--signal=B:TERM@60", "--open-mode=append",
         f"--output={output}"],
    )  # fmt: skip
    env = dict(snap_env.env)
    env["SLURM_CONF"] = slurm.env["SLURM_CONF"]
    submitted = time.monotonic()
    job = slurm.sbatch(str(script), env=env, cwd=tmp_path)
    try:
        pid = int(wait_for(lambda: _ready(tmp_path), 90, "the task to fill its memory"))
        tasks.adopt(pid)
        started = time.monotonic()
        wait_for(lambda: len(read_counts(snap_env.work / "out.txt")) >= 20, 60, "20 lines")

        preempted = time.monotonic()
        high = slurm.sbatch("--partition=high", f"--output={tmp_path / 'high.out'}",
                            "--wrap", "sleep 1", env=env, cwd=tmp_path)  # fmt: skip
        fields = wait_for(
            lambda: f if int((f := slurm.job(job)).get("Restarts", "0")) >= 1 else None,
            120, f"job {job} to be requeued:\n{_tail(output)}",
        )  # fmt: skip
        requeued = time.monotonic()
        wait_for(lambda: slurm.job(high).get("JobState") == "COMPLETED", 120, "the high job")
        fields = wait_for(
            lambda: f if (f := slurm.job(job)).get("JobState") in _DONE else None,
            180, f"job {job} to end:\n{_tail(output)}",
        )  # fmt: skip
        ended = time.monotonic()
    finally:
        slurm.run("scancel", str(job), check=False)
    text = output.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, text)
    assert read_counts(snap_env.work / "out.txt") == list(range(1, exit_at + 1)), text
    assert f"Slurm job {job} requeued (restart 1)" in text, text
    assert "restored snapshot 1 of task 'job'" in text, text
    assert text.count(_GREETING) == 1, "the task's stdout is forwarded once over both runs"
    assert not (snap_env.root / "job").exists(), "a finished task's snapshots must go"
    print(
        f"submit to running {started - submitted:.1f} s; preempt to requeued "
        f"{requeued - preempted:.1f} s; requeued to done {ended - requeued:.1f} s"
    )


_DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY")


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
