"""The object-store interface every backend implements, and the errors it may raise.

The interface is deliberately small and synchronous (boto3 is synchronous): the async side of
fusionfs calls it through ``trio.to_thread.run_sync`` under a ``trio.CapacityLimiter``, so a
backend method may block, but it must never block for ever: every backend bounds its retries by a
deadline and then raises.

Keys are ``str`` object keys *relative to the store's prefix*: the store adds and strips its
prefix itself, so the filesystem never sees it.

Errors: backends translate their native errors (botocore's, ``OSError``) in one place each into
the classes below. Nothing else may escape a store method.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Iterator, Mapping
from typing import BinaryIO, NewType, Protocol, runtime_checkable

from .checksum import Checksum

__all__ = [
    "Body",
    "Checksum",
    "Corrupt",
    "ETag",
    "Key",
    "ListPage",
    "NotFound",
    "NotSupported",
    "ObjectInfo",
    "ObjectStore",
    "PreconditionFailed",
    "StoreError",
    "Transient",
    "UploadPart",
    "body_size",
    "body_views",
]

Key = NewType("Key", str)
ETag = NewType("ETag", str)

#: What ``put`` stores: one buffer, or a tuple of buffers stored back to back (a pack of chunks
#: goes up without being joined into one buffer first: 8 MiB copied under the GIL per pack).
Body = bytes | memoryview | tuple[bytes | memoryview, ...]


def body_views(body: Body) -> list[memoryview]:
    """The non-empty pieces of ``body`` as byte views, in order."""
    pieces = body if isinstance(body, tuple) else (body,)
    views = [memoryview(p).cast("B") for p in pieces]
    return [v for v in views if v.nbytes]


def body_size(body: Body) -> int:
    """Bytes in ``body``."""
    if isinstance(body, tuple):
        return sum(memoryview(p).nbytes for p in body)
    return memoryview(body).nbytes


class StoreError(Exception):
    """A store operation failed for good (after any retries). Maps to EIO."""


class NotFound(StoreError):
    """The object (or bucket, or upload) does not exist."""


class PreconditionFailed(StoreError):
    """A conditional request failed: the object's ETag is no longer the one asked for."""


class Corrupt(StoreError):
    """Data failed its checksum, the same way on a second fetch: the object's bytes are not the
    ones its checksum vouches for (corrupt at rest, or on every path to it). Maps to EIO."""


class Transient(StoreError):
    """A failure worth retrying (throttling, 5xx, connection reset, timeout).

    Backends retry these themselves within their deadline; one escaping a store method means the
    deadline ran out.
    """


class NotSupported(StoreError):
    """The server does not implement this call (e.g. s3rver answers 501 to UploadPartCopy)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: Key
    size: int
    etag: ETag
    mtime_ns: int
    # User metadata (S3 ``x-amz-meta-*``), lower-case names without the prefix. Only HEAD and GET
    # fill it; LIST results carry ``None`` because S3's LIST does not return metadata.
    metadata: Mapping[str, str] | None = None
    # The full-object checksum of this version where the store knows one (S-INTEG-2): what the
    # server reports (HEAD with ChecksumMode=ENABLED), else what fusionfs recorded at upload.
    # None from LIST, and for objects without one (any other tool's upload to s3rver, say).
    checksum: Checksum | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ListPage:
    objects: builtins.list[ObjectInfo]
    # Common prefixes ("sub-directories"), each ending in the delimiter, relative to the store.
    prefixes: builtins.list[Key]
    # Opaque token to pass back for the next page, or None when this was the last page.
    continuation: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class UploadPart:
    number: int  # 1-based part number
    etag: ETag
    checksum: str | None = None  # the part's CRC32C as the server took it (base64), if any


@runtime_checkable
class ObjectStore(Protocol):
    """What fusionfs needs from an object store. All methods are thread-safe."""

    #: A short description for logs and ``fusionfs stats`` (never contains credentials).
    description: str

    def check(self) -> None:
        """Verify the store is reachable and usable (bucket exists, credentials work).

        Raises ``NotFound`` for a missing bucket/directory and ``StoreError`` (with a one-line,
        user-readable message) for anything else. Bounded in time (about 10 s).
        """

    def head(self, key: Key) -> ObjectInfo:
        """Size, ETag, mtime and user metadata of ``key``; ``NotFound`` if absent."""

    def get_head(self, key: Key, length: int) -> tuple[ObjectInfo, bytes]:
        """What ``head`` returns, plus the object's first ``length`` bytes (fewer if it is
        smaller), in one request where the store allows it: an S3 GET carries the same headers as
        a HEAD, so a small file's lookup and its read cost one round trip. ``NotFound`` if absent.
        """

    def get_range(self, key: Key, start: int, length: int, etag: ETag | None = None) -> bytes:
        """``length`` bytes of ``key`` from ``start`` (fewer only at the end of the object).

        With ``etag``, raises ``PreconditionFailed`` if the object is no longer that version
        (S3 ``If-Match``). Never returns a short read in the middle of an object: a body cut off
        mid-transfer is retried, then raised as ``Transient``.
        """

    def get_into(
        self, key: Key, start: int, length: int, out: BinaryIO, etag: ETag | None = None
    ) -> int:
        """Like ``get_range`` but streams into ``out`` (a writable file); returns bytes written."""

    def put(self, key: Key, data: Body, metadata: Mapping[str, str] | None = None) -> ETag:
        """Store ``data`` as ``key`` atomically (readers see the old or the new object, whole)."""

    def list(
        self,
        prefix: Key,
        delimiter: str | None = "/",
        continuation: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        """One page of keys starting with ``prefix``, in lexicographic order.

        With a delimiter, keys containing it after the prefix are rolled up into ``prefixes``.
        """

    def delete(self, key: Key) -> None:
        """Delete ``key``. Deleting an absent key is not an error (S3 semantics)."""

    def copy(
        self,
        src: Key,
        dst: Key,
        metadata: Mapping[str, str] | None = None,
        src_etag: ETag | None = None,
    ) -> ETag:
        """Server-side copy. With ``metadata``, the copy gets exactly that metadata (REPLACE);
        without, it keeps the source's. Objects above 5 GiB are copied part by part.
        ``PreconditionFailed`` if ``src_etag`` is given and no longer matches."""

    # -- multipart upload ---------------------------------------------------------------
    def create_multipart(self, key: Key, metadata: Mapping[str, str] | None = None) -> str:
        """Start a multipart upload to ``key``; returns the upload id."""

    def upload_part(
        self, key: Key, upload_id: str, number: int, data: bytes | memoryview
    ) -> UploadPart:
        """Upload part ``number`` (1..10000). Parts other than the last must be >= 5 MiB."""

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
        """Make part ``number`` a server-side copy of ``src[start:start+length]``.

        Raises ``NotSupported`` where the server lacks UploadPartCopy: callers fall back to
        reading the range and calling ``upload_part``.
        """

    def complete_multipart(
        self, key: Key, upload_id: str, parts: builtins.list[UploadPart]
    ) -> ETag:
        """Commit the upload: ``key`` appears atomically with the parts' bytes, in order."""

    def abort_multipart(self, key: Key, upload_id: str) -> None:
        """Abandon the upload and free its parts. Aborting an unknown upload is not an error."""


def iter_list(store: ObjectStore, prefix: Key, delimiter: str | None = "/") -> Iterator[ListPage]:
    """All pages of a listing, following continuation tokens."""
    token: str | None = None
    while True:
        page = store.list(prefix, delimiter=delimiter, continuation=token)
        yield page
        token = page.continuation
        if token is None:
            return
