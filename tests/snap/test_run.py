"""``snapstore run``, the spot supervisor: real CRIU, real processes, a fake metadata server.

The supervisor runs as a user (or a workflow engine) would run it: ``python -m snapstore run
... -- COMMAND`` in a subprocess. COMMAND is ``tests/snap/memtask.py`` behind ``sh -c 'echo
...; exec ...'`` (so there is output to forward): known memory, a counter, an output file that
must read 1, 2, 3, ... with no gap and no repeat, and ``--exit-at N --exit-code C``. A reclaim is
a notice from ``fake_metadata.FakeMetadata`` (or SIGTERM), then ``snap_env.move()`` (for the
fusion variant: unmount, delete the cache, mount again) and the same command line again.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MEMTASK, SnapEnv, Tasks, read_counts
from fake_metadata import FakeMetadata
from helpers import wait_for

from snapstore.errors import EXIT_CHECKPOINTED, EXIT_DUMP_FAILED
from snapstore.metadata import AwsSpot, GcpPreemption, MetadataError, Notice, Poller, detect

_GREETING = "memtask-starting"


_LINES: list[Line] = []


@pytest.fixture(autouse=True)
def _no_supervisor_left() -> Iterator[None]:
    """A supervisor still running when a test ends is killed (and its task by ``tasks``)."""
    yield
    while _LINES:
        proc = _LINES.pop().proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def fake() -> Iterator[FakeMetadata]:
    with FakeMetadata() as server:
        yield server


class Line:
    """One ``snapstore run`` command line, started as often as a test needs."""

    def __init__(
        self,
        env: SnapEnv,
        tmp_path: Path,
        *,
        options: list[str],
        exit_at: int,
        exit_code: int,
        mib: int = 32,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.env = env
        self.state = (
            tmp_path / "state"
        )  # local: ready, verify.json (the task never keeps them open)
        self.state.mkdir()
        self.out = env.work / "out.txt"
        self.logs = tmp_path / "supervisor"
        self.logs.mkdir()
        self.runs = 0
        self.extra_env = dict(extra_env or {})
        task = [
            sys.executable,
            str(MEMTASK),
            "--state",
            str(self.state),
            "--mib",
            str(mib),
            "--out",
            str(self.out),
            "--interval",
            "0.02",
            "--exit-at",
            str(exit_at),
            "--exit-code",
            str(exit_code),
        ]
        shell = f"echo {_GREETING}; exec {shlex.join(task)}"
        self.argv = [
            sys.executable,
            "-m",
            "snapstore",
            "run",
            "--task",
            "job",
            "--root",
            str(env.root),
            # these tests follow the task by its PID as the host sees it (memtask reports
            # getpid()); the PID namespace snapstore run uses by default is tested in
            # test_pidns.py
            "--no-pid-namespace",
            *options,
            "--",
            "sh",
            "-c",
            shell,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        _LINES.append(self)

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        full = dict(self.env.env)
        full.update(self.extra_env)
        with (
            open(self.logs / f"stdout.{self.runs}", "wb") as out,
            open(self.logs / f"stderr.{self.runs}", "wb") as err,
        ):
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full,
                cwd=self.state,
            )
        return self.proc

    def wait(self, timeout: float = 90) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"snapstore run did not exit in {timeout} s:\n{self.stderr()}"
            ) from None

    def stdout(self) -> str:
        return (self.logs / f"stdout.{self.runs}").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.logs / f"stderr.{self.runs}").read_text(errors="replace")

    def task_pid(self) -> int:
        def ready() -> int:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"snapstore run exited early:\n{self.stderr()}")
            try:
                return int((self.state / "ready").read_text())
            except (FileNotFoundError, ValueError):
                return 0

        pid: int = wait_for(ready, 60, "the task to fill its memory")
        return pid

    def wait_counts(self, at_least: int, timeout: float = 60) -> list[int]:
        counts: list[int] = wait_for(
            lambda: c if len(c := read_counts(self.out)) >= at_least else [],
            timeout,
            f"the task to write {at_least} lines",
        )
        return counts

    def verify(self, pid: int) -> dict[str, Any]:
        result = self.state / "verify.json"
        result.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        wait_for(result.exists, 60, f"task {pid} to verify its memory")
        verdict: dict[str, Any] = json.loads(result.read_text())
        return verdict


def _consecutive(counts: list[int]) -> bool:
    return counts == list(range(1, len(counts) + 1))


def _manifests(env: SnapEnv) -> dict[int, dict[str, Any]]:
    found = {}
    for path in (env.root / "job").glob("*.json"):
        found[int(path.stem)] = json.loads(path.read_text())
    return found


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def _resume_to_the_end(line: Line, tasks: Tasks, pid: int, at_dump: int, exit_at: int) -> None:
    """The same line again: the task resumes where it stopped and ends with its own status."""
    started = time.monotonic()
    line.start()
    tasks.adopt(pid)  # restored under its own PID; killed at teardown if the test fails

    def restored() -> bool:
        assert line.proc is not None
        if line.proc.poll() is not None:
            raise AssertionError(
                f"snapstore run exited with {line.proc.returncode}:\n{line.stderr()}"
            )
        return f"pid {pid} running after" in line.stderr()

    wait_for(restored, 60, "the restore")
    counts = line.wait_counts(min(at_dump + 10, exit_at))
    assert counts[:at_dump] == list(range(1, at_dump + 1))
    if len(counts) < exit_at - 20:  # still running: its memory came back intact
        verdict = line.verify(pid)
        assert verdict["ok"], f"memory differs after the restore in {verdict['bad_blocks']}"
        assert verdict["pid"] == pid and verdict["counter"] > at_dump
    code = line.wait()
    stderr = line.stderr()
    assert code == 7, stderr
    assert "restored snapshot" in stderr and f"pid {pid} running" in stderr, stderr
    assert f"task {pid} exited with status 7" in stderr, stderr
    assert read_counts(line.out) == list(range(1, exit_at + 1)), "output file not intact"
    assert _GREETING not in line.stdout(), "output forwarded twice"
    assert not (line.env.root / "job").exists(), "a finished task's snapshots must go"
    print(f"resume run: {time.monotonic() - started:.2f} s")


# --------------------------------------------------------------------------------------------
# metadata clients (no CRIU)


@pytest.mark.timeout(60)
def test_metadata_clients_against_the_fake_server(
    fake: FakeMetadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws = AwsSpot(fake.url)
    assert aws.check() is None
    assert aws.check() is None
    assert fake.requests["PUT /latest/api/token"] == 1, "the IMDSv2 token is reused"
    fake.aws_notice(in_seconds=100)
    notice = aws.check()
    assert notice is not None and notice.source == "aws" and "terminate" in notice.detail
    assert notice.stop_at is not None and 90 < notice.stop_at - time.monotonic() <= 101

    fake.token = "rotated"  # an expired token: 401, then one fresh token
    assert aws.check() is not None
    assert fake.requests["PUT /latest/api/token"] == 2

    gcp = GcpPreemption(f"127.0.0.1:{fake.port}")
    assert gcp.check() is None
    fake.gcp_preempt()
    got = gcp.check()
    assert got is not None and got.source == "gcp" and got.stop_at is None

    for name, value in fake.env.items():
        monkeypatch.setenv(name, value)
    assert isinstance(detect(), AwsSpot)

    with FakeMetadata() as dead:
        port = dead.port
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("SNAPSTORE_AZURE_METADATA_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    assert detect() is None
    assert time.monotonic() - started < 3
    with pytest.raises(MetadataError, match=r"127\.0\.0\.1"):
        AwsSpot().check()


@pytest.mark.timeout(60)
def test_poller_reports_errors_once_and_the_notice(fake: FakeMetadata) -> None:
    seen: list[Notice] = []
    errors: list[str | None] = []
    fake.token = ""  # PUT answers an empty token: every poll fails
    poller = Poller(AwsSpot(fake.url), 0.05, seen.append, errors.append)
    poller.start()
    try:
        wait_for(lambda: fake.requests["PUT /latest/api/token"] >= 4, 10, "four failed polls")
        assert len(errors) == 1 and errors[0] and "token" in errors[0]
        fake.token = "good"
        fake.aws_notice()
        wait_for(lambda: seen, 10, "the notice")
        assert errors[-1] is None, "recovery is reported"
    finally:
        poller.stop()
    assert len(seen) == 1


# --------------------------------------------------------------------------------------------
# the supervisor, end to end


@pytest.mark.criu
@pytest.mark.timeout(240)
@pytest.mark.parametrize("trigger", ["aws", "sigterm"])
def test_notice_checkpoints_and_the_same_line_resumes(
    snap_env: SnapEnv, tasks: Tasks, fake: FakeMetadata, tmp_path: Path, trigger: str
) -> None:
    exit_at = 600
    options = (
        ["--provider", "aws", "--poll-interval", "0.2"]
        if trigger == "aws"
        else [
            "--provider",
            "none",
        ]
    )
    line = Line(
        snap_env, tmp_path, options=options, exit_at=exit_at, exit_code=7, extra_env=fake.env
    )
    line.start()
    pid = line.task_pid()
    line.wait_counts(20)

    noticed = time.monotonic()
    if trigger == "aws":
        fake.aws_notice()
    else:
        assert line.proc is not None
        line.proc.send_signal(signal.SIGTERM)
    code = line.wait()
    took = time.monotonic() - noticed
    stderr = line.stderr()
    assert code == EXIT_CHECKPOINTED, stderr
    assert f"exit {EXIT_CHECKPOINTED}: run the same command again" in stderr
    if trigger == "aws":
        assert "spot instance-action terminate" in stderr and "window 120 s" in stderr
        assert fake.requests["GET /latest/meta-data/spot/instance-action"] >= 2
    else:
        assert "SIGTERM received" in stderr and "window 30 s" in stderr
    assert _GREETING in line.stdout(), "the task's stdout is forwarded"
    assert _gone(pid), "the checkpointed task is killed and reaped"
    at_dump = read_counts(line.out)
    assert _consecutive(at_dump) and 20 <= len(at_dump) < exit_at
    manifests = _manifests(snap_env)
    assert len(manifests) == 1
    (m,) = manifests.values()
    assert m["pid"] == pid and not m["options"]["leave_running"]
    log = snap_env.root / ".logs" / "job.stdout"
    assert log.read_text() == f"{_GREETING}\n"
    print(f"notice to exit {EXIT_CHECKPOINTED}: {took:.2f} s ({snap_env.kind}, {trigger})")

    fake.notice = None  # the next machine has no notice pending
    snap_env.move()
    _resume_to_the_end(line, tasks, pid, len(at_dump), exit_at)
    assert log.read_text() == f"{_GREETING}\n"

    # a finished task is not resurrected: the same line starts it afresh
    line.out.unlink()
    (line.state / "ready").unlink()
    line.start()
    fresh = line.task_pid()
    line.wait_counts(3)
    assert "started task 'job'" in line.stderr() and "restored" not in line.stderr()
    assert line.proc is not None
    line.proc.send_signal(signal.SIGINT)  # forwarded to the task: it ends (KeyboardInterrupt)
    assert line.wait() not in (0, EXIT_CHECKPOINTED)
    assert _gone(fresh)
    assert not (snap_env.root / "job").exists()


@pytest.mark.criu
@pytest.mark.timeout(180)
def test_gcp_preemption_notice(
    dir_env: SnapEnv, tasks: Tasks, fake: FakeMetadata, tmp_path: Path
) -> None:
    exit_at = 300
    line = Line(
        dir_env,
        tmp_path,
        options=["--provider", "gcp", "--poll-interval", "0.2", "--eager"],
        exit_at=exit_at,
        exit_code=7,
        mib=8,
        extra_env=fake.env,
    )
    line.start()
    pid = line.task_pid()
    line.wait_counts(10)
    fake.gcp_preempt()
    code = line.wait()
    stderr = line.stderr()
    assert code == EXIT_CHECKPOINTED, stderr
    assert "instance/preempted is TRUE" in stderr and "window 30 s, margin 3 s" in stderr
    assert fake.requests["GET /computeMetadata/v1/instance/preempted"] >= 2
    at_dump = read_counts(line.out)
    assert _consecutive(at_dump)

    fake.preempted = False
    _resume_to_the_end(line, tasks, pid, len(at_dump), exit_at)
    assert "eagerly" in line.stderr()


@pytest.mark.criu
@pytest.mark.timeout(180)
def test_deadline_that_cannot_be_met_fails_clean(
    snap_env: SnapEnv, tasks: Tasks, fake: FakeMetadata, tmp_path: Path
) -> None:
    exit_at = 500
    line = Line(
        snap_env,
        tmp_path,
        options=[
            "--provider",
            "aws",
            "--poll-interval",
            "0.2",
            "--checkpoint-interval",
            "0.5",
            "--window",
            "1",
            "--deadline-margin",
            "0.99",
        ],
        exit_at=exit_at,
        exit_code=7,
        extra_env=fake.env,
    )
    line.start()
    pid = line.task_pid()
    tasks.adopt(pid)  # it outlives the supervisor
    wait_for(lambda: _manifests(snap_env), 60, "a periodic snapshot")
    line.wait_counts(40)
    fake.aws_notice()
    code = line.wait()
    stderr = line.stderr()
    assert code == EXIT_DUMP_FAILED, stderr
    assert "checkpoint failed" in stderr and f"task {pid} left running" in stderr, stderr
    assert "Traceback" not in stderr
    manifests = _manifests(snap_env)
    assert manifests, "the periodic snapshots stay"
    assert len(manifests) <= 2, "--keep 2 by default"
    assert all(m["options"]["leave_running"] for m in manifests.values()), (
        "the failed final checkpoint committed nothing"
    )

    # the task runs on (the machine is going away anyway), its output growing past the snapshot
    n = len(read_counts(line.out))
    line.wait_counts(n + 10)
    assert not _gone(pid)
    os.kill(pid, signal.SIGKILL)  # the machine goes
    wait_for(lambda: _gone(pid), 30, f"PID {pid} to be reaped")
    grown = len(read_counts(line.out))

    fake.notice = None
    snap_env.move()
    _resume_to_the_end(line, tasks, pid, 1, exit_at)
    assert f"rewound {line.out}" in line.stderr(), "the output file was cut back to the snapshot"
    assert grown < exit_at


@pytest.mark.timeout(60)
def test_run_usage_errors(dir_env: SnapEnv) -> None:
    for args in (
        ("run", "--task", "job"),  # no command
        ("run", "--task", "job", "--"),
        ("run", "--task", "a/b", "--", "true"),
        ("run", "--task", "job", "--provider", "oracle", "--", "true"),
        ("run", "--task", "job", "--checkpoint-interval", "often", "--", "true"),
        ("run", "--task", "job", "--window", "0", "--", "true"),
        ("run", "--task", "job", "--keep", "0", "--", "true"),
        ("run", "--task", "job", "--provider", "none", "--", "/nonexistent/command"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "snapstore", args[0], "--root", str(dir_env.root), *args[1:]],
            capture_output=True,
            text=True,
            env=dir_env.env,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    helped = dir_env.run("run", "--help")
    assert helped.returncode == 0
    for text in ("75", "175", "176", "-- COMMAND"):
        assert text in helped.stdout


@pytest.mark.criu
@pytest.mark.mount
@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["flush", "criu"])
def test_mount_dying_under_the_final_checkpoint_is_one_line_and_175(
    s3_bucket: Any, fusion_mount: Any, criu: str, tasks: Tasks, tmp_path: Path, when: str
) -> None:
    """The mount under ``--root`` (and under the task's logs) is killed while the final
    checkpoint runs (as it begins, or once CRIU is writing page images): ``snapstore run``
    exits 175 with one error line on stderr (S-SNAP-DEAD), never a traceback (before:
    ``OSError: [Errno 107] Transport endpoint is not connected`` from its log forwarder)."""
    mount = fusion_mount(s3_bucket.source, env=s3_bucket.env)
    (mount.path / "work").mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
    )
    env.pop("SNAPSTORE_ROOT", None)
    env.pop("SNAPSTORE_ALLOW_ANY_ROOT", None)
    env.update(s3_bucket.env)
    snap = SnapEnv("fusion-s3", mount.path / "snapshots", mount.path / "work", env, lambda: None)
    line = Line(
        snap, tmp_path, options=["--provider", "none"], exit_at=100_000, exit_code=7, mib=256
    )
    line.start()
    pid = line.task_pid()
    tasks.adopt(pid)
    line.wait_counts(5)
    assert line.proc is not None
    line.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "checkpointing task" in line.stderr(), 30, "the checkpoint to start")
    if when == "criu":
        images = mount.path / "snapshots" / "job" / "1"
        wait_for(
            lambda: images.is_dir() and any(images.glob("pages-*.img")),
            30,
            "CRIU to write page images",
        )
    mount.kill()
    code = line.wait(120)
    stderr = line.stderr()
    assert code == EXIT_DUMP_FAILED, stderr
    assert "Traceback" not in stderr, stderr
    # one error line (CRIU's log excerpt may follow it, indented, as for any failed dump)
    errors = [ln for ln in stderr.splitlines() if ln.startswith("snapstore: error")]
    assert len(errors) == 1 and errors[0].startswith("snapstore: error: checkpoint failed"), stderr
    assert all(ln.startswith("snapstore: ") for ln in stderr.splitlines()), stderr


@pytest.mark.criu
@pytest.mark.mount
@pytest.mark.timeout(120)
def test_every_command_on_a_dead_mount_is_one_line(
    s3_bucket: Any, fusion_mount: Any, criu: str, tasks: Tasks, tmp_path: Path
) -> None:
    """S-SNAP-DEAD: every snapstore command whose root is a mount whose daemon died (ENOTCONN)
    says so in one line and exits with its failure code, never a traceback."""
    mount = fusion_mount(s3_bucket.source, env=s3_bucket.env)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
    )
    env.pop("SNAPSTORE_ROOT", None)
    env.update(s3_bucket.env)
    snap = SnapEnv("fusion-s3", mount.path / "snapshots", mount.path / "work", env, lambda: None)
    task = tasks.start(mib=8)
    assert snap.run("dump", "--task", "job", str(task.pid)).returncode == 0
    os.kill(mount.proc.pid, signal.SIGKILL)  # the daemon dies; the mount stays, dead
    mount.proc.wait(10)
    try:
        for args, code in (
            (("list",), 1),
            (("show", "--task", "job"), 1),
            (("rm", "--task", "job"), 1),
            (("dump", "--task", "job", str(task.pid)), EXIT_DUMP_FAILED),
            (("restore", "--task", "job"), 176),
            # (SnapEnv.run appends --root: for run it must come before the command)
            (
                (
                    "run",
                    "--task",
                    "job",
                    "--root",
                    str(snap.root),
                    "--provider",
                    "none",
                    "--",
                    "true",
                ),
                1,
            ),
        ):
            result = snap.run(*args, timeout=60)
            lines = result.stderr.strip().splitlines()
            assert "Traceback" not in result.stderr, (args, result.stderr)
            assert result.returncode == code, (args, result.stderr)
            assert len(lines) == 1 and lines[0].startswith("snapstore: error:"), (args, lines)
    finally:
        mount.kill()
