"""Garbage collection of pack objects that no manifest references.

Purpose: ``collect_garbage`` frees unreferenced packs in two phases a grace period apart: set
aside as a *fossil*, then deleted for good by a later run if still unreferenced; readers find a
fossil when its pack is missing, and writers refresh the age of old packs they reuse chunks from
(``packer.ChunkWriter``). A pack of which only some chunks are referenced is kept whole
(repacking is future work). ``docs/design/chunked-layout.md`` has the race argument.

Synchronous and blocking (the filesystem runs it in a worker thread).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

from fusionfs.chunked.format import (
    FOSSILS_PREFIX,
    FUSION_PREFIX,
    GC_CLOCK_KEY,
    MAGIC_SIZE,
    MIN_MANIFEST_SIZE,
    PACK_ID_SIZE,
    PACKS_PREFIX,
    LayoutError,
    ManifestError,
    is_chunked,
    pack_key,
    read_manifest,
)
from fusionfs.store.base import Key, NotFound, ObjectStore, PreconditionFailed, iter_list

__all__ = ["GcStats", "collect_garbage"]

log = logging.getLogger(__name__)


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
                if obj.key.startswith(skip) or obj.size < MIN_MANIFEST_SIZE:
                    continue
                try:
                    head = store.get_range(obj.key, 0, MAGIC_SIZE, obj.etag)
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
            if len(pack) == PACK_ID_SIZE and name == f"{hexd[:2]}/{hexd}":
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
