"""The chunked layout: compressed, de-duplicated storage of large files in shared pack objects.

Purpose: a file in the chunked layout (CRIU image files under a chunked directory) is stored as

- its own object (the file's key, e.g. ``snapshots/job/3/pages-1.img``) holding a small binary
  *manifest*: the file's logical size, a table of the pack objects it uses, and its list of
  chunks (length, stored size, BLAKE3 digest, pack, offset in the pack), with user metadata
  ``fusion-layout: chunked-v2`` and ``fusion-size: <logical size>``;
- its data in shared, immutable *pack objects* ``.fusion/packs/<hh>/<packid>`` (relative to the
  store's prefix) of about 8 MiB each: the stored forms of many chunks, back to back.

A chunk's stored form is a zstd frame when that is strictly smaller than the chunk, else the raw
bytes: ``stored == length`` means raw. Every chunk read is checked against its digest; a mismatch
is re-fetched once, then raised as ``CorruptChunk``: bad data is never returned. Consecutive
chunks of a file that lie back to back in one pack are fetched with one ranged GET.

Why packs: one object per 128 KiB chunk means 8192 PUTs (and as many HEADs) per GiB, which
costs seconds on any server with a few ms per request and PUT fees on AWS. Packs of 8 MiB need
128. The de-duplication granularity stays the chunk: a pack is only the unit of transfer and of
garbage collection. Which chunks a store has is known from a mount-wide ``ChunkIndex`` fed by the
manifests the mount writes and reads (and primed from a previous snapshot), so no request is
made per chunk to find out.

Chunking is content-defined at page granularity (``ChunkPolicy``): the data is cut only at 4 KiB
page boundaries of the file, after a page whose XXH3-64 is 0 modulo a divisor, within min/max
bounds. ``docs/design/chunked-layout.md`` has the measurements and the GC race argument.

Concurrency and threads: everything here is synchronous and blocking (store calls, hashing,
compression): the filesystem calls it from worker threads, never from the trio thread.
``ChunkWriter`` runs bounded thread pools of its own; ``ChunkReader`` and ``ChunkIndex`` are
thread-safe.

Garbage collection (``collect_garbage``) frees pack objects that no manifest references and
that are older than a grace period, in two phases (set aside as a *fossil*, deleted for good by
a later run if still unreferenced); writers refresh the age of old packs they reuse chunks from.
A pack of which only some chunks are referenced is kept whole (repacking is future work).

Caveats: a manifest holds at most 2**32-1 chunks of at most ``MAX_CHUNK`` bytes each; a pack is
at most 4 GiB (offsets are u32).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

import blake3
import xxhash
import zstandard

from fusionfs.store.base import (
    Body,
    ETag,
    Key,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    iter_list,
)

__all__ = [
    "FOSSILS_PREFIX",
    "FUSION_PREFIX",
    "GC_CLOCK_KEY",
    "LAYOUT_CHUNKED",
    "LAYOUT_METADATA",
    "MAX_CHUNK",
    "PACKS_PREFIX",
    "PACK_SIZE",
    "SIZE_METADATA",
    "ChunkEntry",
    "ChunkIndex",
    "ChunkPolicy",
    "ChunkReader",
    "ChunkWriter",
    "Chunker",
    "CorruptChunk",
    "GcStats",
    "LayoutError",
    "Manifest",
    "ManifestError",
    "WriteStats",
    "chunk_lengths",
    "collect_garbage",
    "decode_manifest",
    "encode_manifest",
    "fetch_chunk",
    "fetch_chunks",
    "is_chunked",
    "logical_size",
    "manifest_metadata",
    "new_pack_id",
    "pack_key",
    "prime_index",
    "read_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

#: Everything the layout keeps besides manifests lives under this prefix (hidden by the fs).
FUSION_PREFIX: Final = Key(".fusion/")
#: Where pack objects live, relative to the store's prefix.
PACKS_PREFIX: Final = Key(".fusion/packs/")
#: User-metadata name and value that mark an object as a chunked-layout manifest.
LAYOUT_METADATA: Final = "fusion-layout"
LAYOUT_CHUNKED: Final = "chunked-v2"
#: Where garbage collection sets unreferenced packs aside before deleting them for good.
FOSSILS_PREFIX: Final = Key(".fusion/fossils/")
#: Marker object whose LastModified gives garbage collection the store's clock.
GC_CLOCK_KEY: Final = Key(".fusion/gc-clock")
#: User-metadata name holding the logical size (LIST does not return metadata: see the doc).
SIZE_METADATA: Final = "fusion-size"
#: Largest chunk a manifest may describe (a sanity bound for decoding; policies stay far below).
MAX_CHUNK: Final = 64 << 20
#: Target size of a pack object: a PUT this size costs about as much per byte as one huge PUT.
PACK_SIZE: Final = 8 << 20

# Manifest v2, little-endian:
#   header     : magic (8) | version u16 = 2 | flags u16 | logical size u64 | chunk count u32 |
#                pack count u32
#   pack table : pack count x pack id (16 bytes)
#   entries    : chunk count x (length u32 | stored u32 | pack index u32 | offset u32 |
#                blake3 digest 32 bytes)
#   trailer    : blake3 of everything before it, 32 bytes
# Chunk offsets in the file are implicit (cumulative lengths): chunks tile [0, size).
_MAGIC: Final = b"\x89FSCHNK\n"  # high bit and newline catch text-mode mangling, as PNG's does
_VERSION: Final = 2
_HEADER = struct.Struct("<8sHHQII")
_PACK_ID = 16
_ENTRY = struct.Struct("<IIII32s")
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
    """One chunk of a file: logical length, stored size, BLAKE3 digest, and where it is stored
    (pack id and byte offset in that pack)."""

    length: int
    stored: int  # bytes in the pack (== length: raw; < length: a zstd frame)
    digest: bytes
    pack: bytes = bytes(_PACK_ID)
    offset: int = 0

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

    def contiguous(self, index: int) -> bool:
        """Whether chunk ``index + 1`` follows chunk ``index`` directly in the same pack."""
        a, b = self.chunks[index], self.chunks[index + 1]
        return a.pack == b.pack and b.offset == a.offset + a.stored

    @property
    def stored_bytes(self) -> int:
        """Bytes of pack space this file's chunks take (shared chunks counted once each)."""
        seen: dict[bytes, int] = {}
        for entry in self.chunks:
            seen[entry.digest] = entry.stored
        return sum(seen.values())

    def digests(self) -> set[bytes]:
        return {entry.digest for entry in self.chunks}

    def packs(self) -> list[bytes]:
        """The pack ids this file uses, in order of first use."""
        return list(dict.fromkeys(entry.pack for entry in self.chunks))


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest's binary form (see the format comment above ``_MAGIC``)."""
    count = len(manifest.chunks)
    if count >= 1 << 32:
        raise ValueError("too many chunks for one manifest")
    packs = manifest.packs()
    index = {pack: i for i, pack in enumerate(packs)}
    parts = [_HEADER.pack(_MAGIC, _VERSION, 0, manifest.size, count, len(packs))]
    for pack in packs:
        if len(pack) != _PACK_ID:
            raise ValueError(f"bad pack id {pack!r}")
        parts.append(pack)
    for e in manifest.chunks:
        if (not 0 < e.length <= MAX_CHUNK or not 0 <= e.stored <= MAX_CHUNK
                or len(e.digest) != _DIGEST or not 0 <= e.offset < 1 << 32):
            raise ValueError(f"bad chunk entry {e!r}")
        parts.append(_ENTRY.pack(e.length, e.stored, index[e.pack], e.offset, e.digest))
    body = b"".join(parts)
    return body + blake3.blake3(body).digest()


