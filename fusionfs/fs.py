"""The filesystem core: inodes, handles, key <-> path mapping, metadata and listing caches.

Purpose: everything a FUSE request needs except the pyfuse3 types, so it can be tested without
a kernel (``tests/fs``). ``ops`` is a thin adapter over this class.

Mapping (docs/SEMANTICS.md has the user-facing rules): the file ``a/b.txt`` under the mount is
the object ``a/b.txt`` under the store's prefix; a directory ``a`` is the common prefix ``a/``
(and, when made here or empty, the zero-byte marker object ``a/``); a symlink is an object whose
body is the target and whose ``mode`` metadata has ``S_IFLNK`` (s3fs's convention, so both tools
read each other's links). ``mode``, ``uid``, ``gid`` and (once set by ``utimens``) ``mtime`` live
in user metadata, s3fs-compatible. When a key and a prefix share a name, the directory wins.

Caches: an inode's attributes are trusted for ``metadata_ttl`` seconds after the store was last
asked (HEAD or LIST), then asked again on the next lookup/getattr/open, so changes made by other
clients show up after that; the kernel gets the same lifetime. Attributes that came from a LIST
only (no metadata) are handed to the kernel with a zero lifetime, so ``stat`` asks us (and we
HEAD). A directory listing is fetched whole on ``opendir``'s first ``readdir`` and is also used
for fast negative lookups during its lifetime.

Concurrency: all of this runs on the trio thread; store calls run in worker threads through
``_call`` and nothing here holds a lock across one, except a file's own ``commit_lock`` (held by
the writer while uploading), which lookups and listings never take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import enum
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NewType, TypeVar

import trio

from fusionfs.chunked import (
    DIR_LAYOUT_METADATA,
    FUSION_PREFIX,
    LAYOUT_CHUNKED,
    LAYOUT_METADATA,
    SIZE_METADATA,
    logical_size,
)
from fusionfs.control import Control
from fusionfs.errors import (
    Exists,
    FileTooLarge,
    FsError,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoEntry,
    NotADirectory,
    NotEmpty,
    ReadOnly,
    Stale,
    UploadFailed,
    first_error,
)
from fusionfs.fetch import ReadState
from fusionfs.objects import ObjectRef, run_store_call
from fusionfs.reader import ChunkSource
from fusionfs.stats import Stats
from fusionfs.store.base import (
    Checksum,
    Corrupt,
    ETag,
    Key,
    ListPage,
    NotFound,
    ObjectInfo,
    ObjectStore,
    StoreError,
    iter_list,
)
from fusionfs.writer import StagedFile, Uploader

__all__ = ["ROOT_INODE", "Filesystem", "FsConfig", "Handle", "Inode", "InodeNo", "Kind"]

log = logging.getLogger(__name__)

T = TypeVar("T")
InodeNo = NewType("InodeNo", int)
FileHandleNo = NewType("FileHandleNo", int)
ROOT_INODE = InodeNo(1)

_RESERVED = os.fsencode(FUSION_PREFIX.rstrip("/"))  # hidden at the root (S-CHUNK-4)

#: files up to this size (as last listed) are looked up with a GET that also brings their bytes
_SMALL_FILE = 64 * 1024
#: largest directory (entries) whose listing is refreshed to answer a lookup of an unknown name
_RELIST_MAX_ENTRIES = 10_000
#: entries of a directory scan (S-MAP-9) probed at once, and how far ahead of the kernel
_SCAN_CONCURRENCY = 16
_SCAN_AHEAD = 256
_MAX_NAME = 255
_MAX_KEY = 1024
_MAX_SYMLINK = 4096
#: GETs in flight at once while a listing learns the type of its small objects (S-MAP-5)
_TYPE_PROBES = 16
_UNKNOWN = object()  # a directory marker's HEAD that failed (``_list_and_marker``)
#: entries one readdir call returns (and learns the metadata of, S-MAP-5) at most: the kernel's
#: buffer takes fewer, and asks again from where it stopped
_READDIR_BATCH = 256
#: the largest object S3 holds (5 TiB): a larger size is EFBIG (S-ATTR-4)
MAX_FILE_SIZE = 5 * (1 << 40)


def format_mtime(ns: int) -> str:
    """An mtime in nanoseconds as the exact decimal seconds kept in metadata (S-ATTR-1)."""
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def parse_mtime(text: str) -> int:
    """The nanoseconds of a metadata mtime, exactly (no float: a float of today's seconds
    keeps only about 240 ns, and rsync compares nanoseconds). Raises ValueError."""
    try:
        return int(decimal.Decimal(text.strip()).scaleb(9).to_integral_value())
    except (decimal.InvalidOperation, OverflowError) as e:
        raise ValueError(f"bad mtime {text!r}") from e


class Kind(enum.Enum):
    FILE = stat.S_IFREG
    DIR = stat.S_IFDIR
    SYMLINK = stat.S_IFLNK
    # special files (S-SPECIAL-1): an empty object whose ``mode`` metadata carries the type;
    # never opened through us (the kernel serves them), so never read or written as data
    FIFO = stat.S_IFIFO
    SOCKET = stat.S_IFSOCK
    CHAR = stat.S_IFCHR
    BLOCK = stat.S_IFBLK

    @property
    def special(self) -> bool:
        return self in _SPECIAL_KINDS


_SPECIAL_KINDS = frozenset({Kind.FIFO, Kind.SOCKET, Kind.CHAR, Kind.BLOCK})
#: the object kinds a ``mode`` metadata entry can name (directories are prefixes, not objects)
_KIND_OF_TYPE = {k.value: k for k in Kind if k is not Kind.DIR}


@dataclasses.dataclass
class FsConfig:
    metadata_ttl: float = 1.0
    read_only: bool = False
    direct_io: bool = False  # read-only and write-only opens bypass the page cache (S-READ-4)
    uid: int = dataclasses.field(default_factory=os.getuid)
    gid: int = dataclasses.field(default_factory=os.getgid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    store_timeout: float = 60.0
    retry_interval: float = 30.0
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class Inode:
    ino: InodeNo
    parent: InodeNo
    name: bytes
    kind: Kind
    mode: int  # permission bits only
    uid: int
    gid: int
    size: int = 0
    etag: ETag | None = None
    mtime_ns: int = 0
    ctime_ns: int = 0
    explicit_mtime: bool = False  # mtime set by utimens: kept in metadata
    atime_ns: int | None = None  # set by utimens (kept in metadata); else the mtime (S-ATTR-5)
    meta_known: bool = False  # attributes come from HEAD/our own writes, not only from LIST
    meta_unsaved: bool = False  # a metadata change failed to reach the store (setattr retries it)
    validated: float = float("-inf")  # trio.current_time() of the last store answer
    lookups: int = 0
    opens: int = 0
    writers: int = 0
    staged: StagedFile | None = None
    staging: trio.Event | None = None  # set when a _stage of this inode in progress is done
    target: bytes | None = None  # symlink target, once known
    rdev: int = 0  # character and block devices: the device number (metadata ``rdev``)
    local_only: bool = False  # created here, not committed to the store yet
    linked: bool = True
    kernel_etag: ETag | None = None  # the version the kernel's page cache holds
    checksum: Checksum | None = None  # the stored full-object checksum of ``etag`` (S-INTEG-2)
    listed_at: float = float("-inf")  # directories: when the listing below was fetched
    # kept true as entries are made, moved and removed through this mount (S-MAP-7)
    listed_names: set[bytes] = dataclasses.field(default_factory=set)
    listed_dirs: set[bytes] = dataclasses.field(default_factory=set)
    write_behind: bool = False  # directories: close of files below does not wait (S-WRITE-7)
    read_once: bool = False  # directories: read-only opens below bypass the page cache (S-READ-5)
    no_cache: bool = False  # directories: reads below do not fill the chunk cache (S-READ-6)
    chunked: bool = False  # files: the object is a chunked-layout manifest (size is logical)
    layout_chunked: bool = False  # directories: new files below are chunked (S-CHUNK-1)

    @property
    def st_mode(self) -> int:
        return self.kind.value | self.mode


@dataclasses.dataclass(eq=False)
class Handle:
    inode: Inode
    writable: bool
    ref: ObjectRef | None  # the object version this handle reads (None: nothing in the store)
    rstate: ReadState = dataclasses.field(default_factory=ReadState)
    cache: bool = True  # write what its reads fetch to the chunk cache (not below read-once)
    #: the kernel keeps what this handle reads in its page cache (no FOPEN_DIRECT_IO): chunks a
    #: sequential read has passed need not stay in the daemon's memory (S-READ-7)
    page_cache: bool = False


@dataclasses.dataclass(eq=False)
class _Scan:
    """A readdir followed by a stat of every entry, in progress (S-MAP-9)."""

    names: list[bytes]  # the entries known only from the listing, in readdir order
    index: dict[bytes, int]
    reached: int = 0  # the highest index the kernel has looked up
    moved: trio.Event = dataclasses.field(default_factory=trio.Event)
    stop: bool = False


@dataclasses.dataclass(eq=False)
class _DirHandle:
    inode: Inode
    entries: list[tuple[bytes, Inode]] | None = None


def _now_ns() -> int:
    return time.time_ns()


class Filesystem:
    """The core. Built by ``mount`` (or a test) with all its parts handed in."""

    def __init__(
        self,
        store: ObjectStore,
        chunks: ChunkSource,
        uploader: Uploader,
        *,
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
        stats: Stats,
        config: FsConfig,
    ) -> None:
        self._store = store
        self._chunks = chunks
        self._uploader = uploader
        self._nursery = nursery
        self._limiter = limiter
        self.stats = stats
        self.cfg = config
        now = _now_ns()
        root = Inode(
            ROOT_INODE,
            ROOT_INODE,
            b"",
            Kind.DIR,
            config.dir_mode,
            config.uid,
            config.gid,
            mtime_ns=now,
            ctime_ns=now,
            meta_known=True,
            validated=float("inf"),
            lookups=1,
        )
        self._inodes: dict[InodeNo, Inode] = {ROOT_INODE: root}
        self._children: dict[InodeNo, dict[bytes, InodeNo]] = {ROOT_INODE: {}}
        self._next_ino = 2
        self._handles: dict[FileHandleNo, Handle] = {}
        self._dir_handles: dict[FileHandleNo, _DirHandle] = {}
        self._relisting: dict[InodeNo, trio.Event] = {}  # directories being re-listed
        self._probing: dict[tuple[InodeNo, bytes], trio.Event] = {}  # names being probed
        self._scans: dict[InodeNo, _Scan] = {}  # directories whose entries are probed ahead
        self._next_fh = 1
        self._control = Control(self, root=ROOT_INODE, store=store, chunks=chunks, limiter=limiter)

    # -- plumbing ----------------------------------------------------------------------------
    def _ref(self, inode: Inode, key: Key | None = None) -> ObjectRef:
        assert inode.etag is not None
        return ObjectRef(
            key if key is not None else self.key_of(inode),
            inode.etag,
            inode.size,
            inode.chunked,
            inode.checksum,
        )

    def _chunked_dir(self, inode: Inode) -> bool:
        """Whether ``inode`` (a file) is below a directory marked chunked (S-CHUNK-1)."""
        while inode.ino != ROOT_INODE:
            parent = self._inodes.get(inode.parent)
            if parent is None:
                return False
            if parent.layout_chunked:
                return True
            inode = parent
        return False

    async def _call(self, fn: Callable[..., T], *args: Any, what: str = "") -> T:
        return await run_store_call(
            functools.partial(fn, *args),
            limiter=self._limiter,
            timeout=self.cfg.store_timeout,
            what=what or getattr(fn, "__name__", "store call"),
        )

    def _fresh(self, inode: Inode) -> bool:
        return trio.current_time() - inode.validated < self.cfg.metadata_ttl

    def inode(self, ino: int) -> Inode:
        try:
            return self._inodes[InodeNo(ino)]
        except KeyError:
            raise NoEntry(f"no inode {ino}") from None

    def _path(self, inode: Inode) -> str:
        parts: list[bytes] = []
        while inode.ino != ROOT_INODE:
            parts.append(inode.name)
            inode = self._inodes[inode.parent]
        return os.fsdecode(b"/".join(reversed(parts)))

    def key_of(self, inode: Inode) -> Key:
        """The object key of a file/symlink, or the prefix (ending in /) of a directory."""
        path = self._path(inode)
        if inode.kind is Kind.DIR:
            return Key(path + "/" if path else "")
        return Key(path)

    def _child_key(self, parent: Inode, name: bytes, kind: Kind) -> Key:
        self._check_name(name)
        if parent.ino == ROOT_INODE and name == _RESERVED:
            raise InvalidArgument(f"{FUSION_PREFIX} is reserved for the chunked layout")
        key = self.key_of(parent) + os.fsdecode(name) + ("/" if kind is Kind.DIR else "")
        if len(key.encode("utf-8", "surrogateescape")) > _MAX_KEY:
            raise NameTooLong(f"key longer than {_MAX_KEY} bytes")
        return Key(key)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > _MAX_NAME:
            raise NameTooLong(name[:40].decode(errors="replace"))
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise InvalidArgument(f"invalid name {name!r}")
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("object keys must be valid UTF-8") from None

    def _writable(self) -> None:
        if self.cfg.read_only:
            raise ReadOnly("mounted read-only")

    def _new_inode(self, parent: Inode, name: bytes, kind: Kind, **kw: Any) -> Inode:
        ino = InodeNo(self._next_ino)
        self._next_ino += 1
        mode = kw.pop("mode", self.cfg.dir_mode if kind is Kind.DIR else self.cfg.file_mode)
        inode = Inode(
            ino,
            parent.ino,
            name,
            kind,
            mode,
            kw.pop("uid", self.cfg.uid),
            kw.pop("gid", self.cfg.gid),
            **kw,
        )
        if kind is Kind.SYMLINK:
            inode.mode = 0o777
        self._inodes[ino] = inode
        if kind is Kind.DIR:
            self._children[ino] = {}
        self._children[parent.ino][name] = ino
        self._listing_add(parent, name, kind)
        return inode

    @staticmethod
    def _listing_add(parent: Inode, name: bytes, kind: Kind) -> None:
        """``name`` exists in ``parent``: a listing known there says so from now on, so a
        lookup after the kernel forgot the entry finds it within the TTL (S-MAP-7)."""
        parent.listed_names.add(name)
        if kind is Kind.DIR:
            parent.listed_dirs.add(name)
        else:
            parent.listed_dirs.discard(name)

    @staticmethod
    def _entries_changed(*directories: Inode) -> None:
        """An entry was added to or removed from these directories through this mount: their
        mtime and ctime move (S-DIR-2; kept in memory only, directories store no times)."""
        now = _now_ns()
        for directory in directories:
            directory.mtime_ns = directory.ctime_ns = now

    def _dir(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if inode.kind is not Kind.DIR:
            raise NotADirectory(self._path(inode))
        return inode

    def _known_child(self, parent: Inode, name: bytes) -> Inode | None:
        ino = self._children.get(parent.ino, {}).get(name)
        return self._inodes.get(ino) if ino is not None else None

    def _detach(self, inode: Inode, *, gone: bool = True) -> None:
        """Remove an inode from its parent's names (it may live on while the kernel knows it).
        ``gone``: the name no longer exists at all (not: it now means another version)."""
        siblings = self._children.get(inode.parent, {})
        if siblings.get(inode.name) == inode.ino:
            del siblings[inode.name]
            parent = self._inodes.get(inode.parent)
            if gone and parent is not None:
                parent.listed_names.discard(inode.name)
                parent.listed_dirs.discard(inode.name)
        inode.linked = False
        self._maybe_drop(inode)

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.ino == ROOT_INODE or inode.lookups > 0 or inode.opens > 0:
            return
        if inode.staged is not None and inode.staged.dirty and inode.linked:
            return  # unsaved data: kept until it is in the store
        if inode.kind is Kind.DIR and self._holds_unsaved(inode):
            return  # the key of what is below is its path through here (S-FAIL-3)
        if inode.linked:
            siblings = self._children.get(inode.parent, {})
            if siblings.get(inode.name) == inode.ino:
                del siblings[inode.name]
        self._inodes.pop(inode.ino, None)
        if inode.kind is Kind.DIR:
            for child in list(self._children.get(inode.ino, {}).values()):
                c = self._inodes.get(child)
                if c is not None and c.lookups == 0 and c.opens == 0 and c.staged is None:
                    self._inodes.pop(child, None)
            self._children.pop(inode.ino, None)

    def _holds_unsaved(self, directory: Inode) -> bool:
        """Whether some inode below ``directory`` still needs its path: data not yet in the
        store, or an open handle (the kernel forgets a directory once it forgot the entries
        below it, and a file whose commit failed is kept beyond that)."""
        for ino in self._children.get(directory.ino, {}).values():
            child = self._inodes.get(ino)
            if child is None:
                continue
            if child.staged is not None or child.opens > 0 or child.lookups > 0:
                return True
            if child.kind is Kind.DIR and self._holds_unsaved(child):
                return True
        return False

    # -- attributes from the store -----------------------------------------------------------
    def _apply_info(self, inode: Inode, info: ObjectInfo) -> None:
        """Update a file/symlink inode from a HEAD (metadata) or LIST (no metadata) answer."""
        if inode.staged is not None:
            return  # our local content is newer than anything in the store
        if info.etag != inode.etag:
            inode.target = None
            inode.checksum = info.checksum
            self._chunks.forget(Key(self.key_of(inode)))
        elif info.checksum is not None:  # a LIST answer (None) keeps what a HEAD said
            inode.checksum = info.checksum
        inode.size = info.size
        inode.etag = info.etag
        inode.mtime_ns = inode.ctime_ns = info.mtime_ns
        inode.local_only = False
        if info.metadata is not None:
            logical = logical_size(info.metadata)  # S-CHUNK-3: a chunked file's own size
            inode.chunked = logical is not None
            if logical is not None:
                inode.size = logical
            self._apply_metadata(inode, info.metadata)
            inode.meta_known = True
        elif inode.etag != info.etag:
            inode.meta_known = False

    def _apply_metadata(self, inode: Inode, md: Mapping[str, str]) -> None:
        try:
            if "mode" in md:
                inode.mode = int(md["mode"]) & 0o7777
            if "uid" in md:
                inode.uid = int(md["uid"])
            if "gid" in md:
                inode.gid = int(md["gid"])
            if inode.kind.special:
                inode.rdev = int(md.get("rdev", "0"))
            if "mtime" in md:
                inode.mtime_ns = parse_mtime(md["mtime"])
                inode.explicit_mtime = True
            if "atime" in md:
                inode.atime_ns = parse_mtime(md["atime"])
            if inode.kind is Kind.DIR:
                inode.layout_chunked = md.get(DIR_LAYOUT_METADATA) == "chunked"
        except ValueError:
            log.info("ignoring malformed metadata on %s: %r", self._path(inode), dict(md))

    def _metadata(self, inode: Inode) -> dict[str, str]:
        md = {"mode": str(inode.st_mode), "uid": str(inode.uid), "gid": str(inode.gid)}
        if inode.explicit_mtime:
            md["mtime"] = format_mtime(inode.mtime_ns)
        if inode.atime_ns is not None:
            md["atime"] = format_mtime(inode.atime_ns)
        if inode.kind in (Kind.CHAR, Kind.BLOCK):
            md["rdev"] = str(inode.rdev)
        if inode.kind is Kind.DIR and inode.layout_chunked:
            md[DIR_LAYOUT_METADATA] = "chunked"
        return md

    @staticmethod
    def _kind_from_metadata(md: Mapping[str, str] | None) -> Kind:
        """An object's kind from the type bits of its ``mode`` metadata (S-MAP-5,
        S-SPECIAL-1); an object without them (any other tool's) is a regular file."""
        if md and "mode" in md:
            try:
                return _KIND_OF_TYPE.get(stat.S_IFMT(int(md["mode"])), Kind.FILE)
            except ValueError:
                pass
        return Kind.FILE

    async def _probe(
        self, parent: Inode, name: bytes, *, small_file: bool = False, known_dir: bool = False
    ) -> tuple[Kind, ObjectInfo | None] | None:
        """Ask the store what ``name`` in ``parent`` is: a directory, an object, or nothing.

        A HEAD of the key comes first, so a file (the common case) costs one request. Only when
        there is no such object does a LIST of ``key/`` look for a directory (and a HEAD of its
        marker, when it has one, gives its mode and owner). When ``name`` is known as a
        directory (``known_dir``: an inode of this mount, or the parent's fresh listing), the
        directory is checked first (S-MAP-3): a directory on the path of busy files is
        revalidated every TTL, and its HEAD would always miss.
        """
        file_key = self._child_key(parent, name, Kind.FILE)
        dir_key = Key(file_key + "/")
        listing_fresh = trio.current_time() - parent.listed_at < self.cfg.metadata_ttl
        dir_first = known_dir or (listing_fresh and name in parent.listed_dirs)
        if not dir_first:
            try:
                if small_file:  # one GET answers the lookup and the read that follows (S-MAP-8)
                    info, head = await self._call(
                        functools.partial(self._store.get_head, file_key, self._chunks.chunk_size),
                        what=f"GET {file_key}",
                    )
                    kind = self._kind_from_metadata(info.metadata)
                    if kind is Kind.FILE and logical_size(info.metadata) is None:  # plain
                        self._chunks.prime(
                            ObjectRef(file_key, info.etag, info.size, checksum=info.checksum), head
                        )
                    return kind, info
                info = await self._call(self._store.head, file_key, what=f"HEAD {file_key}")
                return self._kind_from_metadata(info.metadata), info
            except NotFound:
                if listing_fresh and name in parent.listed_names:
                    return None  # was a file a moment ago, and is gone
        # the LIST decides; the marker's HEAD goes with it (one round trip, not two: on a fresh
        # mount every directory on a path costs this), and is used only if the LIST shows it
        page, marker = await self._list_and_marker(dir_key)
        if not (page.objects or page.prefixes):
            if dir_first:  # the directory went: a file now?
                with contextlib.suppress(NotFound):
                    info = await self._call(self._store.head, file_key, what=f"HEAD {file_key}")
                    return self._kind_from_metadata(info.metadata), info
            return None
        if not (page.objects and page.objects[0].key == dir_key):
            return Kind.DIR, None
        if marker is _UNKNOWN:  # the HEAD alongside failed: ask again, and let it fail now
            with contextlib.suppress(NotFound):
                return Kind.DIR, await self._call(self._store.head, dir_key, what=f"HEAD {dir_key}")
            return Kind.DIR, None
        return Kind.DIR, marker

    async def _list_and_marker(self, dir_key: Key) -> tuple[ListPage, Any]:
        """The first entry under ``dir_key`` (a LIST of one key) and, asked at the same time,
        the HEAD of the directory's marker: its ``ObjectInfo``, None when there is none, or
        ``_UNKNOWN`` when that HEAD failed otherwise (only the LIST's failure is the lookup's:
        a marker the LIST does not show is never needed)."""
        page: ListPage | None = None
        marker: Any = None

        async def listing() -> None:
            nonlocal page
            page = await self._call(
                functools.partial(self._store.list, dir_key, "/", None, 1),
                what=f"LIST {dir_key}",
            )

        async def head() -> None:
            nonlocal marker
            try:
                marker = await self._call(self._store.head, dir_key, what=f"HEAD {dir_key}")
            except NotFound:
                marker = None
            except StoreError:
                marker = _UNKNOWN

        with first_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listing)
                nursery.start_soon(head)
        assert page is not None
        return page, marker

    async def _resolve(self, parent: Inode, name: bytes) -> Inode:
        """The child ``name`` of ``parent``, revalidated against the store if stale."""
        if name == b".":
            return parent
        if name == b"..":
            return self._inodes[parent.parent]
        self._check_name(name)
        if parent.ino == ROOT_INODE and name == _RESERVED:
            raise NoEntry(name.decode())  # the layout's own objects (S-CHUNK-4)
        probing = (parent.ino, name)
        while (running := self._probing.get(probing)) is not None:
            await running.wait()  # another lookup is asking the store: take its answer
        child = self._known_child(parent, name)
        if child is not None and (child.staged is not None or child.local_only):
            return child
        if child is not None and self._fresh(child):
            return child
        if child is None and self._absent_from_listing(parent, name):
            raise NoEntry(name.decode(errors="replace"))
        if (
            child is None
            and parent.listed_at > float("-inf")
            and len(parent.listed_names) <= _RELIST_MAX_ENTRIES
        ):
            # A name this mount has not seen, in a directory it has listed (or made) before:
            # usually a file about to be created. One LIST of the directory answers this
            # lookup and every other one in the next metadata_ttl, where a probe costs a HEAD
            # and a LIST per name, each under the kernel's lock of the directory (S-MAP-7).
            await self._relist(parent)
            child = self._known_child(parent, name)
            if child is None and name not in parent.listed_names:  # as fresh as it gets
                raise NoEntry(name.decode(errors="replace"))
        small = (  # S-MAP-8; an object listed as empty is HEADed, never GET (S-SRV-1)
            child is not None
            and child.kind is Kind.FILE
            and child.etag is not None
            and 0 < child.size <= _SMALL_FILE
        )
        if probing in self._probing:  # one began while we re-listed: share it
            return await self._resolve(parent, name)
        # Concurrent lookups of one name (the kernel revalidates a busy directory on every
        # path walk through it) share one probe: the others wait above, then find it fresh.
        done = self._probing[probing] = trio.Event()
        try:
            found = await self._probe(
                parent,
                name,
                small_file=small,
                known_dir=child is not None and child.kind is Kind.DIR,
            )
        finally:
            del self._probing[probing]
            done.set()
        child = self._known_child(parent, name)  # the world may have moved while we waited
        if child is not None and (child.staged is not None or child.local_only):
            return child
        if found is None:
            if child is not None:
                self._detach(child)
            raise NoEntry(name.decode(errors="replace"))
        kind, info = found
        if child is not None and (
            child.kind is not kind
            or (kind is not Kind.DIR and self._new_version(child, info))
            or self._listed_with_wrong_size(child, info)
        ):
            self._detach(child)
            child = None
        if child is None:
            child = self._new_inode(parent, name, kind)
        if kind is Kind.DIR:
            if info is not None and info.metadata is not None:
                self._apply_metadata(child, info.metadata)
                child.mtime_ns = child.mtime_ns or info.mtime_ns
            child.mtime_ns = child.ctime_ns = child.mtime_ns or _now_ns()
            child.meta_known = True
        elif info is not None:
            self._apply_info(child, info)
        child.validated = trio.current_time()
        return child

    @staticmethod
    def _listed_with_wrong_size(inode: Inode, info: ObjectInfo | None) -> bool:
        """A chunked file known only from a LIST was given to the kernel with its manifest's
        size; the kernel (writeback cache) never takes a new size for an inode it knows, so
        the name gets a new inode with the logical size (S-CHUNK-3)."""
        if info is None or inode.meta_known or inode.staged is not None or inode.local_only:
            return False
        logical = logical_size(info.metadata)
        return logical is not None and logical != inode.size

    @staticmethod
    def _new_version(inode: Inode, info: ObjectInfo | None) -> bool:
        """Did the object change in the store (not through us) since ``inode`` last saw it?

        A new version of an object gets a new inode: the kernel keeps page cache and size per
        inode (with the writeback cache it even trusts its own size over ours), so a fresh inode
        is how a remote change reaches it, while handles open on the old inode keep reading the
        version they opened (S-READ-3).
        """
        return (
            info is not None
            and inode.etag is not None
            and info.etag != inode.etag
            and inode.staged is None
            and not inode.local_only
        )

    # -- lookups and attributes ----------------------------------------------------------
    async def lookup(self, parent_ino: int, name: bytes) -> Inode:
        parent = self._dir(parent_ino)
        self._note_scan(parent, name)
        inode = await self._resolve(parent, name)
        inode.lookups += 1
        return inode

    def _note_scan(self, parent: Inode, name: bytes) -> None:
        """A kernel lookup of an entry known only from ``parent``'s listing (``ls -l``,
        ``find -size``, ``rsync``: a readdir, then a stat of every entry, one at a time):
        the entries after it are probed ahead, concurrently (S-MAP-9)."""
        child = self._known_child(parent, name)
        if (
            child is None
            or child.meta_known
            or child.staged is not None
            or child.local_only
            or self._fresh(child)
        ):
            return
        scan = self._scans.get(parent.ino)
        if scan is None or name not in scan.index:
            if scan is not None:
                scan.stop = True
            names = sorted(
                n
                for n, ino in self._children.get(parent.ino, {}).items()
                if (c := self._inodes.get(ino)) is not None
                and not c.meta_known
                and c.staged is None
                and not c.local_only
            )
            if len(names) < 2:
                return
            scan = self._scans[parent.ino] = _Scan(names, {n: i for i, n in enumerate(names)})
            self._nursery.start_soon(self._prefetch_scan, parent, scan)
        scan.reached = max(scan.reached, scan.index[name])
        scan.moved.set()
        scan.moved = trio.Event()

    async def _prefetch_scan(self, parent: Inode, scan: _Scan) -> None:
        """Probe ``scan.names`` in order, ``_SCAN_CONCURRENCY`` at a time, at most
        ``_SCAN_AHEAD`` entries past the kernel's latest lookup (so what is probed is still
        fresh when its lookup comes); stop when the lookups stop for a TTL."""
        limit = trio.CapacityLimiter(_SCAN_CONCURRENCY)

        async def probe(name: bytes) -> None:
            try:
                child = self._known_child(parent, name)
                if child is not None and (child.meta_known or self._fresh(child)):
                    return
                await self._resolve(parent, name)
            except Exception as err:  # the kernel's own lookup will meet it and report it
                log.debug("prefetch of %r in %s: %s", name, self._path(parent), err)
            finally:
                limit.release_on_behalf_of(name)

        try:
            async with trio.open_nursery() as n:
                for i, name in enumerate(scan.names):
                    while i > scan.reached + _SCAN_AHEAD and not scan.stop:
                        moved = scan.moved
                        with trio.move_on_after(max(self.cfg.metadata_ttl, 1.0)) as idle:
                            await moved.wait()
                        if idle.cancelled_caught:
                            scan.stop = True
                    if scan.stop:
                        break
                    await limit.acquire_on_behalf_of(name)
                    n.start_soon(probe, name)
        finally:
            if self._scans.get(parent.ino) is scan:
                del self._scans[parent.ino]

    def note_lookup(self, inode: Inode) -> None:
        """The kernel took a reference to ``inode`` through a readdir entry."""
        inode.lookups += 1

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for ino, n in items:
            inode = self._inodes.get(InodeNo(ino))
            if inode is None:
                continue
            inode.lookups = max(0, inode.lookups - n)
            self._maybe_drop(inode)

    async def getattr(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if inode.kind is Kind.DIR:
            await self._learn_dir_metadata(inode)
            return inode
        if inode.staged is not None or inode.local_only:
            return inode
        if not self._fresh(inode) or not inode.meta_known:
            await self._revalidate(inode)
        return inode

    async def _learn_dir_metadata(self, inode: Inode) -> None:
        """A directory known only from a listing learns its mode, owner and times from its
        marker, once (S-ATTR-1: a `stat` after `readdir` on a fresh mount, as rsync and `ls -l`
        do, must not see defaults); a directory without a marker keeps the defaults."""
        if inode.meta_known or inode.ino == ROOT_INODE or inode.local_only:
            return
        key = self.key_of(inode)
        with contextlib.suppress(NotFound):
            info = await self._call(self._store.head, key, what=f"HEAD {key}")
            if info.metadata is not None and not inode.meta_known:
                self._apply_metadata(inode, info.metadata)
        inode.meta_known = True

    async def _revalidate(self, inode: Inode, *, opening: bool = False) -> None:
        """Check an inode against the store (getattr, open, setattr after the TTL).

        A new version of the object is never applied to a kernel-visible inode in place (the
        kernel would keep the old size, S-CONS-4): the inode is detached from its name and the
        call fails with ESTALE, which makes the kernel redo the path walk with a fresh lookup
        (``retry_estale``), which gives the new version a new inode. ``getattr`` of a file
        still open (``fstat``) keeps answering for the version it opened."""
        key = self.key_of(inode)
        try:
            info = await self._call(self._store.head, key, what=f"HEAD {key}")
        except NotFound:
            if inode.opens > 0:
                return  # keep serving what the open handles see
            self._detach(inode)
            raise NoEntry(key) from None
        if self._kind_from_metadata(info.metadata) is not inode.kind:
            if inode.opens > 0:
                return
            self._detach(inode, gone=False)
            raise NoEntry(f"{key} changed type in the store") from None
        if self._new_version(inode, info):
            self._detach(inode, gone=False)  # the name now means the new version
            if inode.opens > 0 and not opening:
                return  # fstat of an open file: the version it has open
            raise Stale(f"{key} has a new version in the store")
        self._apply_info(inode, info)
        inode.validated = trio.current_time()

    async def setattr(
        self,
        ino: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
        atime_ns: int | None = None,
    ) -> Inode:
        inode = self.inode(ino)
        self._writable()
        meta_change = any(v is not None for v in (mode, uid, gid, mtime_ns, atime_ns))
        if size is not None:
            if inode.kind is Kind.DIR:
                raise IsADirectory(self._path(inode))
            if inode.kind is not Kind.FILE:
                raise InvalidArgument("cannot truncate a symlink")
            if size > MAX_FILE_SIZE:
                raise FileTooLarge(f"{self._path(inode)}: {size} bytes, more than S3 holds")
        if not inode.meta_known and inode.kind is not Kind.DIR and not inode.local_only:
            await self._revalidate(inode)
        stored = None if inode.meta_unsaved else self._metadata(inode)
        if mode is not None:
            inode.mode = mode & 0o7777
        if uid is not None:
            inode.uid = uid
        if gid is not None:
            inode.gid = gid
        # an atime equal to what stat shows (the mtime, while none was set) is no change
        shown_atime = inode.mtime_ns if inode.atime_ns is None else inode.atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
            inode.explicit_mtime = True
        if atime_ns is not None and atime_ns != shown_atime:
            inode.atime_ns = atime_ns
        inode.ctime_ns = _now_ns()
        if size is not None:
            staged, temporary = await self._stage(inode, truncate=False)
            await staged.truncate(size)
            inode.size = size
            inode.mtime_ns = inode.mtime_ns if mtime_ns is not None else _now_ns()
            if temporary:
                await self._commit(inode)
                await self._unstage(inode)
            return inode
        if meta_change and self._metadata(inode) != stored:
            # Not when only ctime moved: with the writeback cache the kernel sends the mtime it
            # holds again after an fsync or a rename (snapstore's manifest commit), and storing
            # it would be one more server-side copy of the object (S-ATTR-3).
            await self._store_metadata(inode)
        return inode

    async def _store_metadata(self, inode: Inode) -> None:
        """Make changed mode/owner/mtime durable: now, unless a commit will carry them (S-ATTR-1).

        A file with uncommitted data gets them with its next commit. A file still staged but
        clean (the change came after its last commit, before its release: rsync closes its
        temporary file, then sets its times and mode) has no commit coming, so they are stored
        now; a commit in flight has taken its metadata already, so we wait for it first."""
        staged = inode.staged
        if inode.local_only:
            if staged is not None:
                staged.set_metadata_hint(self._metadata(inode))
            return
        if staged is not None:
            staged.set_metadata_hint(self._metadata(inode))
            if staged.commit_lock.locked():
                async with staged.commit_lock:
                    pass
            if inode.staged is staged and staged.dirty:
                return
        if inode.ino == ROOT_INODE:
            return  # the prefix root has no marker object to hold it
        inode.meta_unsaved = True  # until the store has it: a repeat of the change is not a no-op
        key = self.key_of(inode)
        md = self._metadata(inode)
        if inode.chunked:  # a metadata REPLACE must keep the layout's own entries
            md.update({LAYOUT_METADATA: LAYOUT_CHUNKED, SIZE_METADATA: str(inode.size)})
        if inode.kind is Kind.DIR:
            await self._call(self._store.put, key, b"", md, what=f"PUT {key}")
            inode.meta_unsaved = False
            return
        try:
            etag = await self._call(self._store.copy, key, key, md, inode.etag, what=f"COPY {key}")
        except NotFound:
            raise NoEntry(key) from None
        inode.meta_unsaved = False
        inode.etag = etag
        inode.kernel_etag = etag
        inode.validated = trio.current_time()
        inode.meta_known = True
        for h in self._handles.values():
            if h.inode is inode and h.ref is not None:
                h.ref = ObjectRef(key, etag, h.ref.size, h.ref.chunked, h.ref.checksum)
        if inode.staged is not None:
            inode.staged.copied(key, etag)

    # -- namespace changes ---------------------------------------------------------------------
    async def _relist(self, directory: Inode) -> None:
        """Refresh a directory's listing; concurrent lookups share one LIST."""
        running = self._relisting.get(directory.ino)
        if running is not None:
            await running.wait()
            return
        done = self._relisting[directory.ino] = trio.Event()
        try:
            await self._list_dir(directory)
            # its TTL runs from when it completed: a listing slower than the TTL (a big
            # directory on a slow server) must not make every next lookup list again
            directory.listed_at = trio.current_time()
        finally:
            del self._relisting[directory.ino]
            done.set()

    def _absent_from_listing(self, parent: Inode, name: bytes) -> bool:
        """The parent's listing is fresh and does not have ``name``."""
        fresh = trio.current_time() - parent.listed_at < self.cfg.metadata_ttl
        return fresh and name not in parent.listed_names

    async def _ensure_absent(self, parent: Inode, name: bytes) -> None:
        try:
            await self._resolve(parent, name)
        except NoEntry:
            return
        raise Exists(name.decode(errors="replace"))

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        self._writable()
        parent = self._dir(parent_ino)
        key = self._child_key(parent, name, Kind.DIR)
        await self._ensure_absent(parent, name)
        now = _now_ns()
        # the marker keeps the directory's times too, so that a directory reads back after a
        # remount with the mtime it showed before (S-ATTR-1; rsync -a leaves a directory's
        # time alone when it already looks equal, and a LIST gives no time for a directory)
        md = {
            "mode": str(stat.S_IFDIR | (mode & 0o7777)),
            "uid": str(uid),
            "gid": str(gid),
            "mtime": format_mtime(now),
        }
        await self._call(self._store.put, key, b"", md, what=f"PUT {key}")
        inode = self._new_inode(
            parent,
            name,
            Kind.DIR,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            mtime_ns=now,
            ctime_ns=now,
            meta_known=True,
        )
        inode.explicit_mtime = True
        inode.validated = trio.current_time()
        # nothing was under the name (checked above): its listing is known, and empty
        inode.listed_at = inode.validated
        inode.listed_names, inode.listed_dirs = set(), set()
        inode.lookups += 1
        self._entries_changed(parent)
        return inode

    async def symlink(
        self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int
    ) -> Inode:
        self._writable()
        parent = self._dir(parent_ino)
        if len(target) > _MAX_SYMLINK:
            raise NameTooLong("symlink target too long")
        key = self._child_key(parent, name, Kind.FILE)
        await self._ensure_absent(parent, name)
        md = {"mode": str(stat.S_IFLNK | 0o777), "uid": str(uid), "gid": str(gid)}
        etag = await self._call(self._store.put, key, target, md, what=f"PUT {key}")
        now = _now_ns()
        inode = self._new_inode(
            parent,
            name,
            Kind.SYMLINK,
            uid=uid,
            gid=gid,
            size=len(target),
            etag=etag,
            mtime_ns=now,
            ctime_ns=now,
            meta_known=True,
            target=target,
        )
        inode.validated = trio.current_time()
        inode.lookups += 1
        self._entries_changed(parent)
        return inode

    async def mknod(
        self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Inode:
        """A FIFO, socket, character or block device (S-SPECIAL-1): an empty object whose
        metadata carries its type, mode, owner and (devices) ``rdev``, as s3fs stores them."""
        self._writable()
        parent = self._dir(parent_ino)
        kind = _KIND_OF_TYPE.get(stat.S_IFMT(mode))
        if kind is None or not kind.special:
            raise InvalidArgument(f"mknod of file type {stat.S_IFMT(mode):o}")
        key = self._child_key(parent, name, kind)
        await self._ensure_absent(parent, name)
        now = _now_ns()
        inode = self._new_inode(
            parent,
            name,
            kind,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            mtime_ns=now,
            ctime_ns=now,
            meta_known=True,
            rdev=rdev if kind in (Kind.CHAR, Kind.BLOCK) else 0,
        )
        try:
            inode.etag = await self._call(
                self._store.put, key, b"", self._metadata(inode), what=f"PUT {key}"
            )
        except BaseException:
            self._detach(inode)
            raise
        inode.validated = trio.current_time()
        inode.lookups += 1
        self._entries_changed(parent)
        return inode

    async def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if inode.kind is not Kind.SYMLINK:
            raise InvalidArgument("not a symlink")
        if inode.target is None:
            key = self.key_of(inode)
            data = await self._call(
                self._store.get_range, key, 0, _MAX_SYMLINK + 1, None, what=f"GET {key}"
            )
            inode.target = data
        return inode.target

    async def unlink(self, parent_ino: int, name: bytes) -> None:
        self._writable()
        parent = self._dir(parent_ino)
        inode = await self._resolve(parent, name)
        if inode.kind is Kind.DIR:
            raise IsADirectory(name.decode(errors="replace"))
        key = self.key_of(inode)
        if not inode.local_only:
            await self._call(self._store.delete, key, what=f"DELETE {key}")
        self._chunks.forget(key)
        self._chunks.chunked.forget_dir_file(key)
        self._detach(inode)
        self._entries_changed(parent)
        inode.ctime_ns = parent.ctime_ns  # its link count dropped
        if inode.staged is not None and inode.writers == 0:
            await self._unstage(inode)

    async def rmdir(self, parent_ino: int, name: bytes) -> None:
        self._writable()
        parent = self._dir(parent_ino)
        inode = await self._resolve(parent, name)
        if inode.kind is not Kind.DIR:
            raise NotADirectory(name.decode(errors="replace"))
        await self._check_empty(inode)
        key = self.key_of(inode)
        await self._call(self._store.delete, key, what=f"DELETE {key}")
        self._detach(inode)
        self._entries_changed(parent)

    async def _check_empty(self, inode: Inode) -> None:
        for ino in self._children.get(inode.ino, {}).values():
            child = self._inodes.get(ino)
            if child is not None and child.linked and (child.local_only or child.staged):
                raise NotEmpty(self._path(inode))
        key = self.key_of(inode)
        page = await self._call(
            functools.partial(self._store.list, key, "/", None, 2), what=f"LIST {key}"
        )
        if page.prefixes or any(o.key != key for o in page.objects):
            raise NotEmpty(self._path(inode))

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._writable()
        if flags & ~_RENAME_NOREPLACE:
            raise InvalidArgument("only RENAME_NOREPLACE is supported")
        src_dir, dst_dir = self._dir(old_parent), self._dir(new_parent)
        src = await self._resolve(src_dir, old_name)
        self._check_name(new_name)
        try:
            dst: Inode | None = await self._resolve(dst_dir, new_name)
        except NoEntry:
            dst = None
        if dst is src:
            return
        if dst is not None and flags & _RENAME_NOREPLACE:
            raise Exists(new_name.decode(errors="replace"))
        if src.kind is Kind.DIR:
            # a directory cannot move into itself
            p: Inode = dst_dir
            while True:
                if p is src:
                    raise InvalidArgument("cannot move a directory into itself")
                if p.ino == ROOT_INODE:
                    break
                p = self._inodes[p.parent]
            if dst is not None:
                if dst.kind is not Kind.DIR:
                    raise NotADirectory(new_name.decode(errors="replace"))
                await self._check_empty(dst)
            await self._rename_dir(src, dst_dir, new_name)
            if dst is not None:
                await self._call(self._store.delete, self.key_of(dst), what="DELETE")
        else:
            if dst is not None and dst.kind is Kind.DIR:
                raise IsADirectory(new_name.decode(errors="replace"))
            if src.staged is not None and (src.staged.dirty or src.local_only):
                await self._commit(src)
            old_key = self.key_of(src)
            new_key = self._child_key(dst_dir, new_name, Kind.FILE)
            try:
                etag = await self._call(
                    self._store.copy, old_key, new_key, None, src.etag, what=f"COPY {old_key}"
                )
            except NotFound:
                raise NoEntry(old_key) from None
            await self._call(self._store.delete, old_key, what=f"DELETE {old_key}")
            self._chunks.forget(old_key)
            self._chunks.chunked.forget_dir_file(old_key)
            src.etag = etag
            src.kernel_etag = etag
            for h in self._handles.values():
                if h.inode is src and h.ref is not None:
                    h.ref = ObjectRef(new_key, etag, h.ref.size, h.ref.chunked, h.ref.checksum)
        if dst is not None:
            self._detach(dst)
        self._move(src, dst_dir, new_name)
        self._entries_changed(src_dir, dst_dir)

    def _move(self, inode: Inode, new_parent: Inode, new_name: bytes) -> None:
        siblings = self._children.get(inode.parent, {})
        if siblings.get(inode.name) == inode.ino:
            del siblings[inode.name]
            old_parent = self._inodes.get(inode.parent)
            if old_parent is not None:
                old_parent.listed_names.discard(inode.name)
                old_parent.listed_dirs.discard(inode.name)
        inode.parent = new_parent.ino
        inode.name = new_name
        inode.validated = trio.current_time()
        self._children[new_parent.ino][new_name] = inode.ino
        self._listing_add(new_parent, new_name, inode.kind)
        new_parent.listed_at = float("-inf")

    async def _rename_dir(self, src: Inode, dst_dir: Inode, new_name: bytes) -> None:
        """Copy every object under the directory to the new prefix, then delete the old ones.

        Not atomic (S3 has no such operation): a failure midway leaves both trees partly there,
        and nothing is deleted before every copy succeeded."""
        await self._commit_below(src)
        old_prefix = self.key_of(src)
        new_prefix = self._child_key(dst_dir, new_name, Kind.DIR)
        pages = await self._call(
            lambda: list(iter_list(self._store, old_prefix, None)), what=f"LIST {old_prefix}"
        )
        keys = [o.key for page in pages for o in page.objects]

        async def copy_one(k: Key) -> None:
            dst = Key(new_prefix + k[len(old_prefix) :])
            await self._call(self._store.copy, k, dst, None, None, what=f"COPY {k}")

        if keys:
            await _bounded_all([functools.partial(copy_one, k) for k in keys], 32)
        else:  # an empty directory known only here: give it its marker at the new place
            await self._call(self._store.put, new_prefix, b"", None, what=f"PUT {new_prefix}")
        # objects first, then markers deepest first: a local-directory store can only remove a
        # directory once it is empty
        await _bounded_all(
            [
                functools.partial(self._call, self._store.delete, k, what=f"DELETE {k}")
                for k in keys
                if not k.endswith("/")
            ],
            32,
        )
        for k in sorted((k for k in keys if k.endswith("/")), key=len, reverse=True):
            await self._call(self._store.delete, k, what=f"DELETE {k}")

    async def _commit_below(self, directory: Inode) -> None:
        prefix = self.key_of(directory)
        for inode in list(self._inodes.values()):
            if (
                inode.staged is not None
                and inode.linked
                and inode.kind is Kind.FILE
                and (inode.staged.dirty or inode.local_only)
                and self.key_of(inode).startswith(prefix)
            ):
                await self._commit(inode)

    # -- files ---------------------------------------------------------------------------
    async def _stage(self, inode: Inode, *, truncate: bool) -> tuple[StagedFile, bool]:
        """The inode's staged state, created if needed. Returns (staged, created_now).

        Two requests that find no staged state at once (two opens for writing, a write after
        a commit released it) share one: the second waits for the first's instead of making
        its own, which would leave the first's writes in a staged file nobody commits."""
        while inode.staged is None and inode.staging is not None:
            await inode.staging.wait()
        if inode.staged is not None:
            if truncate:
                await inode.staged.truncate(0)
            return inode.staged, False
        key = self.key_of(inode)
        base = None
        if not truncate and inode.etag is not None and inode.size > 0:
            base = self._ref(inode, key)
        done = inode.staging = trio.Event()
        try:
            staged = await self._uploader.new_staged(key, base)
            staged.set_metadata_hint(self._metadata(inode))
            if inode.chunked or self._chunked_dir(inode):
                staged.use_chunked(self._chunks.chunked)
            inode.staged = staged
        finally:
            inode.staging = None
            done.set()
        if truncate and inode.size > 0:
            await staged.truncate(0)
        return staged, True

    async def _unstage(self, inode: Inode) -> None:
        staged, inode.staged = inode.staged, None
        if staged is not None:
            await staged.discard()
        self._maybe_drop(inode)

    async def create(
        self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int
    ) -> tuple[Handle, Inode]:
        self._writable()
        parent = self._dir(parent_ino)
        key = self._child_key(parent, name, Kind.FILE)
        existing = self._known_child(parent, name)
        if existing is not None and existing.linked:
            if existing.kind is Kind.DIR:
                raise IsADirectory(name.decode(errors="replace"))
            self._detach(existing)
        now = _now_ns()
        inode = self._new_inode(
            parent,
            name,
            Kind.FILE,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            mtime_ns=now,
            ctime_ns=now,
            meta_known=True,
            local_only=True,
        )
        inode.validated = trio.current_time()
        # dirty: even if nothing is written, the new (empty) file is committed at close
        staged = await self._uploader.new_staged(key, None, dirty=True)
        staged.set_metadata_hint(self._metadata(inode))
        if self._chunked_dir(inode):
            staged.use_chunked(self._chunks.chunked)  # S-CHUNK-1
        inode.staged = staged
        inode.lookups += 1
        self._entries_changed(parent)
        return self._open_handle(inode, writable=True), inode

    def _open_handle(self, inode: Inode, *, writable: bool) -> Handle:
        ref = None
        if inode.etag is not None and not inode.local_only:
            ref = self._ref(inode)
        handle = Handle(inode, writable, ref)
        if not writable and self._below(inode, lambda d: d.read_once or d.no_cache):
            handle.cache = False  # S-READ-5, S-READ-6: read once, so not worth a cache write
        inode.opens += 1
        if writable:
            inode.writers += 1
        return handle

    def register(self, handle: Handle) -> int:
        fh = FileHandleNo(self._next_fh)
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[FileHandleNo(fh)]
        except KeyError:
            raise InvalidArgument(f"no file handle {fh}") from None

    async def open(self, ino: int, flags: int) -> tuple[Handle, bool, bool]:
        """Open a file. Returns the handle, whether the kernel may keep its page cache, and
        whether this open bypasses the page cache (``bypasses_page_cache``)."""
        inode = self.inode(ino)
        if inode.kind is Kind.DIR:
            raise IsADirectory(self._path(inode))
        if inode.kind is not Kind.FILE:
            raise InvalidArgument("not a regular file")
        writable = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        truncate = bool(flags & os.O_TRUNC) and writable
        if writable:
            self._writable()
        if (
            inode.staged is None
            and not inode.local_only
            and (
                not self._fresh(inode) or not inode.meta_known  # LIST-only: is it chunked?
            )
        ):
            await self._revalidate(inode, opening=True)  # close-to-open: the newest version
        if writable:
            await self._stage(inode, truncate=truncate)
            if truncate:
                inode.size = 0
                inode.mtime_ns = _now_ns()
        handle = self._open_handle(inode, writable=writable)
        keep = inode.etag is not None and inode.kernel_etag == inode.etag and not truncate
        inode.kernel_etag = inode.etag
        direct = self.bypasses_page_cache(inode, flags)
        handle.page_cache = not direct
        return handle, keep, direct

    def bypasses_page_cache(self, inode: Inode, flags: int) -> bool:
        """Whether an open of ``inode`` with ``flags`` gets FOPEN_DIRECT_IO: with
        ``--direct-io``, read-only opens of a file nobody is writing through this mount
        (S-READ-4) and write-only opens; without it, write-only opens below a write-behind
        directory (S-WRITE-8) and read-only opens below a read-once directory (S-READ-5)."""
        mode = flags & os.O_ACCMODE
        if mode == os.O_WRONLY:
            return self.cfg.direct_io or self._in_write_behind_dir(inode)
        if mode != os.O_RDONLY or inode.staged is not None:
            return False
        return self.cfg.direct_io or self._below(inode, lambda d: d.read_once)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        h = self.handle(fh)
        inode = h.inode
        data: bytes | memoryview
        if inode.staged is not None:
            data = await inode.staged.read(off, size)
        elif h.ref is None:
            data = b""
        else:
            try:
                data = await self._chunks.read(
                    h.ref, off, size, h.rstate, cache=h.cache, release=h.page_cache
                )
            except Corrupt:
                # S-INTEG-2: the kernel keeps the pages of the chunks served before the check
                # failed; the next open must not reuse them (no FOPEN_KEEP_CACHE)
                inode.kernel_etag = None
                raise
        self.stats.bytes_read += len(data)  # trio thread only: no lock needed for these two
        self.stats.read_calls += 1
        return data

    async def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handle(fh)
        if not h.writable:
            raise InvalidArgument("file not open for writing")
        inode = h.inode
        staged = inode.staged
        if staged is None:  # committed and released by another handle meanwhile
            staged, _ = await self._stage(inode, truncate=False)
        n = await staged.write(off, data)
        inode.size = staged.size
        inode.mtime_ns = inode.ctime_ns = _now_ns()
        self.stats.bytes_written += n
        self.stats.write_calls += 1
        return n

    async def _commit(self, inode: Inode) -> None:
        staged = inode.staged
        if staged is None or not inode.linked:
            return
        if not staged.dirty and not inode.local_only:
            return
        key = self.key_of(inode)
        ref = await staged.commit(key, self._metadata(inode))
        inode.chunked = ref.chunked
        inode.etag = ref.etag
        inode.checksum = ref.checksum
        inode.kernel_etag = ref.etag
        # writes (or a truncate) that came in during the commit are in the staged file, not in
        # the object yet: the file's size is the staged one while it is staged
        inode.size = staged.size if inode.staged is staged else ref.size
        inode.local_only = False
        inode.validated = trio.current_time()
        for h in self._handles.values():
            if h.inode is inode:
                h.ref = ref

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: commit if this handle could have written."""
        h = self.handle(fh)
        if not h.writable:
            return
        if self._in_write_behind_dir(h.inode):
            self._nursery.start_soon(self._background_commit, h.inode)
            return
        await self._commit(h.inode)

    def _in_write_behind_dir(self, inode: Inode) -> bool:
        return self._below(inode, lambda d: d.write_behind)

    def _below(self, inode: Inode, marked: Callable[[Inode], bool]) -> bool:
        """Whether some directory above ``inode`` is ``marked``."""
        while inode.ino != ROOT_INODE:
            parent = self._inodes.get(inode.parent)
            if parent is None:
                return False
            if marked(parent):
                return True
            inode = parent
        return False

    async def _background_commit(self, inode: Inode) -> None:
        """Write-behind close: commit now, off the caller's path; fsync/flush wait for it."""
        try:
            await self._commit(inode)
        except (FsError, StoreError) as e:
            log.warning(
                "%s: background commit failed (kept staged, retried): %s", self._path(inode), e
            )
            return
        staged = inode.staged
        if staged is not None and inode.writers == 0 and not staged.dirty:
            await self._unstage(inode)

    async def fsync(self, fh: int) -> None:
        await self._commit(self.handle(fh).inode)

    async def release(self, fh: int) -> None:
        h = self._handles.pop(FileHandleNo(fh), None)
        if h is None:
            return
        inode = h.inode
        inode.opens -= 1
        if h.writable:
            inode.writers -= 1
        staged = inode.staged
        if staged is not None and inode.writers == 0:
            if not inode.linked or not staged.dirty:
                await self._unstage(inode)
                return
            if not self._in_write_behind_dir(inode):
                log.warning(
                    "%s: data not yet durable stays staged; retried in the background",
                    self._path(inode),
                )
        self._maybe_drop(inode)

    # -- directories -------------------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        inode = self._dir(ino)
        fh = FileHandleNo(self._next_fh)
        self._next_fh += 1
        self._dir_handles[fh] = _DirHandle(inode)
        return fh

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(FileHandleNo(fh), None)

    async def readdir(self, fh: int, start: int) -> list[tuple[bytes, Inode]]:
        """Entries from index ``start`` on; the listing is fetched once, at ``start == 0``."""
        dh = self._dir_handles.get(FileHandleNo(fh))
        if dh is None:
            raise InvalidArgument(f"no directory handle {fh}")
        if dh.entries is None or start == 0:
            dh.entries = await self._list_dir(dh.inode)
        batch = await self._learn_types(dh.inode, dh.entries[start : start + _READDIR_BATCH])
        dh.entries[start : start + len(batch)] = batch
        return batch

    async def _learn_types(
        self, directory: Inode, entries: list[tuple[bytes, Inode]]
    ) -> list[tuple[bytes, Inode]]:
        """Entries whose type and times a LIST cannot tell, made certain before the kernel
        sees them (S-MAP-5).

        The kernel takes each entry's type from READDIRPLUS and keeps it, and with the
        writeback cache it keeps a regular file's mtime from then on too (later GETATTRs do not
        change it). A LIST says nothing of metadata: a symlink or a FIFO (an object whose
        ``mode`` metadata says so) would stay a regular file for ``ls -l``, ``find`` and
        ``os.walk``, and a file whose mtime was set (``rsync -a``, ``cp -p``, ``tar``) would
        show the time of its upload. So each object known only from a listing is asked first:
        one GET of its head when it is small enough to be a symlink (as a lookup would do,
        S-MAP-8, which primes the read that follows), else a HEAD; at most ``_TYPE_PROBES`` at
        a time, once per object version, for the batch of entries this readdir call returns.
        An object gone meanwhile is left for the next lookup to find gone.
        """
        unsure = [
            (name, child)
            for name, child in entries
            if child.kind is Kind.FILE
            and not child.meta_known
            and child.staged is None
            and not child.local_only
        ]
        if not unsure:
            return entries
        limit = trio.CapacityLimiter(_TYPE_PROBES)
        learned: dict[bytes, Inode] = {}
        failures: list[StoreError] = []

        async def learn(name: bytes, child: Inode) -> None:
            key = self.key_of(child)
            async with limit:
                try:
                    if 0 < child.size <= _MAX_SYMLINK:
                        info, head = await self._call(
                            functools.partial(self._store.get_head, key, self._chunks.chunk_size),
                            what=f"GET {key}",
                        )
                    else:
                        info = await self._call(self._store.head, key, what=f"HEAD {key}")
                        head = b""
                except NotFound:
                    return
                except StoreError as e:
                    failures.append(e)
                    return
            if (
                self._known_child(directory, name) is not child
                or child.staged is not None
                or child.local_only
            ):
                return  # changed here meanwhile: its next lookup looks again
            now = trio.current_time()
            kind = self._kind_from_metadata(info.metadata)
            if kind is not Kind.FILE or info.etag != child.etag:
                # a symlink, a FIFO, a socket, a device (S-SPECIAL-1); or a newer version than
                # the listing showed (Ceph RGW's bucket index can lag its objects: a symlink
                # that replaced an empty placeholder, as tar makes them, was still listed as
                # the placeholder): what the object itself says wins
                self._detach(child)
                other = self._new_inode(directory, name, kind)
                self._apply_info(other, info)
                if kind is Kind.SYMLINK and len(head) == info.size:
                    other.target = head
                other.validated = now
                learned[name] = other
                return
            if head and logical_size(info.metadata) is None:
                self._chunks.prime(
                    ObjectRef(key, info.etag, info.size, checksum=info.checksum), head
                )
            self._apply_info(child, info)
            child.validated = now

        with first_error():
            async with trio.open_nursery() as nursery:
                for name, child in unsure:
                    nursery.start_soon(learn, name, child)
        if failures:
            raise failures[0]
        return [(name, learned.get(name, child)) for name, child in entries]

    async def _list_dir(self, directory: Inode) -> list[tuple[bytes, Inode]]:
        prefix = self.key_of(directory)
        listed_at = trio.current_time()
        pages = await self._call(
            lambda: list(iter_list(self._store, prefix, "/")), what=f"LIST {prefix}"
        )
        dirs: dict[bytes, None] = {}
        files: dict[bytes, ObjectInfo] = {}
        for page in pages:
            for p in page.prefixes:
                name = os.fsencode(p[len(prefix) : -1])
                if self._valid_listed(name):
                    dirs[name] = None
            for o in page.objects:
                name = os.fsencode(o.key[len(prefix) :])
                if o.key != prefix and self._valid_listed(name):
                    files[name] = o
        if directory.ino == ROOT_INODE:  # the layout's own objects are hidden (S-CHUNK-4)
            dirs.pop(_RESERVED, None)
            files.pop(_RESERVED, None)
        children = self._children.setdefault(directory.ino, {})
        entries: dict[bytes, Inode] = {}
        for name in dirs:
            child = self._known_child(directory, name)
            if (
                child is not None
                and child.kind is not Kind.DIR
                and not (child.staged or child.local_only)
            ):
                self._detach(child)
                child = None
            if child is None:
                child = self._new_inode(directory, name, Kind.DIR)
            if child.meta_known:  # else the next lookup HEADs its marker for mode and owner
                child.validated = listed_at
            entries[name] = child
        for name, info in files.items():
            if name in entries:
                continue  # a directory of the same name wins
            child = self._known_child(directory, name)
            if child is not None and (child.kind is Kind.DIR or self._new_version(child, info)):
                self._detach(child)
                child = None
            if child is None:
                child = self._new_inode(directory, name, Kind.FILE)
            if child.etag != info.etag:
                self._apply_info(child, info)
            child.validated = listed_at if child.meta_known else child.validated
            entries[name] = child
        # what exists only here (being written, just made) stays visible; the rest is gone
        for name, ino in list(children.items()):
            child = self._inodes.get(ino)
            if name in entries or child is None:
                continue
            if child.local_only or child.staged is not None:
                entries[name] = child
            else:
                self._detach(child)
        directory.listed_at = listed_at
        directory.listed_names = set(entries)
        directory.listed_dirs = set(dirs)
        return sorted(entries.items())

    @staticmethod
    def _valid_listed(name: bytes) -> bool:
        if not name or name in (b".", b"..") or b"/" in name or len(name) > _MAX_NAME:
            log.debug("skipping key component %r: not a valid file name", name)
            return False
        return True

    # -- extended attributes: only the control interface (fusionfs/control.py) ----------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        return self._control.getxattr(ino, name)

    def listxattr(self, ino: int) -> list[bytes]:
        self.inode(ino)
        return []

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        await self._control.setxattr(ino, name, value)

    async def flush_all(self) -> None:
        """Commit every file with data not yet durable, several at once.

        Raises UploadFailed listing the files that could not be made durable."""
        failures: list[str] = []
        pending = [
            i
            for i in self._inodes.values()
            if i.staged is not None and i.linked and (i.staged.dirty or i.local_only)
        ]

        async def one(inode: Inode) -> None:
            try:
                await self._commit(inode)
            except (FsError, StoreError) as e:
                failures.append(f"{self._path(inode)}: {e}")
                return
            if inode.writers == 0 and inode.staged is not None:
                await self._unstage(inode)

        await _bounded_all([functools.partial(one, i) for i in pending], 16)
        if failures:
            raise UploadFailed("; ".join(failures))

    async def retry_loop(self) -> None:
        """Background: keep trying to commit data whose commit failed, until it is in."""
        while True:
            await trio.sleep(self.cfg.retry_interval)
            pending = [
                i
                for i in self._inodes.values()
                if i.staged is not None and i.staged.dirty and i.writers == 0 and i.linked
            ]
            for inode in pending:
                path = self._path(inode)
                try:
                    await self._commit(inode)
                    await self._unstage(inode)
                    log.info("%s: staged data is now durable", path)
                except (FsError, StoreError) as e:
                    log.warning("%s: still not durable: %s", path, e)

    def statfs(self) -> dict[str, int]:
        return {
            "f_bsize": 1 << 20,
            "f_frsize": 4096,
            "f_blocks": 1 << 40,
            "f_bfree": 1 << 40,
            "f_bavail": 1 << 40,
            "f_files": 1 << 32,
            "f_ffree": 1 << 32,
            "f_favail": 1 << 32,
            "f_namemax": _MAX_NAME,
        }


_RENAME_NOREPLACE = 1  # linux/fs.h RENAME_NOREPLACE


async def _bounded_all(jobs: Sequence[Callable[[], Any]], limit: int) -> None:
    sem = trio.Semaphore(limit)

    async def run(job: Callable[[], Any]) -> None:
        async with sem:
            await job()

    with first_error():
        async with trio.open_nursery() as n:
            for job in jobs:
                n.start_soon(run, job)
