"""``snapstore run`` puts the task in a PID namespace of its own (``snapstore.pidns``), and a
task that is a process tree (``producer | gzip > out.gz``) survives a reclaim.

The task is ``sh -c 'treetask.py ... | gzip -n -1 > out.gz'``: a deterministic producer shaped
like ``minimap2 ... | gzip`` whose every line also carries its own ``getpid()``, ``getppid()`` and
whether ``/proc/self`` is itself. An uninterrupted run gives the reference output. The same
command is then reclaimed (SIGTERM) mid-run, moved to "another machine" (fusionfs: unmount,
empty cache, mount again), and resumed while other processes hold every PID the task's tree had
on the first machine: before the task had its own PID namespace, CRIU could not restore it
there (it restores every task under its original PID). The resumed run must end with exactly
the reference bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SnapEnv
from helpers import wait_for

from snapstore import pidns
from snapstore.criu import read_reg_files
from snapstore.errors import EXIT_CHECKPOINTED

TREETASK = Path(__file__).with_name("treetask.py")
_LINES = 4000


def tree_command(python: str, treetask: Path, progress: Path, out: Path, lines: int) -> str:
    """The process tree: producer | gzip, as a user writes it (shared with the container test)."""
    producer = shlex.join(
        [python, str(treetask), "--lines", str(lines), "--progress", str(progress)]
    )
    return f"{producer} | gzip -n -1 > {shlex.quote(str(out))}"


class Run:
    """``snapstore run --task TASK -- sh -c COMMAND``, its stderr in a file."""

    def __init__(
        self, env: SnapEnv, tmp_path: Path, task: str, command: str, options: tuple[str, ...] = ()
    ) -> None:
        self.env = env
        self.logs = tmp_path / f"supervisor-{task}"
        self.logs.mkdir()
        self.argv = [
            sys.executable, "-m", "snapstore", "run", "--task", task, "--root", str(env.root),
            "--provider", "none", *options, "--", "sh", "-c", command,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        with open(self.logs / f"stderr.{self.runs}", "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=self.env.env,
                cwd=self.logs,
            )
        return self.proc

    def stderr(self) -> str:
        return (self.logs / f"stderr.{self.runs}").read_text(errors="replace")

    def wait(self, timeout: float = 90) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"snapstore run did not end in {timeout} s:\n{self.stderr()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def progress(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return 0


def hold_pids(pids: list[int], attempts: int = 200) -> list[subprocess.Popen[bytes]]:
    """Processes that hold exactly these PIDs (via ``/proc/sys/kernel/ns_last_pid``; other
    processes on the machine may take a PID first: then try again). Raises if one cannot be had."""
    held: list[subprocess.Popen[bytes]] = []
    try:
        for pid in pids:
            for _ in range(attempts):
                if os.path.exists(f"/proc/{pid}"):
                    raise AssertionError(f"PID {pid} is still in use before the restore")
                Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
                p = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
                if p.pid == pid:
                    held.append(p)
                    break
                p.kill()
                p.wait()
            else:
                raise AssertionError(f"could not take PID {pid} in {attempts} attempts")
    except BaseException:
        release(held)
        raise
    return held


def release(held: list[subprocess.Popen[bytes]]) -> None:
    for p in held:
        p.kill()
        p.wait()


def decompressed(path: Path) -> bytes:
    with gzip.open(path) as f:
        return f.read()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    made: list[Run] = []
    yield made
    for r in made:
        r.kill()


@pytest.mark.criu
@pytest.mark.timeout(240)
def test_process_tree_resumes_where_its_pids_are_taken(
    snap_env: SnapEnv, tmp_path: Path, runs: list[Run]
) -> None:
    state = tmp_path / "state"
    state.mkdir()

    # the reference: the same command, never interrupted
    ref_out = snap_env.work / "ref.gz"
    ref = Run(
        snap_env,
        tmp_path,
        "ref",
        tree_command(sys.executable, TREETASK, state / "ref.progress", ref_out, _LINES),
    )
    runs.append(ref)
    started = time.monotonic()
    ref.start()
    assert ref.wait() == 0, ref.stderr()
    print(f"uninterrupted run: {time.monotonic() - started:.2f} s")
    expected = decompressed(ref_out)
    assert expected.count(b"\n") == _LINES
    # the task's own view inside its namespace: init 1, sh 2, producer 3 (gzip 4)
    assert b"\tpid:3\tppid:2\tself:1\n" in expected, expected[-200:]

    out = snap_env.work / "out.gz"
    job = Run(
        snap_env,
        tmp_path,
        "job",
        tree_command(sys.executable, TREETASK, state / "job.progress", out, _LINES),
    )
    runs.append(job)
    job.start()
    wait_for(lambda: progress(state / "job.progress") >= 1000, 60, "the producer to be mid-run")
    assert job.proc is not None
    job.proc.send_signal(signal.SIGTERM)  # the reclaim
    assert job.wait() == EXIT_CHECKPOINTED, job.stderr()
    at_dump = progress(state / "job.progress")
    assert at_dump < _LINES, "the reclaim came too late to be mid-run"
    (manifest,) = [json.loads(p.read_text()) for p in (snap_env.root / "job").glob("*.json")]
    assert manifest["options"]["pid_namespace"] is True
    tree = sorted(set(manifest["pids"]) | set(manifest["tids"]))
    assert len(manifest["pids"]) == 4, manifest["pids"]  # init, sh, producer, gzip
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in tree), 10, "the tree to go")

    snap_env.move()  # another machine: fresh mount, empty cache
    held = hold_pids(tree)
    try:
        started = time.monotonic()
        job.start()
        code = job.wait()
        took = time.monotonic() - started
    finally:
        release(held)
    stderr = job.stderr()
    assert code == 0, stderr
    assert "restored snapshot" in stderr, stderr
    print(f"resumed at line {at_dump} with PIDs {tree} taken; resume run {took:.2f} s")
    got = decompressed(out)
    assert got == expected, "resumed output differs from the uninterrupted run"
    assert out.read_bytes() == ref_out.read_bytes()


@pytest.mark.criu
@pytest.mark.timeout(240)
@pytest.mark.parametrize("snap_env", ["fusion-s3"], indirect=True)  # the realistic one: ~50 s
def test_process_tree_resumes_from_a_periodic_snapshot_after_the_machine_died(
    snap_env: SnapEnv, tmp_path: Path, runs: list[Run]
) -> None:
    """No notice at all: the machine dies (supervisor and task SIGKILLed) after a periodic
    snapshot; gzip's output, grown since, is cut back to its size at the snapshot, and the
    resumed tree still ends with the uninterrupted run's bytes."""
    state = tmp_path / "state"
    state.mkdir()
    lines = 3 * _LINES  # long enough for a periodic snapshot and gzip's output to grow after it
    ref_out = snap_env.work / "ref.gz"
    ref = Run(
        snap_env,
        tmp_path,
        "ref",
        tree_command(sys.executable, TREETASK, state / "ref.progress", ref_out, lines),
    )
    runs.append(ref)
    ref.start()
    assert ref.wait() == 0, ref.stderr()

    out = snap_env.work / "out.gz"
    job = Run(
        snap_env,
        tmp_path,
        "job",
        tree_command(sys.executable, TREETASK, state / "job.progress", out, lines),
        ("--checkpoint-interval", "2"),
    )
    runs.append(job)
    job.start()

    def recorded() -> int | None:
        """out.gz's size as the latest committed snapshot recorded it."""
        task_dir = snap_env.root / "job"
        committed = sorted(int(p.stem) for p in task_dir.glob("*.json"))
        if not committed:
            return None
        files = read_reg_files(task_dir / str(committed[-1]))
        sizes = [f.size for f in files if f.name == str(out)]
        return sizes[0] if sizes else None

    # gzip writes its output in large blocks, seconds apart: wait until it wrote one after
    # the latest committed snapshot
    wait_for(
        lambda: (size := recorded()) is not None and out.stat().st_size > size,
        90,
        "gzip's output to grow past a periodic snapshot",
    )
    assert job.proc is not None
    job.proc.send_signal(signal.SIGSTOP)  # no commit from here on
    assert progress(state / "job.progress") < lines, "the task ended before the machine died"
    (init,) = [ln for ln in job.stderr().splitlines() if "init of its own PID namespace" in ln]
    init_pid = int(init.split("pid ")[1].split()[0])
    assert job.proc is not None
    job.proc.kill()  # the machine dies: no notice, no final checkpoint
    job.proc.wait(10)
    os.kill(init_pid, signal.SIGKILL)  # the init's end takes its whole namespace
    wait_for(lambda: not os.path.exists(f"/proc/{init_pid}"), 10, "the task to go")

    snap_env.move()
    job.start()
    code = job.wait()
    stderr = job.stderr()
    assert code == 0, stderr
    assert "restored snapshot" in stderr and f"rewound {out}" in stderr, stderr
    assert decompressed(out) == decompressed(ref_out)
    assert out.read_bytes() == ref_out.read_bytes()