def _manifest_length(header: bytes | memoryview) -> int:
    count, npacks = _HEADER.unpack_from(header, 0)[4:6]
    return int(_HEADER.size + npacks * _PACK_ID + count * _ENTRY.size + _TRAILER)


def decode_manifest(data: bytes | memoryview, *, what: str = "manifest") -> Manifest:
    """Parse and check a manifest; ``ManifestError`` (naming ``what``) if it is not one."""
    view = memoryview(data)
    if len(view) < _HEADER.size + _TRAILER or bytes(view[:8]) != _MAGIC:
        raise ManifestError(f"{what}: not a chunked-layout manifest (bad magic or too short)")
    _magic, version, _flags, size, _count, npacks = _HEADER.unpack_from(view, 0)
    if version != _VERSION:
        raise ManifestError(
            f"{what}: manifest version {version} is not supported (need {_VERSION})"
        )
    expected = _manifest_length(view)
    if len(view) != expected:
        raise ManifestError(f"{what}: manifest is {len(view)} bytes, expected {expected}")
    body = view[: expected - _TRAILER]
    if blake3.blake3(body).digest() != bytes(view[expected - _TRAILER :]):
        raise ManifestError(f"{what}: manifest checksum mismatch (corrupt)")
    table_end = _HEADER.size + npacks * _PACK_ID
    packs = [bytes(body[i : i + _PACK_ID]) for i in range(_HEADER.size, table_end, _PACK_ID)]
    chunks = []
    for length, stored, pack, offset, digest in _ENTRY.iter_unpack(body[table_end:]):
        if not 0 < length <= MAX_CHUNK or stored > MAX_CHUNK or pack >= npacks:
            raise ManifestError(f"{what}: chunk entry out of range")
        chunks.append(ChunkEntry(length, stored, digest, packs[pack], offset))
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
    return what.get(LAYOUT_METADATA, "").startswith("chunked")


