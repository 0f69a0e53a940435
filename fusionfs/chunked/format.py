"""The chunked layout's on-store format: keys, metadata names, the manifest, and its errors.

Purpose: a file in the chunked layout (CRIU image files under a chunked directory) is stored as

- its own object (the file's key, e.g. ``snapshots/job/3/pages-1.img``) holding a small binary
  *manifest*: the file's logical size, a table of the pack objects it uses, and its list of
  chunks (length, stored size, BLAKE3 digest, pack, offset in the pack), with user metadata
  ``fusion-layout: chunked-v2`` and ``fusion-size: <logical size>``;
- its data in shared, immutable *pack objects* ``.fusion/packs/<hh>/<packid>`` (relative to the
  store's prefix) of about 8 MiB each: the stored forms of many chunks, back to back.

This module is that format and nothing else: the names (``FUSION_PREFIX``, ``PACKS_PREFIX``,
``FOSSILS_PREFIX``, ``GC_CLOCK_KEY``, the metadata names), ``Manifest`` with its binary
encoding, reading and writing a manifest object, pack keys and ids, and the layout's errors.
Everything here is synchronous; the store calls block (callers run them in worker threads).
``docs/design/chunked-layout.md`` describes the format and why it is so.

Caveats: a manifest holds at most 2**32-1 chunks of at most ``MAX_CHUNK`` bytes each; a pack is
at most 4 GiB (offsets are u32).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

import blake3

from fusionfs.store.base import ETag, Key, ObjectStore, StoreError

__all__ = [
    "DIR_LAYOUT_METADATA",
    "FOSSILS_PREFIX",
    "FUSION_PREFIX",
    "GC_CLOCK_KEY",
    "LAYOUT_CHUNKED",
    "LAYOUT_METADATA",
    "MAGIC_SIZE",
    "MAX_CHUNK",
    "MIN_MANIFEST_SIZE",
    "PACKS_PREFIX",
    "PACK_ID_SIZE",
    "PACK_SIZE",
    "SIZE_METADATA",
    "ChunkEntry",
    "CorruptChunk",
    "LayoutError",
    "Manifest",
    "ManifestError",
    "decode_manifest",
    "encode_manifest",
    "is_chunked",
    "logical_size",
    "manifest_digest",
    "manifest_metadata",
    "new_pack_id",
    "pack_key",
    "read_manifest",
    "write_manifest",
]

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
#: Metadata of a directory's marker object that makes new files below it chunked.
DIR_LAYOUT_METADATA: Final = "fusion-dir-layout"


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
#: Bytes of the magic that starts every manifest (``is_chunked`` on a body needs this many).
MAGIC_SIZE: Final = len(_MAGIC)
#: Bytes of a pack id.
PACK_ID_SIZE: Final = _PACK_ID
#: The smallest manifest (no chunks, no packs).
MIN_MANIFEST_SIZE: Final = _HEADER.size + _TRAILER


class LayoutError(StoreError):
    """Base of the chunked layout's errors (a ``StoreError``, so the fs maps it to EIO)."""


class CorruptChunk(LayoutError):
    """A chunk's bytes do not hash to the digest its manifest names. Never served."""


class ManifestError(LayoutError):
    """An object that should be a chunked-layout manifest cannot be decoded."""


# -- manifest -------------------------------------------------------------------------------
class ChunkEntry(NamedTuple):
    """One chunk of a file: logical length, stored size, BLAKE3 digest, and where it is stored
    (pack id and byte offset in that pack). Immutable. A named tuple, not a frozen dataclass:
    a manifest holds one per 128 KiB, and a frozen dataclass's ``__init__`` made decoding a
    1 GiB file's manifest (8192 entries) take 8 ms instead of 3 (on the restore's path)."""

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

    __slots__ = ("_offsets", "chunks", "digest", "size")

    def __init__(self, chunks: Sequence[ChunkEntry], digest: bytes | None = None) -> None:
        self.chunks: tuple[ChunkEntry, ...] = tuple(chunks)
        #: the BLAKE3 trailer of its encoded form, when it was decoded from it (else None:
        #: ``manifest_digest`` encodes it)
        self.digest = digest
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

    def pack_runs(self, first: int, last: int, max_bytes: int) -> list[tuple[int, int]]:
        """Chunks ``first..last`` as runs ``(i, j)`` of chunks that lie back to back in one pack,
        at most ``max_bytes`` stored each (a single chunk may exceed it): one ranged GET each."""
        runs = []
        i = first
        while i <= last:
            j, total = i, self.chunks[i].stored
            while (
                j < last and self.contiguous(j) and total + self.chunks[j + 1].stored <= max_bytes
            ):
                j += 1
                total += self.chunks[j].stored
            runs.append((i, j))
            i = j + 1
        return runs

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
        if (
            not 0 < e.length <= MAX_CHUNK
            or not 0 <= e.stored <= MAX_CHUNK
            or len(e.digest) != _DIGEST
            or not 0 <= e.offset < 1 << 32
        ):
            raise ValueError(f"bad chunk entry {e!r}")
        parts.append(_ENTRY.pack(e.length, e.stored, index[e.pack], e.offset, e.digest))
    body = b"".join(parts)
    return body + blake3.blake3(body).digest()


def manifest_digest(manifest: Manifest) -> bytes:
    """The BLAKE3 trailer of the manifest's encoded form: it names the file's content (every
    chunk's digest, length and place). Kept from the decode when there was one."""
    return manifest.digest if manifest.digest is not None else encode_manifest(manifest)[-_TRAILER:]


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
    trailer = bytes(view[expected - _TRAILER :])
    if blake3.blake3(body).digest() != trailer:
        raise ManifestError(f"{what}: manifest checksum mismatch (corrupt)")
    table_end = _HEADER.size + npacks * _PACK_ID
    packs = [bytes(body[i : i + _PACK_ID]) for i in range(_HEADER.size, table_end, _PACK_ID)]
    chunks = []
    for length, stored, pack, offset, digest in _ENTRY.iter_unpack(body[table_end:]):
        if not 0 < length <= MAX_CHUNK or stored > MAX_CHUNK or pack >= npacks:
            raise ManifestError(f"{what}: chunk entry out of range")
        chunks.append(ChunkEntry(length, stored, digest, packs[pack], offset))
    manifest = Manifest(chunks, trailer)
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
