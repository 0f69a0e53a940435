"""Shared machinery of the benchmarks: results, statistics, machine facts, output, subprocesses.

Every figure is recorded raw (one record per run) in :class:`Results`; summaries are the median of
the runs with min and max, and ratios are computed pair by pair inside a run (tool in run *i*
against the reference in run *i*), then summarised the same way, so a machine that is slow during
one run skews neither side. Higher is better for every primary figure (MB/s, operations/s), so a
ratio above 1 means "faster than the reference". MB is 10**6 bytes, MiB 2**20.

Caveats: ``drop_page_cache`` needs root (it writes ``/proc/sys/vm/drop_caches``); callers say what
they did instead when it fails. Subprocesses always run with a timeout.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

__all__ = [
    "Measurement",
    "ProxyProcess",
    "Results",
    "Steps",
    "SummaryRow",
    "drop_page_cache",
    "last_line",
    "machine_info",
    "mb_per_s",
    "run_cmd",
    "timed",
    "timestamp",
    "tool_versions",
]

_MB = 1e6


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_cmd(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd`` with a bounded timeout, capturing text output.

    A timeout becomes a ``CompletedProcess`` with return code 124 and a message in ``stderr``;
    a missing program becomes return code 127. With ``check``, a non-zero exit raises
    ``RuntimeError`` naming the command and the last line of its error output.
    """
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(list(cmd), 124, "", f"timed out after {timeout:g} s")
    except FileNotFoundError as exc:
        proc = subprocess.CompletedProcess(list(cmd), 127, "", str(exc))
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {last_line(proc)}")
    return proc


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The last non-empty line of a finished command's stderr (or stdout), for messages."""
    for text in (proc.stderr, proc.stdout):
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return f"exit status {proc.returncode}"