def logical_size(metadata: Mapping[str, str] | None) -> int | None:
    """The logical size a chunked object's metadata records, or None."""
    if not is_chunked(metadata):
        return None
    assert metadata is not None
    try:
        return int(metadata[SIZE_METADATA])
    except (KeyError, ValueError):
        return None


def manifest_metadata(manifest: Manifest) -> dict[str, str]:
    """User metadata to store a manifest object with."""
    return {LAYOUT_METADATA: LAYOUT_CHUNKED, SIZE_METADATA: str(manifest.size)}


def write_manifest(
    store: ObjectStore, key: Key, manifest: Manifest, metadata: Mapping[str, str] | None = None
) -> ETag:
    """PUT ``manifest`` as ``key`` (atomic: the commit point of the file). Extra ``metadata`` is
    merged under the layout's own entries. Every pack the manifest names must be durable."""
    meta = {**(metadata or {}), **manifest_metadata(manifest)}
    return store.put(key, encode_manifest(manifest), meta)


def read_manifest(store: ObjectStore, key: Key, etag: ETag | None = None) -> Manifest:
    """GET and decode the manifest object ``key`` (``If-Match: etag`` when given)."""
    head = store.get_range(key, 0, 1 << 16, etag)
    if len(head) < _HEADER.size or not is_chunked(head):
        raise ManifestError(f"{key}: not a chunked-layout manifest")
    total = _manifest_length(head)
    data = head
    if total > len(head):
        data = head + store.get_range(key, len(head), total - len(head), etag)
    return decode_manifest(data, what=key)


def pack_key(pack: bytes | str, prefix: Key = PACKS_PREFIX) -> Key:
    """The object key of the pack with id ``pack`` (bytes or hex)."""
    hexd = pack.hex() if isinstance(pack, bytes) else pack
    return Key(f"{prefix}{hexd[:2]}/{hexd}")


def new_pack_id() -> bytes:
    """A fresh pack id: 128 random bits (see the design note for why not a content hash)."""
    return os.urandom(_PACK_ID)


