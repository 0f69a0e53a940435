"""Reclamation window fit: the largest process whose checkpoint is durable inside a spot notice.

From each task size's measured dump-until-durable time (``snapstore dump via fusionfs``: the
command's wall time until the manifest is committed) this computes how large a process fits in
AWS's 120 s spot notice and GCP's 30 s preemption notice, in two ways:

- at the measured bandwidth: the dump throughput of this run, in bytes of task memory per
  second, ``R = M / T``, so ``M_max(W) = W * M / T``;
- at the emulated bandwidth (only with ``--link-mbps`` or ``--bandwidth-mbps``): the link the
  proxy emulates for fusionfs's parallel uploads: with ``--link-mbps`` (one cap for all
  connections together, as an instance's NIC) ``B = link_mbps * 10**6 / 8`` bytes/s, else
  ``B = bandwidth_mbps * 10**6 / 8 * connections`` (the per-connection cap times them; both
  set: the smaller), used
  with the efficiency measured in the same run against a direct upload of the same image files
  over the same path, ``e = T_upload / T``, and the image bytes per memory byte ``I / M``:
  ``M_max(W) = W * B * e * M / I``.

``M`` is the task's memory, ``I`` the bytes of its CRIU images, ``T`` the dump time and
``T_upload`` the direct multipart upload time, all of the same run; the figure is the median of
the per-run values. Caveats: a straight-line extrapolation. Fixed costs (freezing, CRIU start,
the manifest commit) weigh more in short windows, and a server or link that slows down with
larger objects makes the real limit lower; only a measured size whose own dump fits (the
"measured fits" column) is a guarantee. Pure: reads measurements, writes nothing.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["WINDOWS", "FitRow", "fit_rows", "largest_fit", "markdown"]

WINDOWS: dict[str, float] = {"AWS spot, 120 s": 120.0, "GCP preemption, 30 s": 30.0}

_OURS = "snapstore dump via fusionfs"
_UPLOAD = "direct upload, multipart"
_DUMP = re.compile(r"^dump (\d+) (MiB|GiB)$")
_MIB = 1 << 20
_GIB = 1 << 30


class _Measured(Protocol):
    scenario: str
    tool: str
    run: int
    value: float
    extras: dict[str, float]


@dataclass
class FitRow:
    size_mib: int
    runs: int
    dump_s: float  # median dump-until-durable time
    mem_mb_per_s: float  # median R, MB (10**6 bytes) of task memory per second
    efficiency: float | None  # median T_upload / T, None without the upload rows
    upload_mb_per_s: float | None  # median I / T_upload: the bandwidth measured to the store
    measured: dict[str, float]  # window name -> largest process in bytes, measured bandwidth
    emulated: dict[str, float] | None  # the same at the emulated link, None without one
    fits_as_measured: dict[str, bool]  # window name -> did the measured size itself fit


def largest_fit(window_s: float, mem_bytes_per_s: float) -> float:
    """The largest task memory (bytes) dumped within ``window_s`` at that throughput."""
    if window_s < 0 or mem_bytes_per_s < 0:
        raise ValueError("window and throughput must be >= 0")
    return window_s * mem_bytes_per_s


def link_bytes_per_s(bandwidth_mbps: float, connections: int, link_mbps: float = 0.0) -> float:
    """The emulated link in bytes/s: ``link_mbps`` megabits/s for all connections together;
    else ``bandwidth_mbps`` per connection times ``connections``; the smaller when both are set
    (0: none)."""
    caps = [c for c in (link_mbps * 1e6 / 8, bandwidth_mbps * 1e6 / 8 * connections) if c > 0]
    return min(caps) if caps else 0.0


def fit_rows(
    measurements: Iterable[_Measured],
    *,
    bandwidth_mbps: float = 0.0,
    connections: int = 8,
    link_mbps: float = 0.0,
) -> list[FitRow]:
    """One row per task size that has ``snapstore dump via fusionfs`` measurements."""
    ours: dict[int, dict[int, tuple[float, float]]] = {}  # size -> run -> (T, image bytes)
    upload: dict[int, dict[int, float]] = {}
    for m in measurements:
        match = _DUMP.match(m.scenario)
        if not match:
            continue
        mib = int(match.group(1)) * (1024 if match.group(2) == "GiB" else 1)
        if m.tool == _OURS and m.value > 0:
            image = m.extras.get("image_mb", 0.0) * 1e6
            ours.setdefault(mib, {})[m.run] = (m.value, image)
        elif m.tool == _UPLOAD and m.value > 0:
            upload.setdefault(mib, {})[m.run] = m.value
    link = link_bytes_per_s(bandwidth_mbps, connections, link_mbps)
    rows = []
    for mib in sorted(ours):
        mem = mib * _MIB
        per_run = ours[mib]
        rates = [mem / t for t, _ in per_run.values()]
        effs = [upload[mib][r] / t for r, (t, _) in per_run.items() if r in upload.get(mib, {})]
        up_rates = [
            image / upload[mib][r] / 1e6
            for r, (_, image) in per_run.items()
            if image > 0 and r in upload.get(mib, {})
        ]
        emulated_rates = [
            link * (upload[mib][r] / t) * (mem / image)
            for r, (t, image) in per_run.items()
            if link and image > 0 and r in upload.get(mib, {})
        ]
        rate = statistics.median(rates)
        dump_s = statistics.median(t for t, _ in per_run.values())
        rows.append(
            FitRow(
                size_mib=mib,
                runs=len(per_run),
                dump_s=dump_s,
                mem_mb_per_s=rate / 1e6,
                efficiency=statistics.median(effs) if effs else None,
                upload_mb_per_s=statistics.median(up_rates) if up_rates else None,
                measured={w: largest_fit(s, rate) for w, s in WINDOWS.items()},
                emulated=(
                    {
                        w: largest_fit(s, statistics.median(emulated_rates))
                        for w, s in WINDOWS.items()
                    }
                    if emulated_rates
                    else None
                ),
                fits_as_measured={w: dump_s <= s for w, s in WINDOWS.items()},
            )
        )
    return rows


def _gib(nbytes: float) -> str:
    value = nbytes / _GIB
    return f"{value:.1f} GiB" if value >= 1 else f"{nbytes / _MIB:.0f} MiB"


def _size(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def markdown(
    rows: list[FitRow],
    *,
    bandwidth_mbps: float = 0.0,
    connections: int = 8,
    link_mbps: float = 0.0,
) -> str:
    """The window-fit table with its formula, as a Markdown section ('' without rows)."""
    if not rows:
        return ""
    names = list(WINDOWS)
    link = link_bytes_per_s(bandwidth_mbps, connections, link_mbps)
    if link_mbps > 0:
        how = (
            f"`B = link_mbps * 10^6 / 8` bytes/s (the {link_mbps:g} Mbit/s cap of all "
            "connections together, as an instance's NIC)"
        )
    else:
        how = (
            f"`B = bandwidth_mbps * 10^6 / 8 * {connections}` bytes/s (per-connection cap times "
            f"fusionfs's {connections} upload connections)"
        )
    header = ["task", "runs", "dump until durable (s)", "memory MB/s"]
    header += [f"largest in {n} (measured)" for n in names]
    if link > 0:
        header += [f"largest in {n} (emulated {link / 1e6:.0f} MB/s link)" for n in names]
    header += ["direct upload MB/s", "efficiency vs direct upload", "measured size fits"]
    lines = [
        "## Reclamation window fit",
        "",
        "Largest process whose checkpoint is durable inside the notice, from this run's "
        "`snapstore dump via fusionfs` times (median of the per-run values).",
        "",
        "- measured bandwidth: `M_max = W * M / T` (M task memory, T dump-until-durable time)",
        f"- emulated bandwidth: `M_max = W * B * e * M / I` with {how}, `e = T_upload / T` "
        "(direct multipart upload of the same images, same run), `I` the image bytes"
        + ("" if link > 0 else "; not computed: run with `--link-mbps` or `--bandwidth-mbps`"),
        "- the emulated figure assumes the link, not the server, limits the upload: compare the "
        "emulated link with the direct upload MB/s measured in this run",
        "- a straight-line extrapolation: fixed costs weigh more in short windows; only a "
        "measured size that fits is a guarantee",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [_size(row.size_mib), str(row.runs), f"{row.dump_s:.2f}", f"{row.mem_mb_per_s:.0f}"]
        cells += [_gib(row.measured[n]) for n in names]
        if link > 0:
            cells += [_gib(row.emulated[n]) if row.emulated else "-" for n in names]
        cells.append(f"{row.upload_mb_per_s:.0f}" if row.upload_mb_per_s is not None else "-")
        cells.append(f"{row.efficiency:.2f}" if row.efficiency is not None else "-")
        cells.append(
            ", ".join(
                f"{n.split(',')[0]}: {'yes' if row.fits_as_measured[n] else 'no'}" for n in names
            )
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
