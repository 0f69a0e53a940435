"""PNG plots of a benchmark's results, drawn from the summary rows (median with min-max bars).

Which plots a results dict yields depends on the rows it has; each is written only when its rows
are there:

- ``read_throughput.png`` (fs): read MB/s against concurrency (direct boto3 ranged GETs with 1-16
  threads; 1, 2, 4 files read at once through fusionfs) and against fusionfs's ``--chunk-size``.
- ``checkpoint_time.png`` (snap): seconds until a checkpoint is durable against the task's memory
  size: snapstore through fusionfs (full and incremental) beside the local-disk dump, the direct
  upload, the naive sum and the machine's ceiling (cores and link), with the spot windows (GCP's
  30 s, AWS's 120 s) drawn where the times come near them.
- ``resume_latency.png`` (snap): time to resume after a restore on an empty cache, lazy against
  eager, against the first-byte latency the proxy added.

matplotlib is optional (the ``bench`` extra): without it :func:`write_plots` says so in one line
and returns nothing, and the JSON and Markdown results are written all the same. Pure apart from
the files it writes: the input is the dict ``Results.to_json()`` returns (only ``summary`` is
read), so tests can hand it a small fake.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MISSING_MATPLOTLIB",
    "WINDOWS",
    "checkpoint_sizes",
    "series",
    "window_lines",
    "write_plots",
]

MISSING_MATPLOTLIB = (
    "plots skipped: matplotlib is not installed (pip install -e '.[bench]'); "
    "results.json and results.md are written anyway"
)

Row = Mapping[str, Any]
Point = tuple[float, float, float, float]  # x, median, min, max

# row names shared with fs.py and snap.py (kept as literals here: this module imports neither)
_SWEEP_CHUNK = "read vs chunk size"
_SWEEP_THREADS = "read vs threads"
_SWEEP_READERS = "read vs readers"
_DUMP_TOOLS = (
    "criu dump + fsync, local disk",
    "direct upload, multipart",
    "naive: dump + fsync + upload (multipart)",
    "snapstore dump via fusionfs",
    "snapstore dump via fusionfs, incremental (10 % changed)",
    "ceiling: the machine's cores and the link",
)
#: reclamation windows drawn on the checkpoint plot: (seconds, label)
WINDOWS = ((30.0, "GCP preemption notice, 30 s"), (120.0, "AWS spot notice, 120 s"))
_DUMP_SCENARIO = re.compile(r"^dump (\d+) (MiB|GiB)$")
_LATENCY_SCENARIO = "resume vs latency"


def checkpoint_sizes(scenario: str) -> int | None:
    """The task size in MiB of a ``dump <n> MiB|GiB`` scenario, else None."""
    m = _DUMP_SCENARIO.match(scenario)
    if not m:
        return None
    return int(m.group(1)) * (1024 if m.group(2) == "GiB" else 1)


def series(
    summary: Sequence[Row],
    x_of: Callable[[Row], float | None],
    name_of: Callable[[Row], str | None],
) -> dict[str, list[Point]]:
    """Groups summary rows into named series of (x, median, min, max), sorted by x; rows for
    which ``x_of`` or ``name_of`` answer None are left out."""
    out: dict[str, list[Point]] = {}
    for row in summary:
        x, name = x_of(row), name_of(row)
        if x is None or name is None:
            continue
        out.setdefault(name, []).append(
            (float(x), float(row["median"]), float(row["low"]), float(row["high"]))
        )
    for points in out.values():
        points.sort()
    return out


def _extra(key: str) -> Callable[[Row], float | None]:
    def get(row: Row) -> float | None:
        value = (row.get("extras") or {}).get(key)
        return None if value is None else float(value)

    return get


def _draw(
    ax: Any, data: dict[str, list[Point]], style: Callable[[str], dict[str, Any]] | None = None
) -> None:
    for name, points in data.items():
        xs = [p[0] for p in points]
        med = [p[1] for p in points]
        err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
        kwargs: dict[str, Any] = {"marker": "o", "capsize": 3}
        kwargs.update(style(name) if style else {})
        ax.errorbar(xs, med, yerr=err, label=name, **kwargs)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    if data:
        ax.legend(fontsize="small")


def _log2_axis(ax: Any, data: dict[str, list[Point]]) -> None:
    """A base-2 log x axis labelled with the measured x values as plain numbers."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    xs = sorted({p[0] for points in data.values() for p in points})
    if not xs:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _read_plot(plt: Any, summary: Sequence[Row], path: Path, title: str) -> bool:
    def concurrency_name(row: Row) -> str | None:
        if row["scenario"] == _SWEEP_THREADS:
            return "direct boto3, ranged GETs (x = threads)"
        if row["scenario"] == _SWEEP_READERS:
            return "fusionfs, files read at once (x = files)"
        return None

    def concurrency_x(row: Row) -> float | None:
        return _extra("threads")(row) or _extra("readers")(row)

    conc = series(summary, concurrency_x, concurrency_name)
    chunk = series(
        summary,
        _extra("chunk_kib"),
        lambda r: "fusionfs cold sequential read" if r["scenario"] == _SWEEP_CHUNK else None,
    )
    if not conc and not chunk:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _draw(left, conc)
    _log2_axis(left, conc)
    left.set_xlabel("concurrency (threads / files at once)")
    left.set_ylabel("MB/s (median, min-max)")
    left.set_title("read throughput against concurrency")
    _draw(right, chunk)
    _log2_axis(right, chunk)
    right.set_xlabel("fusionfs --chunk-size (KiB)")
    right.set_ylabel("MB/s (median, min-max)")
    right.set_title("read throughput against chunk size")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def window_lines(data: Mapping[str, Sequence[Point]]) -> list[tuple[float, str]]:
    """The windows worth drawing: those the slowest time reaches a third of (a 120 s line over
    a few seconds of dumps would flatten them)."""
    top = max((p[3] for points in data.values() for p in points), default=0.0)
    return [(w, label) for w, label in WINDOWS if top >= w / 3]


