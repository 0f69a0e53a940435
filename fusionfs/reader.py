"""Chunked, de-duplicated, read-ahead fetching of object data.

Purpose: turn a FUSE ``read(off, size)`` on an object version into chunk fetches. A chunk is
``chunk_size`` bytes of one object *version*, identified by ``(key, etag, index)``, so bytes of
two versions can never be mixed: every ranged GET carries ``If-Match: etag`` and a version that
changed under us is ``Stale`` (ESTALE), never a splice.

Where a chunk comes from, fastest first: the in-memory LRU of recent chunks (kernel reads are
often smaller than a chunk, so consecutive reads hit it), a fetch already in flight for the same
chunk (two readers of one chunk cause one fetch), the on-disk ``ChunkCache``, then the store.
Misses that are adjacent go up as one ranged GET of up to ``read_request_size`` bytes.

Read-ahead: each file handle carries a ``ReadState``. A read that starts near the furthest chunk
read so far (a few chunks behind it, since the kernel delivers its read-ahead out of order, up to
one past what read-ahead already requested) is sequential and doubles the handle's window, up to
``max_readahead`` bytes; any other read resets it. The chunks in the window are fetched in the
background as several ranged GETs in flight at once.

Integrity (S-INTEG-2): where the version has a full-object checksum (``ObjectRef.checksum``),
every chunk gets its CRC in the worker thread that fetched it or read it from the disk cache; the
reads that touch the chunks in order fold those CRCs together (``combine``, no second pass over
the bytes), and the read that touches the last chunk compares the result with the stored
checksum: on a mismatch it fails with ``Corrupt`` (EIO) and the version's chunks are dropped
from memory and from the disk cache, so a later read fetches them again. A single GET that
covers the whole object is checked before any of its bytes are served or cached: a mismatch is
fetched once more, then ``Corrupt``. Caveat: a file read in part, or out of order beyond the
slack below, is not checked; bytes of chunks before the last are served before the check.

Machinery: memory, fetches in flight, runs and cache writes are ``fetch.FetchEngine``'s, the
engine the chunked layout's reads use too; this module says how a plain object's chunks are
named (``(key, etag, index)``), found in the disk cache, fetched (one ranged GET per stretch,
checked) and cached (``_VersionChunks``), and adds what only plain objects have: page reads,
checksum folds, release of chunks read. Reads of chunked files go to ``chunked.ChunkedLayout``.

Concurrency: everything here runs on the trio thread except the store and cache calls, which go
through ``trio.to_thread.run_sync`` (store calls under the mount's ``CapacityLimiter``). State is
only touched on the trio thread, so it needs no lock. A fetch that fails wakes its waiters with
the error; nothing is cached from it. Caveat: a fetch's thread cannot be interrupted; when a call
overruns ``store_timeout`` the waiters get ``Transient`` and the thread is abandoned (the store's
own deadline ends it later).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from fusionfs.cache import WRITER_THREADS
from fusionfs.chunked import ChunkedLayout
from fusionfs.errors import Stale
from fusionfs.fetch import Data, FetchEngine, ReadState
from fusionfs.objects import ObjectRef, run_pinned_call
from fusionfs.stats import Stats
from fusionfs.store import checksum as _checksum
from fusionfs.store.base import (
    Corrupt,
    ETag,
    Key,
    ObjectStore,
    Transient,
)

if TYPE_CHECKING:
    from fusionfs.cache import ChunkCache

__all__ = ["ChunkSource"]

log = logging.getLogger(__name__)

_ChunkId = tuple[Key, ETag, int]

_PAGE = 4096
#: Chunks remembered as touched by a sparse read: a second random read of one fetches it whole.
_TOUCHED_MAX = 1 << 16
#: Objects of at most this many chunks (and one request) are fetched whole by any read of them
#: until verified (S-INTEG-2).
_WHOLE_CHUNKS = 8
#: How far ahead of the next chunk to fold a served chunk's CRC may be kept (S-INTEG-2).
_FOLD_AHEAD = 4096
#: Object versions with a fold in progress, and versions already verified, remembered at most.
_FOLDS_MAX = 1024


@dataclasses.dataclass(slots=True)
class _Fold:
    """The CRC of a version's chunks ``0..next-1`` (served in order), and the CRCs and lengths
    of chunks served ahead of ``next``."""

    next: int = 0
    crc: int = 0
    ahead: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)


class ChunkSource:
    """Serves byte ranges of object versions, chunk by chunk. One per mount."""

    def __init__(
        self,
        store: ObjectStore,
        cache: ChunkCache | None,
        *,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
        stats: Stats,
        chunk_size: int,
        read_request_size: int,
        max_readahead: int,
        memory_bytes: int,
        store_timeout: float,
        chunked: ChunkedLayout,
    ) -> None:
        if chunk_size <= 0 or read_request_size < chunk_size:
            raise ValueError("need 0 < chunk_size <= read_request_size")
        self._store = store
        self._cache = cache
        self._nursery = nursery
        self._limiter = limiter
        self._stats = stats
        self.chunk_size = chunk_size
        self._run_chunks = max(1, read_request_size // chunk_size)
        self._max_window = max(1, max_readahead // chunk_size)
        mem_limit = max(memory_bytes, 2 * max_readahead, 4 * read_request_size)
        self._touched: OrderedDict[_ChunkId, None] = OrderedDict()  # by sparse reads
        # S-INTEG-2: the CRC of each chunk in memory (of a version with a checksum), the folds
        # in progress, and the versions verified whole in this mount
        self._crcs: dict[_ChunkId, int] = {}
        self._folds: OrderedDict[tuple[Key, ETag], _Fold] = OrderedDict()
        self._verified: OrderedDict[tuple[Key, ETag], None] = OrderedDict()
        # versions found corrupt, and how often: a cache write of a chunk fetched before the
        # last drop is not made (it would put back what the drop took away)
        self._drops: dict[tuple[Key, ETag], int] = {}
        self._call_timeout = store_timeout
        # Runs of up to 16 chunks are looked up in one thread hand-off each; 8 at once, so a
        # warm sequential read keeps its whole read-ahead window in flight (1 GiB warm read on
        # s3rver, alternating runs: 780-880 MB/s with 8, 691-854 with 2).
        self._cache_read_limiter = trio.CapacityLimiter(8)
        # Cache writes happen in the background, off the read's critical path (WRITER_THREADS at
        # once); bounded so a slow cache disk cannot make memory grow without limit (excess
        # writes are simply skipped). The bound is the read memory: the chunks waiting are views
        # of responses that the in-memory LRU holds anyway. A cold 1 GiB read on s3rver skipped
        # 120 of its 1024 chunks with a 128 MiB bound released per 16-chunk stretch (GETs
        # complete in bursts, 8 stretches at once).
        self._engine: FetchEngine[_ChunkId] = FetchEngine(
            nursery=nursery,
            memory_bytes=mem_limit,
            cache_limiter=trio.CapacityLimiter(WRITER_THREADS),
            backlog_limit=max(mem_limit, 64 * chunk_size + (64 << 20)),
            stats=stats,
            on_evict=self._evicted,
        )
        self.chunked = chunked  # the chunked layout (reads of chunked files go there)

    # -- public -----------------------------------------------------------------------------
    async def read(
        self,
        ref: ObjectRef,
        off: int,
        size: int,
        state: ReadState | None,
        *,
        cache: bool = True,
        release: bool = False,
    ) -> bytes | memoryview:
        """``size`` bytes of ``ref`` from ``off`` (short only at the end of the object).

        A read within one chunk returns a view into the chunk, not a copy: pyfuse3 answers the
        kernel from any buffer, so the bytes are copied once, into the kernel. ``cache=False``:
        what this read and its read-ahead fetch is not written to the disk cache (a file read
        once, S-READ-5); chunks already cached are still used. ``release=True`` (the kernel
        keeps what it reads in its page cache): a sequential read drops from memory the chunks
        it has read to their end (S-READ-7)."""
        if state is not None and state.corrupt is not None:
            raise Corrupt(state.corrupt)
        if size <= 0 or off >= ref.size:
            return b""
        if ref.chunked:
            return await self.chunked.read(ref, off, size, state, cache=cache)
        end = min(off + size, ref.size)
        cs = self.chunk_size
        first, last = off // cs, (end - 1) // cs
        if (
            ref.verifiable
            and ref.size <= min(self._run_chunks, _WHOLE_CHUNKS) * cs
            and (ref.key, ref.etag) not in self._verified
        ):
            # a small object: one GET of all of it, checked before any byte is served
            # (S-INTEG-2), rather than the read's chunks (or pages) and then read-ahead's
            self._engine.request(_VersionChunks(self, ref), 0, (ref.size - 1) // cs, cache)
        src = _VersionChunks(self, ref)
        if state is not None:
            self._advance_window(src, state, first, last, cache)
            if (
                state.window == 0
                and end - off <= cs
                and (off % cs or end - off < cs)  # covers no chunk whole
                and self._first_touch(ref, first, last)
            ):
                return await self._read_pages(ref, off, end)
        self._engine.request(src, first, last, cache)
        out: bytes | memoryview
        check = ref.verifiable and (ref.key, ref.etag) not in self._verified
        if first == last:
            data = await self._engine.chunk(src, first)
            if check:
                await self._fold(ref, first, data, state)
            out = memoryview(data)[off - first * cs : end - first * cs]
        else:
            parts = []
            for idx in range(first, last + 1):
                data = await self._engine.chunk(src, idx)
                if check:
                    await self._fold(ref, idx, data, state)
                lo = max(off, idx * cs) - idx * cs
                hi = min(end, (idx + 1) * cs) - idx * cs
                parts.append(memoryview(data)[lo:hi])  # a view: the join below is the one copy
            out = b"".join(parts)
        if release and state is not None and state.window > 0:
            passed = last if end == min((last + 1) * cs, ref.size) else last - 1
            self._release_read(ref, first, passed)
        return out

    # -- integrity (S-INTEG-2) -----------------------------------------------------------------
    async def _fold(self, ref: ObjectRef, idx: int, data: Data, state: ReadState | None) -> None:
        """Note that chunk ``idx`` of ``ref`` was served; when that completes the version in
        order, compare with its stored checksum (``Corrupt`` on a mismatch)."""
        assert ref.checksum is not None
        vkey = (ref.key, ref.etag)
        fold = self._folds.get(vkey)
        if fold is None:
            fold = self._folds[vkey] = _Fold()
            while len(self._folds) > _FOLDS_MAX:
                self._folds.popitem(last=False)
        if idx < fold.next or idx in fold.ahead or idx >= fold.next + _FOLD_AHEAD:
            return
        crc = self._crcs.get((ref.key, ref.etag, idx))
        if crc is None:  # a chunk that came without one (primed, say): computed here
            crc = _checksum.compute(ref.checksum.algorithm, data)
        fold.ahead[idx] = (crc, len(data))
        algorithm = ref.checksum.algorithm
        while fold.next in fold.ahead:
            chunk_crc, length = fold.ahead.pop(fold.next)
            fold.crc = _checksum.combine(algorithm, fold.crc, chunk_crc, length)
            fold.next += 1
        if fold.next * self.chunk_size < ref.size:
            return
        del self._folds[vkey]
        if fold.crc == ref.checksum.value:
            self._stats.add("objects_verified")
            self._mark_verified(ref)
            return
        self._stats.add("checksum_mismatches")
        got = _checksum.encode(algorithm, fold.crc)
        log.warning(
            "%s: the bytes read do not match the object's %s (stored %s, read %s); its cached "
            "chunks are dropped",
            ref.key,
            algorithm,
            ref.checksum.b64(),
            got,
        )
        message = (
            f"{ref.key}: read bytes do not match the stored {algorithm} "
            f"({ref.checksum.source}): {got} != {ref.checksum.b64()}"
        )
        if state is not None:
            state.corrupt = message  # before the await: reads in flight on it fail too
        await self.drop_version(ref)
        raise Corrupt(message)

    def _mark_verified(self, ref: ObjectRef) -> None:
        self._verified[(ref.key, ref.etag)] = None
        while len(self._verified) > _FOLDS_MAX:
            self._verified.popitem(last=False)

    async def drop_version(self, ref: ObjectRef) -> None:
        """Forget every chunk of ``ref``'s key, in memory and in the disk cache (a version found
        corrupt: the next read fetches it again)."""
        self.forget(ref.key)
        self._folds.pop((ref.key, ref.etag), None)
        self._drops[(ref.key, ref.etag)] = self._drops.get((ref.key, ref.etag), 0) + 1
        cache = self._cache
        if cache is not None:
            await trio.to_thread.run_sync(cache.drop_object, ref.key)

    def _crcs_of(self, ref: ObjectRef, view: memoryview, count: int) -> list[int] | None:
        """Per-chunk CRCs of ``count`` chunks in ``view`` (worker thread), or None when the
        version has no checksum to check or was already verified in this mount."""
        if not ref.verifiable or (ref.key, ref.etag) in self._verified:
            return None
        assert ref.checksum is not None
        cs = self.chunk_size
        algorithm = ref.checksum.algorithm
        return [_checksum.compute(algorithm, view[n * cs : (n + 1) * cs]) for n in range(count)]

    def _whole(self, ref: ObjectRef, crcs: list[int], view: memoryview) -> bool:
        """Whether per-chunk ``crcs`` of the whole object ``view`` add up to its checksum."""
        assert ref.checksum is not None
        algorithm = ref.checksum.algorithm
        total = 0
        cs = self.chunk_size
        for n, crc in enumerate(crcs):
            total = _checksum.combine(algorithm, total, crc, len(view[n * cs : (n + 1) * cs]))
        return total == ref.checksum.value

    def _first_touch(self, ref: ObjectRef, first: int, last: int) -> bool:
        """Whether a random read of chunks ``first..last`` should fetch only its own pages
        (S-READ-8): nothing holds them (memory, a fetch in flight, the disk cache) and no earlier
        sparse read touched them. Marks them touched either way."""
        cids = [(ref.key, ref.etag, idx) for idx in range(first, last + 1)]
        sparse = True
        cache = self._cache
        for cid in cids:
            if self._engine.holds(cid) or cid in self._touched:
                sparse = False
            elif cache is not None and cache.contains(ref.key, ref.etag, self.chunk_size, cid[2]):
                sparse = False
            self._touched[cid] = None
            self._touched.move_to_end(cid)
        while len(self._touched) > _TOUCHED_MAX:
            self._touched.popitem(last=False)
        return sparse

    async def _read_pages(self, ref: ObjectRef, off: int, end: int) -> memoryview:
        """``[off, end)`` from one ranged GET of the pages holding it, not cached (S-READ-8).

        Why: a random 4 KiB read that fetched its whole 1 MiB chunk waited for 1 MiB to arrive
        (s3rver, p50: 6.1-7.7 ms, 4.2 ms like this, 2.7-3.5 ms for the bare GET), and a random
        1 MiB read, which spans two chunks, for 2 MiB. A chunk that random reads come back to is
        fetched whole and cached on the second touch, so a hot region ends up in the cache."""
        lo = off - off % _PAGE
        hi = min(ref.size, -(-end // _PAGE) * _PAGE)
        blob = await self._get(ref, lo, hi - lo)
        self._stats.add("sparse_reads")
        return memoryview(blob)[off - lo : end - lo]

    async def _get(self, ref: ObjectRef, start: int, length: int) -> bytes:
        """``length`` bytes of ``ref`` at ``start``, by one ranged GET pinned to its ETag."""
        fn = functools.partial(self._store.get_range, ref.key, start, length, ref.etag)
        blob = await run_pinned_call(
            fn, ref.key, limiter=self._limiter, timeout=self._call_timeout, what=f"GET {ref.key}"
        )
        if len(blob) != length:
            raise Transient(f"GET {ref.key}: short read ({len(blob)} of {length} bytes)")
        return blob

    def _release_read(self, ref: ObjectRef, first: int, last: int) -> None:
        """Drop chunks ``first..last`` from memory: a sequential read has passed their end and
        the kernel's page cache holds their bytes. Kept, they would only grow the daemon to its
        memory bound (256 MiB) during any large read, every chunk in fresh pages (a 1 GiB warm
        read took 97-101 thousand page faults); dropped, the read-ahead window's memory is
        reused. A later read of them finds them in the page cache, else in the disk cache."""
        for idx in range(first, last + 1):
            self._engine.drop((ref.key, ref.etag, idx))
            self._crcs.pop((ref.key, ref.etag, idx), None)

    def forget(self, key: Key) -> None:
        """Drop in-memory chunks of ``key`` (any version): after an overwrite or unlink."""
        self.chunked.forget(key)
        self._engine.drop_where(lambda c: c[0] == key)
        for cid in [c for c in self._crcs if c[0] == key]:
            del self._crcs[cid]

    # -- read-ahead ----------------------------------------------------------------------
    def _advance_window(
        self, src: _VersionChunks, state: ReadState, first: int, last: int, cache: bool = True
    ) -> None:
        if not state.advance(first, last, max_window=self._max_window, min_window=4):
            return
        if self._engine.cache_behind:
            # The cache disk is behind: read no further ahead until it catches up (the next
            # read tops the window up again), so that what a sequential read fetches is cached
            # rather than skipped. Reads themselves are never held back: their own chunks are
            # fetched as usual, and their cache writes are skipped while the backlog is full.
            return
        nchunks = (src.ref.size + self.chunk_size - 1) // self.chunk_size
        # top up in whole requests of read_request_size (or of the window while it is still
        # smaller than one), not one chunk at a time
        wanted = state.wanted(nchunks, min(self._run_chunks, state.window))
        if wanted is not None:
            self._engine.request(src, *wanted, cache)

    # -- chunk plumbing (for _VersionChunks and the engine) -----------------------------------
    def _evicted(self, cid: _ChunkId) -> None:
        self._crcs.pop(cid, None)

    def _resolve(self, ref: ObjectRef, idx: int, data: Data, crc: int | None) -> None:
        cid = (ref.key, ref.etag, idx)
        if crc is not None:
            self._crcs[cid] = crc
        else:
            self._crcs.pop(cid, None)
        self._engine.resolve(cid, data)

    async def _fetch_stretch(self, ref: ObjectRef, stretch: list[int]) -> list[Data]:
        cs = self.chunk_size
        start = stretch[0] * cs
        length = min((stretch[-1] + 1) * cs, ref.size) - start

        def fetch() -> tuple[bytes, list[int] | None]:
            """The GET, and the chunks' CRCs, in the worker thread (S-INTEG-2). A GET of the
            whole object is checked before anything is served: fetched once more on a
            mismatch, then ``Corrupt``."""
            for attempt in (1, 2):
                blob = self._store.get_range(ref.key, start, length, ref.etag)
                if len(blob) != length:
                    return blob, None
                view = memoryview(blob)
                crcs = self._crcs_of(ref, view, len(stretch))
                if crcs is None or start != 0 or length != ref.size or self._whole(ref, crcs, view):
                    return blob, crcs
                self._stats.add("checksum_mismatches")
                log.warning(
                    "GET %s: the object does not match its stored checksum%s",
                    ref.key,
                    "; fetching it again" if attempt == 1 else "",
                )
            assert ref.checksum is not None
            raise Corrupt(
                f"{ref.key}: the object does not match its stored {ref.checksum.algorithm} "
                f"({ref.checksum.source}) on two fetches"
            )

        blob, crcs = await self._get_with(ref, fetch, length)
        if crcs is not None and start == 0 and length == ref.size:
            self._stats.add("objects_verified")
            self._mark_verified(ref)  # checked whole before serving: no fold needed
            crcs = None
        # chunks are views into the one response buffer: no copy until the reply to the kernel
        view = memoryview(blob)
        datas: list[Data] = [view[n * cs : (n + 1) * cs] for n in range(len(stretch))]
        for n, idx in enumerate(stretch):
            cid = (ref.key, ref.etag, idx)
            if crcs is not None:
                self._crcs[cid] = crcs[n]
            else:
                self._crcs.pop(cid, None)
        return datas

    async def _get_with(
        self, ref: ObjectRef, fn: Callable[[], tuple[bytes, list[int] | None]], length: int
    ) -> tuple[bytes, list[int] | None]:
        """``fn()`` (a ranged GET of ``length`` bytes and what goes with it) in a worker thread."""
        blob, extra = await run_pinned_call(
            fn, ref.key, limiter=self._limiter, timeout=self._call_timeout, what=f"GET {ref.key}"
        )
        if len(blob) != length:
            raise Transient(f"GET {ref.key}: short read ({len(blob)} of {length} bytes)")
        return blob, extra

    def _cache_lookup(self, ref: ObjectRef, run: list[int]) -> dict[int, tuple[bytes, int | None]]:
        assert self._cache is not None
        hits: dict[int, tuple[bytes, int | None]] = {}
        for idx in run:
            data = self._cache.get(ref.key, ref.etag, self.chunk_size, idx)
            if data is not None:
                crcs = self._crcs_of(ref, memoryview(data), 1)
                hits[idx] = (data, None if crcs is None else crcs[0])
        return hits

    def prime(self, ref: ObjectRef, data: bytes) -> None:
        """Offer the first bytes of an object, fetched along with its metadata (a small file's
        lookup), so that the read that usually follows is served from memory."""
        if ref.size == 0 or len(data) != min(ref.size, self.chunk_size):
            return
        if not self._engine.holds((ref.key, ref.etag, 0)):
            crcs = self._crcs_of(ref, memoryview(data), 1)
            if crcs is not None and len(data) == ref.size:  # the whole object: checked now
                if not self._whole(ref, crcs, memoryview(data)):
                    self._stats.add("checksum_mismatches")
                    log.warning(
                        "GET %s: the object does not match its stored checksum; fetching it again",
                        ref.key,
                    )
                    return  # not served: the read fetches (and checks) it again
                self._stats.add("objects_verified")
                self._mark_verified(ref)
                crcs = None
            self._resolve(ref, 0, data, None if crcs is None else crcs[0])


class _VersionChunks:
    """The fetch engine's view of one plain object version: chunks of ``chunk_size`` bytes named
    ``(key, etag, index)``, runs of up to ``read_request_size`` bytes, each stretch one ranged GET
    pinned to the ETag, checked against the version's checksum where it has one (S-INTEG-2)."""

    __slots__ = ("_src", "ref", "run_limit")

    def __init__(self, src: ChunkSource, ref: ObjectRef) -> None:
        self._src = src
        self.ref = ref
        self.run_limit = src._run_chunks

    def cid(self, idx: int) -> _ChunkId:
        return (self.ref.key, self.ref.etag, idx)

    def follows(self, idx: int) -> bool:
        return True

    def weight(self, idx: int) -> int:
        return 1

    async def lookup(self, run: list[int]) -> dict[int, Data]:
        src, ref = self._src, self.ref
        if src._cache is None:
            return {}
        # one thread hand-off for the whole run: on 2 cores the hand-off, not the read, is
        # what costs (see docs/design/data-path.md)
        hits = await trio.to_thread.run_sync(
            src._cache_lookup, ref, run, limiter=src._cache_read_limiter
        )
        out: dict[int, Data] = {}
        for idx, (data, crc) in hits.items():
            cid = (ref.key, ref.etag, idx)
            if crc is not None:
                src._crcs[cid] = crc
            else:
                src._crcs.pop(cid, None)
            out[idx] = data
        return out

    async def fetch(self, stretch: list[int]) -> list[Data]:
        return await self._src._fetch_stretch(self.ref, stretch)

    def cache_writer(self) -> Callable[[int, Data], None] | None:
        src, ref = self._src, self.ref
        cache = src._cache
        if cache is None:
            return None
        vkey = (ref.key, ref.etag)
        epoch = src._drops.get(vkey, 0)
        chunk_size = src.chunk_size

        def put(idx: int, data: Data) -> None:
            if src._drops.get(vkey, 0) == epoch:  # not found corrupt since fetched
                cache.put(ref.key, ref.etag, chunk_size, idx, data)

        return put

    def failed(self, run: list[int], exc: Exception) -> None:
        if not isinstance(exc, Stale):
            log.warning("fetching %s chunks %d-%d failed: %s", self.ref.key, run[0], run[-1], exc)
