"""``python -m benchmarks {fs,snap,all}``: the benchmark suite's command line.

``fs`` measures fusionfs against direct boto3, local disk and installed peers (see
``benchmarks/fs.py``); ``snap`` measures snapstore checkpoint/restore through fusionfs against CRIU
on local disk and a direct upload (see ``benchmarks/snap.py``); ``all`` runs both, into
``OUT/fs`` and ``OUT/snap``. With no ``--endpoint-url`` a local s3rver is started for the run.
Errors in the set-up are one line on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rich.console import Console

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, AWS); default: a local s3rver")
    p.add_argument(
        "--bucket", help="bucket to use with --endpoint-url (a run prefix is created in it)"
    )
    p.add_argument("--latency-ms", type=float, default=0.0, help="first-byte latency per request")
    p.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=0.0,
        help="cap per connection (and direction) in megabits/s: 800 = 100 MB/s; 0 = off",
    )
    p.add_argument(
        "--link-mbps",
        type=float,
        default=0.0,
        help="cap of all connections together (and direction) in megabits/s, as an instance's "
        "NIC: 800 = 100 MB/s in total; 0 = off",
    )
    p.add_argument(
        "--error-rate", type=float, default=0.0, help="share of requests failed with 503 or reset"
    )
    p.add_argument("--runs", type=int, default=3, help="runs per figure (default 3; median shown)")
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/out/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="smaller sizes: 256 MiB, 2000 objects")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes in MiB: {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive MiB counts: {text!r}")
    return sizes


def _latencies(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of milliseconds: {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"latencies must be >= 0 ms: {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="fusionfs and snapstore benchmarks"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fs = sub.add_parser("fs", help="filesystem: reads, writes, metadata")
    _add_common(fs)
    fs.add_argument("--size-mib", type=int, help="object size in MiB (default 1024; quick 256)")
    fs.add_argument("--objects", type=int, help="objects for stat/list (default 10000; quick 2000)")
    fs.add_argument(
        "--small-files",
        type=int,
        help="4 KiB files for the small-files scenario (default 10000; quick 2000)",
    )
    fs.add_argument(
        "--no-sweeps",
        action="store_true",
        help="skip the read sweeps (chunk size, threads, concurrent files) behind the read plot",
    )
    fs.add_argument(
        "--no-peers", action="store_true", help="skip s3fs and rclone even if installed"
    )
    snap = sub.add_parser("snap", help="snapstore checkpoint/restore")
    _add_common(snap)
    snap.add_argument(
        "--sizes-mib",
        type=_sizes,
        help="task sizes in MiB, comma-separated (default 256,1024,4096 where memory allows; "
        "quick 256)",
    )
    snap.add_argument(
        "--resume-latencies-ms",
        type=_latencies,
        help="first-byte latencies (ms) of the resume-against-latency restores "
        "(default: 0 and --latency-ms if set, else 0,30)",
    )
    snap.add_argument(
        "--memory",
        choices=("random", "fastq"),
        default="random",
        help="what the task's memory holds: random bytes (incompressible, the default) or "
        "fastq (sequencing reads: every page distinct, about 3x with zstd)",
    )
    snap.add_argument(
        "--dump-only",
        action="store_true",
        help="only the snapstore dumps (full, then incremental) and their window fit: no CRIU "
        "or direct-upload references, no restores",
    )
    everything = sub.add_parser("all", help="every benchmark")
    _add_common(everything)
    return parser


def _fs_config(args: argparse.Namespace, out: Path | None) -> object:
    from benchmarks.fs import FsConfig

    return FsConfig(
        endpoint_url=args.endpoint_url,
        bucket=args.bucket,
        latency_ms=args.latency_ms,
        bandwidth_mbps=args.bandwidth_mbps,
        link_mbps=args.link_mbps,
        error_rate=args.error_rate,
        runs=args.runs,
        out=out,
        quick=args.quick,
        size_mib=getattr(args, "size_mib", None),
        objects=getattr(args, "objects", None),
        peers=not getattr(args, "no_peers", False),
        small_files=getattr(args, "small_files", None),
        sweeps=not getattr(args, "no_sweeps", False),
    )


def _snap_config(args: argparse.Namespace, out: Path | None) -> object:
    from benchmarks.snap import SnapConfig

    return SnapConfig(
        endpoint_url=args.endpoint_url,
        bucket=args.bucket,
        latency_ms=args.latency_ms,
        bandwidth_mbps=args.bandwidth_mbps,
        link_mbps=args.link_mbps,
        error_rate=args.error_rate,
        runs=args.runs,
        out=out,
        quick=args.quick,
        memory=getattr(args, "memory", "random"),
        dump_only=getattr(args, "dump_only", False),
        sizes_mib=getattr(args, "sizes_mib", None) or [],
        resume_latencies_ms=getattr(args, "resume_latencies_ms", None) or [],
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not 0 <= args.error_rate <= 1:
        parser.error("--error-rate must be within [0, 1]")
    if args.latency_ms < 0 or args.bandwidth_mbps < 0 or args.link_mbps < 0:
        parser.error("--latency-ms, --bandwidth-mbps and --link-mbps must be >= 0")
    for flag in ("size_mib", "objects", "small_files"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.endpoint_url and not args.bucket:
        parser.error("--endpoint-url needs --bucket")
    # SIGTERM unwinds like Ctrl-C, so mounts are unmounted and servers stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    from benchmarks.fs import FsConfig, run_fs
    from benchmarks.snap import SnapConfig, run_snap

    out: Path | None = args.out
    both = args.command == "all"
    status = 0
    if args.command in ("fs", "all"):
        cfg = _fs_config(args, out / "fs" if (out and both) else out)
        assert isinstance(cfg, FsConfig)
        status = run_fs(cfg, console)
        if status == 130:
            return status
    if args.command in ("snap", "all"):
        snap_cfg = _snap_config(args, out / "snap" if (out and both) else out)
        assert isinstance(snap_cfg, SnapConfig)
        status = max(status, run_snap(snap_cfg, console))
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
