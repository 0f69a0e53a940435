"""``LocalStore``: the object store over a local directory (fusionfs's embedded default).

The mapping is the natural one, so an existing directory appears as it is: key ``"a/b.txt"`` is
the file ``ROOT/a/b.txt``, and key ``"a/"`` is the directory ``ROOT/a`` (a directory *marker*:
``head`` gives size 0, ``put("a/", b"")`` creates it, ``delete("a/")`` removes it only if it is
empty and is a no-op otherwise). ``put("a/b")`` creates missing parent directories.

- ETag: derived from the file's ``(st_ino, st_size, st_mtime_ns)``, so a change by any program
  changes it. Our own writes replace the file by rename and set its mtime to
  ``max(now, previous mtime + 1 ns)``, so two versions written by us never share an ETag even
  when an inode number is reused within one clock tick.
- Reads with an ETag open the file, ``fstat`` it, compare, then ``pread``: the open descriptor
  pins the version against replacement by rename (how fusionfs and most tools write). A program
  that rewrites a file *in place* can still be seen mid-write; that cannot be prevented here.
- Writes are atomic: a temp file under ``ROOT/.fusionfs-tmp/`` is written, fsynced, given its
  metadata, then renamed into place and the directory fsynced.
- User metadata is JSON in the extended attribute ``user.fusionfs.meta``. On a filesystem that
  refuses user xattrs (ENOTSUP, e.g. tmpfs before Linux 6.6) it is kept instead in a sidecar
  file ``ROOT/.fusionfs-tmp/meta/<sha256 of key>.json`` that records the version (ETag) it
  belongs to: a sidecar is ignored once the file has changed, and sidecars of files that other
  programs rename or delete are left behind.
- Multipart uploads keep their parts as files under ``ROOT/.fusionfs-tmp/uploads/<id>/``;
  completion concatenates them (``os.copy_file_range``) into a temp file, then renames it into
  place. As on S3, every part but the last must be at least 5 MiB.
- ``list`` returns keys in S3 order (by the UTF-8 bytes of the whole key); the continuation
  token is the last key (or common prefix) returned. ``.fusionfs-tmp`` is never listed.
  Symbolic links to files are followed; symbolic links to directories, special files (FIFOs,
  sockets, devices) and names that are not valid UTF-8 are not listed.
- S3 lets ``a`` and ``a/b`` coexist; a filesystem does not, so such a ``put`` fails with
  ``StoreError``.
- Keys with empty, ``.`` or ``..`` components, or NUL, are rejected with ``StoreError``; the
  reserved top-level name ``.fusionfs-tmp`` does not exist for reads and cannot be written.
- Temp files left by a crash stay in ``.fusionfs-tmp`` (they are never visible as objects).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO

from ..stats import Stats
from .base import (
    Body,
    ETag,
    Key,
    ListPage,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    StoreError,
    Transient,
    UploadPart,
    body_size,
    body_views,
)

__all__ = ["LocalStore"]

_log = logging.getLogger(__name__)

_TMP = ".fusionfs-tmp"
_XATTR = "user.fusionfs.meta"
_CHUNK = 1 << 20
_MIN_PART = 5 << 20
_MAX_PART_NUMBER = 10_000
_UPLOAD_INFO = "upload.json"
_NO_XATTR_ERRNOS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
_NO_COPY_RANGE_ERRNOS = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def _etag(st: os.stat_result) -> ETag:
    return ETag(f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"')


def _kbytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


class LocalStore:
    """An ``ObjectStore`` over the directory ``root``. Thread-safe."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        stats: Stats | None = None,
        use_xattrs: bool | None = None,
    ) -> None:
        """``use_xattrs``: where user metadata lives; ``None`` (the default) probes the
        filesystem on first use, ``False`` forces sidecar files (for tests)."""
        self.root = os.path.abspath(os.fspath(root))
        self.description = f"local directory {self.root}"
        self._stats = stats
        self._tmp = os.path.join(self.root, _TMP)
        self._uploads = os.path.join(self._tmp, "uploads")
        self._meta_dir = os.path.join(self._tmp, "meta")
        self._use_xattrs = use_xattrs
        self._lock = threading.Lock()

    # -- errors and paths ----------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, op: str, key: str, *, write: bool) -> Iterator[None]:
        """Translate ``OSError`` (and corrupt metadata) into store errors: the one place."""
        try:
            yield
        except OSError as err:
            raise self._translate(err, op, key, write=write) from err
        except ValueError as err:  # undecodable metadata JSON
            raise StoreError(f"{op} '{key}' in {self.root}: {err}") from err

    def _translate(self, err: OSError, op: str, key: str, *, write: bool) -> StoreError:
        where = f"{op} '{key}' in {self.root}"
        code = err.errno
        if code == errno.ENOENT:
            return NotFound(f"{where}: no such object")
        if code in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG) and not write:
            return NotFound(f"{where}: no such object")  # no such key can exist here
        reasons = {
            errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only filesystem",
            errno.ENAMETOOLONG: "name too long for this filesystem",
            errno.ENOTDIR: "a parent of this key is a file",
            errno.EISDIR: "a directory is in the way (the key without '/' names a directory)",
            errno.EEXIST: "a file is in the way of a directory",
            errno.ENOTEMPTY: "a non-empty directory is in the way",
            errno.EIO: "I/O error",
            errno.EMFILE: "too many open files",
        }
        reason = reasons.get(code) if code is not None else None
        return StoreError(f"{where}: {reason or err.strerror or err}")

    def _path(self, key: str, *, op: str, write: bool) -> tuple[str, bool]:
        """``(absolute path, is directory marker)`` for ``key``; rejects keys escaping root."""
        if not key or "\0" in key:
            raise StoreError(f"{op}: invalid key {key!r}")
        is_dir = key.endswith("/")
        parts = (key[:-1] if is_dir else key).split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise StoreError(f"{op}: invalid key {key!r} (empty, '.' or '..' component)")
        if parts[0] == _TMP:
            if write:
                raise StoreError(f"{op}: {_TMP} is reserved for fusionfs's own use")
            raise NotFound(f"{op} '{key}' in {self.root}: no such object")
        return os.path.join(self.root, *parts), is_dir

    def _count(self, kind: str) -> None:
        if self._stats is not None:
            self._stats.count_request(kind)

    # -- metadata --------------------------------------------------------------------------
    def _xattrs(self) -> bool:
        with self._lock:
            if self._use_xattrs is None:
                self._use_xattrs = self._probe_xattrs()
            return self._use_xattrs

    def _probe_xattrs(self) -> bool:
        try:
            os.makedirs(self._tmp, exist_ok=True)
            os.setxattr(self._tmp, "user.fusionfs.probe", b"1")
            os.removexattr(self._tmp, "user.fusionfs.probe")
        except OSError as err:
            if err.errno in _NO_XATTR_ERRNOS:
                _log.info("%s: no user xattrs here; metadata goes to sidecar files", self.root)
                return False
        return True  # or we cannot tell (read-only root): reading xattrs still works

    def _sidecar(self, key: str) -> str:
        return os.path.join(self._meta_dir, hashlib.sha256(_kbytes(key)).hexdigest() + ".json")

    @staticmethod
    def _version(st: os.stat_result) -> str:
        # Directories' mtimes change with their entries: their sidecars follow the inode only.
        return f"dir-{st.st_ino:x}" if stat.S_ISDIR(st.st_mode) else _etag(st)

    def _read_meta(self, target: int | str, key: str, st: os.stat_result) -> dict[str, str]:
        if self._xattrs():
            try:
                raw = os.getxattr(target, _XATTR)
            except OSError as err:
                if err.errno == errno.ENODATA:
                    return {}
                if err.errno not in _NO_XATTR_ERRNOS:
                    raise
            else:
                return self._decode_meta(raw)
        try:
            with open(self._sidecar(key), "rb") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            return {}
        if record.get("version") != self._version(st):
            return {}
        return self._decode_meta(json.dumps(record.get("meta", {})).encode())

    @staticmethod
    def _decode_meta(raw: bytes) -> dict[str, str]:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("corrupt fusionfs metadata (not a JSON object)")
        return {str(k): str(v) for k, v in value.items()}

    def _write_meta(self, target: int | str, metadata: Mapping[str, str] | None) -> bool:
        """Set (or clear) the metadata xattr; ``False`` if it must go to a sidecar instead."""
        if not self._xattrs():
            return False
        meta = {k.lower(): v for k, v in (metadata or {}).items()}
        try:
            if meta:
                os.setxattr(target, _XATTR, json.dumps(meta, sort_keys=True).encode())
            else:
                with contextlib.suppress(FileNotFoundError):
                    try:
                        os.removexattr(target, _XATTR)
                    except OSError as err:
                        if err.errno != errno.ENODATA:
                            raise
        except OSError as err:
            if err.errno not in _NO_XATTR_ERRNOS:
                raise
            with self._lock:
                self._use_xattrs = False
            return False
        return True

    def _write_sidecar(
        self, key: str, st: os.stat_result, metadata: Mapping[str, str] | None
    ) -> None:
        path = self._sidecar(key)
        meta = {k.lower(): v for k, v in (metadata or {}).items()}
        if not meta:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        os.makedirs(self._meta_dir, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps({"key": key, "version": self._version(st), "meta": meta}).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- low-level helpers -------------------------------------------------------------------
    def _open_regular(self, path: str) -> tuple[int, os.stat_result]:
        """Open a regular file for reading (never a FIFO or device); NotFound otherwise."""
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", path)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _new_tmp(self, directory: str) -> tuple[int, str]:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"tmp-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        return fd, path

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _write_all(fd: int, data: Body) -> None:
        for view in body_views(data):
            while view:
                n = os.write(fd, view)
                view = view[n:]

    @staticmethod
    def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
        """Append ``src[offset:offset+length]`` to ``dst_fd``; returns bytes copied."""
        done = 0
        fast = True
        while done < length:
            if fast:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done)
                except OSError as err:
                    if err.errno not in _NO_COPY_RANGE_ERRNOS:
                        raise
                    fast = False
                    continue
            else:
                chunk = os.pread(src_fd, min(_CHUNK, length - done), offset + done)
                n = len(chunk)
                LocalStore._write_all(dst_fd, chunk)
            if n == 0:
                break
            done += n
        return done

    @staticmethod
    def _next_mtime(path: str) -> int:
        now = time.time_ns()
        try:
            return max(now, os.stat(path).st_mtime_ns + 1)
        except OSError:
            return now

    def _write_object(
        self,
        key: str,
        path: str,
        fill: Callable[[int], None],
        metadata: Mapping[str, str] | None,
    ) -> ETag:
        """Write a temp file with ``fill(fd)``, then atomically rename it to ``path``."""
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        fd, tmp = self._new_tmp(self._tmp)
        try:
            fill(fd)
            in_xattr = self._write_meta(fd, metadata)
            mtime = self._next_mtime(path)
            os.utime(fd, ns=(mtime, mtime))
            os.fsync(fd)
            st = os.fstat(fd)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        self._fsync_dir(parent)
        if not in_xattr:
            self._write_sidecar(key, st, metadata)
        return _etag(st)

    # -- ObjectStore -------------------------------------------------------------------------
    def check(self) -> None:
        self._count("check")
        if not os.path.exists(self.root):
            raise NotFound(f"local directory {self.root} does not exist")
        if not os.path.isdir(self.root):
            raise StoreError(f"{self.root} is not a directory")
        try:
            os.makedirs(self._tmp, exist_ok=True)
            fd, probe = self._new_tmp(self._tmp)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise StoreError(
                f"cannot write to local directory {self.root}: {err.strerror or err}"
            ) from err
        self._xattrs()

    def head(self, key: Key) -> ObjectInfo:
        self._count("head")
        path, is_dir = self._path(key, op="head", write=False)
        with self._errors("head", key, write=False):
            st = os.stat(path)
            if is_dir != stat.S_ISDIR(st.st_mode) or not (is_dir or stat.S_ISREG(st.st_mode)):
                raise FileNotFoundError(errno.ENOENT, "no such object", path)
            return ObjectInfo(
                key=key,
                size=0 if is_dir else st.st_size,
                etag=_etag(st),
                mtime_ns=st.st_mtime_ns,
                metadata=self._read_meta(path, key, st),
            )

    def _read(
        self,
        op: str,
        key: Key,
        start: int,
        length: int,
        etag: ETag | None,
        sink: Callable[[bytes], None],
    ) -> int:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length}")
        path, is_dir = self._path(key, op=op, write=False)
        if is_dir:  # a directory marker has no content
            info = self.head(key)
            if etag is not None and info.etag != etag:
                raise PreconditionFailed(f"{op} '{key}': ETag is {info.etag}, expected {etag}")
            return 0
        total = 0
        with self._errors(op, key, write=False):
            fd, st = self._open_regular(path)
            try:
                if etag is not None and _etag(st) != etag:
                    raise PreconditionFailed(
                        f"{op} '{key}' in {self.root}: ETag is {_etag(st)}, expected {etag}"
                    )
                end = min(start + length, st.st_size)
                pos = start
                while pos < end:
                    chunk = os.pread(fd, min(_CHUNK, end - pos), pos)
                    if not chunk:  # truncated in place by another program
                        break
                    sink(chunk)
                    pos += len(chunk)
                    total += len(chunk)
            finally:
                os.close(fd)
        if self._stats is not None and total:
            self._stats.add("bytes_fetched", total)
        return total

    def get_head(self, key: Key, length: int) -> tuple[ObjectInfo, bytes]:
        # two local calls; a replacement in between is retried (the pair must be one version)
        for _ in range(3):
            info = self.head(key)
            n = min(length, info.size)
            if n <= 0:
                return info, b""
            try:
                return info, self.get_range(key, 0, n, info.etag)
            except PreconditionFailed:
                continue
        raise Transient(f"get_head '{key}': the object kept changing while being read")

    def get_range(self, key: Key, start: int, length: int, etag: ETag | None = None) -> bytes:
        self._count("get_range")
        chunks: list[bytes] = []
        self._read("get_range", key, start, length, etag, chunks.append)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def get_into(
        self, key: Key, start: int, length: int, out: BinaryIO, etag: ETag | None = None
    ) -> int:
        self._count("get_into")

        def sink(chunk: bytes) -> None:
            try:
                out.write(chunk)
            except OSError as err:
                raise StoreError(f"get_into '{key}': writing the output failed: {err}") from err

        return self._read("get_into", key, start, length, etag, sink)

    def put(self, key: Key, data: Body, metadata: Mapping[str, str] | None = None) -> ETag:
        self._count("put")
        path, is_dir = self._path(key, op="put", write=True)
        size = body_size(data)
        with self._errors("put", key, write=True):
            if is_dir:
                if size:
                    raise StoreError(f"put '{key}': a directory marker must be empty")
                os.makedirs(path, exist_ok=True)
                in_xattr = self._write_meta(path, metadata)
                st = os.stat(path)
                if not in_xattr:
                    self._write_sidecar(key, st, metadata)
                return _etag(st)
            etag = self._write_object(key, path, lambda fd: self._write_all(fd, data), metadata)
        if self._stats is not None and size:
            self._stats.add("bytes_uploaded", size)
        return etag

    def list(
        self,
        prefix: Key,
        delimiter: str | None = "/",
        continuation: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        self._count("list")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        if "\0" in prefix:
            raise StoreError(f"list: invalid prefix {prefix!r}")
        after = _kbytes(continuation) if continuation is not None else None
        objects: list[ObjectInfo] = []
        prefixes: list[Key] = []
        truncated = False
        last: str | None = None
        with self._errors("list", prefix, write=False):
            for key, is_dir, path in self._iter_keys(prefix, after, descend=delimiter != "/"):
                item = key
                rolled = False
                if delimiter:
                    cut = key.find(delimiter, len(prefix))
                    if cut >= 0:
                        item = key[: cut + len(delimiter)]
                        rolled = True
                if after is not None and _kbytes(item) <= after:
                    continue
                if item == last:  # more keys under a common prefix already returned
                    continue
                info: ObjectInfo | None = None
                if not rolled:
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue  # vanished while listing
                    info = ObjectInfo(
                        key=Key(key),
                        size=0 if is_dir else st.st_size,
                        etag=_etag(st),
                        mtime_ns=st.st_mtime_ns,
                    )
                if len(objects) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                if info is None:
                    prefixes.append(Key(item))
                else:
                    objects.append(info)
                last = item
        return ListPage(
            objects=objects, prefixes=prefixes, continuation=last if truncated else None
        )

    def _iter_keys(
        self, prefix: str, after: bytes | None, *, descend: bool
    ) -> Iterator[tuple[str, bool, str]]:
        """``(key, is directory marker, path)`` for keys starting with ``prefix``, in order.

        Without ``descend``, directories below the first level are yielded as their marker key
        only (enough for a "/" delimiter, which rolls them up).
        """
        dir_part, _, partial = prefix.rpartition("/")
        parts = dir_part.split("/") if dir_part else []
        if any(p in ("", ".", "..") for p in parts) or (parts and parts[0] == _TMP):
            return  # no key can start with such a prefix
        base = os.path.join(self.root, *parts)
        rel = dir_part + "/" if dir_part else ""
        if rel and not partial:
            if not os.path.isdir(base):
                return
            if after is None or _kbytes(rel) > after:
                yield rel, True, base
        yield from self._walk(base, rel, partial, after, descend=descend, top=True)

    def _walk(
        self,
        base: str,
        rel: str,
        partial: str,
        after: bytes | None,
        *,
        descend: bool,
        top: bool,
    ) -> Iterator[tuple[str, bool, str]]:
        try:
            with os.scandir(base) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return
        items: list[tuple[bytes, str, bool, str]] = []
        for entry in entries:
            name = entry.name
            if top and not rel and name == _TMP:
                continue
            if partial and not name.startswith(partial):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                _log.debug("not listing %r under %s: not valid UTF-8", name, base)
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    key = f"{rel}{name}/"
                    is_dir = True
                elif entry.is_file(follow_symlinks=True):
                    key = f"{rel}{name}"
                    is_dir = False
                else:
                    continue
            except OSError:
                continue
            items.append((_kbytes(key), key, is_dir, entry.path))
        items.sort()
        for kb, key, is_dir, path in items:
            if after is not None and kb <= after:
                if not (is_dir and descend and after.startswith(kb)):
                    continue  # this key, and any key below it, is not after the token
                yield from self._walk(path, key, "", after, descend=True, top=False)
                continue
            yield key, is_dir, path
            if is_dir and descend:
                yield from self._walk(path, key, "", after, descend=True, top=False)

    def delete(self, key: Key) -> None:
        self._count("delete")
        path, is_dir = self._path(key, op="delete", write=True)
        with self._errors("delete", key, write=True):
            try:
                if is_dir:
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except OSError as err:
                gone = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
                if err.errno in gone:
                    return  # absent, or a non-empty directory (kept: S3 has no such thing)
                raise
            if not self._xattrs():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._sidecar(key))
            self._fsync_dir(os.path.dirname(path))

    def copy(
        self,
        src: Key,
        dst: Key,
        metadata: Mapping[str, str] | None = None,
        src_etag: ETag | None = None,
    ) -> ETag:
        self._count("copy")
        src_path, src_dir = self._path(src, op="copy", write=False)
        dst_path, _ = self._path(dst, op="copy", write=True)
        if src_dir:
            info = self.head(src)
            if src_etag is not None and info.etag != src_etag:
                raise PreconditionFailed(f"copy '{src}': ETag is {info.etag}, expected {src_etag}")
            return self.put(dst, b"", info.metadata if metadata is None else metadata)
        with self._errors("copy", src, write=False):
            fd, st = self._open_regular(src_path)
        try:
            if src_etag is not None and _etag(st) != src_etag:
                raise PreconditionFailed(f"copy '{src}': ETag is {_etag(st)}, expected {src_etag}")
            with self._errors("copy", src, write=False):
                meta = self._read_meta(fd, src, st) if metadata is None else metadata
            if dst.endswith("/") and st.st_size:
                raise StoreError(f"copy '{src}' to '{dst}': a directory marker must be empty")
            with self._errors("copy", dst, write=True):
                if dst.endswith("/"):
                    return self.put(dst, b"", meta)

                def fill(out: int) -> None:
                    if self._copy_range(fd, out, 0, st.st_size) != st.st_size:
                        raise StoreError(f"copy '{src}': source shrank while copying")

                return self._write_object(dst, dst_path, fill, meta)
        finally:
            os.close(fd)

    # -- multipart upload ----------------------------------------------------------------
    def _upload_dir(self, key: str, upload_id: str, op: str) -> tuple[str, dict[str, object]]:
        if not upload_id or not upload_id.isalnum():
            raise NotFound(f"{op} '{key}': no such upload {upload_id!r}")
        directory = os.path.join(self._uploads, upload_id)
        try:
            with open(os.path.join(directory, _UPLOAD_INFO), "rb") as f:
                info = json.loads(f.read())
        except FileNotFoundError as err:
            raise NotFound(f"{op} '{key}': no such upload {upload_id!r}") from err
        if info.get("key") != key:
            raise NotFound(f"{op} '{key}': upload {upload_id!r} is for another key")
        return directory, info

    def create_multipart(self, key: Key, metadata: Mapping[str, str] | None = None) -> str:
        self._count("create_multipart")
        self._path(key, op="create_multipart", write=True)
        upload_id = uuid.uuid4().hex
        directory = os.path.join(self._uploads, upload_id)
        meta = {k.lower(): v for k, v in (metadata or {}).items()}
        with self._errors("create_multipart", key, write=True):
            os.makedirs(directory)
            with open(os.path.join(directory, _UPLOAD_INFO), "wb") as f:
                f.write(json.dumps({"key": key, "metadata": meta}).encode())
        return upload_id

    def _put_part(
        self, op: str, key: str, upload_id: str, number: int, fill: Callable[[int], None]
    ) -> UploadPart:
        if not 1 <= number <= _MAX_PART_NUMBER:
            raise StoreError(f"{op} '{key}': part number {number} is not in 1..10000")
        with self._errors(op, key, write=True):
            directory, _ = self._upload_dir(key, upload_id, op)
            fd, tmp = self._new_tmp(directory)
            try:
                fill(fd)
                st = os.fstat(fd)
                os.rename(tmp, os.path.join(directory, f"part-{number:05d}"))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            finally:
                os.close(fd)
        return UploadPart(number=number, etag=_etag(st))

    def upload_part(
        self, key: Key, upload_id: str, number: int, data: bytes | memoryview
    ) -> UploadPart:
        self._count("upload_part")
        part = self._put_part(
            "upload_part", key, upload_id, number, lambda fd: self._write_all(fd, data)
        )
        if self._stats is not None and len(data):
            self._stats.add("bytes_uploaded", len(data))
        return part

    def upload_part_copy(
        self,
        key: Key,
        upload_id: str,
        number: int,
        src: Key,
        start: int,
        length: int,
        src_etag: ETag | None = None,
    ) -> UploadPart:
        self._count("upload_part_copy")
        if start < 0 or length <= 0:
            raise ValueError(f"bad range start={start} length={length}")
        src_path, src_dir = self._path(src, op="upload_part_copy", write=False)
        if src_dir:
            raise StoreError(f"upload_part_copy: '{src}' is a directory marker (empty)")
        with self._errors("upload_part_copy", src, write=False):
            fd, st = self._open_regular(src_path)
        try:
            if src_etag is not None and _etag(st) != src_etag:
                raise PreconditionFailed(
                    f"upload_part_copy '{src}': ETag is {_etag(st)}, expected {src_etag}"
                )
            if start + length > st.st_size:
                raise StoreError(
                    f"upload_part_copy '{src}': range {start}+{length} is past its end "
                    f"({st.st_size} bytes)"
                )

            def fill(out: int) -> None:
                if self._copy_range(fd, out, start, length) != length:
                    raise StoreError(f"upload_part_copy '{src}': source shrank while copying")

            return self._put_part("upload_part_copy", key, upload_id, number, fill)
        finally:
            os.close(fd)

    def complete_multipart(
        self, key: Key, upload_id: str, parts: builtins.list[UploadPart]
    ) -> ETag:
        self._count("complete_multipart")
        path, is_dir = self._path(key, op="complete_multipart", write=True)
        if is_dir:
            raise StoreError(f"complete_multipart '{key}': a directory marker must be empty")
        if not parts:
            raise StoreError(f"complete_multipart '{key}': no parts given")
        ordered = sorted(parts, key=lambda p: p.number)
        if len({p.number for p in ordered}) != len(ordered):
            raise StoreError(f"complete_multipart '{key}': a part number is given twice")
        with self._errors("complete_multipart", key, write=True):
            directory, info = self._upload_dir(key, upload_id, "complete_multipart")
            fds: list[tuple[int, int]] = []
            try:
                for i, part in enumerate(ordered):
                    part_path = os.path.join(directory, f"part-{part.number:05d}")
                    try:
                        fd, st = self._open_regular(part_path)
                    except FileNotFoundError as err:
                        raise StoreError(
                            f"complete_multipart '{key}': part {part.number} was not uploaded"
                        ) from err
                    fds.append((fd, st.st_size))
                    if _etag(st) != part.etag:
                        raise StoreError(
                            f"complete_multipart '{key}': part {part.number} has ETag "
                            f"{_etag(st)}, not {part.etag}"
                        )
                    if i < len(ordered) - 1 and st.st_size < _MIN_PART:
                        raise StoreError(
                            f"complete_multipart '{key}': part {part.number} is smaller than "
                            "5 MiB and is not the last part"
                        )

                def fill(out: int) -> None:
                    for fd, size in fds:
                        if self._copy_range(fd, out, 0, size) != size:
                            raise StoreError(f"complete_multipart '{key}': a part shrank")

                raw_meta = info.get("metadata")
                meta = (
                    {str(k): str(v) for k, v in raw_meta.items()}
                    if isinstance(raw_meta, dict)
                    else {}
                )
                etag = self._write_object(key, path, fill, meta)
            finally:
                for fd, _ in fds:
                    os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
        return etag

    def abort_multipart(self, key: Key, upload_id: str) -> None:
        self._count("abort_multipart")
        with self._errors("abort_multipart", key, write=True):
            try:
                directory, _ = self._upload_dir(key, upload_id, "abort_multipart")
            except NotFound:
                return
            with contextlib.suppress(FileNotFoundError):  # a concurrent abort
                shutil.rmtree(directory)
