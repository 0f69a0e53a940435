"""The fetch engine every read goes through, plain or chunked, and per-handle read-ahead state.

Purpose: turn "chunks ``first..last`` of this object are wanted" into background fetches and
"give me chunk ``idx``" into a wait on one of them, the same way for both layouts. The engine
knows chunks only by an id (``K``): ``(key, etag, index)`` for a plain object's fixed-size
chunks (``reader``), the BLAKE3 digest for a chunked file's content-defined ones
(``chunked.layout``). How a chunk is located, fetched and cached is the business of a
``ChunkLocator``, one per object version and read, handed to the engine with each request.

What the engine does, for both:

- an in-memory LRU of chunks, bounded in bytes (``memory_bytes``); a chunk is ``bytes`` or a view
  into one response buffer;
- de-duplication in flight: a chunk being fetched has a ``_Pending``; a second reader waits on it
  rather than fetching again;
- runs: wanted chunks that are neither in memory nor in flight are grouped into runs (while the
  source says they lie back to back, up to the source's ``run_limit``), each fetched by one
  background task: one disk-cache lookup for the run, then the misses in stretches of consecutive
  chunks, each stretch one store request (the source's ``fetch``);
- resolution: a fetched chunk goes into memory and wakes its waiters; a run that fails wakes
  them with its error (``Transient`` when cancelled) and caches nothing;
- cache writes in the background, one thread hand-off per stretch, bounded by a backlog in bytes
  (chunks beyond it are not cached: a cache is never worth stalling reads).

Read-ahead state (``ReadState``, one per file handle) is shared too: the sources decide how far
ahead to ask, the state says whether a read continues a sequential stream.

Concurrency: all state lives on the trio thread (no lock) except the cache backlog, released
from the cache writer threads (under a lock). The engine's tasks run in the nursery it is given
at construction; its threads run under the limiters it is given (cache writes) or the source's
(lookups, store calls, which a source bounds with ``objects.run_store_call``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

import trio

from fusionfs.stats import Stats
from fusionfs.store.base import Transient

__all__ = ["ChunkLocator", "Data", "FetchEngine", "ReadState"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
K_co = TypeVar("K_co", bound=Hashable, covariant=True)
Data = bytes | memoryview  # a chunk: its own bytes, or a view into a response buffer

#: How many chunks behind the furthest read a read may start and still count as sequential.
_REORDER_SLACK = 8


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


class ChunkLocator(Protocol[K_co]):
    """How the chunks of one object version are named, grouped, found and fetched."""

    #: A run is sent off once the ``weight`` of its chunks reaches this.
    run_limit: int

    def cid(self, idx: int) -> K_co:
        """The engine's id of chunk ``idx``."""

    def follows(self, idx: int) -> bool:
        """Whether chunk ``idx`` lies right after chunk ``idx - 1`` (one request may carry both)."""

    def weight(self, idx: int) -> int:
        """What chunk ``idx`` counts against ``run_limit``."""

    async def lookup(self, run: list[int]) -> dict[int, Data]:
        """The chunks of ``run`` the disk cache holds (one thread hand-off; {} without a cache)."""

    async def fetch(self, stretch: list[int]) -> list[Data]:
        """Consecutive chunks ``stretch`` from the store, checked, bounded by the store-call
        timeout."""

    def cache_writer(self) -> Callable[[int, Data], None] | None:
        """What writes one fetched chunk to the disk cache (called in a worker thread), or None
        without a cache. Asked on the trio thread when the fetch completes."""

    def failed(self, run: list[int], exc: Exception) -> None:
        """Report a run that failed (its waiters get ``exc``)."""


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: Data | None = None
        self.error: BaseException | None = None


