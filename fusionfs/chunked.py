"""The chunked layout inside a mount: reading chunked files, streaming writes into packs.

Purpose: the glue between ``fusionfs.layout`` (formats, chunking, packs, index, GC; blocking)
and the async filesystem. One ``ChunkedLayout`` per mount owns

- the mount-wide ``ChunkIndex`` (digest -> pack location), fed by every manifest the mount
  writes or reads, and primed on request from a directory's manifests (``prime_from``: the
  ``user.fusionfs.dedup-from`` control xattr);
- the thread pools of all chunk writers (compression, pack uploads): bounded per mount, whatever
  the number of files written at once;
- an in-memory cache of manifests per (key, ETag) and of decoded chunks per content digest, with
  in-flight de-duplication, and the on-disk ``ChunkCache`` keyed by digest, so a chunk shared by
  two snapshots is fetched and cached once;
- per-directory accounting of what chunked commits stored (``user.fusionfs.chunk-stats``).

Reading (``read``): a chunked ``ObjectRef`` maps to its manifest (fetched with ``If-Match`` on
the ETag; a changed object is ``Stale``); the chunks a read touches are taken from memory, from
the disk cache, or fetched, back-to-back chunks of a pack in one ranged GET, in a worker thread
that also decompresses and verifies them. Sequential reads grow a read-ahead window counted in
manifest chunks.

Writing (``ChunkFeed``): a staged file in a chunked directory feeds a ``ChunkWriter`` from its
staging file as bytes are staged sequentially (several MiB behind the write front), so ``close``
only waits for the tail; a write behind what was already fed abandons the stream, and the
commit feeds the whole content again (unchanged chunks cost a hash, no upload).

Concurrency: trio thread for all state here; blocking work in worker threads
(``trio.to_thread.run_sync`` under limiters). Memory: chunk memory is bounded by
``memory_bytes``; each writer by its ``ChunkWriter`` bounds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import trio

from fusionfs.errors import Stale
from fusionfs.layout import (
    FUSION_PREFIX,
    MAX_CHUNK,
    PACK_SIZE,
    ChunkIndex,
    ChunkPolicy,
    ChunkWriter,
    Manifest,
    ManifestError,
    WriteStats,
    fetch_chunks,
    prime_index,
    read_manifest,
)
from fusionfs.store.base import (
    ETag,
    Key,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    Transient,
    iter_list,
)

if TYPE_CHECKING:
    from fusionfs.cache import ChunkCache
    from fusionfs.reader import ObjectRef, ReadState

__all__ = ["DIR_LAYOUT_METADATA", "FEED_STEP", "ChunkFeed", "ChunkedLayout", "DirStats"]

log = logging.getLogger(__name__)

#: Metadata of a directory's marker object that makes new files below it chunked.
DIR_LAYOUT_METADATA = "fusion-dir-layout"
_CACHE_ETAG = ETag("blake3")
FEED_STEP = 4 << 20  # bytes read from staging and fed at a time
_FEED_LAG = 4 << 20  # stay this far behind the write front (kernel writeback reorders a little)


@dataclasses.dataclass(slots=True)
class DirStats:
    """What chunked commits stored in one directory (since mount)."""

    files: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # logical, stored
    writes: WriteStats = dataclasses.field(default_factory=WriteStats)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": len(self.files),
            "logical_bytes": sum(v[0] for v in self.files.values()),
            "stored_bytes": sum(v[1] for v in self.files.values()),
            "new_stored_bytes": self.writes.new_stored,
            "new_chunks": self.writes.new_chunks,
            "reused_chunks": self.writes.reused_chunks,
            "reused_logical_bytes": self.writes.reused_logical,
            "packs_written": self.writes.packs,
            "packs_refreshed": self.writes.touched,
        }


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkedLayout:
    """Mount-wide state of the chunked layout (see the module docstring). One per mount."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        cache: ChunkCache | None = None,
        workers: int = 2,
        pack_uploads: int = 4,
        pack_size: int = PACK_SIZE,
        level: int = 1,
        policy: ChunkPolicy | None = None,
        refresh_age: float = 3600.0,
        memory_bytes: int = 64 << 20,
        request_size: int = 16 << 20,
        max_readahead: int = 64 << 20,
        call_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self.cache = cache
        self.index = ChunkIndex()
        self.policy = policy or ChunkPolicy()
        self._workers = workers
        self._pack_uploads = pack_uploads
        self._pack_size = pack_size
        self._level = level
        self._refresh_age = refresh_age
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "fusionfs-chunks")
        self._upload_pool = concurrent.futures.ThreadPoolExecutor(pack_uploads, "fusionfs-packs")
        self.limiter = trio.CapacityLimiter(max(4, 2 * workers))  # threads feeding/finishing
        self._fetch_limiter = trio.CapacityLimiter(8)
        self._cache_limiter = trio.CapacityLimiter(2)  # see cache.WRITER_THREADS
        self._request_size = request_size
        self._max_window = max(1, max_readahead // self.policy.avg_size)
        self._call_timeout = call_timeout
        self._manifests: collections.OrderedDict[tuple[Key, ETag], Manifest] = (
            collections.OrderedDict()
        )
        self._mem: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._mem_bytes = 0
        self._mem_limit = max(memory_bytes, max_readahead + request_size, 4 * self.policy.max_size)
        self._inflight: dict[bytes, _Pending] = {}
        self._cache_backlog = 0
        self.dirs: dict[str, DirStats] = {}
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        """The nursery that runs background fetches (set by the ``ChunkSource`` that owns us)."""
        if self._nursery is None:
            self._nursery = nursery

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._upload_pool.shutdown(wait=True)

    # -- writing -------------------------------------------------------------------------------
    def new_writer(self) -> ChunkWriter:
        return ChunkWriter(
            self.store, policy=self.policy, level=self._level, workers=self._workers,
            index=self.index, refresh_age=self._refresh_age, pack_size=self._pack_size,
            pack_uploads=self._pack_uploads, pool=self._pool, upload_pool=self._upload_pool,
        )

    def note_commit(self, key: Key, manifest: Manifest, stats: WriteStats) -> None:
        """Account a committed chunked file in its directory's stats; remember its manifest."""
        parent, _, name = key.rpartition("/")
        d = self.dirs.setdefault(parent + "/" if parent else "", DirStats())
        d.files[name] = (manifest.size, manifest.stored_bytes)
        d.writes.add(stats)

    def forget_dir_file(self, key: Key) -> None:
        parent, _, name = key.rpartition("/")
        d = self.dirs.get(parent + "/" if parent else "")
        if d is not None:
            d.files.pop(name, None)

    def prime_from(self, prefix: Key) -> dict[str, int]:
        """Blocking: read the manifests of the chunked files directly under ``prefix`` into the
        index and check their packs (one HEAD per pack). For ``dedup-from``."""
        manifests = []
        for page in iter_list(self.store, prefix, "/"):
            for obj in page.objects:
                if obj.key == prefix or obj.size < 64:
                    continue
                try:
                    manifests.append(read_manifest(self.store, obj.key, obj.etag))
                except (ManifestError, NotFound, PreconditionFailed):
                    continue  # a plain file, or gone: nothing to learn
        chunks, packs = prime_index(self.store, self.index, manifests)
        return {"manifests": len(manifests), "chunks": chunks, "packs": packs}

    # -- reading -------------------------------------------------------------------------------
    def forget(self, key: Key) -> None:
        for k in [k for k in self._manifests if k[0] == key]:
            del self._manifests[k]

    async def manifest(self, ref: ObjectRef) -> Manifest:
        """The manifest of a chunked object version (cached per (key, ETag))."""
        mkey = (ref.key, ref.etag)
        manifest = self._manifests.get(mkey)
        if manifest is not None:
            self._manifests.move_to_end(mkey)
            return manifest
        fn = functools.partial(read_manifest, self.store, ref.key, ref.etag)
        try:
            manifest = cast(Manifest, await self._run(fn, f"GET manifest {ref.key}"))
        except (PreconditionFailed, NotFound) as e:
            raise Stale(f"{ref.key} changed in the store while being read") from e
        self._manifests[mkey] = manifest
        while len(self._manifests) > 256:
            self._manifests.popitem(last=False)
        self.index.add_manifest(manifest)
        return manifest

    async def _run(self, fn: Callable[[], Any], what: str) -> Any:
        with trio.move_on_after(self._call_timeout) as scope:
            return await trio.to_thread.run_sync(
                fn, limiter=self._fetch_limiter, abandon_on_cancel=True
            )
        assert scope.cancelled_caught
        raise Transient(f"{what}: no answer from the store within {self._call_timeout:g} s")

    async def read(
        self, ref: ObjectRef, off: int, size: int, state: ReadState | None, *,
        cache: bool = True,
    ) -> bytes | memoryview:
        """``size`` bytes of the chunked file ``ref`` from ``off`` (short only at its end).

        Pieces of chunks are views, not copies: a read within one chunk returns a view into it
        (pyfuse3 answers the kernel from any buffer), a read across chunks (128 KiB on average,
        so a 1 MiB read spans about 8) is one join of views, the only copy on the trio thread.
        ``cache=False``: what is fetched is not written to the disk cache (ChunkSource.read)."""
        manifest = await self.manifest(ref)
        span = manifest.span(off, size)
        if not span:
            return b""
        first, last = span[0][0], span[-1][0]
        if state is not None:
            self._advance_window(manifest, state, first, last, cache)
        self._request(manifest, first, last, cache)
        parts: list[bytes | memoryview] = []
        for idx, lo, hi in span:
            data = await self._chunk(manifest, idx)
            parts.append(memoryview(data)[lo:hi] if (lo, hi) != (0, len(data)) else data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _advance_window(
        self, manifest: Manifest, state: ReadState, first: int, last: int, cache: bool = True
    ) -> None:
        if not state.advance(first, last, max_window=self._max_window, min_window=2):
            return
        wanted = state.wanted(len(manifest.chunks), max(1, state.window // 2))
        if wanted is not None:
            self._request(manifest, *wanted, cache)

    def _request(self, manifest: Manifest, first: int, last: int, cache: bool = True) -> None:
        """Make sure chunks first..last are in memory or being fetched, in runs of chunks
        that lie back to back in one pack, of at most ``request_size`` stored bytes each."""
        run: list[int] = []
        run_bytes = 0
        for idx in range(first, last + 1):
            digest = manifest.chunks[idx].digest
            if digest in self._mem or digest in self._inflight:
                if run:
                    self._spawn(manifest, run, cache)
                    run, run_bytes = [], 0
                continue
            if run and not (run[-1] == idx - 1 and manifest.contiguous(idx - 1)):
                self._spawn(manifest, run, cache)  # one run = one ranged GET: in parallel
                run, run_bytes = [], 0
            self._inflight[digest] = _Pending()
            run.append(idx)
            run_bytes += manifest.chunks[idx].stored
            if run_bytes >= self._request_size:
                self._spawn(manifest, run, cache)
                run, run_bytes = [], 0
        if run:
            self._spawn(manifest, run, cache)

    def _spawn(self, manifest: Manifest, run: list[int], cache: bool) -> None:
        assert self._nursery is not None, "ChunkedLayout.bind was not called"
        self._nursery.start_soon(self._fetch_run, manifest, list(run), cache)

    async def _chunk(self, manifest: Manifest, idx: int) -> bytes:
        digest = manifest.chunks[idx].digest
        while True:
            data = self._mem.get(digest)
            if data is not None:
                self._mem.move_to_end(digest)
                return data
            pending = self._inflight.get(digest)
            if pending is None:
                self._request(manifest, idx, idx)  # evicted between request and use
                continue
            await pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            return pending.data

    async def _fetch_run(self, manifest: Manifest, run: list[int], cache: bool = True) -> None:
        digests = [manifest.chunks[i].digest for i in run]
        try:
            missing = run
            if self.cache is not None:
                hits = await trio.to_thread.run_sync(
                    self._cache_lookup, digests, limiter=self._cache_limiter
                )
                for digest, data in hits.items():
                    self._resolve(digest, data)
                missing = [i for i in run if manifest.chunks[i].digest not in hits]
            stretches: list[list[int]] = []
            for idx in missing:
                if stretches and stretches[-1][-1] == idx - 1:
                    stretches[-1].append(idx)
                else:
                    stretches.append([idx])
            for s in stretches:
                fn = functools.partial(fetch_chunks, self.store, manifest, s[0], s[-1],
                                       max_request=self._request_size)
                datas: list[bytes] = await self._run(fn, "GET pack range")
                fetched = [(manifest.chunks[idx].digest, data)
                           for idx, data in zip(s, datas, strict=True)]
                for digest, data in fetched:
                    self._resolve(digest, data)
                if cache:
                    self._cache_store(fetched)
        except BaseException as exc:
            for digest in digests:
                pending = self._inflight.pop(digest, None)
                if pending is not None:
                    pending.error = exc if isinstance(exc, Exception) else Transient("cancelled")
                    pending.event.set()
            if not isinstance(exc, Exception):
                raise
            log.warning("fetching chunks failed: %s", exc)

    def _cache_lookup(self, digests: list[bytes]) -> dict[bytes, bytes]:
        assert self.cache is not None
        hits = {}
        for digest in digests:
            data = self.cache.get(Key(FUSION_PREFIX + digest.hex()), _CACHE_ETAG, MAX_CHUNK, 0)
            if data is not None:
                hits[digest] = data
        return hits

    def _resolve(self, digest: bytes, data: bytes) -> None:
        old = self._mem.pop(digest, None)
        if old is not None:
            self._mem_bytes -= len(old)
        self._mem[digest] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > self._mem_limit and len(self._mem) > 1:
            _, dropped = self._mem.popitem(last=False)
            self._mem_bytes -= len(dropped)
        pending = self._inflight.pop(digest, None)
        if pending is not None:
            pending.data = data
            pending.event.set()

    def _cache_store(self, chunks: list[tuple[bytes, bytes]]) -> None:
        """Write a fetched stretch to the disk cache in the background, one thread hand-off
        for all of it (a GiB is 8192 chunks). Bounded: a slow cache disk makes cache writes be
        skipped, never memory grow."""
        if self.cache is None or self._nursery is None or self._cache_backlog > 64 << 20:
            return
        self._cache_backlog += sum(len(data) for _, data in chunks)
        self._nursery.start_soon(self._cache_put, chunks)

    async def _cache_put(self, chunks: list[tuple[bytes, bytes]]) -> None:
        cache = self.cache
        assert cache is not None

        def put_all() -> None:
            for digest, data in chunks:
                cache.put(Key(FUSION_PREFIX + digest.hex()), _CACHE_ETAG, MAX_CHUNK, 0, data)

        try:
            await trio.to_thread.run_sync(put_all, limiter=self._cache_limiter)
        except Exception:
            log.exception("chunk cache write failed")
        finally:
            self._cache_backlog -= sum(len(data) for _, data in chunks)


def _feed_pieces(writer: ChunkWriter, offset: int, pieces: list[bytes | memoryview]) -> None:
    for piece in pieces:
        writer.feed(offset, piece)
        offset += memoryview(piece).nbytes


class ChunkFeed:
    """Feeds one staged file's bytes, in order, into a ``ChunkWriter`` (trio side).

    ``read(off, n)`` returns the file's current bytes (staging over base) as a list of pieces,
    short at the end of the file. ``wrote`` is told of
    every write; ``finish`` feeds what is left and returns the manifest once its packs are
    durable. Abandon with ``close``.
    """

    def __init__(
        self,
        layout: ChunkedLayout,
        read: Callable[[int, int], Awaitable[list[bytes | memoryview]]],
        size: Callable[[], int],
    ) -> None:
        self._layout = layout
        self._read = read
        self._size = size
        self.writer = layout.new_writer()
        self.valid = True
        self.read_until = 0  # bytes [0, read_until) were taken from staging (or are being)
        self._idle = trio.Event()
        self._idle.set()
        self._progress = trio.Event()  # set (and replaced) each time a piece has been fed
        self.error: BaseException | None = None

    def wrote(self, off: int, nursery: trio.Nursery) -> None:
        """A write at ``off`` happened: feed what is far enough behind in the background."""
        if not self.valid:
            return
        if off < self.read_until:
            self.valid = False  # a byte already fed changed: the commit starts again
            return
        if self._idle.is_set() and self._size() - self.read_until >= FEED_STEP + _FEED_LAG:
            self._idle = trio.Event()
            nursery.start_soon(self._pump)

    async def _pump(self) -> None:
        try:
            while self.valid and self._size() - self.read_until >= FEED_STEP + _FEED_LAG:
                await self._feed_piece(FEED_STEP)
        except Exception as e:
            self.error = e
            self.valid = False
        finally:
            self._idle.set()
            self._advanced()

    async def keep_up(self, max_lag: int) -> None:
        """Wait while the feed is busy and more than ``max_lag`` bytes behind the write front.

        The staged file keeps only its newest writes in memory; a feed that falls further behind
        reads its bytes back from disk, which costs more CPU than the chunking itself on a busy
        machine. Awaited by a write before it is acknowledged, so the kernel holds the writing
        process back to the pace of the chunks going out."""
        while self.valid and not self._idle.is_set() and self._size() - self.read_until > max_lag:
            await self._progress.wait()

    def _advanced(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _feed_piece(self, n: int) -> None:
        start = self.read_until
        self.read_until += n
        pieces = await self._read(start, n)
        short = n - sum(memoryview(p).nbytes for p in pieces)
        if short > 0:
            pieces.append(bytes(short))
        await trio.to_thread.run_sync(_feed_pieces, self.writer, start, pieces,
                                      limiter=self._layout.limiter)
        self._advanced()

    async def finish(self, size: int) -> Manifest:
        """Feed ``[fed, size)`` and return the manifest (packs durable). Raises on failure."""
        await self._idle.wait()
        if not self.valid:
            raise self.error or ValueError("stream abandoned")
        while self.read_until < size:
            await self._feed_piece(min(FEED_STEP, size - self.read_until))
        manifest: Manifest = await trio.to_thread.run_sync(
            self.writer.finish, limiter=self._layout.limiter
        )
        return manifest

    async def close(self) -> None:
        self.valid = False
        await self._idle.wait()
        await trio.to_thread.run_sync(self.writer.close, limiter=self._layout.limiter)
