"""The pyfuse3 adapter: unpack the request, call ``Filesystem``, map errors to errno.

This is the only module that raises ``pyfuse3.FUSEError`` (pyfuse3 answers nothing else). Every
handler goes through ``_errors``: a known error class gets its errno from ``errors.errno_for``;
anything else is a bug, logged with its traceback and answered ``EIO``.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3

from fusionfs.errors import errno_for
from fusionfs.fs import Filesystem, Inode, Kind

__all__ = ["FusionOperations"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# errnos that are answers, not failures: not counted in the error statistics
_QUIET = {errno.ENOENT, errno.ENODATA, errno.EEXIST, errno.ENOTEMPTY}
#: operations whose failure loses data the writer was told was written: logged at any errno
_DATA_LOSING = frozenset({"write", "flush", "fsync", "release"})


def _errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: FusionOperations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = errno_for(exc)
            if code is None:
                log.exception("unexpected error in %s", fn.__name__)
                code = errno.EIO
            elif code == errno.EIO:
                log.warning("%s failed: %s", fn.__name__, exc)
            elif fn.__name__ in _DATA_LOSING:
                # the kernel's writeback cache had accepted these bytes: the writer learns of
                # the failure only as EIO from close or fsync, so the log must say why
                log.warning(
                    "%s failed with %s (the writer sees EIO at close or fsync): %s",
                    fn.__name__,
                    errno.errorcode.get(code, str(code)),
                    exc,
                )
            if code not in _QUIET:
                self.fs.stats.count_error(errno.errorcode.get(code, str(code)))
            raise pyfuse3.FUSEError(code) from None

    return cast(F, wrapper)


class FusionOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, fs: Filesystem, on_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.fs = fs
        self._on_init = on_init

    def init(self) -> None:
        """The kernel's INIT was answered: the session is live."""
        if self._on_init is not None:
            self._on_init()

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(inode.ino)
        e.generation = 0
        # attributes known only from a LIST (no metadata yet) are not cached by the kernel
        trusted = inode.meta_known or inode.staged is not None
        ttl = self.fs.cfg.metadata_ttl if trusted else 0
        e.entry_timeout = ttl
        e.attr_timeout = ttl
        e.st_mode = pyfuse3.ModeT(inode.st_mode)
        # an unlinked file still open has no name left (S-LINK-1)
        e.st_nlink = 2 if inode.kind is Kind.DIR else (1 if inode.linked else 0)
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        e.st_rdev = inode.rdev
        e.st_size = inode.size
        e.st_blksize = 1 << 20
        e.st_blocks = (inode.size + 511) // 512
        e.st_atime_ns = inode.mtime_ns if inode.atime_ns is None else inode.atime_ns
        e.st_mtime_ns = inode.mtime_ns
        e.st_ctime_ns = inode.ctime_ns or inode.mtime_ns
        return e

    # -- namespace -------------------------------------------------------------------------
    @_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        try:
            self.fs.forget(inode_list)
        except Exception:
            log.exception("forget failed")

    @_errors
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.getattr(inode))

    @_errors
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = await self.fs.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            fh=fh,
        )
        return self._attrs(node)

    @_errors
    async def readlink(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileNameT:
        return pyfuse3.FileNameT(await self.fs.readlink(inode))

    @_errors
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errors
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):  # S-SPECIAL-1
            return self._attrs(
                await self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid)
            )
        handle, inode = await self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        fh = self.fs.register(handle)
        try:
            await self.fs.flush(fh)
        finally:
            await self.fs.release(fh)
        return self._attrs(inode)

    @_errors
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.unlink(parent_inode, name)

    @_errors
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_errors
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errors
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # link(2): the filesystem has no hard links

    # -- files ---------------------------------------------------------------------------
    @_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        handle, keep, direct = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(self.fs.register(handle)), keep_cache=keep, direct_io=direct
        )

    @_errors
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle, inode = await self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        fh = pyfuse3.FileHandleT(self.fs.register(handle))
        direct = self.fs.bypasses_page_cache(inode, flags)
        return pyfuse3.FileInfo(fh=fh, direct_io=direct), self._attrs(inode)

    @_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 replies from any contiguous buffer: a memoryview saves a copy of each chunk
        return cast(bytes, await self.fs.read(fh, off, size))

    @_errors
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_errors
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        await self.fs.flush(fh)

    @_errors
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        await self.fs.release(fh)

    # -- directories -------------------------------------------------------------------------
    @_errors
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        return pyfuse3.FileHandleT(self.fs.opendir(inode))

    @_errors
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        entries = await self.fs.readdir(fh, start_id)
        for i, (name, inode) in enumerate(entries):
            if not pyfuse3.readdir_reply(
                token, pyfuse3.FileNameT(name), self._attrs(inode), start_id + i + 1
            ):
                break
            self.fs.note_lookup(inode)

    @_errors
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.fs.releasedir(fh)

    @_errors
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        return None  # namespace changes are durable when their call returns

    @_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        for k, v in self.fs.statfs().items():
            setattr(out, k, v)
        return out

    # -- extended attributes: only the control interface on the root ---------------------------
    @_errors
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        return self.fs.getxattr(inode, name)

    @_errors
    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.setxattr(inode, name, value)

    @_errors
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(n) for n in self.fs.listxattr(inode)]

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def access(self, inode: pyfuse3.InodeT, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # permission checks are the kernel's (default_permissions)
