"""Check one stored file against the store, past every cache: the ``user.fusionfs.verify`` hook.

snapstore asks this before it restores a snapshot and in ``snapstore verify`` (S-CHUNK-10):
``setxattr(FILE, "user.fusionfs.verify", MODE)`` runs ``verify_object`` on the file's committed
version in a worker thread, and ``getxattr(FILE, "user.fusionfs.verify")`` then returns the
result as JSON. MODE is

- ``quick``: the object is still the version the mount knows (HEAD: ETag and size); for a
  chunked file its manifest decodes (magic, lengths, its own BLAKE3 trailer) and every pack it
  names exists (a flat LIST of the packs, a page per 16 packs needed at most, then a HEAD of
  each pack it did not show, 16 at a time; a pack set aside by garbage collection counts
  from its fossil) and is long enough for the chunks the manifest places in it. No chunk is read.
- ``manifest``: the object check and, for a chunked file, its manifest decoded (its digest),
  nothing more (what snapstore records when it commits a snapshot).
- ``full [START END]``: the object check, then every chunk overlapping bytes
  ``[START, END)`` of the file (default: all of it) is fetched from the store (ranged GETs of
  the packs, never the chunk cache), decompressed and compared with its BLAKE3 digest
  (``chunked.fetch_chunks``: a mismatch is fetched once more before it counts). A plain object is
  read whole (``If-Match``), compared with its stored full-object checksum when it has one
  (S-INTEG-2: read twice before a mismatch counts), and its BLAKE3 returned, for the caller to
  compare with what it recorded.

The result: ``{"ok", "layout" ("chunked"|"plain"), "size", "etag", "digest", "chunks",
"packs", "checked_bytes", "problem"}``. ``digest`` is, for a chunked file, the manifest's own
BLAKE3 trailer (it covers every chunk's digest and place, so it names the content), for a plain
one the BLAKE3 of its bytes (``full`` only). ``problem`` is one line naming what is missing or
wrong, with ``ok`` false. Store errors that say nothing about the content (timeouts, refused
connections) are raised, not reported as a problem.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

import blake3

from fusionfs.chunked import (
    FOSSILS_PREFIX,
    PACKS_PREFIX,
    CorruptChunk,
    Manifest,
    ManifestError,
    fetch_chunks,
    is_chunked,
    manifest_digest,
    pack_key,
    read_manifest,
)
from fusionfs.store import checksum as _checksum
from fusionfs.store.base import ETag, Key, ListPage, NotFound, ObjectStore, PreconditionFailed
from fusionfs.store.checksum import Checksum

__all__ = ["verify_object"]

_WORKERS = 8
_HEAD_WORKERS = 16  # a HEAD moves no body: twice the workers of the reads
#: A quick check lists the packs (a page per this many needed) instead of a HEAD per pack.
_PACKS_PER_PAGE = 16
_RUN_BYTES = 16 << 20


_MANIFESTS: collections.OrderedDict[tuple[int, Key, ETag], Manifest] = collections.OrderedDict()
_MANIFESTS_LOCK = threading.Lock()


def _manifest(store: ObjectStore, key: Key, etag: ETag) -> Manifest:
    """The manifest of that version, remembered for the next ranges of a ``full`` check (a
    version never changes; a few are kept)."""
    mkey = (id(store), key, etag)
    with _MANIFESTS_LOCK:
        if mkey in _MANIFESTS:
            _MANIFESTS.move_to_end(mkey)
            return _MANIFESTS[mkey]
    manifest = read_manifest(store, key, etag)
    with _MANIFESTS_LOCK:
        _MANIFESTS[mkey] = manifest
        while len(_MANIFESTS) > 8:
            _MANIFESTS.popitem(last=False)
    return manifest


def _result(layout: str, size: int, etag: str) -> dict[str, Any]:
    return {
        "ok": True,
        "layout": layout,
        "size": size,
        "etag": etag,
        "digest": None,
        "chunks": 0,
        "packs": 0,
        "checked_bytes": 0,
        "problem": None,
    }


def _fail(result: dict[str, Any], problem: str) -> dict[str, Any]:
    result["ok"] = False
    result["problem"] = problem
    return result


def _first_packs_page(store: ObjectStore) -> ListPage:
    return store.list(PACKS_PREFIX, delimiter=None, continuation=None)


def _listed_sizes(
    store: ObjectStore, need: dict[bytes, int], first: ListPage | None = None
) -> dict[bytes, int]:
    """The sizes of the needed packs that a flat listing of the packs shows, in at most a page
    per ``_PACKS_PER_PAGE`` needed packs (a LIST answers for up to 1000 packs in one round trip,
    where a HEAD answers for one; a store with many more packs than that is cut short, and the
    packs not seen are HEADed). Pack keys sort by their id: the listing stops once past the
    largest needed one. ``first``: the listing's first page, asked for already."""
    wanted = {pack_key(p): p for p in need}
    last = max(wanted)
    budget = max(1, len(need) // _PACKS_PER_PAGE)
    found: dict[bytes, int] = {}
    token: str | None = None
    for _ in range(budget):
        if first is not None:
            page, first = first, None
        else:
            page = store.list(PACKS_PREFIX, delimiter=None, continuation=token)
        for info in page.objects:
            pack = wanted.get(info.key)
            if pack is not None:
                found[pack] = info.size
        token = page.continuation
        if token is None or (page.objects and page.objects[-1].key >= last):
            break
    return found


def _check_packs(
    store: ObjectStore, manifest: Manifest, first: ListPage | None = None
) -> str | None:
    """None if every pack the manifest names exists and is long enough, else the first problem.
    ``first``: the first page of the packs' listing, asked for already."""
    need: dict[bytes, int] = {}
    for entry in manifest.chunks:
        need[entry.pack] = max(need.get(entry.pack, 0), entry.offset + entry.stored)
    if not need:
        return None
    listed = (
        _listed_sizes(store, need, first)
        if first is not None or len(need) >= _PACKS_PER_PAGE
        else {}
    )
    for pack, size in listed.items():
        if size < need[pack]:
            return f"pack {pack.hex()} has {size} bytes, its chunks need {need[pack]}"

    def check(pack: bytes) -> str | None:
        for prefix in (PACKS_PREFIX, FOSSILS_PREFIX):
            try:
                info = store.head(pack_key(pack, prefix))
            except NotFound:
                continue
            if info.size < need[pack]:
                return f"pack {pack.hex()} has {info.size} bytes, its chunks need {need[pack]}"
            return None
        return f"pack {pack.hex()} is missing from the store"

    rest = [p for p in need if p not in listed]  # not listed: set aside (a fossil) or missing
    with concurrent.futures.ThreadPoolExecutor(_HEAD_WORKERS) as pool:
        for problem in pool.map(check, rest):
            if problem is not None:
                return problem
    return None


def _check_chunks(
    store: ObjectStore, manifest: Manifest, start: int, end: int
) -> tuple[int, int, str | None]:
    """Fetch and verify the chunks overlapping ``[start, end)``: (chunks, stored bytes, problem)."""
    span = manifest.span(start, end - start)
    if not span:
        return 0, 0, None
    first, last = span[0][0], span[-1][0]
    # runs of back-to-back chunks, one ranged GET each, several at once
    runs = manifest.pack_runs(first, last, _RUN_BYTES)

    def fetch(run: tuple[int, int]) -> str | None:
        try:
            fetch_chunks(store, manifest, run[0], run[1], max_request=_RUN_BYTES)
        except CorruptChunk as err:
            return f"{err} (bytes {manifest.offset(run[0])}-{manifest.offset(run[1] + 1)})"
        except NotFound as err:
            return str(err)
        return None

    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
        for problem in pool.map(fetch, runs):
            if problem is not None:
                return 0, 0, problem
    stored = sum(manifest.chunks[k].stored for k in range(first, last + 1))
    return last - first + 1, stored, None


def _matches(stored: Checksum, data: bytes) -> bool:
    return _checksum.compute(stored.algorithm, data) == stored.value


def verify_object(
    store: ObjectStore,
    key: Key,
    etag: ETag | None,
    mode: str,
    start: int = 0,
    end: int | None = None,
    *,
    seen: Callable[[Manifest], None] | None = None,
) -> dict[str, Any]:
    """Check the object ``key`` (the version ``etag``, when given); see the module docstring.
    ``seen`` is given the manifest of a chunked file once it decoded (the version ``etag``).
    Blocking: run it in a worker thread.

    With the version known, a ``quick`` or ``manifest`` check asks for the manifest (GET,
    ``If-Match``) and the first page of the packs' listing at the same time as the HEAD: one
    round trip, not three, before the packs are checked (what a restore waits for). A plain
    file costs one wasted 64 KiB GET then."""
    ahead = _Ahead(store, key, etag, mode)
    try:
        return _verify(store, key, etag, mode, start, end, seen, ahead)
    finally:
        ahead.pool.shutdown(wait=False, cancel_futures=True)


class _Ahead:
    """The store calls a check starts before the HEAD answers (see ``verify_object``)."""

    def __init__(self, store: ObjectStore, key: Key, etag: ETag | None, mode: str) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="verify-ahead")
        self.manifest: concurrent.futures.Future[Manifest] | None = None
        self.page: concurrent.futures.Future[ListPage] | None = None
        if etag is not None and mode in ("quick", "manifest"):
            self.manifest = self.pool.submit(read_manifest, store, key, etag)
            if mode == "quick":
                self.page = self.pool.submit(_first_packs_page, store)