def drop_page_cache() -> bool:
    """Writes back dirty pages and drops the kernel page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _read_first(path: str, pattern: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(pattern, text, re.MULTILINE)
    return m.group(1).strip() if m else None


def machine_info() -> dict[str, Any]:
    mem_kb = _read_first("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "os": _read_first("/etc/os-release", r'^PRETTY_NAME="?([^"\n]*)'),
        "cpu_model": _read_first("/proc/cpuinfo", r"^model name\s*:\s*(.*)$"),
        "cpus": os.cpu_count(),
        "memory_gib": round(int(mem_kb) / 2**20, 1) if mem_kb else None,
        "python": sys.version.split()[0],
    }


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str | None]:
    """Versions of everything whose speed the figures depend on (None: not installed)."""
    versions: dict[str, str | None] = {
        name: _pkg_version(name) for name in ("fusionfs", "boto3", "botocore", "pyfuse3", "trio")
    }
    for name, cmd, pattern in (
        ("node", ["node", "--version"], r"v?(\S+)"),
        ("s3fs", ["s3fs", "--version"], r"V(\S+)"),
        ("rclone", ["rclone", "version"], r"rclone v(\S+)"),
    ):
        if shutil.which(cmd[0]) is None:
            versions[name] = None
            continue
        proc = run_cmd(cmd, timeout=20)
        m = re.search(pattern, proc.stdout or "")
        versions[name] = m.group(1) if m else None
    git = run_cmd(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"], timeout=10
    )
    versions["git_commit"] = git.stdout.strip() if git.returncode == 0 else None
    return versions


@dataclass
class Measurement:
    """One raw figure: ``value`` (higher is better, in ``unit``) for one tool in one run."""

    scenario: str
    tool: str
    run: int
    value: float
    unit: str
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class SummaryRow:
    scenario: str
    tool: str
    unit: str
    median: float
    low: float
    high: float
    runs: int
    extras: dict[str, float]
    ratios: dict[str, tuple[float, float, float]]


@dataclass
class Results:
    """Every raw figure of a run plus what could not be measured and why."""

    name: str
    settings: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)  # extra Markdown blocks, after the table
    started: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))

    def add(self, m: Measurement) -> None:
        self.measurements.append(m)

    def mark_unavailable(self, scenario: str, tool: str, reason: str) -> None:
        self.unavailable.setdefault(f"{scenario} / {tool}", reason)

    def scenarios(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.measurements:
            seen.setdefault(m.scenario, None)
        for key in self.unavailable:
            seen.setdefault(key.split(" / ")[0], None)
        return list(seen)

    def summary(self) -> list[SummaryRow]:
        rows = []
        for scenario in self.scenarios():
            by_tool: dict[str, list[Measurement]] = {}
            for m in self.measurements:
                if m.scenario == scenario:
                    by_tool.setdefault(m.tool, []).append(m)
            for tool, ms in by_tool.items():
                values = [m.value for m in ms]
                extras: dict[str, float] = {}
                for key in ms[0].extras:
                    xs = [m.extras[key] for m in ms if key in m.extras]
                    extras[key] = statistics.median(xs)
                ratios = {}
                for ref in self.references.get(scenario, []):
                    # A reference is a tool of the same scenario, or "scenario::tool".
                    ref_scenario, _, ref_tool = ref.rpartition("::")
                    ref_scenario = ref_scenario or scenario
                    if (ref_scenario, ref_tool) == (scenario, tool):
                        continue
                    ref_by_run = {
                        m.run: m.value
                        for m in self.measurements
                        if m.scenario == ref_scenario and m.tool == ref_tool
                    }
                    if not ref_by_run:
                        continue
                    pairs = [m.value / ref_by_run[m.run] for m in ms if ref_by_run.get(m.run)]
                    if pairs:
                        ratios[ref] = (statistics.median(pairs), min(pairs), max(pairs))
                rows.append(
                    SummaryRow(
                        scenario,
                        tool,
                        ms[0].unit,
                        statistics.median(values),
                        min(values),
                        max(values),
                        len(values),
                        extras,
                        ratios,
                    )
                )
        return rows

    # -- output --------------------------------------------------------------------------

    def _table_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["scenario", "tool", "median", "min", "max", "unit", "runs", "ratios", "details"]
        body = []
        for row in self.summary():
            ratios = "; ".join(
                f"{_fmt(med)}x {ref} ({_fmt(lo)}-{_fmt(hi)})"
                for ref, (med, lo, hi) in row.ratios.items()
            )
            details = ", ".join(f"{k} {_fmt(v)}" for k, v in row.extras.items())
            body.append(
                [
                    row.scenario,
                    row.tool,
                    _fmt(row.median),
                    _fmt(row.low),
                    _fmt(row.high),
                    row.unit,
                    str(row.runs),
                    ratios,
                    details,
                ]
            )
        for key, reason in self.unavailable.items():
            scenario, tool = key.split(" / ", 1)
            body.append([scenario, tool, "-", "-", "-", "", "0", "", f"not available: {reason}"])
        order = {s: i for i, s in enumerate(self.scenarios())}
        body.sort(key=lambda r: order.get(r[0], 99))
        return header, body

    def rich_table(self) -> Table:
        header, body = self._table_rows()
        table = Table(title=f"{self.name}: median of runs (min-max)", show_lines=False)
        for col in header:
            table.add_column(
                col, overflow="fold", justify="right" if col in {"median", "min", "max"} else "left"
            )
        for row in body:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        header, body = self._table_rows()
        lines = [f"# {self.name} results ({self.started})", ""]
        lines += [f"Settings: `{json.dumps(self.settings, sort_keys=True)}`", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in body:
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
        for section in self.sections:
            lines += ["", section.rstrip("\n")]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "started": self.started,
            "settings": self.settings,
            "machine": machine_info(),
            "versions": tool_versions(),
            "measurements": [asdict(m) for m in self.measurements],
            "summary": [asdict(r) for r in self.summary()],
            "unavailable": self.unavailable,
            "notes": self.notes,
            "sections": self.sections,
            "extra": self.extra,
        }

    def write(self, out_dir: Path, console: Console) -> None:
        from benchmarks.plots import write_plots

        out_dir.mkdir(parents=True, exist_ok=True)
        report = self.to_json()
        (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "results.md").write_text(self.markdown())
        console.print(self.rich_table())
        for section in self.sections:
            console.print(section, markup=False, highlight=False)
        for note in self.notes:
            console.print(f"[dim]note:[/dim] {note}")
        console.print(f"results written to {out_dir}/results.json and results.md")
        try:
            plots = write_plots(report, out_dir, lambda line: console.print(line, markup=False))
        except Exception as exc:  # a plot must never cost the results
            console.print(f"plots failed: {exc!r}", markup=False)
            plots = []
        if plots:
            console.print(f"plots: {', '.join(str(p) for p in plots)}", markup=False)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


class ProxyProcess:
    """``python -m benchmarks.proxy`` in a process of its own (so it does not share the
    benchmark's GIL), in front of ``upstream``; stopped with SIGTERM, its counters kept."""

    def __init__(self, upstream: tuple[str, int], args: Sequence[str]) -> None:
        self.upstream = upstream
        self.args = list(args)
        self.endpoint_url = ""
        self.stats: dict[str, Any] = {}
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ProxyProcess:
        upstream = f"{self.upstream[0]}:{self.upstream[1]}"
        cmd = [sys.executable, "-m", "benchmarks.proxy", "--upstream", upstream]
        self._proc = subprocess.Popen(
            cmd + self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # the proxy prints its address first
        m = re.match(r"proxy (http://\S+) ", line)
        if not m:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the proxy did not start: {line.strip() or 'no output'}")
        self.endpoint_url = m.group(1)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
        for line in (out or "").splitlines():
            if line.startswith("stats "):
                with contextlib.suppress(ValueError):
                    self.stats = json.loads(line[6:])


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process (all its threads) has used so far; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by named processes while a block runs, plus this process's own
    (``self``) and that of the child processes it waited for meanwhile (``children``, with
    their own waited-for descendants: ``snapstore dump`` and its CRIU):
    ``with CpuMeter({"server": pid}) as cpu: ...``, then ``cpu.used``. A named process missing
    at either end is left out."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.used: dict[str, float] = {}
        self._start: dict[str, float | None] = {}

    @staticmethod
    def _own() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, t.children_user + t.children_system

    def __enter__(self) -> CpuMeter:
        self._start = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        self._start["self"], self._start["children"] = self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        for name, pid in self.pids.items():
            begin, end = self._start.get(name), process_cpu_s(pid)
            if begin is not None and end is not None:
                self.used[name] = end - begin
        own, children = self._own()
        self.used["self"] = own - (self._start["self"] or 0.0)
        used_children = children - (self._start["children"] or 0.0)
        if used_children > 0:
            self.used["children"] = used_children

    def per_gib(self, nbytes: int, labels: Mapping[str, str] | None = None) -> dict[str, float]:
        """``cpu_per_gib`` of what this meter measured."""
        return cpu_per_gib(self.used, nbytes, labels)


def cpu_per_gib(
    used: Mapping[str, float], nbytes: int, labels: Mapping[str, str] | None = None
) -> dict[str, float]:
    """``{"cpu_" + label: CPU seconds per GiB of nbytes}`` for a measurement's extras, from CPU
    seconds by process name; ``labels`` renames (``{"self": "reader"}``)."""
    labels = labels or {}
    if nbytes <= 0:
        return {}
    return {
        f"cpu_{labels.get(name, name)}": round(v * (1 << 30) / nbytes, 3)
        for name, v in used.items()
    }


def cpu_parts(row: SummaryRow) -> str:
    """A row's ``cpu_*`` extras as ``name value, ...`` (for the CPU notes)."""
    return ", ".join(f"{k[4:]} {v:.2f}" for k, v in row.extras.items() if k.startswith("cpu_"))


def cpu_budget_note(
    results: Results,
    scenario: str,
    tool: str,
    reference: str,
    target: float,
    cores: int,
    mine: Sequence[str],
    others: Sequence[str],
) -> str | None:
    """One line: how much CPU per GiB ``tool`` could spend in ``scenario`` if it were to reach
    ``target`` x the reference's throughput on ``cores`` cores, against what it used.

    ``mine`` are the extras that are the tool's own CPU (``cpu_daemon``...), ``others`` what the
    rest of the machine spent meanwhile (``cpu_server``...). Medians over the runs. A bound that
    holds whatever the bottleneck: a read of 1 GiB cannot take less than its CPU time / cores."""
    rows = {r.tool: r for r in results.summary() if r.scenario == scenario}
    ours, ref = rows.get(tool), rows.get(reference)
    if ours is None or ref is None or ref.median <= 0:
        return None
    if not all(k in ours.extras for k in mine):
        return None
    gib_mb = (1 << 30) / 1e6
    seconds = gib_mb / (target * ref.median)  # per GiB at the target throughput
    budget = cores * seconds
    rest = sum(ours.extras.get(k, 0.0) for k in others)
    own = sum(ours.extras[k] for k in mine)
    return (
        f"{scenario}, CPU seconds per GiB (medians): {reference} {cpu_parts(ref)}; {tool} "
        f"{cpu_parts(ours)}. {target:g}x {reference} ({target * ref.median:.0f} MB/s) on {cores} "
        f"cores allows at most {budget:.2f} CPU-s per GiB in all; the rest of the machine took "
        f"{rest:.2f} during {tool}'s run, leaving {budget - rest:.2f} for {tool}, which used "
        f"{own:.2f}"
    )


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / _MB if seconds > 0 else float("inf")


class _StepElapsed(ProgressColumn):
    """Seconds since the current step began (the task's ``step_t0`` field)."""

    def render(self, task: Task) -> Text:
        t0 = task.fields.get("step_t0")
        if t0 is None:
            return Text("")
        return Text(f"(this step {time.monotonic() - t0:.0f} s)", style="dim")


class Steps:
    """What a benchmark is doing now (scenario, tool, run) and for how long.

    On a terminal: a rich progress bar with the current step, steps done out of all, the time
    since the start and the time in the current step. Otherwise (a pipe, a log file): one plain
    line per step, ``[mm:ss] name: step``, and no cursor movement, so logs stay readable.
    ``log`` prints a line above the bar (or plainly)."""

    def __init__(self, console: Console, name: str, total: int) -> None:
        self.console = console
        self.name = name
        self.total = total
        self._start = time.monotonic()
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> Steps:
        self._start = time.monotonic()
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn(f"[bold]{self.name}[/bold] {{task.description}}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                _StepElapsed(),
                console=self.console,
                transient=False,
                refresh_per_second=2,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "setting up", total=self.total, step_t0=time.monotonic()
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self._start)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def step(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text, step_t0=time.monotonic())
        else:
            self.console.print(f"[{self.elapsed()}] {self.name}: {text}", markup=False)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def log(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            self.console.print(text)
