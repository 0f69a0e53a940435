"""Writing chunked files: chunks hashed, compressed and appended in file order to packs.

Purpose: ``ChunkWriter`` takes a file's bytes sequentially and returns its ``Manifest`` once every
pack it names is durable (storing the manifest is the caller's commit). ``PackThreads`` are the
threads all writers of a mount share for the CPU work (BLAKE3, zstd) and the pack PUTs.

Why threads of its own, not trio's: ``ChunkWriter.feed`` is called from a worker thread (the
mount's ``ChunkFeed``) or from plain synchronous code (tests, tools); it must hand chunks to
other threads without going back to the trio thread, and hashing and zstd release the GIL, so a
pool of ``workers`` threads uses both cores. The pools are bounded per mount, whatever the number
of files written at once, and have one owner: whoever builds the mount's core creates a
``PackThreads`` and closes it at teardown (``close``: waits for running work). A writer built
without one makes and closes its own.

Memory: at most ``max_pending`` chunks being prepared, one open pack and ``pack_uploads`` packs
in flight per writer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import blake3

from fusionfs.chunked import codec
from fusionfs.chunked.chunker import Chunker, ChunkPolicy
from fusionfs.chunked.format import (
    PACK_SIZE,
    PACKS_PREFIX,
    ChunkEntry,
    Manifest,
    new_pack_id,
    pack_key,
)
from fusionfs.chunked.index import ChunkIndex, ChunkLocation
from fusionfs.store.base import Body, Key, NotFound, ObjectStore

__all__ = ["RAW_PROBE", "RAW_STREAK", "ChunkWriter", "PackThreads", "WriteStats"]


class PackThreads:
    """The threads that prepare chunks (hash, compress) and upload packs: ``workers`` and
    ``uploads`` of them, shared by every ``ChunkWriter`` given this object. Closed by its owner
    (``close``), after the writers using it are finished or closed."""

    def __init__(self, workers: int = 2, uploads: int = 4) -> None:
        if workers < 1 or uploads < 1:
            raise ValueError("need at least one worker and one upload")
        self.workers = workers
        self.uploads = uploads
        self.prepare = concurrent.futures.ThreadPoolExecutor(workers, "fusionfs-chunks")
        self.upload = concurrent.futures.ThreadPoolExecutor(uploads, "fusionfs-packs")

    def close(self) -> None:
        """Cancel chunks not started and wait for those running and for the uploads."""
        self.prepare.shutdown(wait=True, cancel_futures=True)
        self.upload.shutdown(wait=True)


@dataclasses.dataclass(slots=True)
class WriteStats:
    """What one ``ChunkWriter`` did. ``new_stored`` is what this writer added to packs."""

    logical: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_logical: int = 0
    new_stored: int = 0
    reused_chunks: int = 0
    reused_logical: int = 0
    packs: int = 0  # packs PUT
    pack_checks: int = 0  # HEADs of packs known only from manifests
    touched: int = 0  # old packs refreshed (copied onto themselves) before reuse
    raw_unprobed: int = 0  # chunks stored raw without trying zstd (inside an incompressible run)

    def add(self, other: WriteStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


#: After ``RAW_STREAK`` chunks in a row that zstd could not shrink, a writer stores chunks raw
#: and tries compression only on every ``RAW_PROBE``-th one; a chunk that shrinks ends the run.
RAW_STREAK = 16
RAW_PROBE = 8


@dataclasses.dataclass(slots=True)
class _Prepared:
    length: int
    digest: bytes
    body: bytes | memoryview | None  # None: reused from ``loc``
    loc: ChunkLocation | None


class ChunkWriter:
    """Chunks, hashes, compresses and packs a file's bytes; ``finish`` returns its manifest.

    Feed the file sequentially (``feed(offset, data)``). On ``threads`` (``workers`` threads) each
    chunk is hashed and, unless the ``index`` (or this writer itself) already has it, compressed;
    chunks are then appended *in file order* to an open pack, so consecutive new chunks lie back
    to back and a sequential read fetches them with one GET. A pack that reaches ``pack_size``
    is PUT in the background (at most ``pack_uploads`` at once); ``finish`` PUTs the last,
    partial one and returns the ``Manifest`` once every pack it names is durable. It does not
    store the manifest (``write_manifest`` does: the caller decides when the file is committed).

    Memory: at most ``max_pending`` chunks being prepared, one open pack, and ``pack_uploads``
    packs in flight. A failure in the background is raised by the next ``feed`` or by
    ``finish``; packs already stored stay (garbage collection frees them if unreferenced).

    Reuse of a chunk from the index: its pack must be known to have been last modified less
    than ``refresh_age`` ago. A pack learnt from a manifest is HEADed (once); an old one is
    copied onto itself (renewing its LastModified, so that ``collect_garbage`` keeps it); a
    missing one is forgotten and the chunk stored anew.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        packs_prefix: Key = PACKS_PREFIX,
        policy: ChunkPolicy | None = None,
        level: int = 1,
        workers: int = 4,
        max_pending: int | None = None,
        index: ChunkIndex | None = None,
        refresh_age: float = 3600.0,
        pack_size: int = PACK_SIZE,
        pack_uploads: int = 4,
        threads: PackThreads | None = None,
    ) -> None:
        if workers < 1 or pack_uploads < 1:
            raise ValueError("need at least one worker and one upload")
        self._store = store
        self._prefix = packs_prefix
        self.policy = policy or ChunkPolicy()
        self._level = level
        self.index = index if index is not None else ChunkIndex()
        self._refresh_age = refresh_age
        self._pack_size = pack_size
        self._chunker = Chunker(self.policy)
        # the mount's shared threads, or (None) threads of this writer's own, closed with it
        self._own_threads = threads is None
        self._threads = threads if threads is not None else PackThreads(workers, pack_uploads)
        self._pool = self._threads.prepare
        self._uploads = self._threads.upload
        self._slots = threading.BoundedSemaphore(max_pending or 2 * workers)
        self._upload_slots = threading.BoundedSemaphore(pack_uploads)
        self._futures: list[concurrent.futures.Future[None]] = []
        self._pack_futures: list[concurrent.futures.Future[None]] = []
        self._lock = threading.Lock()  # order, open pack, entries, stats (never held on I/O)
        self._error: BaseException | None = None
        self._fed = 0
        self._seq = 0
        self._next = 0  # next sequence number to append
        self._ready: dict[int, _Prepared] = {}
        self._entries: list[ChunkEntry] = []
        self._mine: dict[bytes, ChunkLocation] = {}  # chunks this writer placed
        self._fresh_packs: set[bytes] = set()  # packs this writer checked or refreshed
        self._pack_id = new_pack_id()
        # the open pack's chunk bodies, sent as they are (never joined: store.put takes a tuple)
        self._pack: list[bytes | memoryview] = []
        self._pack_len = 0
        self._pack_chunks: list[tuple[bytes, int, int]] = []
        self._closed = False
        self._raw_streak = 0  # chunks in a row that did not compress (under _lock)
        self._raw_seen = 0  # chunks met since the streak reached RAW_STREAK
        self.stats = WriteStats()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def offset(self) -> int:
        """Bytes fed so far (the offset the next ``feed`` must start at)."""
        return self._fed

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """Append ``data``, which must start at ``offset == self.offset``."""
        if self._closed:
            raise ValueError("ChunkWriter is finished or closed")
        if offset != self._fed:
            raise ValueError(
                f"ChunkWriter takes data sequentially: expected offset {self._fed}, got {offset}"
            )
        self._raise_error()
        self._fed += memoryview(data).nbytes
        for chunk in self._chunker.push(data):
            self._submit(chunk)

    def finish(self) -> Manifest:
        """Store what is left, wait until every pack is durable, and return the manifest."""
        if self._closed:
            raise ValueError("ChunkWriter is finished or closed")
        try:
            tail = self._chunker.flush()
            if tail is not None:
                self._submit(tail)
            for f in self._futures:
                f.result()
            self._raise_error()
            with self._lock:
                sealed = self._seal()
            if sealed is not None:
                self._upload(*sealed)
            for pf in self._pack_futures:
                pf.result()
            self._raise_error()
            entries = list(self._entries)
        finally:
            self.close()
        manifest = Manifest(entries)
        assert manifest.size == self._fed
        return manifest

    def close(self) -> None:
        """Stop: cancel chunks not started, wait for those running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for f in self._futures:
            f.cancel()
        for f in self._futures:
            if not f.cancelled():
                concurrent.futures.wait([f])
        for pf in self._pack_futures:
            concurrent.futures.wait([pf])
        if self._own_threads:
            self._threads.close()

    # -- internals ---------------------------------------------------------------------------
    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = e

    def _submit(self, chunk: bytes | memoryview) -> None:
        # a chunk that failed never frees the slots of those after it: poll for the error
        while not self._slots.acquire(timeout=0.05):
            self._raise_error()
        try:
            self._raise_error()
            seq = self._seq
            self._seq += 1
            future = self._pool.submit(self._process, seq, chunk)
        except BaseException:
            self._slots.release()
            raise
        self._futures.append(future)

    def _process(self, seq: int, chunk: bytes | memoryview) -> None:
        try:
            prepared = self._prepare(chunk)
        except BaseException as e:
            self._fail(e)
            self._slots.release()
            raise
        with self._lock:
            self._ready[seq] = prepared
            sealed = self._append_ready()
        for pack in sealed:
            self._upload(*pack)

    def _prepare(self, chunk: bytes | memoryview) -> _Prepared:
        digest = blake3.blake3(chunk).digest()
        with self._lock:
            mine = self._mine.get(digest)
        if mine is not None:
            return _Prepared(len(chunk), digest, None, mine)
        loc = self.index.lookup(digest)
        if loc is not None and self._pack_usable(loc.pack):
            return _Prepared(len(chunk), digest, None, loc)
        return _Prepared(len(chunk), digest, self._encode(chunk), None)

    def _encode(self, chunk: bytes | memoryview) -> bytes | memoryview:
        """``codec.encode_chunk``, except inside a run of incompressible data (random or already
        compressed memory), where only every ``RAW_PROBE``-th chunk is tried: zstd level 1
        spends about 0.5 CPU-s per GiB finding that random bytes do not shrink, a sixth of
        what the daemon spends on a whole 1 GiB dump (perf). Costs nothing on data that
        compresses; in mixed data, at most ``RAW_PROBE - 1`` chunks after such a run are stored
        raw that would have shrunk. Chunk identity (the digest) does not depend on it."""
        if self._level <= 0:
            return chunk
        with self._lock:
            if self._raw_streak >= RAW_STREAK:
                self._raw_seen += 1
                if self._raw_seen % RAW_PROBE:
                    self.stats.raw_unprobed += 1
                    return chunk
        body = codec.encode_chunk(chunk, self._level)
        with self._lock:
            if len(body) < len(chunk):
                self._raw_streak = self._raw_seen = 0
            else:
                self._raw_streak += 1
        return body

    def _pack_usable(self, pack: bytes) -> bool:
        """Make sure ``pack`` exists and stays out of GC's reach for ``refresh_age``. A pack
        checked once by this writer stays good for its whole run (the GC argument's ``T``)."""
        if pack in self._fresh_packs:
            return True
        with self.index.pack_lock(pack):
            ok = self._check_pack(pack)
        if ok:
            self._fresh_packs.add(pack)
        return ok

    def _check_pack(self, pack: bytes) -> bool:
        if pack in self._fresh_packs:
            return True
        mtime = self.index.pack_mtime(pack)
        if mtime is not None and time.time() - mtime <= self._refresh_age:
            return True
        key = pack_key(pack, self._prefix)
        if mtime is None:
            with self._lock:
                self.stats.pack_checks += 1
            try:
                mtime = self._store.head(key).mtime_ns / 1e9
            except NotFound:
                self.index.forget_pack(pack)
                return False
            self.index.set_pack_mtime(pack, mtime)
            if time.time() - mtime <= self._refresh_age:
                return True
        try:
            self._store.copy(key, key, {})
        except NotFound:  # collected meanwhile: store the chunks again
            self.index.forget_pack(pack)
            return False
        self.index.set_pack_mtime(pack, time.time())
        with self._lock:
            self.stats.touched += 1
        return True

    def _append_ready(self) -> list[tuple[bytes, Body, list[tuple[bytes, int, int]]]]:
        """Under ``_lock``: append prepared chunks in file order; return packs to upload."""
        sealed = []
        s = self.stats
        while self._next in self._ready:
            p = self._ready.pop(self._next)
            self._next += 1
            self._slots.release()
            loc = p.loc
            if loc is None:
                loc = self._mine.get(p.digest)  # the same content twice in this file
            if loc is None:
                assert p.body is not None
                loc = ChunkLocation(self._pack_id, self._pack_len, len(p.body))
                self._pack.append(p.body)
                self._pack_len += len(p.body)
                self._pack_chunks.append((p.digest, loc.offset, loc.stored))
                self._mine[p.digest] = loc
                s.new_chunks += 1
                s.new_logical += p.length
                s.new_stored += loc.stored
                if self._pack_len >= self._pack_size:
                    pack = self._seal()
                    if pack is not None:
                        sealed.append(pack)
            else:
                s.reused_chunks += 1
                s.reused_logical += p.length
            s.chunks += 1
            s.logical += p.length
            self._entries.append(ChunkEntry(p.length, loc.stored, p.digest, loc.pack, loc.offset))
        return sealed

    def _seal(self) -> tuple[bytes, Body, list[tuple[bytes, int, int]]] | None:
        if not self._pack:
            return None
        pack = (self._pack_id, tuple(self._pack), self._pack_chunks)
        self._pack_id = new_pack_id()
        self._pack = []
        self._pack_len = 0
        self._pack_chunks = []
        self.stats.packs += 1
        return pack

    def _upload(self, pack: bytes, body: Body, chunks: list[tuple[bytes, int, int]]) -> None:
        self._upload_slots.acquire()  # bounds the packs in memory
        try:
            future = self._uploads.submit(self._put_pack, pack, body, chunks)
        except BaseException:
            self._upload_slots.release()
            raise
        with self._lock:
            self._pack_futures.append(future)

    def _put_pack(self, pack: bytes, body: Body, chunks: list[tuple[bytes, int, int]]) -> None:
        try:
            self._store.put(pack_key(pack, self._prefix), body)
            self.index.add_pack(pack, chunks)
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self._upload_slots.release()