def _verify(
    store: ObjectStore,
    key: Key,
    etag: ETag | None,
    mode: str,
    start: int,
    end: int | None,
    seen: Callable[[Manifest], None] | None,
    ahead: _Ahead,
) -> dict[str, Any]:
    try:
        info = store.head(key)
    except NotFound:
        return _fail(_result("plain", 0, ""), f"{key} is missing from the store")
    chunked = is_chunked(info.metadata)
    result = _result("chunked" if chunked else "plain", info.size, str(info.etag))
    if etag is not None and info.etag != etag:
        return _fail(result, f"{key} changed in the store (ETag {info.etag}, expected {etag})")
    try:
        if not chunked:
            if mode == "full":
                data = store.get_range(key, 0, info.size, info.etag) if info.size else b""
                if len(data) != info.size:
                    return _fail(result, f"{key}: read {len(data)} of {info.size} bytes")
                if info.checksum is not None and not _matches(info.checksum, data):
                    data = store.get_range(key, 0, info.size, info.etag)  # once more, as chunks
                    if not _matches(info.checksum, data):
                        return _fail(
                            result,
                            f"{key} does not match its stored {info.checksum.algorithm} "
                            "checksum (S-INTEG-2)",
                        )
                result["digest"] = blake3.blake3(data).hexdigest()
                result["checked_bytes"] = len(data)
            return result
        if ahead.manifest is not None:
            manifest = ahead.manifest.result()
        else:
            manifest = _manifest(store, key, info.etag)
    except ManifestError as err:
        return _fail(result, f"{key}: {err}")
    except (NotFound, PreconditionFailed):
        return _fail(result, f"{key} changed in the store while it was checked")
    if seen is not None:
        seen(manifest)
    result["size"] = manifest.size
    result["digest"] = manifest_digest(manifest).hex()
    result["packs"] = len(manifest.packs())
    if mode == "manifest":
        result["chunks"] = len(manifest.chunks)
    elif mode != "full":  # a full check finds a missing pack when it reads it
        problem = _check_packs(store, manifest, ahead.page.result() if ahead.page else None)
        if problem is not None:
            return _fail(result, f"{key}: {problem}")
        result["chunks"] = len(manifest.chunks)
    else:
        stop = manifest.size if end is None else min(end, manifest.size)
        chunks, stored, problem = _check_chunks(store, manifest, max(0, start), stop)
        if problem is not None:
            return _fail(result, f"{key}: {problem}")
        result["chunks"] = chunks
        result["checked_bytes"] = stored
    return result
