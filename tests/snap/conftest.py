"""Fixtures for the snapstore tests: real CRIU on real processes.

- ``criu``: the CRIU snapstore will use (skips, or fails under CI=true, when none is usable or
  the tests do not run as root).
- ``snap_env``: where snapshots go, parametrized by backing:
  ``dir``: a plain directory, accepted through the testing aid SNAPSTORE_ALLOW_ANY_ROOT=1;
  ``fusion-s3``: a fusionfs mount of a bucket on the moto S3 server (``fusion_mount`` and
  ``s3_bucket`` from tests/conftest.py). Its ``move()`` is "another machine": unmount, delete
  the cache, mount again. SNAPSTORE_TEST_FUSION=0 turns this variant off (for debugging).
  ``dir_env`` is the plain-directory variant alone, for the failure cases.
- ``tasks``: starts ``memtask.py`` processes and kills whatever is left at teardown, including
  restored tasks (which are not children of the test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import missing, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
MEMTASK = Path(__file__).with_name("memtask.py")
# an opt-out for local runs only: under CI=true the fusionfs variant always runs
_FUSION = os.environ.get("SNAPSTORE_TEST_FUSION", "1") != "0" or os.environ.get("CI") == "true"


@pytest.fixture(scope="session")
def criu() -> str:
    """Path of the CRIU that snapstore will use."""
    from snapstore.criu import find_criu
    from snapstore.errors import CriuUnavailable

    if os.geteuid() != 0:
        missing("CRIU", "checkpoint/restore needs root")
    try:
        return str(find_criu().path)
    except CriuUnavailable as err:
        missing("CRIU", str(err))


@dataclasses.dataclass
class SnapEnv:
    """Where a test's snapshots and task files go, and how to run ``snapstore``."""

    kind: str
    root: Path  # --root
    work: Path  # where tasks write their files (on the mount, for fusion)
    env: dict[str, str]
    move: Callable[[], None]  # "another machine": for fusion, remount with an empty cache

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        full = dict(self.env)
        full.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "snapstore", *args, "--root", str(self.root)],
            capture_output=True,
            text=True,
            env=full,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("SNAPSTORE_ROOT", None)
    env.pop("SNAPSTORE_ALLOW_ANY_ROOT", None)
    for name in [n for n in env if n.startswith("SLURM_")]:  # tests run inside a Slurm job:
        del env[name]  # snapstore run must not requeue that job
    return env


def _dir_env(tmp_path: Path) -> SnapEnv:
    root, work = tmp_path / "snapshots", tmp_path / "work"
    work.mkdir()
    env = _base_env()
    env["SNAPSTORE_ALLOW_ANY_ROOT"] = "1"
    return SnapEnv("dir", root, work, env, lambda: None)


@pytest.fixture
def dir_env(tmp_path: Path, criu: str) -> SnapEnv:
    return _dir_env(tmp_path)


@pytest.fixture(
    params=[
        "dir",
        pytest.param(
            "fusion-s3",
            marks=[
                pytest.mark.mount,
                pytest.mark.s3,
                pytest.mark.skipif(
                    not _FUSION, reason="SNAPSTORE_TEST_FUSION=0 turns the fusionfs variant off"
                ),
            ],
        ),
    ]
)
def snap_env(request: pytest.FixtureRequest, tmp_path: Path, criu: str) -> SnapEnv:
    if request.param == "dir":
        return _dir_env(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    fusion_mount = request.getfixturevalue("fusion_mount")
    state: dict[str, Any] = {"mount": fusion_mount(bucket.source, env=bucket.env)}
    path: Path = state["mount"].path
    (path / "work").mkdir()

    def move() -> None:
        state["mount"] = state["mount"].remount(fresh_cache=True)

    env = _base_env()
    env.update(bucket.env)
    return SnapEnv("fusion-s3", path / "snapshots", path / "work", env, move)


# --------------------------------------------------------------------------------------------
# tasks


def read_counts(path: Path) -> list[int]:
    """The complete lines of a task's output file, as integers."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split("\n")[:-1]]


@dataclasses.dataclass
class Task:
    pid: int
    state: Path
    out: Path | None
    proc: subprocess.Popen[bytes] | None

    def counts(self) -> list[int]:
        assert self.out is not None
        return read_counts(self.out)

    def wait_counts(self, at_least: int, timeout: float = 30) -> list[int]:
        return wait_for(
            lambda: c if len(c := self.counts()) >= at_least else [],
            timeout,
            f"task {self.pid} to write {at_least} lines to {self.out}",
        )

    def verify(self, timeout: float = 60) -> dict[str, Any]:
        """Ask the task (SIGUSR1) to check its memory; return its verdict."""
        result = self.state / "verify.json"
        result.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        wait_for(result.exists, timeout, f"task {self.pid} to verify its memory")
        verdict: dict[str, Any] = json.loads(result.read_text())
        return verdict

    def status(self) -> str:
        """The kernel's one-letter state (R, S, T, t, Z, ...) or '' if gone."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return ""


class Tasks:
    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._count = 0
        self.started: list[Task] = []
        self.adopted: list[int] = []
        self._workdirs_before = set(_restore_workdirs())

    def start(
        self,
        *,
        mib: int = 16,
        out: Path | None = None,
        exit_at: int = 0,
        exit_code: int = 0,
        new_session: bool = True,
    ) -> Task:
        self._count += 1
        state = self._tmp / f"task{self._count}"
        state.mkdir()
        argv = [
            sys.executable,
            str(MEMTASK),
            "--state",
            str(state),
            "--mib",
            str(mib),
            "--seed",
            str(self._count),
        ]
        if out is not None:
            argv += ["--out", str(out)]
        if exit_at:
            argv += ["--exit-at", str(exit_at), "--exit-code", str(exit_code)]
        with open(state / "log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
                cwd=state,
            )
        task = Task(proc.pid, state, out, proc)
        self.started.append(task)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"memtask exited with {proc.returncode}: {(state / 'log').read_text()}"
                )
            return (state / "ready").exists()

        wait_for(ready, 60, "memtask to fill its memory")
        return task

    def adopt(self, pid: int) -> None:
        """A restored task (not our child): killed at teardown."""
        self.adopted.append(pid)

    def cleanup(self) -> None:
        for task in self.started:
            if task.proc is not None and task.proc.poll() is None:
                task.proc.kill()
                task.proc.wait(10)
        for pid in self.adopted:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10  # PID 1 reaps orphans slowly here: wait a little
        while time.monotonic() < deadline and any(
            os.path.exists(f"/proc/{pid}") for pid in self.adopted
        ):
            time.sleep(0.05)
        # work dirs that detached lazy restores leave behind (their daemons end with the task)
        for path in set(_restore_workdirs()) - self._workdirs_before:
            shutil.rmtree(path, ignore_errors=True)


def _restore_workdirs() -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob("snapstore-restore-*"))


@pytest.fixture
def tasks(tmp_path: Path) -> Iterator[Tasks]:
    t = Tasks(tmp_path)
    try:
        yield t
    finally:
        t.cleanup()
