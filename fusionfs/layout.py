"""The chunked layout: compressed, de-duplicated, content-addressed storage of large files.

Purpose: a file in the chunked layout (CRIU image files under a snapshot root) is stored as

- its own object (the file's key, e.g. ``snapshots/job/3/pages-1.img``) holding a small binary
  *manifest*: the file's logical size and its list of chunks (length, stored size, BLAKE3 hash),
  with user metadata ``fusion-layout: chunked-v1`` and ``fusion-size: <logical size>``;
- its data in shared content-addressed *chunk objects* ``.fusion/chunks/<hh>/<hash>`` (relative to
  the store's prefix), where ``<hash>`` is the hex BLAKE3 of the chunk's uncompressed bytes.

Chunk objects are self-describing: a chunk is stored zstd-compressed when that makes it strictly
smaller, raw otherwise, so *an object whose size equals the chunk's length is raw* and any other
is a zstd frame. Readers never trust a flag for this (two writers with different settings may
store the same content differently; either object is valid). Every chunk read is checked against
its hash; a mismatch is re-fetched once, then raised as ``CorruptChunk``: bad data is never
returned.

Chunking is content-defined at page granularity (``ChunkPolicy``): the data is cut only at 4 KiB
page boundaries of the file, after a page whose CRC-32 is 0 modulo a divisor, within min/max
bounds. Pages that did not change between two dumps land in the same chunks even when regions
were inserted or removed before them, as long as the shift is a whole number of pages (CRIU's
``pages-*.img`` is a concatenation of pages). Data shifted by other amounts de-duplicates only
where whole chunks happen to line up. ``docs/design/chunked-layout.md`` has the measurements.

Concurrency and threads: everything here is synchronous and blocking (store calls, hashing,
compression): the filesystem calls it from worker threads, never from the trio thread.
``ChunkWriter`` runs a bounded thread pool of its own; ``ChunkReader`` and ``KnownChunks`` are
thread-safe.

Garbage collection (``collect_garbage``) frees chunk objects that no manifest references and
that are older than a grace period, in two phases (set aside as a *fossil*, deleted for good by
a later run if still unreferenced); writers refresh the age of old chunks they reuse. The race
analysis is in the design doc and in ``collect_garbage``.

Caveats: chunk objects must be readable with a ranged GET of ``length`` bytes (any S3 server);
the manifest holds at most 2**32-1 chunks of at most ``MAX_CHUNK`` bytes each.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import blake3
import zstandard

from fusionfs.store.base import (
    ETag,
    Key,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    iter_list,
)

__all__ = [
    "CHUNKS_PREFIX",
    "FOSSILS_PREFIX",
    "GC_CLOCK_KEY",
    "LAYOUT_CHUNKED_V1",
    "LAYOUT_METADATA",
    "MAX_CHUNK",
    "SIZE_METADATA",
    "ChunkEntry",
    "ChunkPolicy",
    "ChunkReader",
    "ChunkWriter",
    "Chunker",
    "CorruptChunk",
    "GcStats",
    "KnownChunks",
    "LayoutError",
    "Manifest",
    "ManifestError",
    "WriteStats",
    "chunk_key",
    "chunk_lengths",
    "collect_garbage",
    "decode_manifest",
    "encode_manifest",
    "fetch_chunk",
    "is_chunked",
    "manifest_metadata",
    "read_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

#: Where chunk objects live, relative to the store's prefix.
CHUNKS_PREFIX: Final = Key(".fusion/chunks/")
#: User-metadata name and value that mark an object as a chunked-layout manifest.
LAYOUT_METADATA: Final = "fusion-layout"
LAYOUT_CHUNKED_V1: Final = "chunked-v1"
#: Where garbage collection sets unreferenced chunks aside before deleting them for good.
FOSSILS_PREFIX: Final = Key(".fusion/fossils/")
#: Marker object whose LastModified gives garbage collection the store's clock.
GC_CLOCK_KEY: Final = Key(".fusion/gc-clock")
#: User-metadata name holding the logical size (LIST does not return metadata: see the doc).
SIZE_METADATA: Final = "fusion-size"
#: Largest chunk a manifest may describe (a sanity bound for decoding; policies stay far below).
MAX_CHUNK: Final = 64 << 20

# Manifest v1, little-endian:
#   header  : magic (8) | version u16 | flags u16 | logical size u64 | chunk count u32 | zero u32
#   entries : count x (length u32 | stored size u32 | blake3 digest 32 bytes)
#   trailer : blake3 of header + entries, 32 bytes
# Chunk offsets are implicit (cumulative lengths), so chunks tile [0, size) by construction.
_MAGIC: Final = b"\x89FSCHNK\n"  # high bit and newline catch text-mode mangling, as PNG's does
_VERSION: Final = 1
_HEADER = struct.Struct("<8sHHQII")
_ENTRY = struct.Struct("<II32s")
_TRAILER = 32
_DIGEST = 32
_RETRIES_ON_MISMATCH = 1


class LayoutError(StoreError):
    """Base of the chunked layout's errors (a ``StoreError``, so the fs maps it to EIO)."""