# -- chunking ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ChunkPolicy:
    """Content-defined chunking at page granularity.

    A chunk ends after page p when it holds at least ``min_size`` bytes and
    ``xxh3_64(page p) % divisor == 0`` (``divisor = (avg_size - min_size) / page_size``), or when
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


def _as_is(view: memoryview) -> memoryview:
    return view


class Chunker:
    """Splits a sequential stream into chunks by a ``ChunkPolicy``. Not thread-safe.

    ``push(data)`` returns the chunks completed so far; ``flush()`` returns the last, partial one.
    A page (stream offsets ``k * page_size``) past the chunk's minimum size ends the chunk when
    its XXH3-64 is 0 modulo the policy's divisor, or when the chunk reaches its maximum size.

    Pages are judged where they lie in the pushed data. A chunk that lies within one pushed
    buffer of immutable bytes (a FUSE write's own buffer, usually) is a view of it, not a copy;
    a chunk that spans pushes, or comes from a mutable buffer, is copied once. Only the
    unfinished chunk's bytes (at most ``max_size``) are kept between pushes.
    """

    def __init__(self, policy: ChunkPolicy) -> None:
        self.policy = policy
        self._held: list[bytes | memoryview] = []  # the unfinished chunk's earlier bytes
        self._held_len = 0
        self._judged = 0  # bytes of the unfinished chunk already judged (a page multiple)

    def push(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        pol = self.policy
        page, lo, hi, div = pol.page_size, pol.min_size, pol.max_size, pol.divisor
        cut_hash = xxhash.xxh3_64_intdigest  # see docs/design/chunked-layout.md: not CRC-32
        out: list[bytes | memoryview] = []
        # Slices of immutable bytes stay valid whatever the caller does next (and after the
        # ``with`` below releases ``view``); anything else is copied: a caller may reuse it.
        immutable = isinstance(data, bytes) or isinstance(getattr(data, "obj", None), bytes)
        keep: Callable[[memoryview], bytes | memoryview] = _as_is if immutable else bytes
        with memoryview(data) as whole, whole.cast("B") as view:
            n = len(view)
            # offsets below are relative to the unfinished chunk's start; it starts at ``start``
            # in ``view`` (negative: in the bytes held from earlier pushes)
            start = -self._held_len
            pos = self._judged  # next page to judge, relative to the chunk start
            while start + pos + page <= n:
                end = pos + page
                if end < lo:  # pages before the minimum are never judged: skip to it
                    pos = lo - page
                    continue
                at = start + pos  # the page's offset in view (negative: it began earlier)
                if at >= 0:
                    cut = end >= hi or cut_hash(view[at : at + page]) % div == 0
                else:
                    cut = (
                        end >= hi or cut_hash(self._held_tail(-at) + view[: at + page]) % div == 0
                    )
                if cut:
                    if start >= 0:
                        out.append(keep(view[start : start + end]))
                    else:
                        out.append(b"".join([*self._held, view[: start + end]]))
                        self._held, self._held_len = [], 0
                    start += end
                    pos = 0
                else:
                    pos = end
            if start >= 0:
                self._held = [keep(view[start:])] if start < n else []
                self._held_len = n - start
            elif n:
                self._held.append(keep(view[:]))
                self._held_len += n
            self._judged = pos
        if len(self._held) > 64:  # many tiny pushes: keep the unfinished chunk in one piece
            self._held = [b"".join(self._held)]
        return out

    def _held_tail(self, count: int) -> bytes:
        """The last ``count`` bytes held from earlier pushes."""
        parts: list[bytes | memoryview] = []
        for piece in reversed(self._held):
            if count <= 0:
                break
            parts.append(piece[-count:] if count < len(piece) else piece)
            count -= len(piece)
        return b"".join(reversed(parts))

    def flush(self) -> bytes | None:
        """The remaining bytes as the last chunk (None if there are none); resets the chunker."""
        data = b"".join(self._held) if self._held_len else None
        self._held, self._held_len, self._judged = [], 0, 0
        return data


def chunk_lengths(data: bytes | memoryview, policy: ChunkPolicy | None = None) -> list[int]:
    """Chunk lengths for ``data`` in one piece (for tests and measurements)."""
    chunker = Chunker(policy or ChunkPolicy())
    lengths = [len(c) for c in chunker.push(data)]
    tail = chunker.flush()
    if tail is not None:
        lengths.append(len(tail))
    return lengths


# -- the mount-wide index -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ChunkLocation:
    pack: bytes
    offset: int
    stored: int


class ChunkIndex:
    """Which chunks the store holds, and where: digest -> (pack, offset, stored size), plus for
    each pack the newest LastModified known for it (wall-clock seconds; None: not checked).

    Fed by every manifest a mount writes (``add_pack`` once a pack is durable) or reads
    (``add_manifest``), and primed from older snapshots (``prime_index``). A writer reuses a
    chunk found here instead of storing it again, after making sure its pack is young enough
    (``ChunkWriter``): entries learnt from manifests are only as good as the pack behind them.
    Thread-safe; bounded (the oldest chunk entries are dropped).
    """

    def __init__(self, max_entries: int = 1 << 20) -> None:
        self._lock = threading.Lock()
        self._chunks: collections.OrderedDict[bytes, ChunkLocation] = collections.OrderedDict()
        self._packs: dict[bytes, float | None] = {}
        self._pack_locks: dict[bytes, threading.Lock] = {}
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._chunks)

    def _put(self, digest: bytes, loc: ChunkLocation) -> None:
        self._chunks[digest] = loc
        self._chunks.move_to_end(digest)
        if len(self._chunks) > self._max:
            self._chunks.popitem(last=False)

    def add_manifest(self, manifest: Manifest) -> None:
        """Learn the chunks of a manifest read from the store (packs not checked yet)."""
        with self._lock:
            for e in manifest.chunks:
                self._packs.setdefault(e.pack, None)
                self._put(e.digest, ChunkLocation(e.pack, e.offset, e.stored))

    def add_pack(
        self, pack: bytes, chunks: Iterable[tuple[bytes, int, int]], mtime: float | None = None
    ) -> None:
        """A pack is durable with ``chunks`` = (digest, offset, stored) in it."""
        with self._lock:
            self._packs[pack] = time.time() if mtime is None else mtime
            for digest, offset, stored in chunks:
                self._put(digest, ChunkLocation(pack, offset, stored))

    def lookup(self, digest: bytes) -> ChunkLocation | None:
        with self._lock:
            return self._chunks.get(digest)

    def pack_mtime(self, pack: bytes) -> float | None:
        with self._lock:
            return self._packs.get(pack)

    def set_pack_mtime(self, pack: bytes, mtime: float) -> None:
        with self._lock:
            self._packs[pack] = mtime

    def forget_pack(self, pack: bytes) -> None:
        """The pack is gone (collected): drop it and every chunk located in it."""
        with self._lock:
            self._packs.pop(pack, None)
            for digest in [d for d, loc in self._chunks.items() if loc.pack == pack]:
                del self._chunks[digest]

    def pack_lock(self, pack: bytes) -> threading.Lock:
        """A lock per pack, so that one pack is checked or refreshed once, not per chunk."""
        with self._lock:
            lock = self._pack_locks.get(pack)
            if lock is None:
                if len(self._pack_locks) > 4 * len(self._packs) + 1024:
                    self._pack_locks.clear()
                lock = self._pack_locks[pack] = threading.Lock()
            return lock

    def unchecked_packs(self) -> list[bytes]:
        with self._lock:
            return [p for p, m in self._packs.items() if m is None]


def prime_index(
    store: ObjectStore,
    index: ChunkIndex,
    manifests: Iterable[Manifest],
    *,
    packs_prefix: Key = PACKS_PREFIX,
    workers: int = 8,
) -> tuple[int, int]:
    """Learn ``manifests``' chunks, then HEAD every pack not yet checked (once per pack, in
    parallel), recording its age or forgetting it if it is gone. Returns (chunks, packs)."""
    packs: set[bytes] = set()
    chunks = 0
    for manifest in manifests:
        index.add_manifest(manifest)
        packs.update(manifest.packs())
        chunks += len(manifest.chunks)
    todo = [p for p in packs if index.pack_mtime(p) is None]

    def check(pack: bytes) -> None:
        try:
            info = store.head(pack_key(pack, packs_prefix))
        except NotFound:
            index.forget_pack(pack)
            return
        index.set_pack_mtime(pack, info.mtime_ns / 1e9)

    if todo:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers), "fusionfs-prime") as pool:
            for future in [pool.submit(check, p) for p in todo]:
                future.result()
    return chunks, len(packs)


# -- writing ----------------------------------------------------------------------------------
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


_tls = threading.local()


#: Level 1 (the mounts' default) narrows zstd's match finder to what chunks of 32-512 KiB need:
#: a table of 2**10 entries (level 1's is 2**14, far bigger than L1 cache: a miss per position
#: on data with few long matches) and matches of at least 7 bytes. Measured on sequencing-like
#: memory (FASTQ reads, tests/snap/memtask.py): 3.8 against 4.6-5.8 CPU-s per GiB for 2.82x
#: against 2.96x; random and float data cost the same; repetitive text shrinks less (3.1x
#: against 3.7x). A checkpoint on a 2-core machine is CPU-bound, not link-bound (issue 19:
#: 4 GiB at 100 MB/s), so the CPU is worth more than the 5 % of bytes. The frames are plain zstd.
FAST_HASH_LOG: Final = 10
FAST_MIN_MATCH: Final = 7


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, "compressors", None)
    if cache is None:
        cache = _tls.compressors = {}
    comp = cache.get(level)
    if comp is None:
        if level == 1:
            params = zstandard.ZstdCompressionParameters.from_level(
                1, hash_log=FAST_HASH_LOG, min_match=FAST_MIN_MATCH, write_content_size=True
            )
            comp = zstandard.ZstdCompressor(compression_params=params)
        else:
            comp = zstandard.ZstdCompressor(level=level, write_content_size=True)
        cache[level] = comp
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_tls, "decompressor", None)
    if dec is None:
        dec = _tls.decompressor = zstandard.ZstdDecompressor()
    return dec


#: After ``RAW_STREAK`` chunks in a row that zstd could not shrink, a writer stores chunks raw
#: and tries compression only on every ``RAW_PROBE``-th one; a chunk that shrinks ends the run.
RAW_STREAK = 16
RAW_PROBE = 8


def _encode_chunk(data: bytes | memoryview, level: int) -> bytes | memoryview:
    """The chunk's stored form: zstd if strictly smaller, else the raw bytes."""
    if level <= 0:
        return data
    packed: bytes = _compressor(level).compress(data)
    return packed if len(packed) < len(data) else data


