"""The core of a mount without the kernel: chunk cache -> reader -> writer -> filesystem.

``build_core`` is the one place these parts are wired together. ``fusionfs.mount`` serves the
``Filesystem`` it yields through pyfuse3; the tests of ``tests/fs`` call it directly, so what
they test is what a mount runs, background tasks included.

``build_core`` owns a trio nursery for every background task of the core (fetches, uploads,
the retry loop of S-FAIL-3); the caller may start its own tasks in ``Core.nursery`` too. The
nursery is entered first and each part pushes its teardown right after it is built, so on exit
everything unwinds in reverse order: the chunked layout's thread pools, then the chunk cache,
then the nursery is cancelled and closes last. Nothing is flushed on exit: a caller that wants
its data durable calls ``fs.flush_all()`` first (the mount does, in its own teardown).

The store is the caller's: it is opened before (``fusionfs.store.open_store``) and closed after.

Caveat: leftovers of an earlier run in the staging directory are uploaded (or set aside) before
the nursery opens, and their messages returned in ``Core.recovered`` for the caller to report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from fusionfs.cache import ChunkCache
from fusionfs.chunked import ChunkedLayout, PackThreads
from fusionfs.fs import Filesystem, FsConfig
from fusionfs.reader import ChunkSource
from fusionfs.staging import recover_leftovers
from fusionfs.stats import Stats
from fusionfs.store import ObjectStore
from fusionfs.writer import Uploader

__all__ = ["Core", "CoreConfig", "build_core"]

MiB = 1 << 20


@dataclasses.dataclass(kw_only=True)
class CoreConfig(FsConfig):
    """The filesystem's options, and the sizes and limits of the parts below it. The mount's
    options (``fusionfs.mount.MountConfig``) add the store, the mount point and the kernel's."""

    cache_size: int = 10 << 30
    cache_min_free: int = 1 << 30
    chunk_size: int = 1 * MiB
    read_request_size: int = 16 * MiB
    max_readahead: int = 128 * MiB
    read_memory: int = 256 * MiB
    part_size: int = 16 * MiB
    upload_concurrency: int = 8
    store_threads: int = 32


@dataclasses.dataclass(frozen=True)
class Core:
    """The parts of a running core. ``fs`` is what serves requests."""

    store: ObjectStore
    stats: Stats
    cache: ChunkCache
    chunked: ChunkedLayout
    chunks: ChunkSource
    uploader: Uploader
    fs: Filesystem
    nursery: trio.Nursery
    staging_dir: Path
    recovered: list[str]  # what recovering the staging directory's leftovers found


def _chunked_layout(
    store: ObjectStore,
    cache: ChunkCache,
    cfg: CoreConfig,
    *,
    nursery: trio.Nursery,
    limiter: trio.CapacityLimiter,
    threads: PackThreads,
) -> ChunkedLayout:
    # one chunk index per mount; its reads share the core's nursery, store limiter and call
    # timeout, its writes the bounded compression/pack-upload threads the core owns
    return ChunkedLayout(
        store,
        nursery=nursery,
        limiter=limiter,
        threads=threads,
        cache=cache,
        store_timeout=cfg.store_timeout,
    )


@contextlib.asynccontextmanager
async def build_core(
    store: ObjectStore, cache_dir: Path, cfg: CoreConfig, *, stats: Stats | None = None
) -> AsyncIterator[Core]:
    """Build the core on ``store`` with its cache and staging directory under ``cache_dir``,
    start its background tasks, and tear it all down on exit (see the module docstring)."""
    stats = stats if stats is not None else Stats()
    staging = cache_dir / "staging"
    staging.mkdir(mode=0o700, exist_ok=True)
    os.chmod(staging, 0o700)
    recovered = await trio.to_thread.run_sync(
        recover_leftovers, staging, cache_dir / "recovered", store
    )
    async with contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)

        cache = ChunkCache(
            cache_dir / "cache",
            max_bytes=cfg.cache_size,
            min_free_bytes=cfg.cache_min_free,
            stats=stats,
        )
        await trio.to_thread.run_sync(cache.open)
        stack.callback(cache.close)

        limiter = trio.CapacityLimiter(cfg.store_threads)
        pack_threads = PackThreads(workers=2, uploads=4)
        stack.callback(pack_threads.close)
        chunked = _chunked_layout(
            store, cache, cfg, nursery=nursery, limiter=limiter, threads=pack_threads
        )
        chunks = ChunkSource(
            store,
            cache,
            nursery=nursery,
            limiter=limiter,
            stats=stats,
            chunk_size=cfg.chunk_size,
            read_request_size=max(cfg.read_request_size, cfg.chunk_size),
            max_readahead=cfg.max_readahead,
            memory_bytes=cfg.read_memory,
            store_timeout=cfg.store_timeout,
            chunked=chunked,
        )
        uploader = Uploader(
            store,
            chunks,
            staging_dir=staging,
            nursery=nursery,
            limiter=limiter,
            stats=stats,
            part_size=cfg.part_size,
            upload_concurrency=cfg.upload_concurrency,
            store_timeout=cfg.store_timeout,
        )
        fs = Filesystem(
            store, chunks, uploader, nursery=nursery, limiter=limiter, stats=stats, config=cfg
        )
        nursery.start_soon(fs.retry_loop)  # S-FAIL-3
        yield Core(store, stats, cache, chunked, chunks, uploader, fs, nursery, staging, recovered)