@pytest.mark.criu
@pytest.mark.timeout(60)
def test_init_reaps_forwards_signals_and_reports_status(dir_env: SnapEnv, tmp_path: Path) -> None:
    """The init: the task sees PID 1 as its parent, orphans are reaped, SIGINT reaches the
    task, and the task's status comes back as a shell reports it."""
    out = tmp_path / "view"
    script = (
        f"(sleep 0.1 &) ; echo $$ $PPID > {out}; "
        "trap 'echo got-int >> " + str(out) + "; exit 9' INT; "
        f"echo ready >> {out}; while :; do sleep 0.05; done"
    )
    run = Run(dir_env, tmp_path, "view", script)
    run.start()
    wait_for(lambda: out.exists() and "ready" in out.read_text(), 30, "the task to start")
    first = out.read_text().split()
    assert first[:2] == ["2", "1"], first  # sh is PID 2, its parent the init
    (init,) = [ln for ln in run.stderr().splitlines() if "init of its own PID namespace" in ln]
    init_pid = int(init.split("pid ")[1].split()[0])
    assert pidns.is_namespace_init(init_pid)

    def no_zombies() -> bool:
        kids = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
        return kids == [kids[0]] if kids else False  # only sh: the orphaned sleep was reaped

    wait_for(no_zombies, 10, "the orphan to be reaped")
    assert run.proc is not None
    run.proc.send_signal(signal.SIGINT)  # snapstore forwards it to the init, the init to sh
    assert run.wait(30) == 9, run.stderr()
    assert "got-int" in out.read_text()
    with contextlib.suppress(FileNotFoundError):
        assert not Path(f"/proc/{init_pid}").exists()
