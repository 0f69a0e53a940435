"""The earliest warning each cloud gives, ``--checkpoint-interval auto``, and what runs saved.

- AWS's rebalance recommendation is an early notice: one ``--leave-running`` checkpoint at once,
  the task keeps running, and the final checkpoint on the interruption notice only uploads what
  changed since.
- Azure's Scheduled Events: a ``Preempt`` for this VM is a final notice (others' events and
  ``Freeze`` are not), acknowledged only after the checkpoint committed.
- ``--checkpoint-interval auto`` chooses each interval from the checkpoints measured so far
  (``snapstore.interval``) and logs why.
- Every attempt is recorded (``snapstore.attempts``): ``show`` prints them, ``report`` sums them,
  and ``run`` ends with a summary line.

The supervisor runs for real (CRIU, the fake metadata server of ``fake_metadata``), through the
``Line`` helper of ``test_run``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SnapEnv, Tasks, read_counts
from fake_metadata import FakeMetadata
from helpers import wait_for
from test_run import (
    Line,
    _consecutive,
    _gone,
    _manifests,
    _resume_to_the_end,
)
from test_run import _no_supervisor_left as _no_supervisor_left  # autouse: kills leftovers

from snapstore.errors import EXIT_CHECKPOINTED
from snapstore.interval import MAX_INTERVAL_S, SAFETY, AutoInterval
from snapstore.metadata import AwsSpot, AzureScheduledEvents, Notice, Poller, detect


@pytest.fixture
def fake() -> Iterator[FakeMetadata]:
    with FakeMetadata() as server:
        yield server


def _records(env: SnapEnv, task: str = "job") -> list[dict[str, Any]]:
    found = sorted((env.root / ".attempts" / task).glob("[0-9]*.json"))
    return [json.loads(p.read_text()) for p in found]


def _stderr_has(line: Line, text: str, timeout: float = 60) -> None:
    def seen() -> bool:
        assert line.proc is not None
        if line.proc.poll() is not None and text not in line.stderr():
            raise AssertionError(f"snapstore run exited without {text!r}:\n{line.stderr()}")
        return text in line.stderr()

    wait_for(seen, timeout, repr(text))


# --------------------------------------------------------------------------------------------
# the clients (no CRIU)


@pytest.mark.timeout(60)
def test_aws_rebalance_is_an_early_notice_reported_once(fake: FakeMetadata) -> None:
    aws = AwsSpot(fake.url)
    assert aws.check() is None
    assert fake.requests["GET /latest/meta-data/events/recommendations/rebalance"] == 1
    fake.aws_rebalance()
    early = aws.check()
    assert early is not None and early.early and early.source == "aws"
    assert "rebalance recommendation" in early.detail
    assert aws.check() is None, "a rebalance recommendation is reported once"
    fake.aws_notice(in_seconds=110)
    final = aws.check()
    assert final is not None and not final.early and "instance-action" in final.detail

    seen: list[Notice] = []
    errors: list[str | None] = []
    fake.notice = None
    poller = Poller(AwsSpot(fake.url), 0.05, seen.append, errors.append)
    poller.start()
    try:
        wait_for(lambda: len(seen) == 1, 10, "the early notice")
        assert seen[0].early
        fake.aws_notice()
        wait_for(lambda: len(seen) == 2, 10, "the final notice after the early one")
    finally:
        poller.stop()
    assert not seen[1].early and errors == []


@pytest.mark.timeout(60)
def test_azure_scheduled_events(fake: FakeMetadata, monkeypatch: pytest.MonkeyPatch) -> None:
    azure = AzureScheduledEvents(fake.url)
    assert azure.probe()
    assert azure.check() is None
    fake.azure_event("Freeze")  # a pause of seconds: not a reason to checkpoint
    fake.azure_event("Preempt", resources=["another-vm"])  # an availability set's neighbour
    assert azure.check() is None
    event_id = fake.azure_event("Preempt", in_seconds=30)
    notice = azure.check()
    assert notice is not None and notice.source == "azure" and not notice.early
    assert notice.event_id == event_id and "Preempt" in notice.detail
    assert notice.stop_at is not None and 25 < notice.stop_at - time.monotonic() <= 31
    assert fake.requests["POST /metadata/scheduledevents?api-version=2020-07-01"] == 0
    azure.acknowledge(notice)
    assert [a[0] for a in fake.acked] == [event_id]
    assert all(e["EventId"] != event_id for e in fake.azure_events)

    # auto-detection: only Azure's service answers
    with FakeMetadata() as dead:
        port = dead.port
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("SNAPSTORE_AZURE_METADATA_ENDPOINT", fake.url)
    assert isinstance(detect(), AzureScheduledEvents)


def test_auto_interval_fits_the_final_checkpoint_in_the_budget() -> None:
    budget = 27.0
    planner = AutoInterval(budget)
    assert planner.first().interval == pytest.approx(13.5)
    gib = 1 << 30
    # a full checkpoint of 4 GiB stored that took 60 s: it cannot fit 27 s, keep measuring
    plan = planner.after(0.0, 4 * gib, 4 * gib, 60.0)
    assert plan.interval == pytest.approx(13.5) and "measuring" in plan.reason
    # 200 MiB changed in the 100 s since: churn 2 MiB/s
    plan = planner.after(100.0, 200 << 20, 4 * gib, 5.0)
    a, b = planner._model()
    churn = (200 << 20) / 100.0
    assert a >= 0 and b > 0
    predicted = a + b * churn * plan.interval
    assert predicted == pytest.approx(SAFETY * budget, rel=1e-6), plan.reason
    assert "churn 2.1 MB/s" in plan.reason

    # a task whose whole memory checkpoints well inside the window: rare checkpoints
    small = AutoInterval(108.0)
    small.after(0.0, 50 << 20, 50 << 20, 2.0)
    plan = small.after(30.0, 5 << 20, 50 << 20, 0.5)
    assert plan.interval == MAX_INTERVAL_S and "even a full checkpoint fits" in plan.reason

    # a task that changes faster than checkpoints can go: warn, but keep checkpointing
    fast = AutoInterval(9.0)
    fast.after(0.0, 4 * gib, 4 * gib, 60.0)
    plan = fast.after(70.0, 3 * gib, 4 * gib, 45.0)
    assert plan.reason.startswith("warning:") and plan.interval >= 90.0


# --------------------------------------------------------------------------------------------
# the supervisor, end to end


@pytest.mark.criu
@pytest.mark.timeout(300)
def test_rebalance_checkpoints_early_and_the_final_uploads_only_the_change(
    snap_env: SnapEnv, tasks: Tasks, fake: FakeMetadata, tmp_path: Path
) -> None:
    exit_at = 900
    line = Line(
        snap_env,
        tmp_path,
        options=["--provider", "aws", "--poll-interval", "0.2"],
        exit_at=exit_at,
        exit_code=7,
        mib=64,
        extra_env=fake.env,
    )
    line.start()
    pid = line.task_pid()
    line.wait_counts(20)
    fake.aws_rebalance()
    _stderr_has(line, "early snapshot 1 committed")
    assert "rebalance recommendation" in line.stderr()
    before = len(read_counts(line.out))
    line.wait_counts(before + 10)  # the task kept running after the early checkpoint
    assert line.proc is not None and line.proc.poll() is None

    fake.aws_notice()
    code = line.wait()
    stderr = line.stderr()
    assert code == EXIT_CHECKPOINTED, stderr
    assert _gone(pid)
    manifests = _manifests(snap_env)
    assert sorted(manifests) == [1, 2]
    assert manifests[1]["options"]["leave_running"] and not manifests[2]["options"]["leave_running"]
    at_dump = read_counts(line.out)
    assert _consecutive(at_dump)

    (first,) = _records(snap_env)
    assert first["outcome"] == "checkpointed" and first["exit_code"] == EXIT_CHECKPOINTED
    assert first["how"] == "started" and first["notice"]["source"] == "aws"
    kinds = [(cp["kind"], cp["snapshot"]) for cp in first["checkpoints"]]
    assert kinds == [("early", 1), ("final", 2)]
    early, final = first["checkpoints"]
    if snap_env.kind != "dir":  # the chunked layout stores only what changed
        assert final["uploaded"] < early["uploaded"] / 4, (early, final)
    assert final["cpu_s"] > 0 and final["wall_s"] >= early["wall_s"] > 0
    assert "summary: task 'job' attempt 1" in stderr and "checkpointed as snapshot 2" in stderr

    fake.notice = None
    fake.rebalance = None
    snap_env.move()
    _resume_to_the_end(line, tasks, pid, len(at_dump), exit_at)

    first, second = _records(snap_env)
    assert second["how"] == "restored" and second["restored_from"] == 2
    assert second["cpu_carried_s"] == pytest.approx(final["cpu_s"], abs=1e-3)
    assert second["outcome"] == "finished" and second["task_status"] == 7
    assert second["restore"]["seconds"] > 0
    stderr = line.stderr()
    assert "summary: task 'job' attempt 2" in stderr, stderr
    assert "resumed from snapshot 2, finished with status 7" in stderr
    assert "1 reclaim(s) survived" in stderr

    report = snap_env.run("report", "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    (job,) = data["tasks"]
    assert job["task"] == "job" and job["finished"] and job["task_status"] == 7
    assert job["attempts"] == 2 and job["reclaims"] == 1 and job["restores"] == 1
    assert job["cpu_saved_s"] == pytest.approx(final["cpu_s"], abs=1e-3)
    assert job["bytes_uploaded"] == early["uploaded"] + final["uploaded"]
    assert data["total"]["reclaims"] == 1 and data["total"]["finished_tasks"] == 1

    text = snap_env.run("report")
    assert text.returncode == 0 and "finished (7)" in text.stdout, text.stdout
    shown = snap_env.run("show", "--task", "job")
    assert shown.returncode == 0, shown.stderr
    assert "no committed snapshot" in shown.stdout  # finished: its snapshots are gone
    assert "checkpointed (aws)" in shown.stdout and "finished (7)" in shown.stdout
    assert "restored 2" in shown.stdout and "early 1" in shown.stdout
    as_json = json.loads(snap_env.run("show", "--task", "job", "--json").stdout)
    assert [r["outcome"] for r in as_json["attempts"]] == ["checkpointed", "finished"]


@pytest.mark.criu
@pytest.mark.timeout(180)
def test_azure_preempt_is_acknowledged_after_the_commit(
    dir_env: SnapEnv, tasks: Tasks, fake: FakeMetadata, tmp_path: Path
) -> None:
    exit_at = 400
    line = Line(
        dir_env,
        tmp_path,
        options=["--provider", "azure", "--poll-interval", "0.2", "--eager"],
        exit_at=exit_at,
        exit_code=7,
        mib=8,
        extra_env=fake.env,
    )
    fake.ack_hook = lambda: sorted(_manifests(dir_env))
    line.start()
    pid = line.task_pid()
    line.wait_counts(10)
    fake.azure_event("Preempt", resources=["another-vm"])
    event_id = fake.azure_event("Preempt", in_seconds=30)
    code = line.wait()
    stderr = line.stderr()
    assert code == EXIT_CHECKPOINTED, stderr
    assert f"scheduled event Preempt {event_id}" in stderr and "window 30 s" in stderr
    assert [(a[0], a[2]) for a in fake.acked] == [(event_id, [1])], (
        "acknowledged once, after snapshot 1 was committed"
    )
    at_dump = read_counts(line.out)
    _resume_to_the_end(line, tasks, pid, len(at_dump), exit_at)


@pytest.mark.criu
@pytest.mark.timeout(180)
def test_auto_checkpoint_interval(dir_env: SnapEnv, tasks: Tasks, tmp_path: Path) -> None:
    line = Line(
        dir_env,
        tmp_path,
        options=["--provider", "none", "--checkpoint-interval", "auto", "--window", "10"],
        exit_at=100_000,
        exit_code=7,
        mib=16,
    )
    line.start()
    pid = line.task_pid()
    _stderr_has(line, "auto checkpoint interval: first checkpoint in 5 s")
    _stderr_has(line, "periodic snapshot 2 committed", timeout=90)
    _stderr_has(line, "checkpoint model")  # the interval after the second one is computed
    stderr = line.stderr()
    assert "churn" in stderr and "final budget 7.2 s" in stderr, stderr
    assert line.proc is not None
    line.proc.send_signal(signal.SIGTERM)
    assert line.wait() == EXIT_CHECKPOINTED, line.stderr()
    tasks.adopt(pid)
    (record,) = _records(dir_env)
    kinds = [cp["kind"] for cp in record["checkpoints"]]
    assert kinds[:2] == ["periodic", "periodic"] and kinds[-1] == "final"


def test_report_on_an_empty_root_and_bad_usage(dir_env: SnapEnv) -> None:
    dir_env.root.mkdir()
    empty = dir_env.run("report", "--json")
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout)["tasks"] == []
    missing = subprocess.run(
        [sys.executable, "-m", "snapstore", "report", "--root", str(dir_env.root / "nope")],
        capture_output=True,
        text=True,
        env=dir_env.env,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.criu
@pytest.mark.timeout(180)
def test_check_measures_the_root_and_tells_what_fits(snap_env: SnapEnv, tasks: Tasks) -> None:
    fits = snap_env.run("check", "--size", "64M", "--sample-mib", "16", "--window", "120", "--json")
    assert fits.returncode == 0, fits.stderr
    r = json.loads(fits.stdout)
    assert r["size"] == 64 << 20 and r["sample_bytes"] == 16 << 20
    assert r["new_rate"] > 0 and r["same_rate"] > 0 and r["full_fits"]
    assert r["deadline"] == pytest.approx(108.0)
    assert "new memory: 17 MB in" in fits.stderr, "progress is shown"
    assert not any(p.name.startswith(".check-") for p in snap_env.root.iterdir()), "scratch left"

    hopeless = snap_env.run("check", "--size", "4T", "--sample-mib", "8", "--window", "30")
    assert hopeless.returncode == 4, hopeless.stderr
    assert "full" in hopeless.stdout and "does NOT fit" in hopeless.stdout

    task = tasks.start(mib=32)
    live = snap_env.run(
        "check", "--pid", str(task.pid), "--sample-mib", "8", "--measure", "1", "--json"
    )
    assert live.returncode in (0, 3, 4), live.stderr
    r = json.loads(live.stdout)
    assert r["size"] > 32 << 20, "the task's resident memory"
    assert r["churn_rate"] is not None and r["churn_rate"] >= 0
    assert "process" in r["sample_from"] and "over 1 s" in r["churn_from"]

    for bad in (
        ("check", "--size", "lots"),
        ("check", "--size", "1G", "--churn", "2"),
        ("check", "--pid", "999999999"),
        ("check",),
        ("check", "--size", "1G", "--window", "1", "--deadline-margin", "1"),
    ):
        result = snap_env.run(*bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert "Traceback" not in result.stderr
