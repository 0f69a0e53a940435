"""Retrieving chunks from their packs: ranged GETs, decoded and verified.

Purpose: ``fetch_chunks`` returns chunks ``first..last`` of a manifest; chunks that lie back to
back in one pack come with one ranged GET (up to ``max_request`` bytes), then each is decoded
and checked against its digest (``codec.decode_chunk``). A mismatch is fetched once more, alone
(a flip in transit heals; logged), then raised as ``CorruptChunk``: bad data is never returned.
A pack that garbage collection set aside is read from its fossil.

Synchronous and blocking: the mount calls it from worker threads (``chunked.layout``, under the
store-call limiter and timeout), ``verify`` from its own.
"""

from __future__ import annotations

import logging

from fusionfs.chunked.codec import decode_chunk
from fusionfs.chunked.format import (
    FOSSILS_PREFIX,
    PACKS_PREFIX,
    ChunkEntry,
    CorruptChunk,
    Manifest,
    pack_key,
)
from fusionfs.store.base import Key, NotFound, ObjectStore

__all__ = ["fetch_chunk", "fetch_chunks"]

log = logging.getLogger(__name__)

_RETRIES_ON_MISMATCH = 1


def _get_pack_range(
    store: ObjectStore,
    pack: bytes,
    start: int,
    length: int,
    packs_prefix: Key,
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
        blob = _get_pack_range(
            store, entry.pack, entry.offset, entry.stored, packs_prefix, fossils_prefix
        )
        data = decode_chunk(blob, entry)
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
    for i, j in manifest.pack_runs(first, last, max_request):
        head = manifest.chunks[i]
        if i == j:
            out.append(fetch_chunk(store, head, packs_prefix, fossils_prefix))
            continue
        tail = manifest.chunks[j]
        total = tail.offset + tail.stored - head.offset  # back to back: one range
        blob = memoryview(
            _get_pack_range(store, head.pack, head.offset, total, packs_prefix, fossils_prefix)
        )
        for k in range(i, j + 1):
            entry = manifest.chunks[k]
            lo = entry.offset - head.offset
            data = decode_chunk(blob[lo : lo + entry.stored], entry)
            if data is None:
                log.warning("chunk %s failed verification; fetching it again", entry.hex)
                data = fetch_chunk(
                    store, entry, packs_prefix, fossils_prefix, attempts=_RETRIES_ON_MISMATCH
                )
            out.append(data)
    return out
