"""``fusionfs`` command line: mount, unmount, stats.

``fusionfs mount`` without ``--foreground`` forks a daemon and returns only once the mount is
ready (exit 0), or prints why it failed (exit 1; 2 for bad usage). The fork happens before any
thread or boto3 client exists. User errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import trio

from fusionfs import __version__, client
from fusionfs.mount import MountConfig, MountError, check_mountpoint, default_cache_dir, serve

__all__ = ["main", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '10G', '1GiB', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 4096, 512M, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"fusionfs: error: {message}", file=sys.stderr)
    sys.exit(code)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), not the usage."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusionfs", description="Mount S3 (or a local directory) as a filesystem.")
    p.add_argument("--version", action="version", version=f"fusionfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser(
        "mount",
        help="mount SOURCE at MOUNTPOINT",
        description="SOURCE is s3://BUCKET[/PREFIX], file:///abs/path or a "
        "directory. Credentials and endpoint come from the standard AWS chain "
        "(AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL, ...).",
    )
    m.add_argument("source")
    m.add_argument("mountpoint", type=Path)
    m.add_argument(
        "--cache-dir",
        type=Path,
        help="chunk cache and staging directory (default ~/.cache/fusionfs/<hash of SOURCE>)",
    )
    m.add_argument(
        "--cache-size",
        type=parse_size,
        default=parse_size("10G"),
        help="bound of the on-disk chunk cache (default 10G)",
    )
    m.add_argument(
        "--cache-min-free",
        type=parse_size,
        default=parse_size("1G"),
        help="free space to leave on the cache's filesystem (default 1G)",
    )
    m.add_argument(
        "--chunk-size",
        type=parse_size,
        default=parse_size("1M"),
        help="read and cache granularity (default 1M)",
    )
    m.add_argument(
        "--read-request-size",
        type=parse_size,
        default=parse_size("16M"),
        help="largest ranged GET (default 16M)",
    )
    m.add_argument(
        "--max-readahead",
        type=parse_size,
        default=parse_size("128M"),
        help="read-ahead window for sequential reads (default 128M)",
    )
    m.add_argument(
        "--part-size",
        type=parse_size,
        default=parse_size("16M"),
        help="first multipart part size; grows after 1000 parts (default 16M)",
    )
    m.add_argument(
        "--upload-concurrency", type=int, default=8, help="parts uploaded at once (default 8)"
    )
    m.add_argument(
        "--endpoint-url",
        help="S3 endpoint (MinIO, Ceph, ...); default from AWS_ENDPOINT_URL or AWS",
    )
    m.add_argument("--region")
    m.add_argument("--read-only", action="store_true")
    m.add_argument(
        "--direct-io",
        action="store_true",
        help="files opened read-only or write-only bypass the kernel page cache: "
        "every read(2) and write(2) goes to fusionfs (data read or written once: "
        "no page-cache copy; small reads and writes and shared mmap suffer, see "
        "docs/SEMANTICS.md S-READ-4)",
    )
    m.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    m.add_argument(
        "--metadata-ttl",
        type=float,
        default=1.0,
        help="seconds attributes and listings are trusted (default 1)",
    )
    m.add_argument(
        "--store-timeout",
        type=float,
        default=60.0,
        help="seconds before a store call that does not answer fails with EIO",
    )
    m.add_argument(
        "--sse", choices=["AES256", "aws:kms"], help="server-side encryption for uploads"
    )
    m.add_argument("--sse-kms-key-id")
    m.add_argument(
        "--sign-payload",
        action="store_true",
        help="SHA-256 every upload body into its SigV4 signature (default: "
        "UNSIGNED-PAYLOAD, as the AWS CRT sends; costs 0.7 ms of CPU per MiB)",
    )
    m.add_argument("--foreground", "-f", action="store_true")
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    m.add_argument(
        "--log-file",
        type=Path,
        help="daemon log (default CACHE_DIR/fusionfs.log; stderr in foreground)",
    )

    u = sub.add_parser("unmount", help="make pending data durable, then unmount")
    u.add_argument("mountpoint", type=Path)
    u.add_argument(
        "--force",
        action="store_true",
        help="unmount even if some data could not be made durable (it stays staged "
        "in the cache dir and is reported at the next mount)",
    )
    u.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the daemon to exit (default 120)",
    )

    s = sub.add_parser("stats", help="counters since mount")
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "mount":
        _mount(args)
    elif args.command == "unmount":
        _unmount(args)
    else:
        _stats(args)


# -- mount ---------------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> MountConfig:
    source = args.source
    if "://" not in source:
        source = os.path.abspath(source)
    cache_dir = (args.cache_dir or default_cache_dir(source)).absolute()
    return MountConfig(
        source=source,
        mountpoint=args.mountpoint.absolute(),
        cache_dir=cache_dir,
        cache_size=args.cache_size,
        cache_min_free=args.cache_min_free,
        chunk_size=args.chunk_size,
        read_request_size=args.read_request_size,
        max_readahead=args.max_readahead,
        part_size=args.part_size,
        upload_concurrency=args.upload_concurrency,
        endpoint_url=args.endpoint_url,
        region=args.region,
        read_only=args.read_only,
        direct_io=args.direct_io,
        allow_other=args.allow_other,
        metadata_ttl=args.metadata_ttl,
        store_timeout=args.store_timeout,
        sse=args.sse,
        sse_kms_key_id=args.sse_kms_key_id,
        sign_payload=args.sign_payload,
        log_file=args.log_file or (None if args.foreground else cache_dir / "fusionfs.log"),
    )


def _setup_logging(level: str, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fusionfs").setLevel(level.upper())
    if level == "debug":
        logging.getLogger("pyfuse3").setLevel(logging.INFO)


def _mount(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.cache_size <= 0 or args.chunk_size <= 0:
        _fail("--cache-size and --chunk-size must be positive", 2)
    if args.part_size < 5 << 20:
        _fail("--part-size must be at least 5M (S3's minimum part size)", 2)
    try:
        check_mountpoint(cfg.mountpoint)
    except MountError as e:
        _fail(str(e))
    if args.foreground:
        _setup_logging(args.log_level, cfg.log_file)
        _run(cfg, on_ready=lambda: None)
        return

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _setup_logging(args.log_level, cfg.log_file)

        def ready() -> None:
            os.write(write_fd, b"OK\n")
            os.close(write_fd)

        code = 0
        try:
            _run(cfg, on_ready=ready, report_fd=write_fd)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + cfg.check_timeout + 30
    data = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        data += chunk
    text = data.decode(errors="replace").strip()
    if text == "OK":
        return
    if not text:
        text = f"the daemon exited before the mount was ready; see {cfg.log_file}"
    _fail(text.removeprefix("ERR "))


def _keep_freed_memory() -> None:
    """Let glibc keep freed heap memory in the daemon instead of giving it back at once.

    The data path allocates and frees response buffers of up to ``--read-request-size`` (16 MiB)
    all the time. By default glibc maps each with mmap and unmaps it when freed, so every GET
    faults fresh pages in again; on VMs whose balloon reports free pages to the host (this
    project's CI machines) that costs about 2.7 ms of CPU per MiB, more than the data copy.

    One arena: a buffer is made in whichever worker thread ran the GET and freed later by the
    trio thread, and trio hands the next GET to another worker; with glibc's arena per thread
    each such buffer went back to an arena the next allocation did not use, whose heaps were
    then trimmed or unmapped. perf of a 1 GiB cold read: 1.83 s of kernel page zeroing in the
    fetch threads, 0.24 s with one arena (large allocations are rare and made under the GIL,
    so one arena's lock costs nothing here). Must run before the first worker thread starts.
    Best effort: only glibc has ``mallopt``."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_threshold, 64 << 20)  # larger blocks than this still get their own mapping
    mallopt(m_trim_threshold, 512 << 20)  # freed memory kept at the top of the heap, at most


def _run(cfg: MountConfig, on_ready: Callable[[], None], report_fd: int | None = None) -> None:
    log = logging.getLogger("fusionfs.cli")
    started = False
    _keep_freed_memory()

    def ready() -> None:
        nonlocal started
        started = True
        on_ready()

    try:
        trio.run(serve, cfg, ready)
    except MountError as e:
        if started:
            log.error("%s", e)
            sys.exit(1)
        if report_fd is not None:
            os.write(report_fd, f"ERR {e}\n".encode())
            os._exit(1)
        _fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        log.exception("fusionfs daemon failed")
        if not started and report_fd is not None:
            os.write(report_fd, f"ERR unexpected failure: {e} (see {cfg.log_file})\n".encode())
            os._exit(1)
        if not started:
            _fail(f"unexpected failure: {e}")
        sys.exit(1)


# -- unmount and stats -------------------------------------------------------------------------
def _require_mount(mountpoint: Path) -> client.MountInfo:
    mp = mountpoint.absolute()
    if not mp.exists():
        _fail(f"{mp} does not exist")
    if not os.path.ismount(mp):
        _fail(f"{mp} is not mounted")
    info = client.find_mount(mp)
    if info is None or info.mountpoint != Path(os.path.realpath(mp)):
        _fail(f"{mp} is not a fusionfs mount")
    return info


def _unmount(args: argparse.Namespace) -> None:
    info = _require_mount(args.mountpoint)
    try:
        client.flush(info.mountpoint)
    except OSError as e:
        log_file = info.raw.get("log_file") or "the daemon's log"
        msg = (
            f"some data could not be made durable ({os.strerror(e.errno or errno.EIO)}); "
            f"it is kept in {info.cache_dir / 'staging'}; details in {log_file}"
        )
        if not args.force:
            _fail(msg + "; the mount stays up: retry, or use --force")
        print(f"fusionfs: warning: {msg}", file=sys.stderr)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        _fail("fusermount3 not found (install the fuse3 package)")
    try:
        proc = subprocess.run(
            [fusermount, "-u", str(info.mountpoint)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _fail(f"fusermount3 -u {info.mountpoint} did not finish within 60 s")
    if proc.returncode != 0:
        _fail(proc.stderr.strip() or f"fusermount3 -u failed ({proc.returncode})")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            break
        if _is_zombie(info.pid):
            break
        time.sleep(0.05)
    else:
        _fail(f"unmounted, but the daemon (pid {info.pid}) has not exited after {args.timeout:g} s")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _stats(args: argparse.Namespace) -> None:
    info = _require_mount(args.mountpoint)
    try:
        data = client.stats(info.mountpoint)
    except OSError as e:
        _fail(f"cannot read stats: {e.strerror}")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fusionfs {info.mountpoint} ({info.source})", show_header=False)
    for k in sorted(data):
        v = data[k]
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in sorted(v.items())) or "-"
        table.add_row(k, str(v))
    Console().print(table)