class CorruptChunk(LayoutError):
    """A chunk's bytes do not hash to the digest its manifest names. Never served."""


class ManifestError(LayoutError):
    """An object that should be a chunked-layout manifest cannot be decoded."""


# -- manifest -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ChunkEntry:
    """One chunk of a file: its logical length, its stored size, and its BLAKE3 digest."""

    length: int
    stored: int  # size of the chunk object (== length: raw); for accounting only
    digest: bytes

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @property
    def compressed(self) -> bool:
        return self.stored < self.length


class Manifest:
    """A chunked file: logical size and chunk list, with offset lookup. Immutable."""

    __slots__ = ("_offsets", "chunks", "size")

    def __init__(self, chunks: Sequence[ChunkEntry]) -> None:
        self.chunks: tuple[ChunkEntry, ...] = tuple(chunks)
        offsets = [0]
        for entry in self.chunks:
            offsets.append(offsets[-1] + entry.length)
        self._offsets = offsets
        self.size: int = offsets[-1]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and other.chunks == self.chunks

    def __hash__(self) -> int:
        return hash(self.chunks)

    def __repr__(self) -> str:
        return f"Manifest(size={self.size}, chunks={len(self.chunks)})"

    def offset(self, index: int) -> int:
        """Logical offset of chunk ``index``."""
        return self._offsets[index]

    def index_at(self, offset: int) -> int:
        """Index of the chunk holding byte ``offset`` (0 <= offset < size)."""
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset} outside [0, {self.size})")
        lo, hi = 0, len(self.chunks) - 1
        while lo < hi:  # the last chunk whose start is <= offset
            mid = (lo + hi + 1) // 2
            if self._offsets[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def span(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """The chunks a read of ``[offset, offset+length)`` touches, as ``(index, lo, hi)`` with
        ``lo:hi`` the slice of that chunk's bytes to take. Clipped at the end of the file."""
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return []
        out = []
        idx = self.index_at(offset)
        pos = offset
        while pos < end:
            start = self._offsets[idx]
            stop = min(end, self._offsets[idx + 1])
            out.append((idx, pos - start, stop - start))
            pos = stop
            idx += 1
        return out

    @property
    def stored_bytes(self) -> int:
        """Bytes of chunk objects this file references (shared chunks counted once each)."""
        seen: dict[bytes, int] = {}
        for entry in self.chunks:
            seen[entry.digest] = entry.stored
        return sum(seen.values())

    def digests(self) -> set[bytes]:
        return {entry.digest for entry in self.chunks}


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest's binary form (see ``_MAGIC`` and the format comment above it)."""
    count = len(manifest.chunks)
    if count >= 1 << 32:
        raise ValueError("too many chunks for one manifest")
    parts = [_HEADER.pack(_MAGIC, _VERSION, 0, manifest.size, count, 0)]
    for entry in manifest.chunks:
        if not 0 < entry.length <= MAX_CHUNK or entry.stored < 0 or len(entry.digest) != _DIGEST:
            raise ValueError(f"bad chunk entry {entry!r}")
        parts.append(_ENTRY.pack(entry.length, entry.stored, entry.digest))
    body = b"".join(parts)
    return body + blake3.blake3(body).digest()


def decode_manifest(data: bytes | memoryview, *, what: str = "manifest") -> Manifest:
    """Parse and check a manifest; ``ManifestError`` (naming ``what``) if it is not one."""
    view = memoryview(data)
    if len(view) < _HEADER.size + _TRAILER or bytes(view[:8]) != _MAGIC:
        raise ManifestError(f"{what}: not a chunked-layout manifest (bad magic or too short)")
    _magic, version, _flags, size, count, _zero = _HEADER.unpack_from(view, 0)
    if version != _VERSION:
        raise ManifestError(f"{what}: manifest version {version} is not supported (need 1)")
    expected = _HEADER.size + count * _ENTRY.size + _TRAILER
    if len(view) != expected:
        raise ManifestError(f"{what}: manifest is {len(view)} bytes, expected {expected}")
    body = view[: expected - _TRAILER]
    if blake3.blake3(body).digest() != bytes(view[expected - _TRAILER :]):
        raise ManifestError(f"{what}: manifest checksum mismatch (corrupt)")
    chunks = []
    for length, stored, digest in _ENTRY.iter_unpack(body[_HEADER.size :]):
        if not 0 < length <= MAX_CHUNK:
            raise ManifestError(f"{what}: chunk length {length} out of range")
        chunks.append(ChunkEntry(length, stored, digest))
    manifest = Manifest(chunks)
    if manifest.size != size:
        raise ManifestError(f"{what}: chunks add up to {manifest.size} bytes, header says {size}")
    return manifest


def is_chunked(what: Mapping[str, str] | bytes | memoryview | None) -> bool:
    """Whether an object is a chunked-layout manifest, from its user metadata (HEAD/GET) or from
    the first bytes of its body (at least 8)."""
    if what is None:
        return False
    if isinstance(what, bytes | memoryview):
        return bytes(what[: len(_MAGIC)]) == _MAGIC
    return what.get(LAYOUT_METADATA) == LAYOUT_CHUNKED_V1


def manifest_metadata(manifest: Manifest) -> dict[str, str]:
    """User metadata to store a manifest object with."""
    return {LAYOUT_METADATA: LAYOUT_CHUNKED_V1, SIZE_METADATA: str(manifest.size)}


def write_manifest(
    store: ObjectStore, key: Key, manifest: Manifest, metadata: Mapping[str, str] | None = None
) -> ETag:
    """PUT ``manifest`` as ``key`` (atomic: the commit point of the file). Extra ``metadata`` is
    merged under the layout's own entries."""
    meta = {**(metadata or {}), **manifest_metadata(manifest)}
    return store.put(key, encode_manifest(manifest), meta)


def read_manifest(store: ObjectStore, key: Key, etag: ETag | None = None) -> Manifest:
    """GET and decode the manifest object ``key`` (``If-Match: etag`` when given)."""
    head = store.get_range(key, 0, 1 << 16, etag)
    if len(head) < _HEADER.size or not is_chunked(head):
        raise ManifestError(f"{key}: not a chunked-layout manifest")
    count = _HEADER.unpack_from(head, 0)[4]
    total = _HEADER.size + count * _ENTRY.size + _TRAILER
    data = head
    if total > len(head):
        data = head + store.get_range(key, len(head), total - len(head), etag)
    return decode_manifest(data, what=key)


def chunk_key(digest: bytes | str, prefix: Key = CHUNKS_PREFIX) -> Key:
    """The object key of the chunk with BLAKE3 ``digest`` (bytes or hex)."""
    hexd = digest.hex() if isinstance(digest, bytes) else digest
    return Key(f"{prefix}{hexd[:2]}/{hexd}")


# -- chunking ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ChunkPolicy:
    """Content-defined chunking at page granularity.

    A chunk ends after page p when it holds at least ``min_size`` bytes and
    ``crc32(page p) % divisor == 0`` (``divisor = (avg_size - min_size) / page_size``), or when
    it reaches ``max_size``. The expected chunk size is then about ``avg_size``.
    """

    page_size: int = 4096
    min_size: int = 32 << 10
    avg_size: int = 128 << 10
    max_size: int = 512 << 10

    def __post_init__(self) -> None:
        p = self.page_size
        if p <= 0 or any(s % p for s in (self.min_size, self.avg_size, self.max_size)):
            raise ValueError("chunk sizes must be positive multiples of the page size")
        if not p <= self.min_size < self.avg_size <= self.max_size <= MAX_CHUNK:
            raise ValueError("need page_size <= min_size < avg_size <= max_size <= MAX_CHUNK")

    @property
    def divisor(self) -> int:
        return (self.avg_size - self.min_size) // self.page_size


class Chunker:
    """Splits a sequential stream into chunks by a ``ChunkPolicy``. Not thread-safe.

    ``push(data)`` returns the chunks completed so far; ``flush()`` returns the last, partial one.
    Memory: at most ``max_size`` plus one ``push`` worth of bytes is buffered.
    """

    def __init__(self, policy: ChunkPolicy) -> None:
        self.policy = policy
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already judged (a multiple of the page size)

    def push(self, data: bytes | memoryview) -> list[bytes]:
        self._buf += data
        pol = self.policy
        page, lo, hi, div = pol.page_size, pol.min_size, pol.max_size, pol.divisor
        out: list[bytes] = []
        buf = self._buf
        start = 0  # start of the current chunk in buf
        pos = self._scanned
        n = len(buf)
        crc = zlib.crc32
        with memoryview(buf) as view:
            while pos + page <= n:
                end = pos + page
                size = end - start
                if size < lo:  # pages before the minimum are never judged: skip to it
                    pos = start + lo - page
                    continue
                if size >= hi or crc(view[pos:end]) % div == 0:
                    out.append(bytes(view[start:end]))
                    start = end
                pos = end
        if start:
            del buf[:start]
        self._scanned = pos - start
        return out

    def flush(self) -> bytes | None:
        """The remaining bytes as the last chunk (None if there are none); resets the chunker."""
        data = bytes(self._buf) if self._buf else None
        self._buf = bytearray()
        self._scanned = 0
        return data


def chunk_lengths(data: bytes | memoryview, policy: ChunkPolicy | None = None) -> list[int]:
    """Chunk lengths for ``data`` in one piece (for tests and measurements)."""
    chunker = Chunker(policy or ChunkPolicy())
    lengths = [len(c) for c in chunker.push(data)]
    tail = chunker.flush()
    if tail is not None:
        lengths.append(len(tail))
    return lengths


# -- writing ----------------------------------------------------------------------------------
class KnownChunks:
    """Chunks known to exist in the store, and when that was last made sure of (monotonic).

    A writer skips the HEAD of a chunk it (or a writer sharing this object) uploaded or touched
    less than ``refresh_age`` seconds ago. Thread-safe; bounded (oldest entries are dropped).
    """

    def __init__(self, max_entries: int = 1 << 18) -> None:
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[bytes, tuple[int, float]] = collections.OrderedDict()
        self._max = max_entries

    def add(self, digest: bytes, stored: int, at: float | None = None) -> None:
        with self._lock:
            self._entries[digest] = (stored, time.monotonic() if at is None else at)
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def fresh(self, digest: bytes, max_age: float) -> int | None:
        """The stored size if ``digest`` was made sure of within ``max_age`` seconds."""
        with self._lock:
            hit = self._entries.get(digest)
        if hit is None or time.monotonic() - hit[1] > max_age:
            return None
        return hit[0]

    def __len__(self) -> int:
        return len(self._entries)


@dataclasses.dataclass(slots=True)
class WriteStats:
    """What one ``ChunkWriter`` did. ``new_stored`` is what this writer uploaded."""

    logical: int = 0
    chunks: int = 0
    new_chunks: int = 0
    new_logical: int = 0
    new_stored: int = 0
    reused_chunks: int = 0
    reused_logical: int = 0
    touched: int = 0  # reused chunks whose age was refreshed (copy onto themselves)


_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, "compressors", None)
    if cache is None:
        cache = _tls.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_tls, "decompressor", None)
    if dec is None:
        dec = _tls.decompressor = zstandard.ZstdDecompressor()
    return dec


