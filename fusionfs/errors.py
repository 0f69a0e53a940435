"""The filesystem's own error classes and the one table that gives each its errno.

Every layer below ``ops`` raises these (or the store's errors from ``fusionfs.store``); ``ops``
is the only place that turns them into ``pyfuse3.FUSEError``, through ``errno_for``. An exception
that is in neither family is a bug: ``ops`` logs it with its traceback and answers ``EIO``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from fusionfs.store.base import (
    Corrupt,
    NotFound,
    NotSupported,
    PreconditionFailed,
    StoreError,
    Transient,
)

__all__ = [
    "Exists",
    "FileTooLarge",
    "FsError",
    "InvalidArgument",
    "IsADirectory",
    "NameTooLong",
    "NoData",
    "NoEntry",
    "NotADirectory",
    "NotEmpty",
    "OperationNotSupported",
    "ReadOnly",
    "Stale",
    "UploadFailed",
    "errno_for",
    "first_error",
]


class FsError(Exception):
    """Base of the filesystem's errors."""


class NoEntry(FsError):
    pass


class Exists(FsError):
    pass


class NotEmpty(FsError):
    pass


class IsADirectory(FsError):
    pass


class NotADirectory(FsError):
    pass


class Stale(FsError):
    """The object changed under an open handle (its ETag is no longer the one being read)."""


class ReadOnly(FsError):
    pass


class NameTooLong(FsError):
    pass


class FileTooLarge(FsError):
    """A size beyond the largest object the store can hold."""


class InvalidArgument(FsError):
    pass


class OperationNotSupported(FsError):
    pass


class NoData(FsError):
    """No such extended attribute."""


class UploadFailed(FsError):
    """Data could not be made durable in the store; it stays staged locally."""


# Exhaustive: every class above and every store error class appears here. Looked up along the
# MRO, so a subclass without its own row gets its parent's errno.
_ERRNO: dict[type[BaseException], int] = {
    NoEntry: errno.ENOENT,
    Exists: errno.EEXIST,
    NotEmpty: errno.ENOTEMPTY,
    IsADirectory: errno.EISDIR,
    NotADirectory: errno.ENOTDIR,
    Stale: errno.ESTALE,
    ReadOnly: errno.EROFS,
    NameTooLong: errno.ENAMETOOLONG,
    FileTooLarge: errno.EFBIG,
    InvalidArgument: errno.EINVAL,
    OperationNotSupported: errno.EOPNOTSUPP,
    NoData: errno.ENODATA,
    UploadFailed: errno.EIO,
    FsError: errno.EIO,
    # store errors that reach the top unhandled
    NotFound: errno.ENOENT,
    PreconditionFailed: errno.ESTALE,
    Transient: errno.EIO,
    Corrupt: errno.EIO,  # S-INTEG-2: never served, never a retry the caller could win
    NotSupported: errno.EIO,
    StoreError: errno.EIO,
}


@contextlib.contextmanager
def first_error() -> Iterator[None]:
    """Turn an ExceptionGroup out of a nursery into its first real error.

    Concurrent store calls (a HEAD and a LIST side by side, parallel copies) run in nurseries,
    which wrap whatever fails in an ExceptionGroup; callers and the errno table want the error
    itself. Groups holding only cancellations pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        for exc in _leaves(group):
            if isinstance(exc, Exception):
                raise exc from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def errno_for(exc: BaseException) -> int | None:
    """The errno for a known error class, or None for an unexpected exception (a bug)."""
    for cls in type(exc).__mro__:
        code = _ERRNO.get(cls)
        if code is not None:
            return code
    return None
