"""Task containers with podman (issue 20): a task that is a process tree, checkpointed in
container A on a reclaim and resumed in a fresh container B, with output identical to an
uninterrupted run.

The image is the one ``scripts/build-task-image.sh`` builds from ``containers/Containerfile``
(set-up builds it once; its tag is in ``build/task-image/IMAGE``). Each container is a machine:
the image's ``snapstore-entry`` (containers/snapstore-entry) is its PID 1; it mounts the bucket
(moto over the host's loopback: ``--network host``; machines share only the object store) at
``/fusion`` with its own empty cache and runs the task under ``snapstore run``; CRIU comes from
the host's prefix, bound read-only. The reclaim is ``podman kill --signal TERM`` (what ``podman
stop``, Kubernetes and ECS send). Container A and its mount are then removed; B holds every PID
the task had in A with its own processes (``hold_pids.py``) before it resumes it. Each
container is removed (``podman rm -f``) in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SnapEnv, _dir_env
from helpers import missing, wait_for
from test_pidns import TREETASK, Run, decompressed, progress, tree_command

from snapstore.errors import EXIT_CHECKPOINTED

IMAGE_FILE = REPO_ROOT / "build" / "task-image" / "IMAGE"
CONTAINERS_CONF = REPO_ROOT / "build" / "task-image" / "containers.conf"
TESTS = Path(__file__).parent
_LINES = 4000
# what FUSE and CRIU need inside a container (docs/spot.md, "Task containers")
RUN_FLAGS = [
    "--device", "/dev/fuse",
    "--cap-add", "SYS_ADMIN,SYS_PTRACE,NET_ADMIN,SYS_TIME",
    "--security-opt", "seccomp=unconfined",
]  # fmt: skip


def _podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _criu_prefix(criu: str) -> Path:
    """The prefix of the CRIU set-up installed (a wrapper PREFIX/bin/criu that finds its prefix
    at run time), whatever wrapper ``criu`` is."""
    path = Path(criu).resolve()
    text = path.read_text(errors="replace") if path.stat().st_size < 4096 else ""
    match = re.search(r"exec (\S+/bin/criu)", text)
    if match and "ld-linux" not in text:  # .venv/bin/criu: exec PREFIX/bin/criu "$@"
        path = Path(match.group(1).strip("'\""))
    return path.parent.parent


@pytest.fixture(scope="module")
def image() -> str:
    if os.geteuid() != 0:
        missing("podman", "the container tests run rootful podman")
    if subprocess.run(["which", "podman"], capture_output=True, check=False).returncode != 0:
        missing("podman", "not installed (scripts/setup.sh installs it)")
    if not IMAGE_FILE.exists() or not CONTAINERS_CONF.exists():
        missing("podman task image", "not built (scripts/setup.sh runs build-task-image.sh)")
    tag = IMAGE_FILE.read_text().strip()
    if _podman("image", "exists", tag).returncode != 0:
        missing("podman task image", f"{tag} is gone (run scripts/build-task-image.sh)")
    return tag


class Containers:
    def __init__(self) -> None:
        self.names: list[str] = []

    def run(
        self, name: str, image: str, env: dict[str, str], volumes: list[str], command: list[str]
    ) -> float:
        """Start a detached container; return how long ``podman run`` took."""
        self.names.append(name)
        args = ["run", "-d", "--name", name, "--network", "host", *RUN_FLAGS]
        for volume in volumes:
            args += ["-v", volume]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        started = time.monotonic()
        done = _podman(*args, image, *command)
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        return took

    def logs(self, name: str) -> str:
        done = _podman("logs", name)
        return done.stdout + done.stderr

    def wait(self, name: str, timeout: float) -> int:
        done = _podman("wait", name, timeout=timeout)
        assert done.returncode == 0, done.stderr + self.logs(name)
        return int(done.stdout.strip())

    def remove(self, name: str) -> None:
        _podman("rm", "-f", "-t", "0", name, timeout=60)
        if name in self.names:
            self.names.remove(name)


@pytest.fixture
def containers() -> Iterator[Containers]:
    made = Containers()
    try:
        yield made
    finally:
        for name in list(made.names):
            made.remove(name)


def _seconds(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


@pytest.mark.criu
@pytest.mark.mount
@pytest.mark.s3
@pytest.mark.timeout(300)
def test_task_container_checkpointed_in_a_resumed_in_b(
    image: str,
    criu: str,
    s3_bucket: object,
    fusion_mount: object,
    containers: Containers,
    tmp_path: Path,
) -> None:
    from s3servers import S3Bucket

    bucket = s3_bucket
    assert isinstance(bucket, S3Bucket)
    state = tmp_path / "state"
    state.mkdir()

    # the reference: the same process tree, uninterrupted, under snapstore run on the host
    (tmp_path / "ref").mkdir()
    ref_env: SnapEnv = _dir_env(tmp_path / "ref")
    ref_out = ref_env.work / "ref.gz"
    ref = Run(
        ref_env,
        tmp_path,
        "ref",
        tree_command(sys.executable, TREETASK, state / "ref.progress", ref_out, _LINES),
    )
    ref.start()
    try:
        assert ref.wait() == 0, ref.stderr()
    finally:
        ref.kill()
    expected = decompressed(ref_out)

    task = tree_command(
        "python3",
        Path("/tests/treetask.py"),
        Path("/state/job.progress"),
        Path("/fusion/work/out.gz"),
        _LINES,
    )
    env = dict(bucket.env, SNAPSTORE_RUN_FLAGS="--provider none")
    prefix = _criu_prefix(criu)
    volumes = [f"{prefix}:/opt/fusionfs/criu:ro", f"{TESTS}:/tests:ro", f"{state}:/state"]
    entry = ["snapstore-entry", bucket.source, "job", "--", "sh", "-c", task]
    names = [f"snapstore-test-a-{os.getpid()}", f"snapstore-test-b-{os.getpid()}"]
    for name in names:  # a leftover of an interrupted run
        containers.remove(name)

    setup = fusion_mount(bucket.source, env=bucket.env)  # type: ignore[operator]
    (setup.path / "work").mkdir()  # where the task writes: prepared on the store, like inputs
    setup.unmount()

    start_a = containers.run(names[0], image, env, volumes, entry)
    begun = time.monotonic()
    wait_for(
        lambda: "mounted at /fusion" in containers.logs(names[0]), 60, "/fusion in container A"
    )
    mounted_a = time.monotonic() - begun + start_a
    try:
        wait_for(
            lambda: progress(state / "job.progress") >= 1000,
            90,
            "the task in container A to be mid-run",
        )
    except AssertionError as err:
        raise AssertionError(f"{err}; container A says:\n{containers.logs(names[0])}") from None
    assert _podman("kill", "--signal", "TERM", names[0]).returncode == 0
    code = containers.wait(names[0], 120)
    logs_a = containers.logs(names[0])
    assert code == EXIT_CHECKPOINTED, logs_a
    assert "init of its own PID namespace" in logs_a, logs_a
    checkpoint_s = _seconds(r"committed in ([0-9.]+) s", logs_a)
    at_dump = progress(state / "job.progress")
    assert at_dump < _LINES, "the reclaim came too late to be mid-run"
    containers.remove(names[0])  # A and its mount are gone

    # the PIDs the task had in A, from the store (a mount of it here)
    mount = fusion_mount(bucket.source, env=bucket.env)  # type: ignore[operator]
    (manifest,) = [json.loads(p.read_text()) for p in (mount.path / "snapshots/job").glob("*.json")]
    assert manifest["options"]["pid_namespace"] is True
    in_a = sorted(set(manifest["pids"]) | set(manifest["tids"]))
    mount.unmount()
    hold = f"python3 /tests/hold_pids.py {' '.join(map(str, in_a))} && exec {shlex.join(entry)}"
    start_b = containers.run(names[1], image, env, volumes, ["sh", "-c", hold])
    code = containers.wait(names[1], 180)
    logs_b = containers.logs(names[1])
    assert code == 0, logs_b
    assert "holds the task's original PIDs" in logs_b, logs_b
    restore_s = _seconds(r"running after ([0-9.]+) s", logs_b)
    how = "lazily" if "lazily: pid" in logs_b else "eagerly"
    containers.remove(names[1])

    # a third machine reads the result from the store
    mount = fusion_mount(bucket.source, env=bucket.env)  # type: ignore[operator]
    got = decompressed(mount.path / "work" / "out.gz")
    assert got == expected, "the output resumed in container B differs from an uninterrupted run"
    print(
        f"podman run A {start_a:.2f} s (/fusion mounted {mounted_a:.2f} s after the start), "
        f"B {start_b:.2f} s; checkpoint in A {checkpoint_s:.2f} s "
        f"at line {at_dump}; restore in B ({how}) {restore_s:.3f} s"
    )
    print(shlex.join(["podman", "run", "--network", "host", *RUN_FLAGS]))
