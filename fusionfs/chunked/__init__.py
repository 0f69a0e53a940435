"""The chunked layout: compressed, de-duplicated storage of large files in shared pack objects.

A file in the chunked layout is a small *manifest* object at its own key and its chunks' stored
forms in shared, immutable packs (``.fusion/packs/``). ``docs/design/chunked-layout.md`` has the
format, the measurements and the garbage collection race argument. The package, by module:

- ``format``: keys, metadata names, the manifest and its encoding, the layout's errors;
- ``chunker``: content-defined chunking at page granularity;
- ``codec``: a chunk's stored form (zstd or raw) and its verified decoding;
- ``index``: the mount-wide chunk index (digest -> pack location) and its priming;
- ``packer``: ``ChunkWriter`` (hash, compress, pack, upload) and the ``PackThreads`` it runs on;
- ``retrieval``: chunks read back from their packs (coalesced GETs, fossils, one re-fetch);
- ``gc``: two-phase garbage collection of unreferenced packs;
- ``layout``: ``ChunkedLayout``, the mount's side (reads through ``fusionfs.fetch``'s engine);
- ``feed``: ``ChunkFeed``, streaming a staged file into a writer while it is written.

All but ``layout`` and ``feed`` are synchronous and blocking; the mount calls them from worker
threads.
"""

from fusionfs.chunked.chunker import Chunker, ChunkPolicy, chunk_lengths
from fusionfs.chunked.feed import FEED_STEP, ChunkFeed
from fusionfs.chunked.format import (
    DIR_LAYOUT_METADATA,
    FOSSILS_PREFIX,
    FUSION_PREFIX,
    GC_CLOCK_KEY,
    LAYOUT_CHUNKED,
    LAYOUT_METADATA,
    MAX_CHUNK,
    PACK_SIZE,
    PACKS_PREFIX,
    SIZE_METADATA,
    ChunkEntry,
    CorruptChunk,
    LayoutError,
    Manifest,
    ManifestError,
    decode_manifest,
    encode_manifest,
    is_chunked,
    logical_size,
    manifest_digest,
    manifest_metadata,
    new_pack_id,
    pack_key,
    read_manifest,
    write_manifest,
)
from fusionfs.chunked.gc import GcStats, collect_garbage
from fusionfs.chunked.index import ChunkIndex, ChunkLocation, prime_index
from fusionfs.chunked.layout import ChunkedLayout, DirStats
from fusionfs.chunked.packer import ChunkWriter, PackThreads, WriteStats
from fusionfs.chunked.retrieval import fetch_chunk, fetch_chunks

__all__ = [
    "DIR_LAYOUT_METADATA",
    "FEED_STEP",
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
    "ChunkFeed",
    "ChunkIndex",
    "ChunkLocation",
    "ChunkPolicy",
    "ChunkWriter",
    "ChunkedLayout",
    "Chunker",
    "CorruptChunk",
    "DirStats",
    "GcStats",
    "LayoutError",
    "Manifest",
    "ManifestError",
    "PackThreads",
    "WriteStats",
    "chunk_lengths",
    "collect_garbage",
    "decode_manifest",
    "encode_manifest",
    "fetch_chunk",
    "fetch_chunks",
    "is_chunked",
    "logical_size",
    "manifest_digest",
    "manifest_metadata",
    "new_pack_id",
    "pack_key",
    "prime_index",
    "read_manifest",
    "write_manifest",
]
