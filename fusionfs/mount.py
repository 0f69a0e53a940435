"""The composition root: opens the store, builds the core on it (``fusionfs.core.build_core``:
cache -> reader/writer -> fs), puts ``ops`` over it and serves the mount.

One trio nursery, the core's, owns every background task. Everything is entered in one
``AsyncExitStack`` (the store first, then the core, whose nursery is entered before its parts)
and every part pushes its own teardown right after it is built, so everything unwinds in
reverse order: the final flush, the core's parts, the core's nursery, the store. Shutdown
paths:

- the mount is unmounted from outside (``fusionfs unmount`` / ``fusermount3 -u``):
  ``pyfuse3.main`` returns; files were all closed (the kernel refuses to unmount a busy mount), so
  every file was committed at its close; anything still staged is flushed once more.
- SIGTERM or SIGINT: make everything durable first, then end the FUSE session and unmount.

Data that cannot be made durable by then stays in the staging directory with its record, and the
next mount on the same cache directory reports it (``staging.recover_leftovers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import hashlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fusionfs import __version__
from fusionfs.core import CoreConfig, build_core
from fusionfs.fs import Filesystem
from fusionfs.ops import FusionOperations
from fusionfs.stats import Stats
from fusionfs.store import ObjectStore, open_store

__all__ = ["MountConfig", "MountError", "default_cache_dir", "serve"]

log = logging.getLogger(__name__)


class MountError(Exception):
    """A problem that prevents mounting, with a one-line message for the user."""


@dataclasses.dataclass(kw_only=True)
class MountConfig(CoreConfig):
    """The core's options (``CoreConfig``: the filesystem's, sizes, limits, timeouts), and the
    store's, the mount point's and the kernel's."""

    source: str
    mountpoint: Path
    cache_dir: Path
    endpoint_url: str | None = None
    region: str | None = None
    allow_other: bool = False
    check_timeout: float = 15.0
    sse: str | None = None
    sse_kms_key_id: str | None = None
    sign_payload: bool = False
    log_file: Path | None = None

    def public_info(self) -> dict[str, Any]:
        """What ``fusionfs stats``/``snapstore`` may see about the mount (no credentials)."""
        return {
            "pid": os.getpid(),
            "version": __version__,
            "source": self.source,
            "mountpoint": str(self.mountpoint),
            "cache_dir": str(self.cache_dir),
            "cache_size": self.cache_size,
            "chunk_size": self.chunk_size,
            "part_size": self.part_size,
            "read_only": self.read_only,
            "direct_io": self.direct_io,
            "endpoint_url": self.endpoint_url,
            "log_file": str(self.log_file) if self.log_file else None,
        }


def default_cache_dir(source: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return Path(base) / "fusionfs" / digest


def _lock_cache_dir(cache_dir: Path) -> int:
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cache_dir, 0o700)
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(
            f"cache directory {cache_dir} is in use by another fusionfs mount"
        ) from None
    return fd


async def _check_store(store: ObjectStore, timeout: float) -> None:
    from fusionfs.store import NotFound, StoreError

    with trio.move_on_after(timeout) as scope:
        try:
            await trio.to_thread.run_sync(store.check, abandon_on_cancel=True)
        except NotFound as e:
            raise MountError(f"not found: {e}") from None
        except StoreError as e:
            raise MountError(str(e)) from None
    if scope.cancelled_caught:
        raise MountError(
            f"{store.description}: no answer within {timeout:g} s (is the endpoint reachable?)"
        )


def check_mountpoint(mountpoint: Path) -> None:
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"{mountpoint} is a dead mount (its daemon died): "
                f"run 'fusermount3 -uz {mountpoint}' first"
            ) from None
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: FUSE is not available on this machine")