@dataclasses.dataclass(slots=True)
class _Prepared:
    length: int
    digest: bytes
    body: bytes | memoryview | None  # None: reused from ``loc``
    loc: ChunkLocation | None


class ChunkWriter:
    """Chunks, hashes, compresses and packs a file's bytes; ``finish`` returns its manifest.

    Feed the file sequentially (``feed(offset, data)``). On a pool of ``workers`` threads each
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
        pool: concurrent.futures.ThreadPoolExecutor | None = None,
        upload_pool: concurrent.futures.ThreadPoolExecutor | None = None,
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
        self._own_pools = pool is None
        self._pool = pool or concurrent.futures.ThreadPoolExecutor(workers, "fusionfs-chunks")
        self._uploads = upload_pool or concurrent.futures.ThreadPoolExecutor(
            pack_uploads, "fusionfs-packs"
        )
        self._own_uploads = upload_pool is None
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
        if self._own_pools:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._own_uploads:
            self._uploads.shutdown(wait=True)

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
        """``_encode_chunk``, except inside a run of incompressible data (random or already
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
        body = _encode_chunk(chunk, self._level)
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


# -- reading ----------------------------------------------------------------------------------
def _decode_chunk(blob: bytes | memoryview, entry: ChunkEntry) -> bytes | None:
    """The chunk's bytes from its stored form, or None if they are not the right ones."""
    if len(blob) != entry.stored:
        return None
    if entry.stored == entry.length:
        data = bytes(blob)
    else:
        try:
            data = _decompressor().decompress(blob, max_output_size=entry.length)
        except zstandard.ZstdError:
            return None
    if len(data) != entry.length or blake3.blake3(data).digest() != entry.digest:
        return None
    return data


def _get_pack_range(
    store: ObjectStore, pack: bytes, start: int, length: int, packs_prefix: Key,
    fossils_prefix: Key,
) -> bytes:
    """A byte range of a pack; from its fossil when garbage collection set it aside."""
    key = pack_key(pack, packs_prefix)
    try:
        return store.get_range(key, start, length)
    except NotFound:
        try:
            return store.get_range(pack_key(pack, fossils_prefix), start, length)
        except NotFound:
            raise NotFound(f"pack {key} is missing from the store") from None


def fetch_chunk(
    store: ObjectStore,
    entry: ChunkEntry,
    packs_prefix: Key = PACKS_PREFIX,
    fossils_prefix: Key = FOSSILS_PREFIX,
    *,
    attempts: int = _RETRIES_ON_MISMATCH + 1,
) -> bytes:
    """GET (one ranged GET of its pack), decompress and verify one chunk. ``CorruptChunk`` if
    it is still wrong after one re-fetch; ``NotFound`` if its pack is missing (a pack set aside
    by garbage collection is read from its fossil)."""
    blob = b""
    for attempt in range(attempts):
        blob = _get_pack_range(store, entry.pack, entry.offset, entry.stored, packs_prefix,
                               fossils_prefix)
        data = _decode_chunk(blob, entry)
        if data is not None:
            return data
        if attempt < attempts - 1:
            log.warning("chunk %s failed verification; fetching it again", entry.hex)
    raise CorruptChunk(
        f"chunk {entry.hex} in pack {entry.pack.hex()} is corrupt: its content does not match "
        f"its BLAKE3 hash ({len(blob)} bytes read, {entry.stored} stored, {entry.length} long)"
    )


def fetch_chunks(
    store: ObjectStore,
    manifest: Manifest,
    first: int,
    last: int,
    packs_prefix: Key = PACKS_PREFIX,
    fossils_prefix: Key = FOSSILS_PREFIX,
    *,
    max_request: int = 16 << 20,
) -> list[bytes]:
    """Chunks ``first..last`` of ``manifest``, verified. Chunks lying back to back in one pack
    come with one ranged GET (up to ``max_request`` bytes each)."""
    out: list[bytes] = []
    i = first
    while i <= last:
        j = i
        total = manifest.chunks[i].stored
        while (j < last and manifest.contiguous(j)
               and total + manifest.chunks[j + 1].stored <= max_request):
            j += 1
            total += manifest.chunks[j].stored
        head = manifest.chunks[i]
        if i == j:
            out.append(fetch_chunk(store, head, packs_prefix, fossils_prefix))
            i += 1
            continue
        blob = memoryview(
            _get_pack_range(store, head.pack, head.offset, total, packs_prefix, fossils_prefix)
        )
        for k in range(i, j + 1):
            entry = manifest.chunks[k]
            lo = entry.offset - head.offset
            data = _decode_chunk(blob[lo : lo + entry.stored], entry)
            if data is None:
                log.warning("chunk %s failed verification; fetching it again", entry.hex)
                data = fetch_chunk(store, entry, packs_prefix, fossils_prefix,
                                   attempts=_RETRIES_ON_MISMATCH)
            out.append(data)
        i = j + 1
    return out


class ChunkReader:
    """Random access to one chunked file: fetches and verifies only the chunks a read touches
    (back-to-back chunks in one GET). Keeps the last ``keep`` decoded chunks in memory.
    Thread-safe; two threads reading one chunk at once may both fetch it.
    """

    def __init__(
        self,
        store: ObjectStore,
        manifest: Manifest,
        *,
        packs_prefix: Key = PACKS_PREFIX,
        fossils_prefix: Key = FOSSILS_PREFIX,
        keep: int = 4,
    ) -> None:
        self.manifest = manifest
        self._store = store
        self._prefix = packs_prefix
        self._fossils = fossils_prefix
        self._keep = keep
        self._lock = threading.Lock()
        self._recent: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def _remember(self, index: int, data: bytes) -> None:
        with self._lock:
            self._recent[index] = data
            self._recent.move_to_end(index)
            while len(self._recent) > self._keep:
                self._recent.popitem(last=False)

    def read_chunk(self, index: int) -> bytes:
        with self._lock:
            data = self._recent.get(index)
            if data is not None:
                self._recent.move_to_end(index)
                return data
        data = fetch_chunk(self._store, self.manifest.chunks[index], self._prefix, self._fossils)
        self._remember(index, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)``, short only at the end of the file."""
        span = self.manifest.span(offset, length)
        if not span:
            return b""
        have: dict[int, bytes] = {}
        with self._lock:
            for i, _, _ in span:
                if i in self._recent:
                    have[i] = self._recent[i]
        missing = [i for i, _, _ in span if i not in have]
        # fetch each run of consecutive missing chunks together
        k = 0
        while k < len(missing):
            m = k
            while m + 1 < len(missing) and missing[m + 1] == missing[m] + 1:
                m += 1
            datas = fetch_chunks(self._store, self.manifest, missing[k], missing[m],
                                 self._prefix, self._fossils)
            for idx, data in zip(range(missing[k], missing[m] + 1), datas, strict=True):
                have[idx] = data
            k = m + 1
        for i, _, _ in span[-self._keep:]:
            self._remember(i, have[i])
        parts = [have[i][lo:hi] for i, lo, hi in span]
        return parts[0] if len(parts) == 1 else b"".join(parts)


# -- garbage collection -----------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class GcStats:
    """What one ``collect_garbage`` run found and did (with ``dry_run``: would have done)."""

    manifests: int = 0
    referenced: int = 0  # distinct packs referenced by the manifests
    packs_seen: int = 0
    kept_referenced: int = 0
    kept_young: int = 0
    fossilized: int = 0  # unreferenced old packs set aside this run
    resurrected: int = 0  # fossils referenced again (by a dump that raced a collection)
    fossils_kept: int = 0  # unreferenced fossils not yet old enough to delete
    deleted: int = 0  # fossils deleted for good
    bytes_deleted: int = 0
    missing: int = 0  # referenced packs neither stored nor fossilized: damage, report it
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
                refs.update(manifest.packs())
    return refs


def _list_packs(store: ObjectStore, prefix: Key) -> Iterable[tuple[bytes, Key, int, int]]:
    """(pack id, key, mtime_ns, size) of every well-formed pack object under ``prefix``."""
    for page in iter_list(store, prefix, delimiter=None):
        for obj in page.objects:
            name = obj.key[len(prefix) :]
            hexd = name.rpartition("/")[2]
            try:
                pack = bytes.fromhex(hexd)
            except ValueError:
                continue
            if len(pack) == _PACK_ID and name == f"{hexd[:2]}/{hexd}":
                yield pack, obj.key, obj.mtime_ns, obj.size


def collect_garbage(
    store: ObjectStore,
    manifest_prefixes: Key | Sequence[Key],
    packs_prefix: Key = PACKS_PREFIX,
    *,
    grace_seconds: float,
    fossils_prefix: Key = FOSSILS_PREFIX,
    clock_key: Key = GC_CLOCK_KEY,
    dry_run: bool = False,
) -> GcStats:
    """Free pack objects that no manifest references, in two phases a grace period apart.

    (1) ``L`` = the store's clock (a marker's LastModified). (2) Every object under
    ``manifest_prefixes`` is listed and each manifest read: the referenced packs. An object
    that vanishes or changes meanwhile, or a manifest that does not decode, stops the run before
    it changed anything (a rename is copy-then-delete: its references must not be missed).
    (3) Fossils (packs set aside by earlier runs): referenced ones are *resurrected* (moved
    back); unreferenced ones set aside before ``L - grace`` are deleted for good.
    (4) Packs: unreferenced ones last modified before ``L - grace`` become fossils (copied to
    ``fossils_prefix``, then deleted); readers find a fossil when the pack is missing, so a
    dump that reused a chunk just as its pack was set aside loses nothing, and the next run
    resurrects it. A pack with at least one referenced chunk is kept whole.

    Safe as long as ``grace_seconds`` exceeds the writers' ``refresh_age`` plus the longest
    time between a writer's check of a pack and its manifest's commit (about one dump): see
    ``docs/design/chunked-layout.md``. Space is freed by the second run at least
    ``grace_seconds`` after the first. With ``dry_run`` nothing is changed.
    """
    if grace_seconds < 0:
        raise ValueError("grace_seconds must be >= 0")
    prefixes = [manifest_prefixes] if isinstance(manifest_prefixes, str) else manifest_prefixes
    stats = GcStats()
    now_ns = _server_now_ns(store, clock_key)
    cutoff = now_ns - int(grace_seconds * 1e9)
    stats.cutoff_ns = cutoff
    skip = (FUSION_PREFIX, packs_prefix, fossils_prefix, clock_key)
    refs = _referenced(store, [Key(p) for p in prefixes], skip, stats)
    stats.referenced = len(refs)
    present: set[bytes] = set()
    candidates: list[tuple[Key, bytes]] = []
    for pack, key, mtime_ns, _size in _list_packs(store, packs_prefix):
        stats.packs_seen += 1
        if pack in refs:
            stats.kept_referenced += 1
            present.add(pack)
        elif mtime_ns >= cutoff:
            stats.kept_young += 1
        else:
            candidates.append((key, pack))
    for pack, key, mtime_ns, size in list(_list_packs(store, fossils_prefix)):
        if pack in refs:
            if not dry_run:
                if pack not in present:
                    store.copy(key, pack_key(pack, packs_prefix), {})
                store.delete(key)
            present.add(pack)
            stats.resurrected += 1
        elif mtime_ns < cutoff:
            if not dry_run:
                store.delete(key)
            stats.deleted += 1
            stats.bytes_deleted += size
        else:
            stats.fossils_kept += 1
    for key, pack in candidates:
        if not dry_run:
            try:
                store.copy(key, pack_key(pack, fossils_prefix), {})
            except NotFound:
                continue
            store.delete(key)
        stats.fossilized += 1
    stats.missing = len(refs - present)
    if stats.missing:
        log.error("%d referenced packs are missing from %s", stats.missing, packs_prefix)
    return stats
