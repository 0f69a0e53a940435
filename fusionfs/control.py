"""The control interface of a mount: the ``user.fusionfs.*`` extended attributes.

Purpose: programs ask a running mount for its state (info, stats, chunk stats, the last garbage
collection, the last verify of a file) with ``getxattr``, and ask it to act (flush, mark a
directory write-behind, read-once, no-cache or chunked, prime de-duplication, collect garbage,
verify a file) with ``setxattr``. ``fusionfs.client`` is the side programs call; the names are
in ``fusionfs.xattrs``. ``Filesystem`` hands every xattr request here.

Caveats: nothing here is stored as a real extended attribute (a name that is not a control is
``ENODATA`` on get, ``EOPNOTSUPP`` on set). The directory flags other than ``layout`` live in
the inode, in memory, for as long as the kernel keeps the directory. The long jobs (dedup-from,
verify, gc) run in a worker thread with a longer store-call timeout than a FUSE request's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from fusionfs import xattrs
from fusionfs.chunked import Manifest, collect_garbage
from fusionfs.errors import InvalidArgument, NoData, NotADirectory, OperationNotSupported
from fusionfs.objects import run_store_call
from fusionfs.reader import ChunkSource
from fusionfs.store.base import Key, ObjectStore
from fusionfs.verify import verify_object

if TYPE_CHECKING:
    from fusionfs.fs import Filesystem, Inode, InodeNo

__all__ = ["Control"]

log = logging.getLogger(__name__)

_INFO = os.fsencode(xattrs.INFO)
_STATS = os.fsencode(xattrs.STATS)
_FLUSH = os.fsencode(xattrs.FLUSH)
_WRITE_BEHIND = os.fsencode(xattrs.WRITE_BEHIND)
_READ_ONCE = os.fsencode(xattrs.READ_ONCE)
_NO_CACHE = os.fsencode(xattrs.NO_CACHE)
_LAYOUT = os.fsencode(xattrs.LAYOUT)
_DEDUP_FROM = os.fsencode(xattrs.DEDUP_FROM)
_CHUNK_STATS = os.fsencode(xattrs.CHUNK_STATS)
_GC = os.fsencode(xattrs.GC)
_VERIFY = os.fsencode(xattrs.VERIFY)
_VERIFY_MODES = (b"quick", b"manifest", b"full")
#: the directory flags kept in the inode, with the attribute of ``Inode`` that holds each
_DIR_FLAGS = {_WRITE_BEHIND: "write_behind", _READ_ONCE: "read_once", _NO_CACHE: "no_cache"}
#: verify results kept for getxattr (oldest dropped first)
_VERIFIED_MAX = 1024


def _is_dir(inode: Inode) -> bool:
    return stat.S_ISDIR(inode.st_mode)


class Control:
    """Answers the control xattrs of one ``Filesystem`` (which builds it and owns it)."""

    def __init__(
        self,
        fs: Filesystem,
        *,
        root: InodeNo,
        store: ObjectStore,
        chunks: ChunkSource,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self._fs = fs
        self._root = root
        self._store = store
        self._chunks = chunks
        self._limiter = limiter
        self._gc_lock = trio.Lock()
        self._last_gc: dict[str, int] = {}
        self._verified: dict[InodeNo, bytes] = {}  # the last user.fusionfs.verify result

    def getxattr(self, ino: int, name: bytes) -> bytes:
        inode = self._fs.inode(ino)
        if name in _DIR_FLAGS and _is_dir(inode):
            return b"1" if getattr(inode, _DIR_FLAGS[name]) else b"0"
        if name == _LAYOUT and _is_dir(inode):
            return b"chunked" if inode.layout_chunked else b"plain"
        if ino == self._root and name == _GC:
            return json.dumps(self._last_gc).encode()
        if name == _CHUNK_STATS and _is_dir(inode):
            d = self._chunks.chunked.dirs.get(self._fs.key_of(inode))
            return json.dumps(d.as_dict() if d is not None else {}).encode()
        if name == _VERIFY and inode.ino in self._verified:
            return self._verified[inode.ino]
        if ino == self._root and name == _INFO:
            return json.dumps(dict(self._fs.cfg.info)).encode()
        if ino == self._root and name == _STATS:
            return json.dumps(self._fs.stats.as_dict()).encode()
        raise NoData(name.decode(errors="replace"))

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        inode = self._fs.inode(ino)
        if ino == self._root and name == _FLUSH:
            await self._fs.flush_all()
        elif name in _DIR_FLAGS:
            if not _is_dir(inode) or value not in (b"0", b"1"):
                what = name.decode().rpartition(".")[2]
                raise InvalidArgument(f"{what} is set on a directory, to 0 or 1")
            setattr(inode, _DIR_FLAGS[name], value == b"1")
        elif name == _LAYOUT:
            await self._set_layout(inode, value)
        elif name == _DEDUP_FROM:
            await self._dedup_from(inode, value)
        elif ino == self._root and name == _GC:
            await self._collect_garbage(value)
        elif name == _VERIFY:
            await self._verify(inode, value)
        else:
            raise OperationNotSupported("extended attributes are not stored")

    async def _set_layout(self, inode: Inode, value: bytes) -> None:
        """Mark a directory chunked or plain, persisted in its marker's metadata (S-CHUNK-1)."""
        if not _is_dir(inode) or value not in (b"chunked", b"plain"):
            raise InvalidArgument("layout is set on a directory, to 'chunked' or 'plain'")
        fs = self._fs
        fs._writable()
        if inode.ino == self._root:  # the prefix root has no marker: kept in memory only
            inode.layout_chunked = value == b"chunked"
            return
        key = fs.key_of(inode)
        await fs._learn_dir_metadata(inode)  # keep the marker's mode and owner
        inode.layout_chunked = value == b"chunked"
        await fs._call(self._store.put, key, b"", fs._metadata(inode), what=f"PUT {key}")

    async def _dedup_from(self, inode: Inode, value: bytes) -> None:
        """Prime the chunk index from the manifests of the files in another directory (a path
        relative to the mount root), so that files written next de-duplicate against them."""
        if not _is_dir(inode):
            raise InvalidArgument("dedup-from is set on a directory")
        source = self._fs.inode(self._root)
        for part in value.strip(b"/").split(b"/"):
            if part:
                source = await self._fs._resolve(source, part)
        if not _is_dir(source):
            raise NotADirectory(os.fsdecode(value))
        prefix = self._fs.key_of(source)
        result = await run_store_call(
            functools.partial(self._chunks.chunked.prime_from, prefix),
            limiter=self._limiter,
            timeout=max(self._fs.cfg.store_timeout, 300.0),
            what=f"dedup-from {prefix}",
        )
        log.info("dedup index primed from %s: %s", prefix, result)

    async def _verify(self, inode: Inode, value: bytes) -> None:
        """Check a committed file against the store, past every cache (S-CHUNK-10); the result
        is what ``getxattr(FILE, "user.fusionfs.verify")`` returns next."""
        words = value.split()
        if not stat.S_ISREG(inode.st_mode) or not words or words[0] not in _VERIFY_MODES:
            raise InvalidArgument("verify: on a file, 'quick', 'manifest' or 'full [START END]'")
        try:
            bounds = [int(w) for w in words[1:3]] if words[0] == b"full" else []
        except ValueError:
            raise InvalidArgument("verify: START and END are byte offsets") from None
        if inode.etag is None or (inode.staged is not None and inode.staged.dirty):
            raise InvalidArgument("verify: the file has data not committed to the store")
        key, etag = self._fs.key_of(inode), inode.etag
        seen: list[Manifest] = []  # the manifest it read: CRIU's first read of the file needs it
        fn = functools.partial(
            verify_object, self._store, key, etag, words[0].decode(), *bounds, seen=seen.append
        )
        result = await run_store_call(
            fn,
            limiter=self._limiter,
            timeout=max(self._fs.cfg.store_timeout, 600.0),
            what=f"verify {key}",
        )
        if seen and result["ok"]:
            self._chunks.chunked.remember(key, etag, seen[0])
        self._verified.pop(inode.ino, None)
        self._verified[inode.ino] = json.dumps(result).encode()
        while len(self._verified) > _VERIFIED_MAX:
            del self._verified[next(iter(self._verified))]
        if not result["ok"]:
            log.warning("verify: %s", result["problem"])

    async def _collect_garbage(self, value: bytes) -> None:
        """Run the chunked layout's two-phase pack collection over the whole mount (S-CHUNK-7).

        ``value`` is the grace period in seconds. Every object of the mount is a potential
        manifest (a chunked file may have been renamed anywhere), so the run reads the first
        bytes of each object of 72 bytes or more: its cost grows with the bucket."""
        self._fs._writable()
        try:
            grace = float(value.decode() or "21600")
        except (UnicodeDecodeError, ValueError):
            raise InvalidArgument("gc takes a grace period in seconds") from None
        if grace < 0:
            raise InvalidArgument("gc takes a grace period in seconds")
        async with self._gc_lock:
            await self._fs.flush_all()  # committed manifests are what protects their packs
            fn = functools.partial(collect_garbage, self._store, Key(""), grace_seconds=grace)
            result = await run_store_call(
                fn,
                limiter=self._limiter,
                timeout=max(self._fs.cfg.store_timeout, 3600.0),
                what="gc",
            )
            self._last_gc = dataclasses.asdict(result)
        log.info("garbage collection: %s", self._last_gc)
