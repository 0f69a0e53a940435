"""Staging of files open for writing, streaming multipart upload, and commit on fsync/close.

Purpose: every inode open for writing gets a ``StagedFile``: a sparse local file (mode 0600, in a
0700 staging directory) that holds the bytes written so far, plus the object version the other
bytes come from (``base``). A file created or truncated on open has no base: all its content is
local, and when it is written sequentially it *streams*: as soon as a part's worth of bytes is
staged, that part goes up as a multipart-upload part in the background, several in parallel, so
``close`` only has to send the tail and complete the upload. A file opened for a rewrite or an
append keeps its base: a partial write to a chunk first fills that chunk from the base, and at
commit the unchanged parts are copied server-side (``UploadPartCopy``) or, where the server lacks
it, uploaded from the base's bytes.

Durability: ``commit`` returns once the object is committed in the store (PUT, or
CompleteMultipartUpload); until then nothing is visible under the key, so a half-written file is
never visible. A failed commit raises ``UploadFailed`` and leaves everything staged: the next
``fsync``/``close``/unmount tries again. Each staged file has a small JSON record beside it (key,
upload id) so that a daemon killed with unacknowledged data leaves something the next mount can
report (``staging.recover_leftovers``), and multipart uploads it can abort. The disk I/O of
staging files and their records is in ``fusionfs.staging``.

Write-behind: ``write`` only queues the bytes (up to 64 MiB per file) and one background drain
at a time writes the queue to the staging file with ``pwritev``; everything that reads the staging
file (reads, parts, commit, truncate) first waits for the queue to drain (``_settle``). A staging
write that fails (disk full) makes the next write and the commit fail with ``UploadFailed``.

Held files: a new file (no base) gets no staging file at first. Its writes stay queued in memory
(``_HOLD_MAX`` per file, ``_HOLD_BUDGET`` for the mount) and a commit PUTs them from there, so a
small file created, written and closed costs no file creation, record, disk write or unlink
(each one a thread hand-off). The staging file and its record are created ("materialized") as
soon as the file outgrows the hold, something needs the staging file (a read the newest writes do
not cover, a truncate), a commit fails (its data then stays staged), or ``_HOLD_S`` after the
first held write, whichever comes first: unacknowledged bytes live only in memory for at most
that long, as in the kernel's own page cache.

Concurrency: all state is touched on the trio thread only; file and store I/O run in worker
threads. Requests for one file interleave at every await, so a check and the act that depends on
it happen in one step (one fill per chunk, its old bytes queued behind earlier writes and ahead
of later ones; truncates queued too): the invariants are in ``docs/design/staging.md``.
``commit`` holds the file's ``commit_lock`` so two fsyncs of one file do not race; writes
may go on during a commit: each write bumps ``generation``, and a commit only marks the file clean
if no write happened meanwhile. A write into a part that has already been sent (the kernel's
writeback re-sends pages that were dirtied again) marks that part to be sent again before the
upload completes; only a truncate below the sent parts abandons the stream, and the commit then
uploads from the staging file instead. Memory is bounded: a part is read from the staging file
only once an upload slot is free, so at most ``upload_concurrency`` parts are in memory at once,
whatever the file size.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import trio

from fusionfs import staging
from fusionfs.chunked import FEED_STEP, ChunkedLayout, ChunkFeed, Manifest, write_manifest
from fusionfs.directio import ALIGN
from fusionfs.errors import Stale, UploadFailed, first_error
from fusionfs.objects import ObjectRef, run_store_call
from fusionfs.reader import ChunkSource
from fusionfs.stats import Stats
from fusionfs.store.base import (
    ETag,
    Key,
    NotFound,
    NotSupported,
    ObjectStore,
    StoreError,
    UploadPart,
)

__all__ = ["StagedFile", "Uploader", "part_size_for"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_PART = 5 << 30
#: files in a chunked directory smaller than this are stored plain (S-CHUNK-8)
CHUNKED_MIN_SIZE = 1 << 20
_MAX_PENDING = 64 << 20  # bytes of queued writes per file before a write waits for the disk
#: The newest back-to-back writes of a new file kept in memory (the write buffers themselves),
#: so that streamed parts and the chunk feed, which read the bytes just written, do not read
#: them back from the staging file. More than a part (16 MiB) plus the feed's lag and step.
_RECENT_MAX = 48 << 20
#: How far the chunk feed may fall behind a new file's write front before writes wait for it:
#: well within ``_RECENT_MAX``, so the feed reads from memory. What is behind when the writer
#: stops is what its commit still has to chunk and upload, so the bound is the length of the
#: flush after the last write: a 1 GiB snapstore dump on s3rver (alternating runs) flushed in
#: 0.41-0.58 s with 40 MiB, in 0.23-0.41 s with 16 MiB (four feed steps: the feed never runs dry).
_FEED_MAX_LAG = 4 * FEED_STEP
_MAX_PARTS = 10_000
#: A new file's writes are held in memory, without a staging file, up to this many bytes
#: (a file written in one 1 MiB FUSE request fits) ...
_HOLD_MAX = 1 << 20
#: ... while all held files of the mount hold less than this ...
_HOLD_BUDGET = 64 << 20
#: ... and for at most this many seconds after the first held write (see the module docstring).
_HOLD_S = 1.0


def part_size_for(number: int, base: int) -> int:
    """Size of part ``number`` (1-based): ``base`` for the first 1000 parts, then doubling every
    1000 parts (capped at S3's 5 GiB), so 10 000 parts reach past S3's 5 TiB object limit instead
    of stopping at 10 000 x base."""
    return min(base << ((number - 1) // 1000), _MAX_PART)


class Uploader:
    """Shared by all staged files of a mount: the store, limits and policy."""

    def __init__(
        self,
        store: ObjectStore,
        chunks: ChunkSource,
        *,
        staging_dir: Path,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
        stats: Stats,
        part_size: int,
        upload_concurrency: int,
        store_timeout: float,
    ) -> None:
        if part_size < 5 << 20:
            raise ValueError("part size must be at least 5 MiB (S3's minimum)")
        self.store = store
        self.chunks = chunks
        self.staging_dir = staging_dir
        self.nursery = nursery
        self.limiter = limiter
        self.stats = stats
        self.part_size = part_size
        self.slots = trio.CapacityLimiter(upload_concurrency)
        self.store_timeout = store_timeout
        self.part_copy_supported = True
        self.held_bytes = 0  # bytes of writes held in memory by files with no staging file yet

    async def call(self, fn: Callable[[], T], what: str, timeout: float | None = None) -> T:
        return await run_store_call(
            fn, limiter=self.limiter, timeout=timeout or self.store_timeout, what=what
        )

    async def new_staged(
        self, key: Key, base: ObjectRef | None, *, dirty: bool = False
    ) -> StagedFile:
        """The staged state of ``key``. With a ``base`` (a rewrite of an existing object) its
        staging file is created now, in a worker thread (it is disk I/O); a new file starts
        held in memory and gets one only when needed (see the module docstring), so ``create``,
        which runs under the kernel's lock of the directory, hands off nothing.

        ``dirty``: the file is to be committed even if never written (a new, empty file). Its
        crash record waits for the first write: an empty staging file holds nothing to recover
        (``recover_leftovers`` drops it).
        """
        name = uuid.uuid4().hex
        fd = dfd = -1
        if base is not None:
            path = self.staging_dir / f"{name}.data"
            fd, dfd = await trio.to_thread.run_sync(staging.open_staging, path)
        staged = StagedFile(self, key, base, name=name, fd=fd, dfd=dfd)
        if dirty:
            staged.generation, staged.dirty = 1, True
        return staged


class _Recent:
    """The bytes of the newest run of back-to-back writes to a file with no base, as the
    ``bytes`` objects the writes brought (no copy). Holds only the newest bytes of its range:
    a write that overlaps the run, or leaves a gap after it, starts a new run."""

    __slots__ = ("end", "nbytes", "pieces", "start")

    def __init__(self) -> None:
        self.start = self.end = self.nbytes = 0
        self.pieces: collections.deque[bytes] = collections.deque()

    def wrote(self, off: int, data: bytes) -> None:
        end = off + len(data)
        if self.pieces and end <= self.start:
            return  # below the run: the run's bytes are still the newest of their range
        if not self.pieces or off != self.end:
            self.pieces.clear()
            self.start, self.nbytes = off, 0
        self.pieces.append(data)
        self.end = end
        self.nbytes += len(data)
        while self.nbytes > _RECENT_MAX and len(self.pieces) > 1:
            dropped = self.pieces.popleft()
            self.start += len(dropped)
            self.nbytes -= len(dropped)

    def clear(self) -> None:
        self.pieces.clear()
        self.start = self.end = self.nbytes = 0

    def views(self, off: int, length: int) -> list[memoryview] | None:
        """``[off, off + length)`` as views of the writes that hold it, if the run holds all of
        it, else None."""
        end = off + length
        if not self.pieces or off < self.start or end > self.end or length <= 0:
            return None
        views: list[memoryview] = []
        pos = self.start
        for piece in self.pieces:
            stop = pos + len(piece)
            if stop > off and pos < end:
                views.append(memoryview(piece)[max(off, pos) - pos : min(end, stop) - pos])
            if stop >= end:
                break
            pos = stop
        return views

    def get(self, off: int, length: int) -> bytes | None:
        """``[off, off + length)`` if the run holds all of it, else None."""
        views = self.views(off, length)
        if views is None:
            return None
        if len(views) == 1:
            whole = views[0].obj
            if isinstance(whole, bytes) and len(whole) == len(views[0]):
                return whole  # one write's own buffer: no copy
        return b"".join(views)


class _Stream:
    """An in-progress streaming multipart upload of a file with no base."""

    def __init__(self) -> None:
        self.upload_id: str | None = None
        self.creating = False
        self.created = trio.Event()
        self.create_error: BaseException | None = None
        self.parts: dict[int, UploadPart] = {}
        self.starts: list[int] = []  # starts[n - 1]: first byte of part n
        self.resend: set[int] = set()  # parts written to again after they were sent
        self.started_until = 0  # bytes [0, started_until) are in parts sent or being sent
        self.next_number = 1
        self.in_flight = 0
        self.idle = trio.Event()
        self.idle.set()
        self.error: BaseException | None = None
        self.valid = True
        self.metadata: dict[str, str] = {}
        self.started_at = 0.0  # wall clock when the multipart upload was created


class StagedFile:
    """The local state of one inode open for writing. Not thread-safe: trio thread only."""

    def __init__(
        self,
        up: Uploader,
        key: Key,
        base: ObjectRef | None,
        *,
        name: str,
        fd: int,
        dfd: int = -1,
    ) -> None:
        self._up = up
        self.key = key
        self.base = base
        # bytes at or beyond base_limit never come from the base (truncated away or never there)
        self.base_limit = base.size if base else 0
        self.size = base.size if base else 0
        self.filled: set[int] = set()  # chunk indexes whose bytes in staging are authoritative
        # chunks being filled from the base right now: a second fill of one waits for the first
        self._filling: dict[int, trio.Event] = {}
        # the lowest size a truncate set during the running commit (None: no truncate since it
        # began): bytes at or past it must not come from the object that commit makes
        self._shrunk_to: int | None = None
        # set once the running commit has rebased: made just before the store call that
        # replaces the object (the old version is gone from then on, while ``base`` still
        # names it until the commit's task runs again)
        self._replacing: trio.Event | None = None
        self.generation = 0
        self.dirty = False
        self._recorded = False  # the crash record beside the staging file is written
        self.commit_lock = trio.Lock()
        self._stream: _Stream | None = None
        self._id = name
        self.path = up.staging_dir / f"{name}.data"
        self._record = up.staging_dir / f"{name}.json"
        self._fd = fd  # -1: no staging file yet, the writes are held in memory (_materialize)
        self._dfd = dfd  # the same file opened with O_DIRECT, or -1 (see staging.write_batch)
        self._held = 0  # bytes of self._pending counted in the mount's held_bytes
        self._hold_timer = False  # a task will materialize this file _HOLD_S after a write
        self._recent: _Recent | None = _Recent() if base is None else None
        self.closed = False
        # write-behind: writes are queued in memory and written to the staging file by one
        # background drain at a time, so a FUSE write costs a memcpy, not a thread hand-off
        self._pending: list[tuple[int, bytes | None]] = []  # (off, data); None: ftruncate(off)
        self._pending_bytes = 0
        self._idle = trio.Event()
        self._idle.set()
        self._drain_error: OSError | None = None
        # the chunked layout (set by the fs for files in chunked directories): see fusionfs/chunked/
        self.chunked: ChunkedLayout | None = None
        self._committed_chunked = False  # the last commit wrote a manifest
        self._feed: ChunkFeed | None = None

    def use_chunked(self, layout: ChunkedLayout | None) -> None:
        """Commit this file in the chunked layout (``None``: as a plain object)."""
        self.chunked = layout

    # -- writing -------------------------------------------------------------------------------
    async def write(self, off: int, data: bytes) -> int:
        if not data:
            return 0
        if self._drain_error is not None:
            await self._settle()
        await self._fill_partial(off, off + len(data))
        # From here to the first await, one step: the bytes are queued behind everything queued
        # before (the fills of their chunks included) and every record of where bytes live is
        # updated with them, so no other request can see the queue without the marks.
        cs = self._up.chunks.chunk_size
        end = off + len(data)
        self._queue(off, data)
        if self._recent is not None:
            self._recent.wrote(off, data)
        self.filled.update(range(off // cs, (end - 1) // cs + 1))
        stream = self._stream
        if stream is not None and off < stream.started_until:
            # a page written again after its part went up (the kernel's writeback re-sends a
            # page that was re-dirtied): that part is sent once more before completing
            first = bisect.bisect_right(stream.starts, off)
            last = bisect.bisect_right(stream.starts, min(end, stream.started_until) - 1)
            stream.resend.update(range(first, last + 1))
        self.size = max(self.size, end)
        self.generation += 1
        if self._pending_bytes > _MAX_PENDING:
            await self._settle()
        await self._touch()
        if self.chunked is not None:
            self._feed_chunked(off)
            if self._feed is not None:  # only files with no base (and so with _recent) feed
                await self._feed.keep_up(_FEED_MAX_LAG)
        else:
            self._maybe_send_parts()
        return len(data)

    async def truncate(self, size: int) -> None:
        cs = self._up.chunks.chunk_size
        if self.base is not None and size < self.base_limit and size % cs:
            await self._fill_chunk(size // cs)  # the bytes of its chunk below the new end
        # from here to the first await, one step (as in write)
        self.base_limit = min(self.base_limit, size)
        self._shrunk_to = size if self._shrunk_to is None else min(self._shrunk_to, size)
        if self._fd >= 0 or self._pending or self._drain_error is not None:
            self._queue(size, None)  # in order with the writes queued before and after it
        # else: nothing written and no staging file (an O_TRUNC open of a new file's name): a
        # staging file created later starts empty, and reads pad to the size with zeros
        if self._recent is not None:
            self._recent.clear()
        stream = self._stream
        if stream is not None and size < stream.started_until:
            self._invalidate_stream("truncated below the parts already sent")
        if self._feed is not None and size < self._feed.read_until:
            self._feed.valid = False
        self.size = size
        self.generation += 1
        await self._touch()

    async def read(self, off: int, size: int) -> bytes:
        """Current content (staged bytes over the base's) of ``[off, off+size)``."""
        end = min(off + size, self.size)
        if end <= off:
            return b""
        cs = self._up.chunks.chunk_size
        pieces: list[bytes] = []
        pos = off
        while pos < end:
            stop = min(end, (pos // cs + 1) * cs)
            if self._staged_at(pos):
                # one pread for the whole stretch of chunks that are in the staging file
                while stop < end and self._staged_at(stop):
                    stop = min(end, (stop // cs + 1) * cs)
                pieces.append(await self._pread(stop - pos, pos))
            else:
                from_base = min(stop, self.base_limit)
                pieces.append(await self._read_base(pos, from_base - pos))
                if stop > from_base:
                    pieces.append(await self._pread(stop - from_base, from_base))
            pos = stop
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        # a sparse staging file reads short past its written end: pad with the zeros it means
        if len(data) < end - off:
            data += bytes(end - off - len(data))
        return data

    async def read_pieces(self, off: int, size: int) -> list[bytes | memoryview]:
        """What ``read`` returns, as pieces: views of the writes themselves where the newest
        writes hold the range (no copy), else one ``read``. The chunk feed's reader."""
        if self._recent is not None:
            views = self._recent.views(off, min(size, self.size - off))
            if views is not None:
                self._raise_staging_error()  # sticky, as _settle would raise it
                return list(views)
        return [await self.read(off, size)]

    def _staged_at(self, pos: int) -> bool:
        """Whether the byte at ``pos`` comes from the staging file (not from the base)."""
        return (
            self.base is None
            or pos >= self.base_limit
            or pos // self._up.chunks.chunk_size in self.filled
        )

    def _queue(self, off: int, data: bytes | None) -> None:
        """Queue ``data`` for the staging file at ``off`` (``None``: truncate it to ``off``).
        The drain applies the queue in order: what is queued later lands over what came
        before."""
        self._pending.append((off, data))
        n = 0 if data is None else len(data)
        self._pending_bytes += n
        up = self._up
        if (
            self._fd < 0
            and self._drain_error is None
            and self._pending_bytes <= _HOLD_MAX
            and up.held_bytes + n <= _HOLD_BUDGET
        ):
            up.held_bytes += n
            self._held += n
            if not self._hold_timer:
                self._hold_timer = True
                up.nursery.start_soon(self._hold_expiry)
            return
        self._start_drain()

    def _start_drain(self) -> None:
        if self._idle.is_set():
            self._idle = trio.Event()
            self._up.nursery.start_soon(self._drain)

    async def _hold_expiry(self) -> None:
        """Stage a held file's writes ``_HOLD_S`` after they began to be held, unless it has
        been committed (or discarded) since."""
        await trio.sleep(_HOLD_S)
        self._hold_timer = False
        if self._fd < 0 and self.dirty and self._pending and not self.closed:
            self._start_drain()

    async def _stage_held(self) -> None:
        """After a failed commit: what was held in memory goes to the staging file, so it stays
        staged (and recoverable after a crash) like any other file's data."""
        if self._fd < 0:
            with contextlib.suppress(UploadFailed):  # a staging error is already on its way up
                await self._settle()

    def _release_hold(self) -> None:
        self._up.held_bytes -= self._held
        self._held = 0

    async def _materialize(self) -> None:
        """Create the staging file of a file whose writes were held in memory; the drain then
        writes them to it, and only then its crash record, so that a record never names a
        staging file still missing the writes that were held when it was made."""
        fd, dfd = await trio.to_thread.run_sync(staging.open_staging, self.path)
        self._fd, self._dfd = fd, dfd
        self._release_hold()

    async def _record_once(self) -> None:
        if self.dirty and not self._recorded:
            self._recorded = True  # before the await: concurrent writes write it once
            await self._write_record()

    async def _drain(self) -> None:
        record = False  # write the crash record after the first batch (held writes, see above)
        try:
            if self.closed:
                return  # discarded: its descriptors are closed (or about to be)
            if self._fd < 0:
                if self.closed or self._drain_error is not None:
                    return  # discarded: the held writes go with it
                try:
                    await self._materialize()
                    record = True
                except OSError as e:
                    log.error("staging %s: %s", self.key, e)
                    self._drain_error = e
            # (a file materialized with nothing queued goes round once, for its record)
            while (self._pending or record) and self._drain_error is None:
                batch, self._pending = self._pending, []
                try:
                    if batch:
                        direct_ok = await trio.to_thread.run_sync(
                            staging.write_batch, self._fd, batch, self._dfd
                        )
                        if not direct_ok:
                            dfd, self._dfd = self._dfd, -1
                            await trio.to_thread.run_sync(os.close, dfd)
                    if record:
                        record = False
                        await self._record_once()
                except OSError as e:
                    log.error("staging %s: %s", self.key, e)
                    self._drain_error = e
                finally:
                    self._pending_bytes -= sum(len(d) for _, d in batch if d is not None)
        finally:
            self._pending.clear()
            self._pending_bytes = 0
            self._release_hold()
            self._idle.set()

    async def _settle(self) -> None:
        """Wait until every queued write is in the staging file (creating it if the writes
        were held in memory); raise if one failed."""
        if self._fd < 0 and self._drain_error is None:
            self._start_drain()
        await self._idle.wait()
        self._raise_staging_error()

    def _raise_staging_error(self) -> None:
        if self._drain_error is not None:
            raise UploadFailed(f"staging {self.key}: {self._drain_error}")

    async def _pread(self, length: int, off: int) -> bytes:
        if self._recent is not None:
            held = self._recent.get(off, length)
            if held is not None:
                self._raise_staging_error()  # sticky, as _settle would raise it
                return held
        await self._settle()
        dfd = self._dfd
        if dfd >= 0 and off % ALIGN == 0:  # parts and chunk-feed steps: past the page cache
            direct = await trio.to_thread.run_sync(staging.pread_direct, dfd, length, off)
            if direct is not None:
                return direct
        data: bytes = await trio.to_thread.run_sync(os.pread, self._fd, length, off)
        return data

    async def _touch(self) -> None:
        """Mark the file dirty (the caller has bumped ``generation`` in the same step as its
        change) and write its crash record once."""
        if not self.dirty or not self._recorded:
            self.dirty = True
            if self._fd < 0:
                return  # held in memory: the drain writes the record with the staging file
            await self._record_once()

    async def _fill_partial(self, start: int, end: int) -> None:
        """Before a write of [start, end): fill the chunks it only partly covers from the base."""
        if self.base is None:
            return
        cs = self._up.chunks.chunk_size
        first, last = start // cs, (end - 1) // cs
        if start % cs:
            await self._fill_chunk(first)
        if end % cs and (last != first or not start % cs):
            await self._fill_chunk(last)

    async def _fill_chunk(self, idx: int) -> None:
        """Make chunk ``idx``'s bytes in the staging file authoritative: queue its bytes from
        the base, unless a write or a truncate made them so meanwhile (S-WRITE-10).

        One fill per chunk at a time: a second request for the chunk waits for the first and
        then finds it filled. The base's bytes are queued (not written directly) in the same
        step as the chunk is marked filled, after checking again what happened during the
        read: a write queued later lands over them, a write queued earlier that covered the
        chunk whole has marked it filled already (so the old bytes are dropped), and a
        truncate has lowered ``base_limit`` (so only what is still below it is queued)."""
        cs = self._up.chunks.chunk_size
        lo = idx * cs
        while True:
            if idx in self.filled or lo >= self.base_limit or self.base is None:
                return
            running = self._filling.get(idx)
            if running is None:
                break
            await running.wait()
        done = self._filling[idx] = trio.Event()
        try:
            data = await self._read_base(lo, min((idx + 1) * cs, self.base_limit) - lo)
            if idx in self.filled or self.closed:
                return
            hi = min(lo + len(data), self.base_limit)
            if hi > lo:
                self._queue(lo, data[: hi - lo])
            self.filled.add(idx)
        finally:
            del self._filling[idx]
            done.set()

    async def _read_base(self, off: int, length: int) -> bytes:
        """``length`` bytes of the base at ``off``. A commit of this file may replace the base
        while the read is on its way (the old version is then gone from the store): the read is
        made again from the new base, which holds the same bytes there (S-CONS-5)."""
        while True:
            base = self.base
            assert base is not None
            try:
                return bytes(await self._up.chunks.read(base, off, length, None))
            except Stale:
                replacing = self._replacing
                if replacing is not None:
                    await replacing.wait()  # our own commit replaced it: wait for the rebase
                if self.base is base:
                    raise

    # -- streaming -----------------------------------------------------------------------------
    def _maybe_send_parts(self) -> None:
        if self.base is not None:
            return
        if self._stream is None:
            if self.size < self._up.part_size:
                return
            self._stream = _Stream()
        stream = self._stream
        while stream.valid:
            length = part_size_for(stream.next_number, self._up.part_size)
            # keep the last part back: the tail is sent by commit, which knows where the end is
            if self.size - stream.started_until <= length or stream.next_number >= _MAX_PARTS:
                return
            number, start = stream.next_number, stream.started_until
            stream.starts.append(start)
            stream.next_number += 1
            stream.started_until += length
            stream.in_flight += 1
            stream.idle = trio.Event()
            self._up.nursery.start_soon(self._send_part, stream, number, start, length)

    async def _ensure_upload(self, stream: _Stream) -> str:
        if stream.upload_id is None and not stream.created.is_set():
            if not stream.creating:
                stream.creating = True
                try:
                    stream.metadata = dict(self._metadata_hint)
                    stream.started_at = time.time()
                    upload_id = await self._up.call(
                        functools.partial(
                            self._up.store.create_multipart, self.key, stream.metadata
                        ),
                        f"create upload {self.key}",
                    )
                    stream.upload_id = upload_id
                    await self._write_record()
                except Exception as e:
                    stream.create_error = e
                finally:
                    stream.created.set()
        await stream.created.wait()
        if stream.create_error is not None:
            raise stream.create_error
        assert stream.upload_id is not None
        return stream.upload_id

    _metadata_hint: Mapping[str, str] = {}

    def copied(self, key: Key, etag: ETag) -> None:
        """The object this file is based on was copied onto itself (new metadata, same bytes):
        read the base under its new ETag from now on."""
        base = self.base
        if base is not None and base.key == key:
            self.base = ObjectRef(key, etag, base.size, base.chunked)

    def set_metadata_hint(self, metadata: Mapping[str, str]) -> None:
        """Metadata to start a streaming upload with (the commit fixes it up if it changed)."""
        self._metadata_hint = dict(metadata)

    async def _send_part(self, stream: _Stream, number: int, start: int, length: int) -> None:
        try:
            upload_id = await self._ensure_upload(stream)
            async with self._up.slots:
                if not stream.valid:
                    return
                data = await self._pread(length, start)
                if len(data) < length:
                    data += bytes(length - len(data))
                part = await self._up.call(
                    functools.partial(
                        self._up.store.upload_part, self.key, upload_id, number, data
                    ),
                    f"upload part {number} of {self.key}",
                )
                stream.parts[number] = part
        except Exception as e:
            if stream.error is None:
                stream.error = e
            log.warning("streaming part %d of %s failed: %s", number, self.key, e)
        finally:
            stream.in_flight -= 1
            if stream.in_flight == 0:
                stream.idle.set()

    def _invalidate_stream(self, why: str) -> None:
        stream = self._stream
        if stream is None:
            return
        log.debug("streaming upload of %s abandoned: %s", self.key, why)
        stream.valid = False
        self._stream = None
        self._up.nursery.start_soon(self._abort_stream, stream)

    async def _abort_stream(self, stream: _Stream) -> None:
        await stream.idle.wait()
        if stream.upload_id is None:
            return
        try:
            await self._up.call(
                functools.partial(self._up.store.abort_multipart, self.key, stream.upload_id),
                f"abort upload {self.key}",
            )
        except StoreError as e:
            log.info("could not abort multipart upload of %s: %s", self.key, e)

    # -- commit ------------------------------------------------------------------------------
    async def commit(self, key: Key, metadata: Mapping[str, str]) -> ObjectRef:
        """Make the current content durable as ``key``. Raises ``UploadFailed``."""
        async with self.commit_lock:
            if self.closed or (not self.dirty and self.base is not None and self.base.key == key):
                # committed by whoever held the lock before us (or discarded after that)
                if self.base is None:
                    raise UploadFailed(f"{key}: staged data was discarded")
                return self.base
            generation = self.generation
            self._shrunk_to = None
            if key != self.key:
                self._invalidate_stream("renamed")
                self.key = key
                await self._write_record()
            self._up.stats.add("uploads_pending")
            try:
                etag, size = await self._upload(key, metadata)
            except (UploadFailed, StoreError, OSError) as e:
                self._end_replacing()
                self._up.stats.add("uploads_failed")
                await self._stage_held()
                if isinstance(e, UploadFailed):
                    raise
                raise UploadFailed(f"{key}: {e}") from e
            except BaseException:
                self._end_replacing()
                raise
            finally:
                self._up.stats.add("uploads_pending", -1)
            self._up.stats.add("uploads_done")
            ref = ObjectRef(key, etag, size, self._committed_chunked)
            # the staged bytes plus the new object are now the whole truth: rebase on it. What
            # was truncated away while the upload ran must not come back from it (the chunks
            # written meanwhile are marked filled, so they are read from staging).
            self.base = ref
            self.base_limit = size if self._shrunk_to is None else min(size, self._shrunk_to)
            self._end_replacing()
            if self.generation == generation:
                self.dirty = False
            return ref

    def _begin_replacing(self) -> None:
        """Just before a store call that replaces this file's object (PUT, completion, manifest
        PUT): reads of the old version that fail from now on wait for the rebase (S-CONS-5)."""
        if self._replacing is None:
            self._replacing = trio.Event()

    def _end_replacing(self) -> None:
        replacing, self._replacing = self._replacing, None
        if replacing is not None:
            replacing.set()

    async def _upload(self, key: Key, metadata: Mapping[str, str]) -> tuple[ETag, int]:
        """Upload the current content as ``key``: the new object's ETag and size (writes that
        come in meanwhile may make the file larger than what was uploaded)."""
        self._committed_chunked = self.chunked is not None and self.size >= CHUNKED_MIN_SIZE
        if self.chunked is not None:
            if self._committed_chunked:
                return await self._upload_chunked(self.chunked, key, metadata)
            # small (CRIU's core, mm, pagemap... images): one plain object, read back in one
            # round trip, where a manifest would cost two; nothing to de-duplicate (S-CHUNK-8)
            feed, self._feed = self._feed, None
            if feed is not None:
                await feed.close()
        stream = self._stream
        if stream is not None:
            self._stream = None
            if stream.valid:
                done = await self._finish_stream(stream, key, metadata)
                if done is not None:
                    return done
            else:
                self._up.nursery.start_soon(self._abort_stream, stream)
        if self.size <= self._up.part_size:
            await self._fill_all()
            size = self.size
            data = await self._pread(size, 0)
            if len(data) != size:  # sparse past the staged end (or shrunk meanwhile)
                data = data[:size] + bytes(size - len(data))
            self._begin_replacing()
            etag = await self._up.call(
                functools.partial(self._up.store.put, key, data, metadata),
                f"PUT {key}",
            )
            return etag, size
        return await self._multipart(key, metadata)

    async def _finish_stream(
        self, stream: _Stream, key: Key, metadata: Mapping[str, str]
    ) -> tuple[ETag, int] | None:
        """Send the tail and complete. None means the stream broke: upload another way."""
        try:
            await stream.idle.wait()
            if stream.error is not None or not stream.valid:
                raise stream.error or UploadFailed("stream invalidated")
            upload_id = await self._ensure_upload(stream)
            for number in sorted(stream.resend):
                start = stream.starts[number - 1]
                length = part_size_for(number, self._up.part_size)
                stream.in_flight += 1
                stream.idle = trio.Event()
                await self._send_part(stream, number, start, length)
                if stream.error is not None:
                    raise stream.error
            stream.resend.clear()
            end = self.size
            if end > stream.started_until:
                number = stream.next_number
                stream.in_flight += 1
                stream.idle = trio.Event()
                await self._send_part(
                    stream, number, stream.started_until, end - stream.started_until
                )
                stream.started_until = end
                if stream.error is not None:
                    raise stream.error
            parts = [stream.parts[n] for n in sorted(stream.parts)]
            self._begin_replacing()
            etag = await self._up.call(
                functools.partial(self._up.store.complete_multipart, key, upload_id, parts),
                f"complete upload {key}",
                timeout=max(self._up.store_timeout, 300.0),
            )
        except Exception as e:
            log.warning("streaming upload of %s failed (%s); uploading it again whole", key, e)
            stream.valid = False
            self._up.nursery.start_soon(self._abort_stream, stream)
            return None
        if _needs_metadata_copy(metadata, stream.metadata, stream.started_at):
            etag = await self._up.call(
                functools.partial(self._up.store.copy, key, key, metadata, etag),
                f"set metadata {key}",
            )
        return etag, stream.started_until

    # -- the chunked layout ------------------------------------------------------------------
    def _feed_chunked(self, off: int) -> None:
        """Stream a file written from scratch into its chunk writer as it is staged."""
        if self.base is not None:
            return  # a rewrite: the commit feeds base and staged bytes in one pass
        if self._feed is None:
            if off != 0:
                return
            assert self.chunked is not None
            self._feed = ChunkFeed(self.chunked, self.read_pieces, lambda: self.size)
        self._feed.wrote(off, self._up.nursery)

    async def _upload_chunked(
        self, layout: ChunkedLayout, key: Key, metadata: Mapping[str, str]
    ) -> tuple[ETag, int]:
        feed, self._feed = self._feed, None
        manifest: Manifest | None = None
        if feed is not None and feed.valid:
            try:
                manifest = await feed.finish(self.size)
            except Exception as e:
                log.warning("streaming %s into packs failed (%s); feeding it again whole", key, e)
        if manifest is None:
            if feed is not None:
                await feed.close()
            feed = ChunkFeed(layout, self.read_pieces, lambda: self.size)
            try:
                manifest = await feed.finish(self.size)
            finally:
                await feed.close()
        assert feed is not None
        self._begin_replacing()
        etag = await self._up.call(
            functools.partial(write_manifest, self._up.store, key, manifest, metadata),
            f"PUT {key}",
        )
        layout.note_commit(key, manifest, feed.writer.stats)
        return etag, manifest.size

    def _plan(self) -> list[tuple[int, int, int]]:
        parts = []
        pos, number = 0, 1
        while pos < self.size:
            length = min(part_size_for(number, self._up.part_size), self.size - pos)
            parts.append((number, pos, length))
            pos += length
            number += 1
        if len(parts) > _MAX_PARTS:
            raise UploadFailed(f"{self.key}: file too large for a multipart upload")
        return parts

    async def _multipart(self, key: Key, metadata: Mapping[str, str]) -> tuple[ETag, int]:
        up = self._up
        plan = self._plan()
        upload_id = await up.call(
            functools.partial(up.store.create_multipart, key, metadata), f"create upload {key}"
        )
        results: dict[int, UploadPart] = {}
        copied: set[int] = set()
        try:
            with first_error():
                async with trio.open_nursery() as nursery:
                    for number, start, length in plan:
                        nursery.start_soon(
                            self._upload_part,
                            key,
                            upload_id,
                            number,
                            start,
                            length,
                            results,
                            copied,
                        )
            parts = [results[n] for n in sorted(results)]
            if copied:
                await self._check_base_unchanged()
            self._begin_replacing()
            etag = await up.call(
                functools.partial(up.store.complete_multipart, key, upload_id, parts),
                f"complete upload {key}",
                timeout=max(up.store_timeout, 300.0),
            )
            return etag, sum(length for _, _, length in plan)
        except BaseException:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await up.call(
                        functools.partial(up.store.abort_multipart, key, upload_id),
                        f"abort upload {key}",
                    )
            raise

    async def _check_base_unchanged(self) -> None:
        """After parts were copied server-side from the base: the base must still be the
        version they were meant to come from. S3 checks the copy's ``If-Match`` itself, but
        moto and Ceph RGW 16 ignore it on UploadPartCopy, and a base replaced by another
        client meanwhile would give an object mixing its bytes with ours (S-WRITE-5): that
        commit fails (``Stale``, EIO to the caller) and the data stays staged."""
        base = self.base
        assert base is not None
        try:
            info = await self._up.call(
                functools.partial(self._up.store.head, base.key), f"HEAD {base.key}"
            )
        except NotFound:
            raise Stale(f"{base.key} was removed from the store during the rewrite") from None
        if info.etag != base.etag:
            raise Stale(f"{base.key} was replaced in the store during the rewrite")

    async def _upload_part(
        self,
        key: Key,
        upload_id: str,
        number: int,
        start: int,
        length: int,
        results: dict[int, UploadPart],
        copied: set[int],
    ) -> None:
        up = self._up
        cs = up.chunks.chunk_size
        chunks = range(start // cs, (start + length - 1) // cs + 1)
        clean = (
            self.base is not None
            and start + length <= self.base_limit
            and not any(i in self.filled for i in chunks)
        )
        async with up.slots:
            if clean and up.part_copy_supported:
                assert self.base is not None
                try:
                    results[number] = await up.call(
                        functools.partial(
                            up.store.upload_part_copy,
                            key,
                            upload_id,
                            number,
                            self.base.key,
                            start,
                            length,
                            self.base.etag,
                        ),
                        f"copy part {number} of {key}",
                    )
                    copied.add(number)
                    return
                except NotSupported:
                    log.info("store has no UploadPartCopy: uploading unchanged parts instead")
                    up.part_copy_supported = False
            for idx in chunks:
                await self._fill_chunk_if_based(idx)
            data = await self._pread(length, start)
            data += bytes(length - len(data))
            results[number] = await up.call(
                functools.partial(up.store.upload_part, key, upload_id, number, data),
                f"upload part {number} of {key}",
            )

    async def _fill_chunk_if_based(self, idx: int) -> None:
        if self.base is not None:
            await self._fill_chunk(idx)

    async def _fill_all(self) -> None:
        if self.base is None:
            return
        cs = self._up.chunks.chunk_size
        for idx in range((min(self.size, self.base_limit) + cs - 1) // cs):
            await self._fill_chunk(idx)

    # -- records and cleanup -----------------------------------------------------------------
    async def _write_record(self) -> None:
        if self._fd < 0:
            return  # no staging file yet: the drain writes the record once it has one
        stream = self._stream
        record = staging.crash_record(self.key, stream.upload_id if stream else None, self.path)
        await trio.to_thread.run_sync(staging.write_record, self._record, record)

    async def discard(self) -> None:
        """Drop the staged state (after a clean commit and the last close, or an unlink)."""
        async with self.commit_lock:  # never pull the file from under an upload
            if self.closed:
                return
            self.closed = True
            await self._idle.wait()
            feed, self._feed = self._feed, None
            if feed is not None:
                await feed.close()
            stream, self._stream = self._stream, None
            if stream is not None:
                stream.valid = False
                await stream.idle.wait()
                self._up.nursery.start_soon(self._abort_stream, stream)
        self._release_hold()
        if self._fd < 0:
            return  # never staged: nothing on disk
        dfd, self._dfd = self._dfd, -1
        await trio.to_thread.run_sync(
            staging.close_and_remove, self._fd, self.path, self._record, dfd
        )


def _needs_metadata_copy(
    final: Mapping[str, str], started_with: Mapping[str, str], started_at: float
) -> bool:
    """Whether a streamed upload's metadata must be replaced after it completes (a server-side
    copy of the whole object: seconds for a large one, and a multipart copy above 5 GiB).

    Not when only ``mtime`` differs and the new one falls after the upload began: that is the
    timestamp of the file's own writes (the kernel's writeback cache sends it at close), and
    S-ATTR-2 lets a streamed file keep the mtime it had when its upload started. An mtime set
    to an earlier time (``touch -d``, ``cp -p``) is a real change and is stored."""
    final, started_with = dict(final), dict(started_with)
    if final == started_with:
        return False
    mtime = final.pop("mtime", None)
    started_with.pop("mtime", None)
    if final != started_with or mtime is None:
        return True
    try:
        return float(mtime) < started_at - 1.0
    except ValueError:
        return True