def _encode_chunk(data: bytes, level: int) -> bytes:
    """The chunk object's body: zstd if strictly smaller, else the raw bytes."""
    if level <= 0:
        return data
    packed: bytes = _compressor(level).compress(data)
    return packed if len(packed) < len(data) else data


class ChunkWriter:
    """Chunks, hashes, compresses and uploads a file's bytes; ``finish`` returns its manifest.

    Feed the file sequentially (``feed(offset, data)`` with offsets following on); chunks go up
    in the background on a pool of ``workers`` threads, at most ``max_pending`` chunks in memory
    (``feed`` blocks when the pool is that far behind). ``finish`` waits for every chunk and
    returns the ``Manifest``; it does not store the manifest (``write_manifest`` does: the
    caller decides when the file is committed). A failure in the background is raised by the
    next ``feed`` or by ``finish``; chunks already uploaded stay (GC collects them when nothing
    references them). Use as a context manager, or call ``close`` when abandoning the writer.

    Presence: a chunk found in ``known`` (fresh) is skipped; otherwise HEAD: absent -> compress
    and PUT; present but last modified more than ``refresh_age`` seconds ago -> copied onto
    itself, which renews its age so that ``collect_garbage`` does not set it aside.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        chunks_prefix: Key = CHUNKS_PREFIX,
        policy: ChunkPolicy | None = None,
        level: int = 1,
        workers: int = 4,
        max_pending: int | None = None,
        known: KnownChunks | None = None,
        refresh_age: float = 3600.0,
    ) -> None:
        if workers < 1:
            raise ValueError("need at least one worker")
        self._store = store
        self._prefix = chunks_prefix
        self.policy = policy or ChunkPolicy()
        self._level = level
        self._known = known if known is not None else KnownChunks()
        self._refresh_age = refresh_age
        self._chunker = Chunker(self.policy)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "fusionfs-chunks")
        self._slots = threading.BoundedSemaphore(max_pending or 2 * workers)
        self._futures: list[concurrent.futures.Future[ChunkEntry]] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._fed = 0
        self._closed = False
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
        """Upload what is left, wait for every chunk, and return the manifest."""
        if self._closed:
            raise ValueError("ChunkWriter is finished or closed")
        try:
            tail = self._chunker.flush()
            if tail is not None:
                self._submit(tail)
            entries = [f.result() for f in self._futures]
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
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------
    def _raise_error(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _submit(self, chunk: bytes) -> None:
        self._slots.acquire()
        try:
            self._raise_error()
            future = self._pool.submit(self._process, chunk)
        except BaseException:
            self._slots.release()
            raise
        self._futures.append(future)

    def _process(self, chunk: bytes) -> ChunkEntry:
        try:
            return self._store_chunk(chunk)
        except BaseException as e:
            with self._lock:
                if self._error is None:
                    self._error = e
            raise
        finally:
            self._slots.release()

    def _store_chunk(self, chunk: bytes) -> ChunkEntry:
        digest = blake3.blake3(chunk).digest()
        length = len(chunk)
        stored = self._known.fresh(digest, self._refresh_age)
        if stored is not None:
            self._count(length, None)
            return ChunkEntry(length, stored, digest)
        key = chunk_key(digest, self._prefix)
        try:
            info = self._store.head(key)
        except NotFound:
            info = None
        if info is not None and self._plausible(info.size, length):
            age = time.time() - info.mtime_ns / 1e9
            touched = False
            if age > self._refresh_age:
                try:
                    self._store.copy(key, key, {})
                    touched = True
                except NotFound:  # collected meanwhile: upload it again below
                    info = None
            if info is not None:
                # remember its true age, so that it is refreshed again in time
                self._known.add(digest, info.size, at=time.monotonic() - (0 if touched else age))
                self._count(length, None, touched=touched)
                return ChunkEntry(length, info.size, digest)
        body = _encode_chunk(chunk, self._level)
        self._store.put(key, body)
        self._known.add(digest, len(body))
        self._count(length, len(body))
        return ChunkEntry(length, len(body), digest)

    @staticmethod
    def _plausible(size: int, length: int) -> bool:
        # a raw chunk is exactly `length` bytes; a compressed one is smaller. Anything else (an
        # interrupted copy by some other tool) is overwritten.
        return 0 < size <= length

    def _count(self, length: int, stored: int | None, *, touched: bool = False) -> None:
        with self._lock:
            s = self.stats
            s.logical += length
            s.chunks += 1
            if stored is None:
                s.reused_chunks += 1
                s.reused_logical += length
                s.touched += touched
            else:
                s.new_chunks += 1
                s.new_logical += length
                s.new_stored += stored


# -- reading ----------------------------------------------------------------------------------
def _decode_chunk(blob: bytes, entry: ChunkEntry) -> bytes | None:
    """The chunk's bytes from its object's body, or None if they are not the right ones."""
    if len(blob) == entry.length:
        data = blob
    else:
        try:
            data = _decompressor().decompress(blob, max_output_size=entry.length)
        except zstandard.ZstdError:
            return None
    if len(data) != entry.length or blake3.blake3(data).digest() != entry.digest:
        return None
    return data


def fetch_chunk(
    store: ObjectStore,
    entry: ChunkEntry,
    chunks_prefix: Key = CHUNKS_PREFIX,
    fossils_prefix: Key = FOSSILS_PREFIX,
) -> bytes:
    """GET, decompress and verify one chunk. ``CorruptChunk`` if it is still wrong after one
    re-fetch; ``NotFound`` (a ``StoreError``) if the chunk object is missing. A chunk that
    garbage collection set aside as a fossil (see ``collect_garbage``) is read from there."""
    key = chunk_key(entry.digest, chunks_prefix)
    for attempt in range(_RETRIES_ON_MISMATCH + 1):
        try:
            blob = store.get_range(key, 0, entry.length)
        except NotFound:
            fossil = chunk_key(entry.digest, fossils_prefix)
            try:
                blob = store.get_range(fossil, 0, entry.length)
            except NotFound:
                raise NotFound(f"chunk {key} is missing from the store") from None
            key = fossil
        data = _decode_chunk(blob, entry)
        if data is not None:
            return data
        if attempt < _RETRIES_ON_MISMATCH:
            log.warning("chunk %s failed verification; fetching it again", key)
    raise CorruptChunk(
        f"chunk {key} is corrupt: its content does not match its BLAKE3 hash "
        f"({len(blob)} bytes stored, {entry.length} expected)"
    )


class ChunkReader:
    """Random access to one chunked file: fetches and verifies only the chunks a read touches.

    Keeps the last ``keep`` decoded chunks in memory (sequential small reads hit them).
    Thread-safe; two threads reading one chunk at once may both fetch it.
    """

    def __init__(
        self,
        store: ObjectStore,
        manifest: Manifest,
        *,
        chunks_prefix: Key = CHUNKS_PREFIX,
        fossils_prefix: Key = FOSSILS_PREFIX,
        keep: int = 4,
    ) -> None:
        self.manifest = manifest
        self._store = store
        self._prefix = chunks_prefix
        self._fossils = fossils_prefix
        self._keep = keep
        self._lock = threading.Lock()
        self._recent: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def read_chunk(self, index: int) -> bytes:
        with self._lock:
            data = self._recent.get(index)
            if data is not None:
                self._recent.move_to_end(index)
                return data
        data = fetch_chunk(self._store, self.manifest.chunks[index], self._prefix, self._fossils)
        with self._lock:
            self._recent[index] = data
            while len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)``, short only at the end of the file."""
        parts = [self.read_chunk(i)[lo:hi] for i, lo, hi in self.manifest.span(offset, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)


# -- garbage collection -----------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class GcStats:
    """What one ``collect_garbage`` run found and did (with ``dry_run``: would have done)."""

    manifests: int = 0
    referenced: int = 0  # distinct chunks referenced by the manifests
    chunks_seen: int = 0
    kept_referenced: int = 0
    kept_young: int = 0
    fossilized: int = 0  # unreferenced old chunks set aside this run
    resurrected: int = 0  # fossils referenced again (by a dump that raced a collection)
    fossils_kept: int = 0  # unreferenced fossils not yet old enough to delete
    deleted: int = 0  # fossils deleted for good
    bytes_deleted: int = 0
    missing: int = 0  # referenced chunks neither stored nor fossilized: damage, report it
    cutoff_ns: int = 0


def _server_now_ns(store: ObjectStore, clock_key: Key) -> int:
    """The store's own clock: PUT a marker and read its LastModified back (no clock skew)."""
    store.put(clock_key, b"gc")
    return store.head(clock_key).mtime_ns


def _referenced(
    store: ObjectStore, prefixes: Iterable[Key], skip: tuple[str, ...], stats: GcStats
) -> set[bytes]:
    refs: set[bytes] = set()
    for prefix in prefixes:
        for page in iter_list(store, prefix, delimiter=None):
            for obj in page.objects:
                if obj.key.startswith(skip) or obj.size < _HEADER.size + _TRAILER:
                    continue
                try:
                    head = store.get_range(obj.key, 0, len(_MAGIC), obj.etag)
                    if not is_chunked(head):
                        continue
                    manifest = read_manifest(store, obj.key, obj.etag)
                except (NotFound, PreconditionFailed) as e:
                    raise LayoutError(
                        f"garbage collection stopped: {obj.key} changed while the manifests "
                        "were being read; nothing was deleted. Run it again."
                    ) from e
                except ManifestError as e:
                    raise LayoutError(
                        f"garbage collection stopped: {e}; nothing was deleted"
                    ) from e
                stats.manifests += 1
                refs |= manifest.digests()
    return refs


def _list_chunks(store: ObjectStore, prefix: Key) -> Iterable[tuple[bytes, Key, int, int]]:
    """(digest, key, mtime_ns, size) of every well-formed chunk object under ``prefix``."""
    for page in iter_list(store, prefix, delimiter=None):
        for obj in page.objects:
            name = obj.key[len(prefix) :]
            hexd = name.rpartition("/")[2]
            try:
                digest = bytes.fromhex(hexd)
            except ValueError:
                continue
            if len(digest) == _DIGEST and name == f"{hexd[:2]}/{hexd}":
                yield digest, obj.key, obj.mtime_ns, obj.size


def collect_garbage(
    store: ObjectStore,
    manifest_prefixes: Key | Sequence[Key],
    chunks_prefix: Key = CHUNKS_PREFIX,
    *,
    grace_seconds: float,
    fossils_prefix: Key = FOSSILS_PREFIX,
    clock_key: Key = GC_CLOCK_KEY,
    dry_run: bool = False,
) -> GcStats:
    """Free chunk objects that no manifest references, in two phases a grace period apart.

    (1) ``L`` = the store's clock (a marker's LastModified). (2) Every object under
    ``manifest_prefixes`` is listed and each manifest read: the referenced set. An object that
    vanishes or changes meanwhile, or a manifest that does not decode, stops the run before it
    changed anything (a rename is copy-then-delete: its references must not be missed).
    (3) Fossils (chunks set aside by earlier runs): referenced ones are *resurrected* (moved
    back); unreferenced ones set aside before ``L - grace`` are deleted for good.
    (4) Chunks: unreferenced ones last modified before ``L - grace`` become fossils (copied to
    ``fossils_prefix``, then deleted from ``chunks_prefix``); readers find a fossil when the
    chunk is missing (``fetch_chunk``), so a dump that reused a chunk just as it was set aside
    loses nothing, and the next run resurrects it.

    Safe as long as ``grace_seconds`` exceeds the writers' ``refresh_age`` plus the longest
    time between a writer's check of a chunk and its manifest's commit (about one dump): see
    ``docs/design/chunked-layout.md`` for the argument. Space is freed by the second run at
    least ``grace_seconds`` after the first. With ``dry_run`` nothing is changed and the
    counts say what would have been.
    """
    if grace_seconds < 0:
        raise ValueError("grace_seconds must be >= 0")
    prefixes = [manifest_prefixes] if isinstance(manifest_prefixes, str) else manifest_prefixes
    stats = GcStats()
    now_ns = _server_now_ns(store, clock_key)
    cutoff = now_ns - int(grace_seconds * 1e9)
    stats.cutoff_ns = cutoff
    skip = (chunks_prefix, fossils_prefix, clock_key)
    refs = _referenced(store, [Key(p) for p in prefixes], skip, stats)
    stats.referenced = len(refs)
    present: set[bytes] = set()
    candidates: list[tuple[Key, bytes]] = []
    for digest, key, mtime_ns, _size in _list_chunks(store, chunks_prefix):
        stats.chunks_seen += 1
        if digest in refs:
            stats.kept_referenced += 1
            present.add(digest)
        elif mtime_ns >= cutoff:
            stats.kept_young += 1
        else:
            candidates.append((key, digest))
    for digest, key, mtime_ns, size in list(_list_chunks(store, fossils_prefix)):
        if digest in refs:
            if not dry_run:
                if digest not in present:
                    store.copy(key, chunk_key(digest, chunks_prefix), {})
                store.delete(key)
            present.add(digest)
            stats.resurrected += 1
        elif mtime_ns < cutoff:
            if not dry_run:
                store.delete(key)
            stats.deleted += 1
            stats.bytes_deleted += size
        else:
            stats.fossils_kept += 1
    for key, digest in candidates:
        if not dry_run:
            try:
                store.copy(key, chunk_key(digest, fossils_prefix), {})
            except NotFound:
                continue
            store.delete(key)
        stats.fossilized += 1
    stats.missing = len(refs - present)
    if stats.missing:
        log.error("%d referenced chunks are missing from %s", stats.missing, chunks_prefix)
    return stats
