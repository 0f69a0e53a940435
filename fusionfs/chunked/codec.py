"""A chunk's stored form: a zstd frame when that is strictly smaller than the chunk, else raw.

Purpose: ``encode_chunk`` (the writer's compression, zstd level 1 with a narrow match finder;
see ``FAST_HASH_LOG``) and ``decode_chunk`` (decompression bounded by the chunk's length, then
the BLAKE3 check against its digest). ``stored == length`` in a manifest entry means raw.

Threads: compressors and the decompressor are kept per thread (zstandard's objects are not
thread-safe); any number of threads may encode and decode at once.
"""

from __future__ import annotations

import threading
from typing import Final

import blake3
import zstandard

from fusionfs.chunked.format import ChunkEntry

__all__ = ["FAST_HASH_LOG", "FAST_MIN_MATCH", "decode_chunk", "encode_chunk"]

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


def encode_chunk(data: bytes | memoryview, level: int) -> bytes | memoryview:
    """The chunk's stored form: zstd if strictly smaller, else the raw bytes."""
    if level <= 0:
        return data
    packed: bytes = _compressor(level).compress(data)
    return packed if len(packed) < len(data) else data


def decode_chunk(blob: bytes | memoryview, entry: ChunkEntry) -> bytes | None:
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