async def serve(cfg: MountConfig, on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled. Raises MountError before ``on_ready``."""
    check_mountpoint(cfg.mountpoint)
    lock_fd = _lock_cache_dir(cfg.cache_dir)
    stats = Stats()
    try:
        store = open_store(
            cfg.source,
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            stats=stats,
            sse=cfg.sse,
            sse_kms_key_id=cfg.sse_kms_key_id,
            sign_payload=cfg.sign_payload,
        )
    except ValueError as e:
        os.close(lock_fd)
        raise MountError(str(e)) from None
    try:
        await _check_store(store, cfg.check_timeout)
        await _serve(cfg, store, stats, on_ready)
    finally:
        os.close(lock_fd)


async def _serve(
    cfg: MountConfig, store: ObjectStore, stats: Stats, on_ready: Callable[[], None]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        close_store = getattr(store, "close", None)
        if callable(close_store):
            stack.callback(close_store)
        core = await stack.enter_async_context(
            build_core(
                store, cfg.cache_dir, dataclasses.replace(cfg, info=cfg.public_info()), stats=stats
            )
        )
        for message in core.recovered:
            log.warning("%s", message)
        fs, nursery = core.fs, core.nursery
        stack.push_async_callback(_final_flush, fs)

        options = set(pyfuse3.default_options)
        options |= {f"fsname=fusionfs:{cfg.source}"[:200], "subtype=fusionfs", "noatime"}
        if cfg.allow_other:
            options.add("allow_other")
        if cfg.read_only:
            options.add("ro")
        mountpoint = os.path.realpath(cfg.mountpoint)  # resolve before it becomes ours
        initialized = trio.Event()
        try:
            pyfuse3.init(FusionOperations(fs, on_init=initialized.set), mountpoint, options)
        except RuntimeError as e:
            raise MountError(f"cannot mount on {cfg.mountpoint}: {e}") from None
        session = _Session()
        stack.callback(session.close)

        async def tune_readahead() -> None:
            # INIT resets the bdi's read-ahead to what was negotiated (128 KiB): raise it after
            await initialized.wait()
            await trio.to_thread.run_sync(_raise_readahead, Path(mountpoint), cfg.max_readahead)

        nursery.start_soon(tune_readahead)
        nursery.start_soon(_on_signals, fs, session)
        log.info("mounted %s on %s", store.description, cfg.mountpoint)
        # The objects made so far (botocore's service model above all: some 10^5) live as long
        # as the mount: keep them out of the cyclic collector's full passes, which a busy data
        # path triggers often (perf, 1 GiB dump: 3 % of the daemon's CPU in gc_collect_main).
        gc.collect()
        gc.freeze()
        on_ready()
        await pyfuse3.main()
        session.ended_by_unmount = not session.terminated


class _Session:
    def __init__(self) -> None:
        self.terminated = False
        self.ended_by_unmount = False
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            pyfuse3.close(unmount=not self.ended_by_unmount)


async def _on_signals(fs: Filesystem, session: _Session) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %s: making data durable, then unmounting", signum)
            try:
                await fs.flush_all()
            except Exception as e:
                log.error("some data could not be made durable before exit: %s", e)
            session.terminated = True
            pyfuse3.terminate()
            return


async def _final_flush(fs: Filesystem) -> None:
    with trio.CancelScope(shield=True):
        try:
            await fs.flush_all()
        except Exception as e:
            log.error("unmounting with data not yet durable (kept in the staging dir): %s", e)


#: Background (read-ahead) requests the kernel keeps in flight per mount; see ``_raise_readahead``.
BACKGROUND_REQUESTS = 64


def _raise_readahead(mountpoint: Path, max_readahead: int) -> None:
    """Let the kernel read ahead in large requests, and keep them all in flight.

    Two per-mount kernel settings, both root-only (left as they are otherwise):

    - the bdi's ``read_ahead_kb`` (128 KiB by default) becomes a quarter of ``max_readahead``,
      so a sequential reader's page-cache misses go out as 1 MiB requests;
    - the FUSE connection's ``max_background`` (12) and ``congestion_threshold`` (9) become
      ``BACKGROUND_REQUESTS`` and three quarters of it. Read-ahead requests are background
      requests, and the kernel skips an asynchronous read-ahead while ``congestion_threshold``
      of them are outstanding: with the defaults a 32 MiB read-ahead window never had more
      than 9-12 MiB in flight, and the reader stalled on synchronous reads instead. 1 GiB cold
      read on s3rver, alternating default and raised: 164-209 against 181-239 MB/s, faster in
      each of 7 pairs (docs/design/data-path.md).

    The device number comes from /proc/self/mountinfo, not from stat(): a stat of the mountpoint
    would be a FUSE request to ourselves before the session loop runs.
    """
    target = str(mountpoint)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    for line in reversed(lines):
        fields = line.split()
        if len(fields) > 4 and fields[4] == target:
            path = f"/sys/class/bdi/{fields[2]}/read_ahead_kb"
            with contextlib.suppress(OSError):
                Path(path).write_text(str(max(128, max_readahead // 1024 // 4)))
            major, minor = (int(x) for x in fields[2].split(":"))
            conn = Path("/sys/fs/fuse/connections") / str(os.makedev(major, minor))
            # max_background first: the kernel refuses a threshold above it
            for name, value in (
                ("max_background", BACKGROUND_REQUESTS),
                ("congestion_threshold", BACKGROUND_REQUESTS * 3 // 4),
            ):
                try:
                    (conn / name).write_text(str(value))
                except OSError as e:
                    log.debug("cannot set %s of %s: %s", name, conn, e)
            return
