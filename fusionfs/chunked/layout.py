"""The chunked layout inside a mount: reading chunked files through the fetch engine.

Purpose: the glue between the blocking parts of ``fusionfs.chunked`` (format, chunker, index,
packer, retrieval, GC) and the async filesystem. One ``ChunkedLayout`` per mount owns

- the mount-wide ``ChunkIndex`` (digest -> pack location), fed by every manifest the mount
  writes or reads, and primed on request from a directory's manifests (``prime_from``: the
  ``user.fusionfs.dedup-from`` control xattr);
- an in-memory cache of manifests per (key, ETag), and a ``fetch.FetchEngine`` keyed by content
  digest for the decoded chunks (memory, fetches in flight, disk-cache writes), over the on-disk
  ``ChunkCache`` keyed by digest, so a chunk shared by two snapshots is fetched and cached once;
- per-directory accounting of what chunked commits stored (``user.fusionfs.chunk-stats``);
- the writers' side: ``new_writer`` gives a ``ChunkWriter`` on the mount's ``PackThreads``, and
  ``limiter`` bounds the worker threads that feed writers (``feed.ChunkFeed``).

Reading (``read``): a chunked ``ObjectRef`` maps to its manifest (fetched with ``If-Match`` on
the ETag; a changed object is ``Stale``); the chunks a read touches come from the engine: from
memory, from the disk cache, or fetched, back-to-back chunks of a pack in one ranged GET, in a
worker thread that also decompresses and verifies them (``retrieval.fetch_chunks``), under the
mount's store-call limiter and timeout. Sequential reads grow a read-ahead window counted in
manifest chunks.

Concurrency: trio thread for all state here; blocking work in worker threads
(``trio.to_thread.run_sync`` under limiters). The nursery, the store-call limiter and the pack
threads are handed in by whoever builds the mount's core. Memory: chunk memory is bounded by
``memory_bytes``; each writer by its ``ChunkWriter`` bounds.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from fusionfs.chunked.chunker import ChunkPolicy
from fusionfs.chunked.format import (
    FUSION_PREFIX,
    MAX_CHUNK,
    PACK_SIZE,
    Manifest,
    ManifestError,
    read_manifest,
)
from fusionfs.chunked.index import ChunkIndex, prime_index
from fusionfs.chunked.packer import ChunkWriter, PackThreads, WriteStats
from fusionfs.chunked.retrieval import fetch_chunks
from fusionfs.fetch import Data, FetchEngine, ReadState
from fusionfs.objects import ObjectRef, run_pinned_call, run_store_call
from fusionfs.store.base import ETag, Key, NotFound, ObjectStore, PreconditionFailed, iter_list

if TYPE_CHECKING:
    from fusionfs.cache import ChunkCache

__all__ = ["ChunkedLayout", "DirStats"]

log = logging.getLogger(__name__)

_CACHE_ETAG = ETag("blake3")


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


class ChunkedLayout:
    """Mount-wide state of the chunked layout (see the module docstring). One per mount."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
        threads: PackThreads,
        cache: ChunkCache | None = None,
        pack_size: int = PACK_SIZE,
        level: int = 1,
        policy: ChunkPolicy | None = None,
        refresh_age: float = 3600.0,
        memory_bytes: int = 64 << 20,
        read_request_size: int = 16 << 20,
        max_readahead: int = 64 << 20,
        store_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self.cache = cache
        self.index = ChunkIndex()
        self.policy = policy or ChunkPolicy()
        self._threads = threads
        self._pack_size = pack_size
        self._level = level
        self._refresh_age = refresh_age
        #: Worker threads feeding and finishing writers (``ChunkFeed``).
        self.limiter = trio.CapacityLimiter(max(4, 2 * threads.workers))
        self._limiter = limiter  # the mount's store calls
        # at most 8 pack-range fetches at once (each decompresses and verifies on its thread),
        # whatever the store limiter allows: restore competes with CRIU for the cores
        self._fetch_slots = trio.CapacityLimiter(8)
        self._cache_limiter = trio.CapacityLimiter(2)  # see cache.WRITER_THREADS
        self._request_size = read_request_size
        self._max_window = max(1, max_readahead // self.policy.avg_size)
        self._call_timeout = store_timeout
        self._manifests: collections.OrderedDict[tuple[Key, ETag], Manifest] = (
            collections.OrderedDict()
        )
        self._engine: FetchEngine[bytes] = FetchEngine(
            nursery=nursery,
            memory_bytes=max(
                memory_bytes, max_readahead + read_request_size, 4 * self.policy.max_size
            ),
            cache_limiter=self._cache_limiter,
            backlog_limit=64 << 20,
        )
        self.dirs: dict[str, DirStats] = {}

    # -- writing -------------------------------------------------------------------------------
    def new_writer(self) -> ChunkWriter:
        t = self._threads
        return ChunkWriter(
            self.store,
            policy=self.policy,
            level=self._level,
            workers=t.workers,
            index=self.index,
            refresh_age=self._refresh_age,
            pack_size=self._pack_size,
            pack_uploads=t.uploads,
            threads=t,
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
        manifest = await run_pinned_call(
            fn,
            ref.key,
            limiter=self._limiter,
            timeout=self._call_timeout,
            what=f"GET manifest {ref.key}",
        )
        self.remember(ref.key, ref.etag, manifest)
        return manifest

    def remember(self, key: Key, etag: ETag, manifest: Manifest) -> None:
        """Keep the manifest of the version ``etag`` of ``key``, read from the store by someone
        else (the verify hook): the first read of that file then needs no GET of its own."""
        self._manifests[(key, etag)] = manifest
        self._manifests.move_to_end((key, etag))
        while len(self._manifests) > 256:
            self._manifests.popitem(last=False)
        self.index.add_manifest(manifest)

    async def read(
        self,
        ref: ObjectRef,
        off: int,
        size: int,
        state: ReadState | None,
        *,
        cache: bool = True,
    ) -> bytes | memoryview:
        """``size`` bytes of the chunked file ``ref`` from ``off`` (short only at its end).
        ``cache=False``: what is fetched is not written to the disk cache
        (``reader.ChunkSource.read``)."""
        return await self.read_manifest(await self.manifest(ref), off, size, state, cache=cache)

    async def read_manifest(
        self,
        manifest: Manifest,
        off: int,
        size: int,
        state: ReadState | None = None,
        *,
        cache: bool = True,
    ) -> bytes | memoryview:
        """``size`` bytes from ``off`` of the file ``manifest`` describes.

        Pieces of chunks are views, not copies: a read within one chunk returns a view into it
        (pyfuse3 answers the kernel from any buffer), a read across chunks (128 KiB on average,
        so a 1 MiB read spans about 8) is one join of views, the only copy on the trio thread."""
        span = manifest.span(off, size)
        if not span:
            return b""
        src = _ManifestChunks(self, manifest)
        first, last = span[0][0], span[-1][0]
        if state is not None and state.advance(
            first, last, max_window=self._max_window, min_window=2
        ):
            wanted = state.wanted(len(manifest.chunks), max(1, state.window // 2))
            if wanted is not None:
                self._engine.request(src, *wanted, cache)
        self._engine.request(src, first, last, cache)
        parts: list[bytes | memoryview] = []
        for idx, lo, hi in span:
            data = await self._engine.chunk(src, idx)
            parts.append(memoryview(data)[lo:hi] if (lo, hi) != (0, len(data)) else data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- for _ManifestChunks -------------------------------------------------------------------
    def _cache_lookup(self, digests: list[bytes]) -> dict[bytes, bytes]:
        assert self.cache is not None
        hits = {}
        for digest in digests:
            data = self.cache.get(_cache_key(digest), _CACHE_ETAG, MAX_CHUNK, 0)
            if data is not None:
                hits[digest] = data
        return hits


def _cache_key(digest: bytes) -> Key:
    return Key(FUSION_PREFIX + digest.hex())


class _ManifestChunks:
    """The fetch engine's view of one chunked file: chunks named by digest, runs of chunks that
    lie back to back in one pack up to ``read_request_size`` stored bytes, fetched from their
    packs."""

    __slots__ = ("_layout", "_manifest", "run_limit")

    def __init__(self, layout: ChunkedLayout, manifest: Manifest) -> None:
        self._layout = layout
        self._manifest = manifest
        self.run_limit = layout._request_size

    def cid(self, idx: int) -> bytes:
        return self._manifest.chunks[idx].digest

    def follows(self, idx: int) -> bool:
        return self._manifest.contiguous(idx - 1)

    def weight(self, idx: int) -> int:
        return self._manifest.chunks[idx].stored

    async def lookup(self, run: list[int]) -> dict[int, Data]:
        layout = self._layout
        if layout.cache is None:
            return {}
        chunks = self._manifest.chunks
        hits = await trio.to_thread.run_sync(
            layout._cache_lookup, [chunks[i].digest for i in run], limiter=layout._cache_limiter
        )
        return {i: hits[chunks[i].digest] for i in run if chunks[i].digest in hits}

    async def fetch(self, stretch: list[int]) -> list[Data]:
        layout = self._layout
        fn = functools.partial(
            fetch_chunks,
            layout.store,
            self._manifest,
            stretch[0],
            stretch[-1],
            max_request=layout._request_size,
        )
        async with layout._fetch_slots:
            datas: list[bytes] = await run_store_call(
                fn,
                limiter=layout._limiter,
                timeout=layout._call_timeout,
                what="GET pack range",
            )
        return list(datas)

    def cache_writer(self) -> Callable[[int, Data], None] | None:
        cache = self._layout.cache
        if cache is None:
            return None
        chunks = self._manifest.chunks

        def put(idx: int, data: Data) -> None:
            cache.put(_cache_key(chunks[idx].digest), _CACHE_ETAG, MAX_CHUNK, 0, data)

        return put

    def failed(self, run: list[int], exc: Exception) -> None:
        log.warning("fetching chunks failed: %s", exc)
