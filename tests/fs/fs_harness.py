"""The harness for testing the fusionfs core (``Filesystem``) without a kernel.

``FsFactory`` (the ``make_fs`` fixture in conftest.py) builds a core with
``fusionfs.core.build_core``, as the mount does (chunk cache -> ``ChunkSource`` -> ``Uploader``
-> ``Filesystem``, their background tasks and the retry loop in the core's own nursery), each
run as a background task of the fixture, and returns a ``Harness``: the parts plus a small API
that makes the calls the kernel would make (lookup per path component, create/open,
read/write, flush+release, opendir/readdir in batches/releasedir, ...).

Caveats: pyfuse3 is never imported, so ``ops`` (errno mapping, entry lifetimes) is not exercised;
``forget`` is never sent, so inodes stay known for the harness's life. Sizes are small (64 KiB
chunks, 5 MiB parts): a "large" file is a few parts. The retry loop (S-FAIL-3) waits an hour
unless a test asks for less (``retry_interval``). Stopping a harness (``shutdown``) does not
flush, which is also how a test simulates a daemon that died.
"""

from __future__ import annotations

import dataclasses
import os
import random
import stat
from pathlib import Path

import trio
import trio.testing
from helpers import wait_until

from fusionfs.cache import ChunkCache
from fusionfs.core import CoreConfig, build_core
from fusionfs.errors import NoEntry
from fusionfs.fs import ROOT_INODE, Filesystem, Inode, Kind
from fusionfs.reader import ChunkSource
from fusionfs.stats import Stats
from fusionfs.store import FaultyStore, Key
from fusionfs.writer import Uploader

__all__ = ["CHUNK", "PART", "FsFactory", "Harness", "KiB", "MiB", "data_of"]

MiB = 1 << 20
KiB = 1 << 10
CHUNK = 64 * KiB
PART = 5 * MiB
_KERNEL_IO = 128 * KiB  # the size of the kernel's read/write requests in these tests
_READDIR_BATCH = 100  # entries the "kernel" takes per readdir call


