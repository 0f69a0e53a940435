"""Object stores: the ``ObjectStore`` protocol, its errors, and ``open_store``.

``open_store`` turns the SOURCE a user gives on the command line into a store:
``s3://BUCKET[/PREFIX]`` is an ``S3Store``; ``file:///abs/path`` or a plain path (relative paths
are resolved against the current directory, ``~`` is expanded) is a ``LocalStore``. Anything else
is a ``ValueError`` with a message fit for the user. Nothing is contacted here: call ``check()``
on the result to find out whether the bucket or directory is usable.

``S3Store`` is imported lazily (by ``open_store`` or on attribute access), so local use does not
pay for importing boto3.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from ..stats import Stats
from .base import (
    Checksum,
    Corrupt,
    ETag,
    Key,
    ListPage,
    NotFound,
    NotSupported,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    Transient,
    UploadPart,
    iter_list,
)
from .faulty import FaultyStore
from .local import LocalStore

if TYPE_CHECKING:
    from .s3 import S3Store

__all__ = [
    "Checksum",
    "Corrupt",
    "ETag",
    "FaultyStore",
    "Key",
    "ListPage",
    "LocalStore",
    "NotFound",
    "NotSupported",
    "ObjectInfo",
    "ObjectStore",
    "PreconditionFailed",
    "S3Store",
    "StoreError",
    "Transient",
    "UploadPart",
    "iter_list",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unsupported(source: str) -> ValueError:
    return ValueError(f"unsupported source {source!r}: use s3://bucket/prefix or a local directory")


def open_store(
    source: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    stats: Stats | None = None,
    sse: str | None = None,
    sse_kms_key_id: str | None = None,
    sign_payload: bool = False,
) -> ObjectStore:
    """The store named by ``source`` (see the module docstring). Does no I/O."""
    if not source or "\0" in source:
        raise _unsupported(source)
    if "://" not in source:
        return LocalStore(os.path.abspath(os.path.expanduser(source)), stats=stats)
    parts = urllib.parse.urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket or parts.query or parts.fragment or "@" in bucket:
            raise ValueError(
                f"unsupported source {source!r}: use s3://bucket/prefix "
                "(a bucket name is required; credentials go in the environment or a profile)"
            )
        from .s3 import S3Store

        return S3Store(
            bucket,
            parts.path.lstrip("/"),
            endpoint_url=endpoint_url,
            region=region,
            stats=stats,
            sse=sse,
            sse_kms_key_id=sse_kms_key_id,
            sign_payload=sign_payload,
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(
                f"unsupported source {source!r}: a file URL needs an absolute path, "
                "as in file:///abs/path"
            )
        return LocalStore(urllib.parse.unquote(parts.path), stats=stats)
    raise _unsupported(source)