class FetchEngine(Generic[K]):
    """Memory, in-flight fetches and cache writes of one kind of chunk (see the module
    docstring). One per reader kind per mount."""

    def __init__(
        self,
        *,
        nursery: trio.Nursery,
        memory_bytes: int,
        cache_limiter: trio.CapacityLimiter,
        backlog_limit: int,
        stats: Stats | None = None,
        on_evict: Callable[[K], None] | None = None,
    ) -> None:
        self._nursery = nursery
        self._mem: OrderedDict[K, Data] = OrderedDict()
        self._mem_bytes = 0
        self._mem_limit = memory_bytes
        self._inflight: dict[K, _Pending] = {}
        self._on_evict = on_evict
        self._stats = stats
        self._cache_limiter = cache_limiter
        # Bytes handed to cache writers and not yet written; released chunk by chunk from the
        # writer threads (hence the lock; the trio thread reads it without).
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        self._backlog_limit = backlog_limit

    # -- memory ------------------------------------------------------------------------------
    def holds(self, cid: K) -> bool:
        """Whether chunk ``cid`` is in memory or being fetched."""
        return cid in self._mem or cid in self._inflight

    def resolve(self, cid: K, data: Data) -> None:
        """Chunk ``cid`` is here: keep it (evicting the least recently used) and wake its
        waiters."""
        old = self._mem.pop(cid, None)
        if old is not None:
            self._mem_bytes -= len(old)
        self._mem[cid] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > self._mem_limit and len(self._mem) > 1:
            gone, dropped = self._mem.popitem(last=False)
            self._mem_bytes -= len(dropped)
            if self._on_evict is not None:
                self._on_evict(gone)
        pending = self._inflight.pop(cid, None)
        if pending is not None:
            pending.data = data
            pending.event.set()

    def drop(self, cid: K) -> None:
        """Forget chunk ``cid``'s bytes (a fetch in flight still completes)."""
        data = self._mem.pop(cid, None)
        if data is not None:
            self._mem_bytes -= len(data)

    def drop_where(self, match: Callable[[K], bool]) -> None:
        """Forget the bytes of every chunk whose id ``match``es."""
        for cid in [c for c in self._mem if match(c)]:
            self._mem_bytes -= len(self._mem.pop(cid))

    @property
    def cache_behind(self) -> bool:
        """Whether the cache writers hold as many bytes as they may (writes are being skipped)."""
        return self._backlog >= self._backlog_limit

    def quiet(self, backlog: int = 0) -> bool:
        """Whether no fetch is in flight and at most ``backlog`` bytes wait to be written to the
        cache (what a test waits for before asserting that something did not happen)."""
        return not self._inflight and self._backlog <= backlog

    # -- requests ----------------------------------------------------------------------------
    def request(self, src: ChunkLocator[K], first: int, last: int, cache: bool = True) -> None:
        """Make sure chunks ``first..last`` of ``src`` are in memory or being fetched, in runs
        of chunks that follow each other, up to ``src.run_limit`` each (fetched in parallel).
        ``cache``: what is fetched is written to the disk cache."""
        run: list[int] = []
        weight = 0
        for idx in range(first, last + 1):
            cid = src.cid(idx)
            if cid in self._mem or cid in self._inflight:
                if run:
                    self._spawn(src, run, cache)
                    run, weight = [], 0
                continue
            if run and not src.follows(idx):
                self._spawn(src, run, cache)
                run, weight = [], 0
            self._inflight[cid] = _Pending()
            run.append(idx)
            weight += src.weight(idx)
            if weight >= src.run_limit:
                self._spawn(src, run, cache)
                run, weight = [], 0
        if run:
            self._spawn(src, run, cache)

    def _spawn(self, src: ChunkLocator[K], run: list[int], cache: bool) -> None:
        self._nursery.start_soon(self._fetch_run, src, list(run), cache)

    async def chunk(self, src: ChunkLocator[K], idx: int) -> Data:
        """Chunk ``idx`` of ``src``: from memory, from a fetch in flight, else fetched now."""
        cid = src.cid(idx)
        while True:
            data = self._mem.get(cid)
            if data is not None:
                self._mem.move_to_end(cid)
                return data
            pending = self._inflight.get(cid)
            if pending is None:
                # evicted from memory between request and use: fetch it again
                self.request(src, idx, idx)
                continue
            await pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            return pending.data

    async def _fetch_run(self, src: ChunkLocator[K], run: list[int], cache: bool) -> None:
        try:
            hits = await src.lookup(run)
            for idx, data in hits.items():
                self.resolve(src.cid(idx), data)
            # cache hits may have split the run: fetch each stretch of consecutive misses
            stretches: list[list[int]] = []
            for idx in run:
                if idx in hits:
                    continue
                if stretches and stretches[-1][-1] == idx - 1:
                    stretches[-1].append(idx)
                else:
                    stretches.append([idx])
            for stretch in stretches:
                datas = await src.fetch(stretch)
                fetched = list(zip(stretch, datas, strict=True))
                for idx, data in fetched:
                    self.resolve(src.cid(idx), data)
                if cache:
                    self._cache_store(src, fetched)
        except BaseException as exc:
            for idx in run:
                pending = self._inflight.pop(src.cid(idx), None)
                if pending is not None:
                    pending.error = exc if isinstance(exc, Exception) else Transient("cancelled")
                    pending.event.set()
            if not isinstance(exc, Exception):
                raise
            src.failed(run, exc)

    # -- disk cache writes -------------------------------------------------------------------
    def _cache_store(self, src: ChunkLocator[K], chunks: list[tuple[int, Data]]) -> None:
        """Write a fetched stretch to the disk cache in the background, in one thread hand-off.
        Chunks beyond the backlog bound are not cached."""
        put = src.cache_writer()
        if put is None:
            return
        taken: list[tuple[int, Data]] = []
        for idx, data in chunks:
            if self._backlog + len(data) > self._backlog_limit:
                if self._stats is not None:
                    self._stats.add("cache_writes_skipped", len(chunks) - len(taken))
                break
            with self._backlog_lock:
                self._backlog += len(data)
            taken.append((idx, data))
        if taken:
            self._nursery.start_soon(self._cache_put, put, taken)

    async def _cache_put(
        self, put: Callable[[int, Data], None], chunks: list[tuple[int, Data]]
    ) -> None:
        pending = sum(len(data) for _, data in chunks)

        def release(n: int) -> None:
            nonlocal pending
            with self._backlog_lock:
                self._backlog -= n
                pending -= n

        def put_all() -> None:
            for idx, data in chunks:
                try:
                    put(idx, data)
                finally:
                    release(len(data))

        try:
            await trio.to_thread.run_sync(put_all, limiter=self._cache_limiter)
        except Exception:
            log.exception("chunk cache write failed")
        finally:
            release(pending)  # what was not written (cancelled before its turn)