def _checkpoint_plot(plt: Any, summary: Sequence[Row], path: Path, title: str) -> bool:
    data = series(
        summary,
        lambda r: checkpoint_sizes(str(r["scenario"])),
        lambda r: str(r["tool"]) if r["tool"] in _DUMP_TOOLS else None,
    )
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (seconds, label) in enumerate(window_lines(data)):
        ax.axhline(seconds, color="grey", linestyle=("--", ":")[i % 2], linewidth=1, label=label)
    _draw(ax, data)
    _log2_axis(ax, data)
    ax.set_xlabel("task memory (MiB)")
    ax.set_ylabel("seconds until durable (median, min-max)")
    ax.set_title("checkpoint time against process memory size")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _latency_plot(plt: Any, summary: Sequence[Row], path: Path, title: str) -> bool:
    def name(row: Row) -> str | None:
        scenario = str(row["scenario"])
        if not scenario.startswith(_LATENCY_SCENARIO):
            return None
        size = scenario[len(_LATENCY_SCENARIO) :].strip(" ,")
        kind = str(row["tool"]).split(" @ ")[0]
        return f"{kind} ({size})" if size else kind

    data = series(summary, _extra("latency_ms"), name)
    if not data:
        return False
    kinds = sorted({n.split(" (")[0] for n in data})
    sizes = sorted({n.partition(" (")[2] for n in data})
    colors = [f"C{i}" for i in range(10)]
    lines = ["-", "--", ":", "-."]

    def style(series_name: str) -> dict[str, Any]:
        kind, _, size = series_name.partition(" (")
        return {
            "color": colors[kinds.index(kind) % len(colors)],
            "linestyle": lines[sizes.index(size) % len(lines)],
        }

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, data, style)
    ax.set_xlabel("added first-byte latency per request (ms)")
    ax.set_ylabel("seconds (median, min-max)")
    ax.set_title("time to resume on an empty cache: lazy against eager")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(report: Mapping[str, Any], out_dir: Path, say: Callable[[str], None]) -> list[Path]:
    """Writes the plots ``report`` has rows for into ``out_dir``; returns their paths. Without
    matplotlib, calls ``say`` once with :data:`MISSING_MATPLOTLIB` and returns []."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(MISSING_MATPLOTLIB)
        return []
    summary: Sequence[Row] = report.get("summary") or []
    title = f"{report.get('name', '')} benchmark, {report.get('started', '')}".strip(", ")
    written = []
    for filename, draw in (
        ("read_throughput.png", _read_plot),
        ("checkpoint_time.png", _checkpoint_plot),
        ("resume_latency.png", _latency_plot),
    ):
        path = out_dir / filename
        if draw(plt, summary, path, title):
            written.append(path)
    return written
