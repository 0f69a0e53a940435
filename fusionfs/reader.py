"""Chunked, de-duplicated, read-ahead fetching of object data.

Purpose: turn a FUSE ``read(off, size)`` on an object version into chunk fetches. A chunk is
``chunk_size`` bytes of one object *version*, identified by ``(key, etag, index)``, so bytes of
two versions can never be mixed: every ranged GET carries ``If-Match: etag`` and a version that
changed under us is ``Stale`` (ESTALE), never a splice.

Where a chunk comes from, fastest first: the in-memory LRU of recent chunks (kernel reads are
often smaller than a chunk, so consecutive reads hit it), a fetch already in flight for the same
chunk (two readers of one chunk cause one fetch), the on-disk ``ChunkCache``, then the store.
Misses that are adjacent go up as one ranged GET of up to ``request_size`` bytes.

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

Concurrency: everything here runs on the trio thread except the store and cache calls, which go
through ``trio.to_thread.run_sync`` (store calls under the mount's ``CapacityLimiter``). State is
only touched on the trio thread, so it needs no lock. A fetch that fails wakes its waiters with
the error; nothing is cached from it. Caveat: a fetch's thread cannot be interrupted; when a call
overruns ``call_timeout`` the waiters get ``Transient`` and the thread is abandoned (the store's
own deadline ends it later).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from fusionfs.cache import WRITER_THREADS
from fusionfs.errors import Stale
from fusionfs.stats import Stats
from fusionfs.store import checksum as _checksum
from fusionfs.store.base import (
    Checksum,
    Corrupt,
    ETag,
    Key,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    Transient,
)

if TYPE_CHECKING:
    from fusionfs.cache import ChunkCache
    from fusionfs.chunked import ChunkedLayout

__all__ = ["ChunkSource", "ObjectRef", "ReadState", "run_store_call"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_ChunkId = tuple[Key, ETag, int]
_Data = bytes | memoryview  # a chunk: its own bytes, or a view into a response buffer


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectRef:
    """One version of one object: what a chunk belongs to."""

    key: Key
    etag: ETag
    size: int
    chunked: bool = False  # a chunked-layout manifest: ``size`` is the logical size
    checksum: Checksum | None = None  # the version's full-object checksum, if known (S-INTEG-2)

    @property
    def verifiable(self) -> bool:
        return self.checksum is not None and not self.chunked


@dataclasses.dataclass(slots=True)
class ReadState:
    """Per file handle: how far a sequential stream has got and how far ahead to fetch.

    The kernel does not deliver one reader's reads in order: its own read-ahead puts several
    1 MiB requests in flight at once and pyfuse3 answers them concurrently, so read 12 can
    arrive before reads 10 and 11. A read therefore counts as sequential when it starts
    anywhere from a little behind the highest chunk read so far (``high``) up to one past the
    end of what read-ahead already asked for; only a read outside that band closes the window.
    """

    high: int = -1  # highest chunk read in the current stream; -1 before the first read
    window: int = 0  # chunks
    prefetched_until: int = -1  # highest chunk index already requested by read-ahead
    #: Why this handle's version failed its checksum (S-INTEG-2): every later read of the
    #: handle fails too. The kernel retries a failed read-ahead page with a read of its own,
    #: which must not succeed: the pages before it hold bytes the check refused.
    corrupt: str | None = None

    def advance(self, first: int, last: int, *, max_window: int, min_window: int = 1) -> bool:
        """Note a read of chunks ``first..last``: a sequential one doubles the read-ahead
        window (from ``min_window`` up to ``max_window``), any other closes it. True if the
        handle now has a window to fill."""
        if self.high < 0:
            sequential = first == 0
        else:
            behind = max(self.window, min_window, _REORDER_SLACK)
            ahead = max(self.high, self.prefetched_until) + 1
            sequential = self.high - behind <= first <= ahead
        if sequential:
            self.window = min(max(min_window, self.window * 2), max_window)
            self.high = max(self.high, last)
        else:
            self.window = 0
            self.high = last
            self.prefetched_until = last
        return self.window > 0

    def wanted(self, nchunks: int, min_request: int) -> tuple[int, int] | None:
        """The chunks read-ahead should ask for now, ``(start, stop)`` inclusive, or None when
        fewer than ``min_request`` are missing from the window (and it does not reach the end).
        Marks them requested."""
        if self.window <= 0:
            return None
        start = max(self.high + 1, self.prefetched_until + 1)
        stop = min(self.high + self.window, nchunks - 1)
        if stop < start or (stop - start + 1 < min_request and stop < nchunks - 1):
            return None
        self.prefetched_until = stop
        return start, stop


#: How many chunks behind the furthest read a read may start and still count as sequential.
_REORDER_SLACK = 8

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


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: _Data | None = None
        self.error: BaseException | None = None


async def run_store_call(
    fn: Callable[[], T], *, limiter: trio.CapacityLimiter, timeout: float, what: str
) -> T:
    """Run a blocking store call in a worker thread, bounded by ``timeout`` seconds."""
    with trio.move_on_after(timeout) as scope:
        return await trio.to_thread.run_sync(fn, limiter=limiter, abandon_on_cancel=True)
    assert scope.cancelled_caught
    raise Transient(f"{what}: no answer from the store within {timeout:g} s")


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
        request_size: int,
        max_readahead: int,
        memory_bytes: int,
        call_timeout: float,
        chunked: ChunkedLayout | None = None,
    ) -> None:
        if chunk_size <= 0 or request_size < chunk_size:
            raise ValueError("need 0 < chunk_size <= request_size")
        self._store = store
        self._cache = cache
        self._nursery = nursery
        self._limiter = limiter
        self._stats = stats
        self.chunk_size = chunk_size
        self._run_chunks = max(1, request_size // chunk_size)
        self._max_window = max(1, max_readahead // chunk_size)
        self._mem: OrderedDict[_ChunkId, _Data] = OrderedDict()
        self._mem_bytes = 0
        self._mem_limit = max(memory_bytes, 2 * max_readahead, 4 * request_size)
        self._inflight: dict[_ChunkId, _Pending] = {}
        self._touched: OrderedDict[_ChunkId, None] = OrderedDict()  # by sparse reads
        # S-INTEG-2: the CRC of each chunk in memory (of a version with a checksum), the folds
        # in progress, and the versions verified whole in this mount
        self._crcs: dict[_ChunkId, int] = {}
        self._folds: OrderedDict[tuple[Key, ETag], _Fold] = OrderedDict()
        self._verified: OrderedDict[tuple[Key, ETag], None] = OrderedDict()
        # versions found corrupt, and how often: a cache write of a chunk fetched before the
        # last drop is not made (it would put back what the drop took away)
        self._drops: dict[tuple[Key, ETag], int] = {}
        self._call_timeout = call_timeout
        # Cache writes happen in the background, off the read's critical path; bounded so a slow
        # cache disk cannot make memory grow without limit (excess writes are simply skipped).
        self._cache_limiter = trio.CapacityLimiter(WRITER_THREADS)
        # Runs of up to 16 chunks are looked up in one thread hand-off each; 8 at once, so a
        # warm sequential read keeps its whole read-ahead window in flight (1 GiB warm read on
        # s3rver, alternating runs: 780-880 MB/s with 8, 691-854 with 2).
        self._cache_read_limiter = trio.CapacityLimiter(8)
        # Bytes handed to cache writers and not yet written; released chunk by chunk from the
        # writer threads (hence the lock; the trio thread reads it without). The bound is the
        # read memory: the chunks waiting are views of responses that the in-memory LRU holds
        # anyway. A cold 1 GiB read on s3rver skipped 120 of its 1024 chunks with a 128 MiB
        # bound released per 16-chunk stretch (GETs complete in bursts, 8 stretches at once).
        self._cache_backlog = 0
        self._cache_backlog_lock = threading.Lock()
        self._cache_backlog_limit = max(self._mem_limit, 64 * chunk_size + (64 << 20))
        if chunked is None:  # the chunked layout (reads of chunked files go there)
            from fusionfs.chunked import ChunkedLayout

            chunked = ChunkedLayout(store, cache=cache, call_timeout=call_timeout)
        chunked.bind(nursery)
        self.chunked = chunked

    # -- public -----------------------------------------------------------------------------
    async def read(
        self, ref: ObjectRef, off: int, size: int, state: ReadState | None, *,
        cache: bool = True, release: bool = False,
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
            self._request(ref, 0, (ref.size - 1) // cs, cache)
        if state is not None:
            self._advance_window(ref, state, first, last, cache)
            if (
                state.window == 0
                and end - off <= cs
                and (off % cs or end - off < cs)  # covers no chunk whole
                and self._first_touch(ref, first, last)
            ):
                return await self._read_pages(ref, off, end)
        self._request(ref, first, last, cache)
        out: bytes | memoryview
        check = ref.verifiable and (ref.key, ref.etag) not in self._verified
        if first == last:
            data = await self._chunk(ref, first)
            if check:
                await self._fold(ref, first, data, state)
            out = memoryview(data)[off - first * cs : end - first * cs]
        else:
            parts = []
            for idx in range(first, last + 1):
                data = await self._chunk(ref, idx)
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
    async def _fold(
        self, ref: ObjectRef, idx: int, data: _Data, state: ReadState | None
    ) -> None:
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
            "chunks are dropped", ref.key, algorithm, ref.checksum.b64(), got,
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
            if cid in self._mem or cid in self._inflight or cid in self._touched:
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
        try:
            blob = await run_store_call(
                fn, limiter=self._limiter, timeout=self._call_timeout, what=f"GET {ref.key}",
            )
        except (PreconditionFailed, NotFound) as e:
            raise Stale(f"{ref.key} changed in the store while being read") from e
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
            data = self._mem.pop((ref.key, ref.etag, idx), None)
            if data is not None:
                self._mem_bytes -= len(data)
            self._crcs.pop((ref.key, ref.etag, idx), None)

    def forget(self, key: Key) -> None:
        """Drop in-memory chunks of ``key`` (any version): after an overwrite or unlink."""
        self.chunked.forget(key)
        for cid in [c for c in self._mem if c[0] == key]:
            self._mem_bytes -= len(self._mem.pop(cid))
        for cid in [c for c in self._crcs if c[0] == key]:
            del self._crcs[cid]

    # -- read-ahead ----------------------------------------------------------------------
    def _advance_window(
        self, ref: ObjectRef, state: ReadState, first: int, last: int, cache: bool = True
    ) -> None:
        if not state.advance(first, last, max_window=self._max_window, min_window=4):
            return
        if self._cache_backlog >= self._cache_backlog_limit:
            # The cache disk is behind: read no further ahead until it catches up (the next
            # read tops the window up again), so that what a sequential read fetches is cached
            # rather than skipped. Reads themselves are never held back: their own chunks are
            # fetched as usual, and their cache writes are skipped while the backlog is full.
            return
        nchunks = (ref.size + self.chunk_size - 1) // self.chunk_size
        # top up in whole requests of request_size (or of the window while it is still
        # smaller than one), not one chunk at a time
        wanted = state.wanted(nchunks, min(self._run_chunks, state.window))
        if wanted is not None:
            self._request(ref, *wanted, cache)

    # -- chunk plumbing ----------------------------------------------------------------------
    def _request(self, ref: ObjectRef, first: int, last: int, cache: bool = True) -> None:
        """Make sure every chunk in [first, last] is in memory or being fetched (and what is
        fetched, written to the disk cache unless ``cache`` is False)."""
        run: list[int] = []
        for idx in range(first, last + 1):
            cid = (ref.key, ref.etag, idx)
            if cid in self._mem or cid in self._inflight:
                if run:
                    self._spawn(ref, run, cache)
                    run = []
                continue
            self._inflight[cid] = _Pending()
            run.append(idx)
            if len(run) == self._run_chunks:
                self._spawn(ref, run, cache)
                run = []
        if run:
            self._spawn(ref, run, cache)

    def _spawn(self, ref: ObjectRef, run: list[int], cache: bool) -> None:
        self._nursery.start_soon(self._fetch_run, ref, list(run), cache)

    async def _chunk(self, ref: ObjectRef, idx: int) -> _Data:
        cid = (ref.key, ref.etag, idx)
        while True:
            data = self._mem.get(cid)
            if data is not None:
                self._mem.move_to_end(cid)
                return data
            pending = self._inflight.get(cid)
            if pending is None:
                # evicted from memory between request and use: fetch it again
                self._request(ref, idx, idx)
                continue
            await pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            return pending.data

    async def _fetch_run(self, ref: ObjectRef, run: list[int], cache: bool = True) -> None:
        try:
            missing = run
            if self._cache is not None:
                # one thread hand-off for the whole run: on 2 cores the hand-off, not the
                # read, is what costs (see docs/design/data-path.md)
                hits = await trio.to_thread.run_sync(
                    self._cache_lookup, ref, run, limiter=self._cache_read_limiter
                )
                missing = [i for i in run if i not in hits]
                for idx, (data, crc) in hits.items():
                    self._resolve(ref, idx, data, crc)
            # cache hits may have split the run: fetch each contiguous stretch of misses
            stretches: list[list[int]] = []
            for idx in missing:
                if stretches and stretches[-1][-1] == idx - 1:
                    stretches[-1].append(idx)
                else:
                    stretches.append([idx])
            for stretch in stretches:
                await self._fetch_stretch(ref, stretch, cache)
        except BaseException as exc:
            for idx in run:
                pending = self._inflight.pop((ref.key, ref.etag, idx), None)
                if pending is not None:
                    pending.error = exc if isinstance(exc, Exception) else Transient("cancelled")
                    pending.event.set()
            if not isinstance(exc, Exception):
                raise
            if not isinstance(exc, Stale):
                log.warning("fetching %s chunks %d-%d failed: %s", ref.key, run[0], run[-1], exc)

    async def _fetch_stretch(self, ref: ObjectRef, stretch: list[int], cache: bool) -> None:
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
                if crcs is None or start != 0 or length != ref.size or self._whole(
                    ref, crcs, view
                ):
                    return blob, crcs
                self._stats.add("checksum_mismatches")
                log.warning(
                    "GET %s: the object does not match its stored checksum%s", ref.key,
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
        fetched: list[tuple[int, _Data]] = [
            (idx, view[n * cs : (n + 1) * cs]) for n, idx in enumerate(stretch)
        ]
        for n, (idx, data) in enumerate(fetched):
            self._resolve(ref, idx, data, None if crcs is None else crcs[n])
        if cache:
            self._cache_store(ref, fetched)

    async def _get_with(
        self, ref: ObjectRef, fn: Callable[[], tuple[bytes, list[int] | None]], length: int
    ) -> tuple[bytes, list[int] | None]:
        """``fn()`` (a ranged GET of ``length`` bytes and what goes with it) in a worker thread."""
        try:
            blob, extra = await run_store_call(
                fn, limiter=self._limiter, timeout=self._call_timeout, what=f"GET {ref.key}",
            )
        except (PreconditionFailed, NotFound) as e:
            raise Stale(f"{ref.key} changed in the store while being read") from e
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
        cid = (ref.key, ref.etag, 0)
        if cid not in self._mem and cid not in self._inflight:
            crcs = self._crcs_of(ref, memoryview(data), 1)
            if crcs is not None and len(data) == ref.size:  # the whole object: checked now
                if not self._whole(ref, crcs, memoryview(data)):
                    self._stats.add("checksum_mismatches")
                    log.warning("GET %s: the object does not match its stored checksum; "
                                "fetching it again", ref.key)
                    return  # not served: the read fetches (and checks) it again
                self._stats.add("objects_verified")
                self._mark_verified(ref)
                crcs = None
            self._resolve(ref, 0, data, None if crcs is None else crcs[0])

    def _resolve(self, ref: ObjectRef, idx: int, data: _Data, crc: int | None = None) -> None:
        cid = (ref.key, ref.etag, idx)
        old = self._mem.pop(cid, None)
        if old is not None:
            self._mem_bytes -= len(old)
        self._mem[cid] = data
        self._mem_bytes += len(data)
        if crc is not None:
            self._crcs[cid] = crc
        else:
            self._crcs.pop(cid, None)
        while self._mem_bytes > self._mem_limit and len(self._mem) > 1:
            gone, dropped = self._mem.popitem(last=False)
            self._mem_bytes -= len(dropped)
            self._crcs.pop(gone, None)
        pending = self._inflight.pop(cid, None)
        if pending is not None:
            pending.data = data
            pending.event.set()

    def _cache_store(self, ref: ObjectRef, chunks: list[tuple[int, _Data]]) -> None:
        """Write a fetched stretch to the disk cache in the background, in one thread hand-off.

        Chunks beyond the backlog bound are not cached (a cache is never worth stalling reads).
        """
        if self._cache is None:
            return
        taken: list[tuple[int, _Data]] = []
        for idx, data in chunks:
            if self._cache_backlog + len(data) > self._cache_backlog_limit:
                self._stats.add("cache_writes_skipped", len(chunks) - len(taken))
                break
            with self._cache_backlog_lock:
                self._cache_backlog += len(data)
            taken.append((idx, data))
        if taken:
            epoch = self._drops.get((ref.key, ref.etag), 0)
            self._nursery.start_soon(self._cache_put, ref, taken, epoch)

    async def _cache_put(
        self, ref: ObjectRef, chunks: list[tuple[int, _Data]], epoch: int = 0
    ) -> None:
        cache = self._cache
        assert cache is not None
        chunk_size = self.chunk_size
        vkey = (ref.key, ref.etag)

        pending = sum(len(data) for _, data in chunks)

        def release(n: int) -> None:
            nonlocal pending
            with self._cache_backlog_lock:
                self._cache_backlog -= n
                pending -= n

        def put_all() -> None:
            for idx, data in chunks:
                try:
                    if self._drops.get(vkey, 0) == epoch:  # not found corrupt since fetched
                        cache.put(ref.key, ref.etag, chunk_size, idx, data)
                finally:
                    release(len(data))

        try:
            await trio.to_thread.run_sync(put_all, limiter=self._cache_limiter)
        except Exception:
            log.exception("chunk cache write failed")
        finally:
            release(pending)  # what was not written (cancelled before its turn)
