"""Incremental snapshots through fusionfs's chunked layout: real CRIU, real memory.

snapstore marks its root chunked and, before each dump, primes the mount's chunk index from
the previous snapshot's images (``dedup-from``), so a dump uploads only the chunks that changed.
The task (tests/snap/memtask.py) holds 256 MiB of incompressible memory and rewrites 10 % of it
(every tenth MiB) on SIGUSR2 between two dumps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from conftest import SnapEnv, Tasks
from helpers import wait_for

pytestmark = pytest.mark.criu

_MIB = 1 << 20


def _storage(env: SnapEnv, n: int) -> dict[str, int]:
    data = json.loads((env.root / "job" / f"{n}.json").read_text())
    storage: dict[str, int] = data["storage"]
    return storage


def _restore_and_verify(env: SnapEnv, tasks: Tasks, task_pid: int, n: int) -> None:
    env.move()  # another machine: empty cache
    restored = env.run("restore", "--task", "job", "--snapshot", str(n), "--detach")
    assert restored.returncode == 0, restored.stderr
    tasks.adopt(task_pid)
    verdict = tasks.started[0].verify()
    assert verdict["ok"], f"snapshot {n}: memory differs in blocks {verdict['bad_blocks']}"
    os.kill(task_pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{task_pid}"), 20, "the restored task to go")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("snap_env", ["fusion-s3"], indirect=True)  # chunking needs a mount
def test_second_dump_uploads_only_what_changed(snap_env: SnapEnv, tasks: Tasks) -> None:
    task = tasks.start(mib=256)
    first = snap_env.run("dump", str(task.pid), "--task", "job", "--leave-running")
    assert first.returncode == 0, first.stderr
    one = _storage(snap_env, 1)
    assert one["logical_bytes"] >= 256 * _MIB
    assert one["new_stored_bytes"] >= 250 * _MIB  # random memory: stored raw

    os.kill(task.pid, signal.SIGUSR2)
    wait_for((task.state / "changed").exists, 30, "the task to change 10 % of its memory")
    started = time.monotonic()
    second = snap_env.run("dump", str(task.pid), "--task", "job")
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.stderr
    assert task.proc is not None and task.proc.wait(10) == -signal.SIGKILL
    two = _storage(snap_env, 2)
    assert two["logical_bytes"] >= 256 * _MIB
    assert two["new_stored_bytes"] <= 0.15 * one["new_stored_bytes"], (one, two, elapsed)
    assert two["stored_bytes"] >= 250 * _MIB  # references the unchanged chunks of dump 1
    print(f"dump 1 {one}; dump 2 {two} in {elapsed:.2f} s")

    shown = snap_env.run("show", "--task", "job")
    assert shown.returncode == 0, shown.stderr
    assert "new in this snapshot" in shown.stdout

    wait_for(lambda: not os.path.exists(f"/proc/{task.pid}"), 20, "the dumped task to go")
    _restore_and_verify(snap_env, tasks, task.pid, 2)
    _restore_and_verify(snap_env, tasks, task.pid, 1)

    # rm runs the collection; with no grace, the removed snapshots' packs are set aside
    removed = snap_env.run("rm", "--task", "job", env={"SNAPSTORE_GC_GRACE_S": "0"})
    assert removed.returncode == 0, removed.stderr
    assert re.search(r"garbage collection: 0 packs in use, [1-9]\d* set aside", removed.stdout)
