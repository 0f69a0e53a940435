"""Unit tests of the benchmarks' pure pieces: the reclamation-window fit, the PNG plots (from a
tiny fake results dict), the small-files figures and summary, and flag checking. No servers, no
mounts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import missing

from benchmarks import plots, window
from benchmarks.__main__ import main
from benchmarks.fs import small_files_figures, small_files_summary
from benchmarks.harness import CpuMeter, Measurement, Results, cpu_budget_note

_GIB = 1 << 30


def _dump(mib: int, run: int, ours_s: float, upload_s: float, image_mb: float) -> list[Measurement]:
    label = f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"
    return [
        Measurement(
            f"dump {label}", "snapstore dump via fusionfs", run, ours_s, "s", {"image_mb": image_mb}
        ),
        Measurement(f"dump {label}", "direct upload, multipart", run, upload_s, "s", {}),
        Measurement(f"dump {label}", "criu dump, local disk", run, 0.5, "s", {}),
    ]


# -- window fit ---------------------------------------------------------------------------------


def test_window_fit_at_measured_bandwidth_is_window_times_memory_over_time() -> None:
    ms = _dump(1024, 0, 10.0, 8.0, 1000.0)
    (row,) = window.fit_rows(ms)
    assert row.size_mib == 1024 and row.runs == 1
    assert row.measured["AWS spot, 120 s"] == pytest.approx(12 * _GIB)
    assert row.measured["GCP preemption, 30 s"] == pytest.approx(3 * _GIB)
    assert row.efficiency == pytest.approx(0.8)
    assert row.upload_mb_per_s == pytest.approx(1000 / 8.0)
    assert row.emulated is None  # no --bandwidth-mbps
    assert row.fits_as_measured == {"AWS spot, 120 s": True, "GCP preemption, 30 s": True}


def test_window_fit_at_emulated_link_uses_efficiency_and_image_ratio() -> None:
    ms = _dump(1024, 0, 10.0, 8.0, 1000.0)
    (row,) = window.fit_rows(ms, bandwidth_mbps=800, connections=8)
    link = 800e6 / 8 * 8  # 800 MB/s
    expected = 120 * link * 0.8 * (_GIB / 1000e6)
    assert row.emulated is not None
    assert row.emulated["AWS spot, 120 s"] == pytest.approx(expected)


def test_window_fit_at_a_link_cap_counts_the_link_once_for_all_connections() -> None:
    """--link-mbps caps all connections together (an instance's NIC): 800 Mbit/s is 100 MB/s
    for the dump's uploads, not 8 x 100 MB/s as the per-connection cap would count it."""
    ms = _dump(4096, 0, 40.0, 30.0, 4300.0)
    (row,) = window.fit_rows(ms, connections=8, link_mbps=800)
    expected = 30 * 100e6 * (30.0 / 40.0) * (4 * _GIB / 4300e6)
    assert row.emulated is not None
    assert row.emulated["GCP preemption, 30 s"] == pytest.approx(expected)
    # both caps: the smaller one is the link
    assert window.link_bytes_per_s(800, 8, 800) == pytest.approx(100e6)
    assert window.link_bytes_per_s(800, 8, 0) == pytest.approx(800e6)
    text = window.markdown([row], connections=8, link_mbps=800)
    assert "emulated 100 MB/s link" in text
    assert "for all connections together" in text or "all connections together" in text


def test_window_fit_takes_the_median_of_runs_and_flags_a_size_that_does_not_fit() -> None:
    ms = []
    for run, t in enumerate((40.0, 50.0, 200.0)):
        ms += _dump(4096, run, t, 30.0, 4300.0)
    (row,) = window.fit_rows(ms)
    assert row.runs == 3
    assert row.dump_s == 50.0
    assert row.measured["GCP preemption, 30 s"] == pytest.approx(30 * 4 * _GIB / 50.0)
    assert row.fits_as_measured == {"AWS spot, 120 s": True, "GCP preemption, 30 s": False}


def test_window_fit_ignores_other_rows_and_orders_by_size() -> None:
    ms = _dump(4096, 0, 40.0, 30.0, 4300.0) + _dump(256, 0, 3.0, 2.0, 270.0)
    ms.append(Measurement("restore 1 GiB", "snapstore dump via fusionfs", 0, 1.0, "s", {}))
    assert [r.size_mib for r in window.fit_rows(ms)] == [256, 4096]
    assert window.fit_rows([]) == []


def test_window_markdown_states_formula_and_table() -> None:
    rows = window.fit_rows(_dump(1024, 0, 10.0, 8.0, 1000.0), bandwidth_mbps=800)
    text = window.markdown(rows, bandwidth_mbps=800)
    assert text.startswith("## Reclamation window fit")
    assert "M_max = W * M / T" in text
    assert "12.0 GiB" in text and "3.0 GiB" in text
    assert "emulated 800 MB/s link" in text
    assert window.markdown([]) == ""
    plain = window.markdown(window.fit_rows(_dump(1024, 0, 10.0, 8.0, 1000.0)))
    assert "run with `--link-mbps` or `--bandwidth-mbps`" in plain


def test_largest_fit_rejects_negative_input() -> None:
    assert window.largest_fit(30, 1e9) == 30e9
    with pytest.raises(ValueError):
        window.largest_fit(-1, 1e9)


# -- plots --------------------------------------------------------------------------------------


def _row(scenario: str, tool: str, median: float, **extras: float) -> dict[str, object]:
    return {
        "scenario": scenario,
        "tool": tool,
        "unit": "x",
        "median": median,
        "low": median * 0.9,
        "high": median * 1.1,
        "runs": 3,
        "extras": extras,
        "ratios": {},
    }


_FAKE = {
    "name": "fake",
    "started": "2026-01-01T00:00:00",
    "summary": [
        _row("read vs threads", "direct boto3, 1 thread", 300, threads=1),
        _row("read vs threads", "direct boto3, 8 threads", 900, threads=8),
        _row("read vs readers", "fusionfs, 1 file at once", 250, readers=1),
        _row("read vs readers", "fusionfs, 4 files at once", 500, readers=4),
        _row("read vs chunk size", "fusionfs --chunk-size 256K", 100, chunk_kib=256),
        _row("read vs chunk size", "fusionfs --chunk-size 4M", 400, chunk_kib=4096),
        _row("dump 256 MiB", "snapstore dump via fusionfs", 3.0),
        _row("dump 1 GiB", "snapstore dump via fusionfs", 11.0),
        _row("dump 1 GiB", "criu dump + fsync, local disk", 2.0),
        _row("dump 1 GiB: ratios", "ours / naive sum (multipart)", 1.2),
        _row("resume vs latency, 1 GiB", "eager resume @ 0 ms", 5.0, latency_ms=0),
        _row("resume vs latency, 1 GiB", "eager resume @ 30 ms", 9.0, latency_ms=30),
        _row("resume vs latency, 1 GiB", "lazy resume @ 0 ms", 0.3, latency_ms=0),
        _row("resume vs latency, 1 GiB", "lazy resume @ 30 ms", 0.6, latency_ms=30),
    ],
}


def _need_matplotlib() -> None:
    """The plots need matplotlib (the ``bench`` extra, installed by scripts/setup.sh)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        missing("matplotlib", str(exc))


def test_plots_are_written_for_the_rows_present(tmp_path: Path) -> None:
    _need_matplotlib()
    said: list[str] = []
    written = plots.write_plots(_FAKE, tmp_path, said.append)
    names = sorted(p.name for p in written)
    assert names == ["checkpoint_time.png", "read_throughput.png", "resume_latency.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert said == []


def test_plots_skip_what_has_no_rows(tmp_path: Path) -> None:
    _need_matplotlib()
    only_reads = {"summary": _FAKE["summary"][:6]}
    written = plots.write_plots(only_reads, tmp_path, print)
    assert [p.name for p in written] == ["read_throughput.png"]
    assert plots.write_plots({"summary": []}, tmp_path, print) == []


def test_plots_without_matplotlib_say_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    said: list[str] = []
    assert plots.write_plots(_FAKE, tmp_path, said.append) == []
    assert said == [plots.MISSING_MATPLOTLIB]
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_plot_has_the_window_rows_and_lines(tmp_path: Path) -> None:
    """The 4 GiB window figures (full, incremental, the machine's ceiling) are on the
    checkpoint plot, with the 30 s line once the times come near it (not the 120 s one)."""
    rows = [
        _row("dump 4 GiB", "snapstore dump via fusionfs", 29.0),
        _row("dump 4 GiB", "snapstore dump via fusionfs, incremental (10 % changed)", 12.0),
        _row("dump 4 GiB", "ceiling: the machine's cores and the link", 15.0),
    ]
    data = plots.series(
        rows,  # type: ignore[arg-type]
        lambda r: plots.checkpoint_sizes(str(r["scenario"])),
        lambda r: str(r["tool"]),
    )
    assert [w for w, _ in plots.window_lines(data)] == [30.0]
    assert plots.window_lines({}) == []
    _need_matplotlib()
    written = plots.write_plots({"summary": rows}, tmp_path, print)
    assert [p.name for p in written] == ["checkpoint_time.png"]


def test_series_groups_and_sorts() -> None:
    data = plots.series(
        _FAKE["summary"],  # type: ignore[arg-type]
        lambda r: plots.checkpoint_sizes(str(r["scenario"])),
        lambda r: str(r["tool"]) if r["tool"] == "snapstore dump via fusionfs" else None,
    )
    assert list(data) == ["snapstore dump via fusionfs"]
    points = data["snapstore dump via fusionfs"]
    assert [p[0] for p in points] == [256, 1024]
    assert points[1] == pytest.approx((1024, 11.0, 9.9, 12.1))
    assert plots.checkpoint_sizes("dump 4 GiB") == 4096
    assert plots.checkpoint_sizes("dump 1 GiB: ratios") is None


# -- small files --------------------------------------------------------------------------------


def test_small_files_figures() -> None:
    value, details = small_files_figures(2000, 4096, 4.0, 8)
    assert value == 500.0
    assert details == {
        "seconds": 4.0,
        "files": 2000.0,
        "mb_per_s": 2000 * 4096 / 4.0 / 1e6,
        "workers": 8.0,
    }
    with pytest.raises(ValueError):
        small_files_figures(0, 4096, 1.0, 8)
    with pytest.raises(ValueError):
        small_files_figures(10, 4096, 0.0, 8)


def test_small_files_summary_compares_with_direct_per_run() -> None:
    results = Results("fs", {})
    for scenario in ("small files create", "small files read"):
        results.references[scenario] = ["direct boto3", "local disk"]
    for run, (direct, ours) in enumerate(((200.0, 100.0), (100.0, 80.0), (400.0, 100.0))):
        for tool, value in (("direct boto3", direct), ("fusionfs", ours)):
            _, details = small_files_figures(2000, 4096, 2000 / value, 8)
            results.add(Measurement("small files create", tool, run, value, "files/s", details))
    results.add(Measurement("seq write", "fusionfs", 0, 99.0, "MB/s", {}))
    lines = small_files_summary(results)
    assert lines == [
        "fusionfs: 2000 files of 4 KiB created until durable at 100 files/s "
        "(0.50x direct boto3, 0.25-0.80)"
    ]


# -- flags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["fs", "--small-files", "0"],
        ["fs", "--size-mib", "-1"],
        ["snap", "--resume-latencies-ms", "0,x"],
        ["snap", "--resume-latencies-ms", "-5"],
        ["fs", "--runs", "0"],
    ],
)
def test_bad_flags_exit_non_zero_with_one_error_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


# -- progress -----------------------------------------------------------------------------------


def test_steps_without_a_terminal_print_plain_lines() -> None:
    import io

    from rich.console import Console

    from benchmarks.harness import Steps

    buf = io.StringIO()
    console = Console(file=buf, width=120)
    assert not console.is_terminal
    with Steps(console, "fs", 3) as steps:
        steps.step("run 1: [fusionfs] seq read")
        steps.log("a result line")
        steps.advance()
    lines = buf.getvalue().splitlines()
    assert lines == ["[00:00] fs: run 1: [fusionfs] seq read", "a result line"]
    assert "\x1b" not in buf.getvalue()


def test_steps_on_a_terminal_show_a_bar() -> None:
    import io

    from rich.console import Console

    from benchmarks.harness import Steps

    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=True)
    with Steps(console, "snap", 2) as steps:
        steps.step("1 GiB run 1: criu dump to local disk")
        steps.advance()
    text = buf.getvalue()
    assert "criu dump to local disk" in text and "1/2" in text and "this step" in text


def test_cpu_meter_counts_a_busy_process_itself_and_waited_children() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with CpuMeter({"busy": busy.pid, "gone": None}) as cpu:
            end = time.process_time() + 0.3
            while time.process_time() < end:  # this process: 0.3 s of CPU
                pass
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import time\nt=time.process_time()+0.3\nwhile time.process_time() < t: pass",
                ],
                check=True,
            )
            time.sleep(0.2)  # not synchronisation: the busy process runs on (what is measured)
    finally:
        busy.kill()
        busy.wait()
    assert set(cpu.used) == {"busy", "self", "children"}
    assert cpu.used["self"] >= 0.25
    assert cpu.used["children"] >= 0.25
    assert cpu.used["busy"] >= 0.3  # it ran for the whole block (0.3 s + the child + 0.2 s)
    per = cpu.per_gib(512 << 20, {"self": "reader"})
    assert per["cpu_reader"] == pytest.approx(2 * cpu.used["self"], abs=0.01)


def test_cpu_budget_note_states_the_budget_of_a_throughput_target() -> None:
    results = Results("fs", {})
    results.add(
        Measurement(
            "seq read cold",
            "direct boto3",
            0,
            1073.741824,
            "MB/s",
            {"cpu_server": 1.0, "cpu_client": 0.5},
        )
    )
    results.add(
        Measurement(
            "seq read cold",
            "fusionfs",
            0,
            500.0,
            "MB/s",
            {"cpu_server": 1.2, "cpu_daemon": 2.0, "cpu_reader": 0.1},
        )
    )
    note = cpu_budget_note(
        results,
        "seq read cold",
        "fusionfs",
        "direct boto3",
        0.5,
        2,
        mine=("cpu_daemon", "cpu_reader"),
        others=("cpu_server",),
    )
    assert note is not None
    # 0.5x of 1 GiB/s: 2 s per GiB, on 2 cores 4 CPU-s; the server took 1.2 of them
    assert "allows at most 4.00 CPU-s per GiB" in note
    assert "leaving 2.80 for fusionfs, which used 2.10" in note
    assert (
        cpu_budget_note(
            results,
            "seq read cold",
            "rclone",
            "direct boto3",
            0.5,
            2,
            mine=("cpu_daemon",),
            others=(),
        )
        is None
    )
    assert os.cpu_count()
