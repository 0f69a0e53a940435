"""Snakemake (9.x) with its working directory and ``.snakemake`` on the mount, on every store.

The workflow (``snakemake/Snakefile``) makes four samples, squares each and sums them: nine
jobs in three levels. It runs twice: with Snakemake running the jobs itself, two at once, and
with the cluster-generic executor plugin dispatching them to three "nodes", three mounts of the
same store each with its own cache (``snakemake/cluster_submit.py``, round-robin), so that jobs
read what another node wrote and Snakemake, on node 0, sees outputs and job markers that other
nodes closed: the close-to-open consistency of S-CONS-2, within ``--metadata-ttl``, which
``--latency-wait`` covers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
from compat_support import CompatMount, run

pytestmark = pytest.mark.mount

_HERE = Path(__file__).resolve().parent / "snakemake"
_LENGTH = {"a": 10, "b": 200, "c": 3000, "d": 0}


def _snakemake(*args: str, cwd: Path, env: dict[str, str], timeout: float, m: CompatMount) -> str:
    argv = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(cwd / "Snakefile"),
        "--directory",
        str(cwd),
        "--show-failed-logs",
        "--printshellcmds",
        *args,
    ]
    result = run(argv, cwd=cwd, env=env, timeout=timeout, mount=m)
    return result.stdout + result.stderr


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}


def _check_outputs(workdir: Path) -> dict[str, tuple[str, str]]:
    """The summary's sums are right; returns sample -> (node of its input, node of the job)."""
    lines = (workdir / "results/summary.txt").read_text().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("summary node="), lines
    nodes = {}
    for sample, line in zip(sorted(_LENGTH), lines, strict=False):
        got = re.fullmatch(rf"{sample}\.txt (\d+) from=(\S+) node=(\S+)", line)
        assert got, line
        n = _LENGTH[sample]
        assert int(got[1]) == n * (n + 1) * (2 * n + 1) // 6, line
        nodes[sample] = (got[2], got[3])
    return nodes


def _prepare(workdir: Path) -> None:
    workdir.mkdir()
    shutil.copy(_HERE / "Snakefile", workdir / "Snakefile")


def _nothing_to_do(out: str) -> bool:
    return "Nothing to be done" in out


@pytest.mark.timeout(300)
def test_snakemake_local_jobs(compat_mount: CompatMount, tmp_path: Path) -> None:
    """Snakemake runs the workflow on the mount with ``--cores 2``; the outputs are right;
    nothing is left to do, and after a cold remount still nothing (the outputs, their times and
    ``.snakemake``'s records came back)."""
    m = compat_mount
    env = _env(tmp_path)
    workdir = m.path / "wf"
    _prepare(workdir)
    _snakemake("--cores", "2", cwd=workdir, env=env, timeout=180, m=m)
    assert set(_check_outputs(workdir).values()) == {("local", "local")}
    assert _nothing_to_do(
        _snakemake("--cores", "1", "--dry-run", cwd=workdir, env=env, timeout=60, m=m)
    )
    m.remount_cold()
    out = _snakemake("--cores", "1", "--dry-run", cwd=workdir, env=env, timeout=60, m=m)
    assert _nothing_to_do(out), out


@pytest.mark.timeout(420)
def test_snakemake_cluster_generic_on_three_nodes(
    compat_mount: CompatMount, tmp_path: Path
) -> None:
    """The cluster-generic executor submits each job to the next of three mounts of the store
    (each its own cache), three jobs at a time: jobs read inputs that another node wrote, and
    Snakemake on node 0 sees their outputs and ``.jobfinished`` markers; the sums are right."""
    m = compat_mount
    nodes = [m.path, m.add_node(), m.add_node()]
    state = tmp_path / "submit"
    state.mkdir()
    env = {
        **_env(tmp_path),
        "COMPAT_NODES": os.pathsep.join(str(p) for p in nodes),
        "COMPAT_SUBMIT_DIR": str(state),
    }
    workdir = m.path / "wf"
    _prepare(workdir)
    try:
        _snakemake(
            "--executor",
            "cluster-generic",
            "--cluster-generic-submit-cmd",
            f"{sys.executable} {_HERE / 'cluster_submit.py'}",
            "--jobs",
            "3",
            "--latency-wait",
            "30",
            "--seconds-between-status-checks",
            "1",
            cwd=workdir,
            env=env,
            timeout=300,
            m=m,
        )
    finally:
        for pid_file in state.glob("job*.pid"):  # a job still running is ended: the test failed
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    logs = sorted(state.glob("job*-node*.log"))
    assert len(logs) == 9, [p.name for p in logs]
    assert {p.name.split("-")[1] for p in logs} == {"node0.log", "node1.log", "node2.log"}
    made = _check_outputs(workdir)
    assert any(origin != node for origin, node in made.values()), made  # crossed machines
    summary_node = (workdir / "results/summary.txt").read_text().splitlines()[-1]
    assert summary_node.startswith("summary node=node"), summary_node
    for node in nodes[1:]:  # every node sees the same results
        assert _check_outputs(node / "wf") == made
    m.remount_cold()
    assert _check_outputs(workdir) == made