def data_of(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic bytes; no short period (so misplaced ranges show), different per seed."""
    return random.Random(seed).randbytes(n)


@dataclasses.dataclass
class Harness:
    """One ``Filesystem`` with its parts, and kernel-like helpers over it."""

    fs: Filesystem
    store: FaultyStore
    cache: ChunkCache
    chunks: ChunkSource
    uploader: Uploader
    stats: Stats
    cache_dir: Path
    recovered: list[str]  # messages of recover_leftovers at start
    _stop: trio.Event = dataclasses.field(default_factory=trio.Event)
    _stopped: trio.Event = dataclasses.field(default_factory=trio.Event)

    @property
    def staging_dir(self) -> Path:
        return self.cache_dir / "staging"

    async def shutdown(self) -> None:
        """Tear this filesystem down (cancel its background tasks, close its cache)."""
        self._stop.set()
        await self._stopped.wait()

    async def settle(self, *, timeout: float = 10.0, cache_backlog: int = 0) -> None:
        """Wait until nothing is going on in the background: every task blocked, no chunk
        fetch in flight (plain or chunked), and the cache writers' backlog down to
        ``cache_backlog`` bytes. What a test then sees not done (no fetch, no cache write) was
        not merely late. Raises AssertionError after ``timeout`` seconds."""
        chunks = self.chunks

        async def idle() -> bool:
            await trio.testing.wait_all_tasks_blocked(0.01)
            return chunks._engine.quiet(cache_backlog) and chunks.chunked._engine.quiet()

        await wait_until(idle, timeout, "the core to settle")

    # -- paths --------------------------------------------------------------------------------
    @staticmethod
    def _split(path: str) -> list[bytes]:
        return [os.fsencode(p) for p in path.strip("/").split("/") if p]

    async def lookup(self, path: str) -> Inode:
        """Walk ``path`` from the root with one ``lookup`` per component, as the kernel does."""
        inode = self.fs.inode(ROOT_INODE)
        for name in self._split(path):
            inode = await self.fs.lookup(inode.ino, name)
        return inode

    async def _parent(self, path: str) -> tuple[Inode, bytes]:
        parts = self._split(path)
        assert parts, f"no name in {path!r}"
        parent = await self.lookup("/".join(os.fsdecode(p) for p in parts[:-1]))
        return parent, parts[-1]

    async def stat(self, path: str) -> Inode:
        inode = await self.lookup(path)
        return await self.fs.getattr(inode.ino)

    async def exists(self, path: str) -> bool:
        try:
            await self.lookup(path)
        except NoEntry:
            return False
        return True

    # -- files --------------------------------------------------------------------------------
    async def create(self, path: str, mode: int = 0o644) -> int:
        parent, name = await self._parent(path)
        handle, _ = await self.fs.create(
            parent.ino, name, stat.S_IFREG | mode, os.getuid(), os.getgid()
        )
        return self.fs.register(handle)

    async def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        inode = await self.lookup(path)
        handle, _keep, _direct = await self.fs.open(inode.ino, flags)
        return self.fs.register(handle)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.fs.write(fh, off, data)

    async def close(self, fh: int) -> None:
        """close(2): ``flush`` (its error is the caller's), then ``release`` whatever happens."""
        try:
            await self.fs.flush(fh)
        finally:
            await self.fs.release(fh)

    async def write_file(self, path: str, data: bytes, *, block: int = _KERNEL_IO) -> None:
        """open(O_WRONLY|O_CREAT|O_TRUNC), sequential writes of ``block`` bytes, close."""
        if await self.exists(path):
            fh = await self.open(path, os.O_WRONLY | os.O_TRUNC)
        else:
            fh = await self.create(path)
        try:
            for off in range(0, len(data), block):
                n = await self.write(fh, off, data[off : off + block])
                assert n == len(data[off : off + block])
        except BaseException:
            await self.fs.release(fh)
            raise
        await self.close(fh)

    async def read_fh(self, fh: int, *, block: int = _KERNEL_IO) -> bytes:
        out = bytearray()
        while True:
            piece = await self.read(fh, len(out), block)
            out += piece
            if len(piece) < block:
                return bytes(out)

    async def read_file(self, path: str, *, block: int = _KERNEL_IO) -> bytes:
        """open(O_RDONLY), sequential reads of ``block`` bytes until a short one, close."""
        fh = await self.open(path)
        try:
            return await self.read_fh(fh, block=block)
        finally:
            await self.close(fh)

    async def truncate(self, path: str, size: int) -> Inode:
        inode = await self.lookup(path)
        return await self.fs.setattr(inode.ino, size=size)

    # -- namespace ------------------------------------------------------------------------------
    async def listdir(self, path: str = "") -> list[str]:
        """opendir, readdir in batches as the kernel does (offsets carried on), releasedir."""
        inode = await self.lookup(path)
        fh = self.fs.opendir(inode.ino)
        names: list[str] = []
        try:
            start = 0
            while True:
                entries = (await self.fs.readdir(fh, start))[:_READDIR_BATCH]
                if not entries:
                    return names
                for name, child in entries:
                    self.fs.note_lookup(child)
                    names.append(os.fsdecode(name))
                start += len(entries)
        finally:
            self.fs.releasedir(fh)

    async def listdir_kinds(self, path: str = "") -> dict[str, Kind]:
        inode = await self.lookup(path)
        fh = self.fs.opendir(inode.ino)
        kinds: dict[str, Kind] = {}
        try:
            while True:
                entries = await self.fs.readdir(fh, len(kinds))
                if not entries:
                    return kinds
                kinds.update((os.fsdecode(n), c.kind) for n, c in entries)
        finally:
            self.fs.releasedir(fh)

    async def mkdir(self, path: str, mode: int = 0o755) -> Inode:
        parent, name = await self._parent(path)
        return await self.fs.mkdir(parent.ino, name, mode, os.getuid(), os.getgid())

    async def rmdir(self, path: str) -> None:
        parent, name = await self._parent(path)
        await self.fs.rmdir(parent.ino, name)

    async def unlink(self, path: str) -> None:
        parent, name = await self._parent(path)
        await self.fs.unlink(parent.ino, name)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        old_parent, old_name = await self._parent(old)
        new_parent, new_name = await self._parent(new)
        await self.fs.rename(old_parent.ino, old_name, new_parent.ino, new_name, flags)

    async def symlink(self, path: str, target: str) -> Inode:
        parent, name = await self._parent(path)
        return await self.fs.symlink(
            parent.ino, name, os.fsencode(target), os.getuid(), os.getgid()
        )

    async def readlink(self, path: str) -> str:
        return os.fsdecode(await self.fs.readlink((await self.lookup(path)).ino))

    # -- the store, bypassing the filesystem ------------------------------------------------------
    async def put(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> str:
        return await trio.to_thread.run_sync(self.store.inner.put, Key(key), data, metadata)

    async def get(self, key: str) -> bytes:
        info = await trio.to_thread.run_sync(self.store.inner.head, Key(key))
        if info.size == 0:
            return b""
        return await trio.to_thread.run_sync(self.store.inner.get_range, Key(key), 0, info.size)


class FsFactory:
    """``await make_fs(store, **options)``: a running ``Harness``; closed at teardown."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self._nursery = nursery
        self._tmp = tmp_path
        self._count = 0
        self.harnesses: list[Harness] = []

    def new_cache_dir(self) -> Path:
        self._count += 1
        path = self._tmp / f"cache{self._count}"
        path.mkdir(mode=0o700)
        return path

    async def __call__(
        self,
        store: FaultyStore,
        *,
        cache_dir: Path | None = None,
        metadata_ttl: float = 0.2,
        store_timeout: float = 5.0,
        chunk_size: int = CHUNK,
        read_request_size: int = 4 * CHUNK,
        max_readahead: int = 16 * CHUNK,
        read_memory: int = 4 * MiB,
        part_size: int = PART,
        upload_concurrency: int = 4,
        store_threads: int = 16,
        cache_size: int = 256 * MiB,
        direct_io: bool = False,
        retry_interval: float = 3600.0,  # the retry loop runs; tests of it make it short
    ) -> Harness:
        cache_dir = cache_dir if cache_dir is not None else self.new_cache_dir()
        cfg = CoreConfig(
            metadata_ttl=metadata_ttl,
            store_timeout=store_timeout,
            chunk_size=chunk_size,
            read_request_size=read_request_size,
            max_readahead=max_readahead,
            read_memory=read_memory,
            part_size=part_size,
            upload_concurrency=upload_concurrency,
            store_threads=store_threads,
            cache_size=cache_size,
            cache_min_free=0,
            direct_io=direct_io,
            retry_interval=retry_interval,
        )
        harness: Harness = await self._nursery.start(self._run, store, cache_dir, cfg)
        self.harnesses.append(harness)
        return harness

    async def _run(
        self,
        store: FaultyStore,
        cache_dir: Path,
        cfg: CoreConfig,
        task_status: trio.TaskStatus[Harness] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        harness: Harness | None = None
        try:
            async with build_core(store, cache_dir, cfg) as core:
                harness = Harness(
                    core.fs,
                    store,
                    core.cache,
                    core.chunks,
                    core.uploader,
                    core.stats,
                    cache_dir,
                    core.recovered,
                )
                task_status.started(harness)
                await harness._stop.wait()
        finally:
            if harness is not None:
                harness._stopped.set()
