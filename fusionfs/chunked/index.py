"""The mount-wide chunk index: which chunks the store holds, and where.

Purpose: a writer reuses a chunk the store already has instead of storing it again; the index
says where it is (digest -> pack, offset, stored size) and how old its pack is known to be. It is
fed by the manifests a mount writes and reads, and primed from older snapshots
(``prime_index``), so no request is made per chunk to find out.

Concurrency: thread-safe (one lock, never held on I/O; a lock per pack for the writer's pack
checks). ``prime_index`` blocks (HEADs, in a short-lived pool of its own that it closes before
it returns).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Iterable

from fusionfs.chunked.format import PACKS_PREFIX, Manifest, pack_key
from fusionfs.store.base import Key, NotFound, ObjectStore

__all__ = ["ChunkIndex", "ChunkLocation", "prime_index"]


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
