"""``S3Store``: the object store over S3 or any S3-compatible server, through boto3.

boto3's own retries are off (``max_attempts=1``): every request goes through
:func:`fusionfs.store.retry.call_with_retry`, bounded by ``deadline_s``, so there is exactly one
retry loop. Every botocore/urllib3 error is translated by :func:`translate_error`, the one place
that says which errors are transient; nothing else escapes a method.

Credentials, region and endpoint come from the standard AWS chain (environment variables,
profiles, instance roles; ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` are honoured by boto3
itself). Error messages and ``description`` never contain credentials.

Caveats:

- A GET body is read inside the retried function, so a body cut off mid-transfer is retried.
  ``get_into`` resumes after the bytes it already wrote, pinning the ETag of the first response
  with ``If-Match``: if the object is replaced between two attempts the call raises
  ``PreconditionFailed`` rather than mixing two versions, even when the caller passed no ETag.
- ``copy`` issues a HEAD of the source first (to learn its size, and to check ``src_etag``
  before sending ``CopySourceIfMatch``, which some servers, moto among them, ignore). Objects
  above 5 GiB are copied part by part with UploadPartCopy, pinned to the source's ETag; where
  the server answers NotImplemented the parts are read and uploaded instead. The content type is
  not carried over by a multipart copy.
- A ``complete_multipart`` whose response was lost and is then retried may get NoSuchUpload
  (the first attempt did complete): it raises ``NotFound``; callers that care may HEAD the key.
- The store's own root marker (the key equal to the prefix) is left out of listings.
- botocore's own request checksums are off (``request_checksum_calculation="when_required"``:
  botocore >= 1.36 would compute a CRC32 of every body itself). Instead every upload carries
  a CRC32C that this module computes (``x-amz-checksum-crc32c``, with
  ``x-amz-sdk-checksum-algorithm``; multipart uploads as type ``FULL_OBJECT``, each part with
  its own) while the payload stays ``UNSIGNED-PAYLOAD`` (S-INTEG-1). A server that refuses
  them (a 400 or 501 other than a checksum mismatch) is answered at once with the same
  request without them, and the mount sends none from then on (``limits``: "flexible
  checksums"). Whether the server keeps them is learnt from the first PUT's answer (it
  echoes the checksum): until it has been seen to, a single PUT also records its CRC32C in
  user metadata (``fusion-crc32c``), which ``head`` reports as the object's checksum where
  the server reports none (s3rver, Ceph RGW 16).
- ``head`` asks for the stored checksum (``ChecksumMode=ENABLED``) and returns it in
  ``ObjectInfo.checksum``; ``get_head`` does too (every GET carries ``x-amz-checksum-mode``,
  unknown to botocore, which therefore checks no body itself). The reader checks the bytes
  (S-INTEG-2).
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import datetime
import email.utils
import hashlib
import http.client
import itertools
import logging
import math
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO, TypeVar

import boto3
import botocore.exceptions as _bce
import botocore.session
import botocore.utils
import urllib3.exceptions
from botocore.config import Config

from ..stats import Stats
from . import checksum as _checksum
from .base import (
    Body,
    Checksum,
    ETag,
    Key,
    ListPage,
    NotFound,
    NotSupported,
    ObjectInfo,
    PreconditionFailed,
    StoreError,
    Transient,
    UploadPart,
    body_size,
    body_views,
)
from .retry import call_with_retry

__all__ = ["S3Store", "translate_error"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_MiB = 1 << 20
_GiB = 1 << 30
_READ_SIZE = _MiB
_MAX_SINGLE_COPY = 5 * _GiB
_MIN_PART = 5 * _MiB
_MAX_PARTS = 10_000
_COPY_PART = 512 * _MiB  # part size of a server-side multipart copy
_FALLBACK_PART = 64 * _MiB  # part size when UploadPartCopy is not supported (held in memory)
_FALLBACK_COPY = 64 * _MiB  # a copy the server cannot do: one GET + PUT up to this size
_MAX_ATTEMPTS = 10
_CHECK_DEADLINE_S = 6.0
#: User metadata that records an upload's CRC32C where the server keeps no checksum (S-INTEG-1).
CRC_METADATA = "fusion-crc32c"
#: Codes that mean "the body does not match its checksum": the body was hurt on the way, a
#: resend is the answer (never taken for a refusal of checksums).
_CHECKSUM_MISMATCH_CODES = frozenset({"BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest"})

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound"})
_PRECONDITION_CODES = frozenset({"412", "PreconditionFailed"})
_NOT_SUPPORTED_CODES = frozenset({"501", "NotImplemented", "405", "MethodNotAllowed"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",
        "InternalFailure",
        "500",
        "502",
        "503",
        "504",
        "BadDigest",
        "XAmzContentChecksumMismatch",
    }
)
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "403",
    }
)
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    _bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    _bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError (SSLError: see below)
    _bce.IncompleteReadError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    http.client.IncompleteRead,
    ConnectionError,
    TimeoutError,
)
#: How a body that ends before its Content-Length surfaces from ``body.read()``.
_SHORT_BODY: tuple[type[BaseException], ...] = (
    _bce.ResponseStreamingError,
    _bce.IncompleteReadError,
    urllib3.exceptions.ProtocolError,
    http.client.IncompleteRead,
)
_CREDENTIAL_EXCEPTIONS: tuple[type[BaseException], ...] = (
    _bce.NoCredentialsError,
    _bce.PartialCredentialsError,
    _bce.CredentialRetrievalError,
)


_loader_lock = threading.Lock()
_shared_loader: Any = None


def _new_session(region: str | None) -> Any:
    """A fresh boto3 session (credentials resolved anew) sharing one model loader.

    Loading the S3 service model costs about 0.3 s per session; the loader only caches
    read-only data, so sharing it is safe.
    """
    global _shared_loader
    core = botocore.session.get_session()
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _shared_loader)
    core.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_timestamp
    )
    return boto3.session.Session(botocore_session=core, region_name=region)


def parse_timestamp(value: Any) -> datetime.datetime:
    """botocore's timestamp parser, fast for the two forms S3 sends: ISO 8601 in XML bodies
    (``LastModified`` of each listed object) and RFC 1123 in headers (``Last-Modified``).

    botocore parses every timestamp with dateutil's generic parser: 98 us for an ISO 8601
    value, 140 us for an RFC 1123 one on this project's CI machines, so about 0.1 s of CPU per
    1000-entry LIST page; ``datetime.fromisoformat`` takes 0.4 us, ``parsedate_to_datetime``
    8 us. Anything else (epoch numbers, odd servers) goes to botocore's own parser."""
    if isinstance(value, str):
        parsed: datetime.datetime | None = None
        with contextlib.suppress(ValueError):
            parsed = datetime.datetime.fromisoformat(value)
        if parsed is None:
            with contextlib.suppress(ValueError, TypeError, IndexError):
                parsed = email.utils.parsedate_to_datetime(value)
        if parsed is not None:
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)
    result: datetime.datetime = botocore.utils.parse_timestamp(value)
    return result


class _AccessDenied(StoreError):
    """Credentials missing or refused (a ``StoreError`` for callers)."""


def _client_error_fields(err: _bce.ClientError) -> tuple[str, int]:
    response: Mapping[str, Any] = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _classify(err: BaseException) -> type[StoreError]:
    """Which ``StoreError`` class an error raised by boto3 (or by our own code) becomes."""
    if isinstance(err, StoreError):
        return type(err)
    if isinstance(err, _bce.ClientError):
        code, status = _client_error_fields(err)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound
        if code in _PRECONDITION_CODES or status == 412:
            return PreconditionFailed
        if code in _NOT_SUPPORTED_CODES or status in (405, 501):
            return NotSupported
        if code in _ACCESS_CODES or status == 403:
            return _AccessDenied
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
            return Transient
        return StoreError
    if isinstance(err, _CREDENTIAL_EXCEPTIONS):
        return _AccessDenied
    if isinstance(err, _bce.SSLError):
        return StoreError  # a certificate problem does not heal by retrying
    if isinstance(err, _TRANSIENT_EXCEPTIONS):
        return Transient
    return StoreError


def _is_transient(err: BaseException) -> bool:
    return _classify(err) is Transient


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def translate_error(err: BaseException, *, location: str, what: str = "") -> StoreError:
    """The ``StoreError`` (subclass) to raise for ``err``, with a one-line message.

    ``location`` is the ``s3://bucket/prefix[/key]`` the call was about and ``what`` the
    operation (``"get_range"``). ``StoreError``s pass through unchanged. The message never
    carries credentials: for refused credentials it says only where and what to check.
    """
    if isinstance(err, StoreError):
        return err
    cls = _classify(err)
    head = f"{what} {location}" if what else location
    if cls is _AccessDenied:
        if isinstance(err, _CREDENTIAL_EXCEPTIONS):
            return _AccessDenied(
                f"no usable AWS credentials for {location}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        return _AccessDenied(f"access denied to {location}: check credentials")
    if isinstance(err, _bce.ClientError):
        code, status = _client_error_fields(err)
        message = str(err.response.get("Error", {}).get("Message", "") or "")
        detail = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
        return cls(_one_line(f"{head}: {detail}"))
    if cls is Transient:
        return Transient(_one_line(f"{head}: {type(err).__name__}: {err}"))
    return cls(_one_line(f"{head}: {type(err).__name__}: {err}"))


def _mtime_ns(value: Any) -> int:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        delta: datetime.timedelta = value - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
        return (delta // datetime.timedelta(microseconds=1)) * 1000
    return 0


def _redact_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _is_aws_endpoint(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _lower_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata as sent and as returned: lower-case names, without ``CRC_METADATA`` (the
    store's own record, never the caller's: S-INTEG-1)."""
    return {k.lower(): v for k, v in (metadata or {}).items() if k.lower() != CRC_METADATA}


def _object_checksum(resp: Mapping[str, Any], trust_server: bool = True) -> Checksum | None:
    """The full-object checksum a HEAD or GET answer gives: the server's own (unless the server
    was caught computing wrong ones: S-SRV-6), else the CRC32C fusionfs recorded in metadata at
    upload (S-INTEG-1)."""
    found = _checksum.from_headers(resp) if trust_server else None
    if found is not None:
        return found
    recorded = (resp.get("Metadata") or {}).get(CRC_METADATA)
    if isinstance(recorded, str):
        value = _checksum.decode(_checksum.UPLOAD_ALGORITHM, recorded)
        if value is not None:
            return Checksum(_checksum.UPLOAD_ALGORITHM, value, source="metadata")
    return None


def _ask_for_checksum(request: Any, **_: Any) -> None:
    """``x-amz-checksum-mode: ENABLED`` on every GetObject, as a header botocore does not know
    about: a server then returns the stored checksum with a GET of a whole object (moto; S3
    never with a part range), which ``get_head`` reports. Passed as ``ChecksumMode``, botocore
    would check the body itself and fail the call: a corrupt small object would fail its lookup
    (``stat``, ``unlink``) instead of its reads (S-INTEG-2)."""
    request.headers["x-amz-checksum-mode"] = "ENABLED"


def _refuses_checksums(err: BaseException) -> bool:
    """Whether a request that carried flexible-checksum arguments was refused for them (a 400
    or 501 that is not a checksum mismatch). Only taken as such if the same request without
    them then succeeds (``S3Store._upload_call``)."""
    if not isinstance(err, _bce.ClientError):
        return False
    code, status = _client_error_fields(err)
    return status in (400, 501) and code not in _CHECKSUM_MISMATCH_CODES


def _etag(value: Any) -> ETag:
    """An ETag as HEAD, GET and LIST give it: in double quotes (S-STORE-1).

    Ceph RGW 16 answers CopyObject and UploadPartCopy with the ETag unquoted (its HEAD, GET and
    LIST quote it): taken as it is, the ETag a copy returned never equals the one a later HEAD
    or LIST shows, and every such file looks changed in the store. An empty value stays empty.
    """
    text = str(value or "").strip()
    if not text or text.startswith(('"', "W/")):
        return ETag(text)
    return ETag(f'"{text}"')


def _multipart_etag(parts: Sequence[UploadPart]) -> ETag | None:
    """The ETag S3 gives an object completed from ``parts``: the MD5 of the parts' binary MD5s,
    then ``-`` and the number of parts. None when a part's ETag is not a plain MD5 (SSE-KMS,
    say), where it cannot be computed."""
    digests = []
    for part in parts:
        text = part.etag.strip().strip('"')
        if len(text) != 32:
            return None
        try:
            digests.append(bytes.fromhex(text))
        except ValueError:
            return None
    md5 = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return ETag(f'"{md5}-{len(parts)}"')


def _part_size(size: int, preferred: int) -> int:
    """A part size >= ``preferred`` (and >= 5 MiB) that fits ``size`` in 10 000 parts."""
    needed = math.ceil(size / _MAX_PARTS)
    return max(_MIN_PART, preferred, math.ceil(needed / _MiB) * _MiB)


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``"bytes 0-99/1234"`` -> ``(0, 99, 1234)`` (total None for ``*``); None if unparsable."""
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    if unit != "bytes" or not first.isdigit() or not last.isdigit():
        return None
    return int(first), int(last), int(total) if total.strip().isdigit() else None


class _Malformed(StoreError):
    """A response that contradicts itself (a server fault that repeats): never retried."""


def _empty_or_malformed(resp: Mapping[str, Any], where: str) -> bool:
    """Whether a ranged GET's response says the object is empty (so its body is not read).

    A Content-Range whose last byte is at or past the object's total is malformed: s3rver
    answers a ranged GET of an empty object with ``206``, ``Content-Range: bytes 0-0/0`` and
    ``Content-Length: 1`` but no body, so reading it fails with IncompleteRead, the same way
    on every attempt. The headers already say the object is empty: that is the answer. Any
    other self-contradicting range raises ``_Malformed`` (not retried: it would recur).
    """
    parsed = _parse_content_range(resp.get("ContentRange"))
    if parsed is None:
        return False
    first, last, total = parsed
    if total == 0:
        return True
    if last < first or (total is not None and last >= total):
        raise _Malformed(
            f"{where}: malformed response (Content-Range {resp.get('ContentRange')!r})"
        )
    return False


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 0-99/1234" -> 1234 (None for "*" or a missing header)
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


class _Payload:
    """A request body that hands botocore views of the caller's buffers instead of copies.

    botocore wraps a ``bytes`` body of PutObject and UploadPart in ``io.BytesIO``, whose reads
    (urllib3 takes 128 KiB at a time) each copy a slice under the GIL; a ``memoryview`` is sent
    by ``socket.sendall`` as it is. 48 PUTs of 8 MiB to local s3rver: 5.2-5.8 ms of client CPU
    per PUT with ``bytes``, 4.6-4.8 with this. Several buffers (a ``Body`` tuple: a pack's
    chunks) are sent one after the other, never joined. It has what botocore and urllib3 use of
    a file: ``read`` (which may return less than asked, never nothing before the end),
    ``seek``/``tell`` (a payload-signing pass and botocore's resend after a failed send rewind
    it) and ``__len__`` (Content-Length). One per attempt of ``_call``.
    """

    def __init__(self, data: Body) -> None:
        self._views = body_views(data)
        self._starts = list(itertools.accumulate((v.nbytes for v in self._views), initial=0))
        self._size = self._starts[-1]
        self._pos = 0
        self._piece = 0  # the view holding self._pos (len(self._views) at the end)

    def __len__(self) -> int:
        return self._size

    def read(self, size: int | None = -1) -> memoryview:
        if self._pos >= self._size:
            return memoryview(b"")
        view = self._views[self._piece]
        at = self._pos - self._starts[self._piece]
        end = view.nbytes if size is None or size < 0 else min(view.nbytes, at + size)
        out = view[at:end]
        self._pos += end - at
        if end == view.nbytes:
            self._piece += 1
        if len(self._views) > 1 and (size is None or size < 0) and self._pos < self._size:
            # a read of "everything" must return everything
            rest = [out, *(self._views[self._piece :])]
            self._pos, self._piece = self._size, len(self._views)
            return memoryview(b"".join(rest))
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = min(max(0, base + offset), self._size)
        self._piece = bisect.bisect_right(self._starts, self._pos) - 1
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class S3Store:
    """An ``ObjectStore`` over one bucket and key prefix of an S3-compatible server."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        stats: Stats | None = None,
        deadline_s: float = 30.0,
        max_pool_connections: int = 64,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        max_single_copy: int = _MAX_SINGLE_COPY,
        sign_payload: bool = False,
    ) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        prefix = prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self._stats = stats
        self._deadline_s = deadline_s
        self._sse = sse
        self._sse_kms_key_id = sse_kms_key_id
        self._max_single_copy = max_single_copy
        self._sign_payload = sign_payload
        self._location = f"s3://{bucket}/{prefix.rstrip('/')}".rstrip("/")
        self._said_no_complete_etag = False  # logged once per store (S-STORE-1)
        #: Whether the server keeps the checksums uploads carry (None until the first PUT's
        #: answer says; S-INTEG-1). While not True, single PUTs record theirs in metadata.
        self.keeps_checksums: bool | None = None
        #: False once the server answered a copy with a checksum other than its source's: it
        #: computes checksums wrongly (moto without the ``crc32c`` package stores a CRC32 as
        #: the CRC32C), so what it reports is not checked from then on (S-SRV-6).
        self.trust_server_checksums = True
        self._session = _new_session(region)
        self._endpoint_url = endpoint_url
        # Path-style addressing for any endpoint other than AWS's own (given here, or through
        # AWS_ENDPOINT_URL / a profile, which boto3 resolves when it builds the client).
        self._path_style = endpoint_url is not None
        #: The boto3 client (thread-safe). Public for tests and tools; do not change its config.
        self.client: Any = self._make_client(
            max_pool_connections=max_pool_connections, connect_timeout=5, read_timeout=20
        )
        if not self._path_style and not _is_aws_endpoint(self.client.meta.endpoint_url):
            self._path_style = True
            self.client.close()
            self.client = self._make_client(
                max_pool_connections=max_pool_connections, connect_timeout=5, read_timeout=20
            )
        #: What this server was found unable to do (``"UploadPartCopy"``, ...), each logged
        #: once at INFO when first met; the fallback is taken without asking again where the
        #: limit covers every call (see ``_note_limit``).
        self.limits: set[str] = set()
        self._limits_lock = threading.Lock()
        endpoint = _redact_url(self.client.meta.endpoint_url)
        self.description = (
            f"{self._location} (endpoint {endpoint})" if self._path_style else self._location
        )

    # -- plumbing ----------------------------------------------------------------------
    def _make_client(
        self, *, max_pool_connections: int, connect_timeout: float, read_timeout: float
    ) -> Any:
        # SigV4 would otherwise hash every request body with SHA-256 (0.7 ms per MiB here,
        # on top of the upload), over http always and over https too unless a checksum header
        # is sent. UNSIGNED-PAYLOAD instead, as the AWS CRT (Mountpoint) does: TLS protects
        # the body on https, and chunked-layout data is hash-verified on every read.
        s3_config: dict[str, Any] = {"payload_signing_enabled": self._sign_payload}
        if self._path_style:
            s3_config["addressing_style"] = "path"
        config = Config(
            max_pool_connections=max_pool_connections,
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3=s3_config,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = self._session.client("s3", endpoint_url=self._endpoint_url, config=config)
        client.meta.events.register("before-sign.s3.GetObject", _ask_for_checksum)
        return client

    def _full(self, key: str) -> str:
        return self.prefix + key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _call(self, kind: str, key: str, fn: Callable[[], _T]) -> _T:
        location = self._where(key)

        def attempt() -> _T:
            if self._stats is not None:
                self._stats.count_request(kind)
            return fn()

        return call_with_retry(
            attempt,
            is_transient=_is_transient,
            deadline_s=self._deadline_s,
            max_attempts=_MAX_ATTEMPTS,
            stats=self._stats,
            what=f"{kind} {location}",
            translate=lambda err: translate_error(err, location=location, what=kind),
        )

    def _note_limit(self, limit: str, detail: str) -> None:
        """Record that the server cannot do ``limit``; logged once per store (per mount)."""
        with self._limits_lock:
            if limit in self.limits:
                return
            self.limits.add(limit)
        _log.info("%s: the server cannot do %s; %s", self.description, limit, detail)

    def _sse_args(self) -> dict[str, str]:
        args: dict[str, str] = {}
        if self._sse is not None:
            args["ServerSideEncryption"] = self._sse
        if self._sse_kms_key_id is not None:
            args["SSEKMSKeyId"] = self._sse_kms_key_id
        return args

    def _fetched(self, n: int) -> None:
        if self._stats is not None and n:
            self._stats.add("bytes_fetched", n)

    def _uploaded(self, n: int) -> None:
        if self._stats is not None and n:
            self._stats.add("bytes_uploaded", n)

    def close(self) -> None:
        """Close the client's connection pool (not part of ``ObjectStore``; optional)."""
        self.client.close()

    # -- ObjectStore -------------------------------------------------------------------
    def check(self) -> None:
        client = self._make_client(max_pool_connections=2, connect_timeout=2, read_timeout=5)
        endpoint = _redact_url(client.meta.endpoint_url)

        def attempt() -> None:
            try:
                client.head_bucket(Bucket=self.bucket)
            except _bce.ClientError as err:
                # Prefix-scoped policies may refuse HeadBucket yet allow the listing below.
                if _classify(err) is not _AccessDenied:
                    raise
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

        def translate(err: Exception) -> BaseException:
            cls = _classify(err)
            if cls is NotFound:
                return NotFound(f"bucket '{self.bucket}' does not exist at {endpoint}")
            if cls is Transient:
                detail = _one_line(f"{type(err).__name__}: {err}", 200)
                return StoreError(f"cannot reach S3 endpoint {endpoint}: {detail}")
            return translate_error(err, location=self._location, what="check")

        try:
            call_with_retry(
                attempt,
                is_transient=_is_transient,
                deadline_s=min(self._deadline_s, _CHECK_DEADLINE_S),
                max_attempts=4,
                stats=self._stats,
                what=f"check {self._location}",
                translate=translate,
            )
        finally:
            client.close()

    def head(self, key: Key) -> ObjectInfo:
        def fn() -> Any:
            return self.client.head_object(
                Bucket=self.bucket, Key=self._full(key), ChecksumMode="ENABLED"
            )

        resp = self._call("head", key, fn)
        return ObjectInfo(
            key=key,
            size=int(resp.get("ContentLength", 0)),
            etag=_etag(resp.get("ETag")),
            mtime_ns=_mtime_ns(resp.get("LastModified")),
            metadata=_lower_metadata(resp.get("Metadata")),
            checksum=_object_checksum(resp, self.trust_server_checksums),
        )

    def _ranged_get(
        self, args: dict[str, Any], seen: builtins.list[str] | None = None
    ) -> tuple[dict[str, Any], bytes] | None:
        """A ranged GetObject: the response and its whole body; None for 416 (no such range).

        ``seen`` (one list per retried call) remembers how the previous attempt's body fell
        short: the same short body twice in a row (same ETag, same bytes read of the same
        length) is the server's answer, not a connection that broke by chance, and raises
        ``_Malformed`` instead of being retried until the deadline."""
        try:
            resp: dict[str, Any] = self.client.get_object(**args)
        except _bce.ClientError as err:
            if _client_error_fields(err)[1] == 416:
                return None
            raise
        body = resp["Body"]
        try:
            where = f"GET s3://{args['Bucket']}/{args['Key']}"
            self._check_if_match(resp, args.get("IfMatch"), where)
            try:
                data: bytes = b"" if _empty_or_malformed(resp, where) else body.read()
            except _SHORT_BODY as err:
                if seen is not None:
                    signature = f"{resp.get('ETag')} {resp.get('ContentRange')} {err}"
                    if seen and seen[-1] == signature:
                        raise _Malformed(
                            f"{where}: the same short body twice ({_one_line(str(err), 160)})"
                        ) from err
                    seen.append(signature)
                raise
        finally:
            body.close()
        self._fetched(len(data))
        return resp, data

    @staticmethod
    def _check_if_match(resp: Mapping[str, Any], wanted: str | None, where: str) -> None:
        """``If-Match`` checked on our side too: s3rver ignores the header and sends the
        current version; bytes of another version must never be returned (S-READ-3)."""
        got = _etag(resp.get("ETag"))
        if wanted is not None and got and got != _etag(wanted):
            raise PreconditionFailed(
                f"{where}: ETag is {resp.get('ETag')}, expected {wanted} (If-Match)"
            )

    def get_head(self, key: Key, length: int) -> tuple[ObjectInfo, bytes]:
        if length <= 0:
            return self.head(key), b""

        seen: list[str] = []

        def fn() -> tuple[ObjectInfo, bytes] | None:
            got = self._ranged_get(
                {"Bucket": self.bucket, "Key": self._full(key), "Range": f"bytes=0-{length - 1}"},
                seen,
            )
            if got is None:  # an empty object has no byte 0
                return None
            resp, data = got
            content_range = resp.get("ContentRange")
            total = _total_from_content_range(content_range) if content_range else None
            if total is None:  # the server ignored Range and sent the whole object
                total = len(data)
                data = data[:length]
            if len(data) != min(length, total):
                raise Transient(
                    f"get_head {self._where(key)}: body cut short ({len(data)} of "
                    f"{min(length, total)} bytes)"
                )
            info = ObjectInfo(
                key=key,
                size=total,
                etag=_etag(resp.get("ETag")),
                mtime_ns=_mtime_ns(resp.get("LastModified")),
                metadata=_lower_metadata(resp.get("Metadata")),
                checksum=_object_checksum(resp, self.trust_server_checksums),
            )
            return info, data

        got = self._call("get_head", key, fn)
        return got if got is not None else (self.head(key), b"")

    def get_range(self, key: Key, start: int, length: int, etag: ETag | None = None) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length}")
        if length == 0:
            return b""
        seen: list[str] = []

        def fn() -> bytes:
            args: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self._full(key),
                "Range": f"bytes={start}-{start + length - 1}",
            }
            if etag is not None:
                args["IfMatch"] = etag
            got = self._ranged_get(args, seen)
            if got is None:  # start at or past the end
                return b""
            resp, data = got
            content_range = resp.get("ContentRange")
            if content_range is None:  # the server ignored Range and sent the whole object
                return data[start : start + length]
            total = _total_from_content_range(content_range)
            expected = length if total is None else max(0, min(length, total - start))
            if len(data) != expected:
                raise Transient(
                    f"get_range {self._where(key)}: body cut short ({len(data)} of "
                    f"{expected} bytes)"
                )
            return data

        return self._call("get_range", key, fn)

    def get_into(
        self, key: Key, start: int, length: int, out: BinaryIO, etag: ETag | None = None
    ) -> int:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length}")
        if length == 0:
            return 0
        written = 0
        pinned: str | None = etag

        def fn() -> int:
            nonlocal written, pinned
            if written >= length:
                return written
            pos = start + written
            args: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self._full(key),
                "Range": f"bytes={pos}-{start + length - 1}",
            }
            if pinned is not None:
                args["IfMatch"] = pinned
            try:
                resp = self.client.get_object(**args)
            except _bce.ClientError as err:
                if _client_error_fields(err)[1] == 416:
                    return written
                raise
            body = resp["Body"]
            try:
                where = f"GET {self._where(key)}"
                self._check_if_match(resp, pinned, where)
                if pinned is None:
                    pinned = resp.get("ETag") or None
                if _empty_or_malformed(resp, where):
                    return written
                content_range = resp.get("ContentRange")
                if content_range is None and pos > 0:
                    self._skip(body, pos)  # the server ignored Range
                while written < length:
                    chunk = body.read(min(_READ_SIZE, length - written))
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
                    self._fetched(len(chunk))
            finally:
                body.close()
            total = _total_from_content_range(content_range)
            if content_range is None:
                total = int(resp.get("ContentLength", 0))
            if total is not None and start + written < min(start + length, total):
                raise Transient(f"get_into {self._where(key)}: body cut short at {start + written}")
            return written

        return self._call("get_into", key, fn)

    @staticmethod
    def _skip(body: Any, count: int) -> None:
        while count > 0:
            chunk = body.read(min(_READ_SIZE, count))
            if not chunk:
                return
            count -= len(chunk)

    def put(self, key: Key, data: Body, metadata: Mapping[str, str] | None = None) -> ETag:
        crc = _checksum.encode(
            _checksum.UPLOAD_ALGORITHM,
            _checksum.compute_all(_checksum.UPLOAD_ALGORITHM, body_views(data)),
        )
        meta = _lower_metadata(metadata)
        if self.keeps_checksums is not True:
            meta[CRC_METADATA] = crc  # S-INTEG-1: where the server may keep none
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._full(key),
            "Metadata": meta,
            **self._sse_args(),
        }

        def call(extra: dict[str, Any]) -> Any:
            return self.client.put_object(Body=_Payload(data), **args, **extra)

        resp = self._upload_call("put", key, call, self._checksum_args(crc))
        self._uploaded(body_size(data))
        if self.keeps_checksums is None and "flexible checksums" not in self.limits:
            self.keeps_checksums = resp.get(f"Checksum{_checksum.UPLOAD_ALGORITHM}") == crc
            _log.info(
                "%s: the server %s the checksums uploads carry%s",
                self.description,
                "keeps" if self.keeps_checksums else "does not keep",
                "" if self.keeps_checksums else "; single PUTs record theirs in metadata",
            )
        return _etag(resp.get("ETag"))

    # -- flexible checksums (S-INTEG-1) -------------------------------------------------------
    def _checksum_args(self, crc: str | None = None) -> dict[str, Any]:
        """The flexible-checksum arguments of an upload: none once the server refused them."""
        if "flexible checksums" in self.limits:
            return {}
        args: dict[str, Any] = {"ChecksumAlgorithm": _checksum.UPLOAD_ALGORITHM}
        if crc is not None:
            args[f"Checksum{_checksum.UPLOAD_ALGORITHM}"] = crc
        return args

    def _upload_call(
        self, kind: str, key: Key, call: Callable[[dict[str, Any]], Any], extra: dict[str, Any]
    ) -> Any:
        """``call(extra)`` through the retry loop. A server that refuses the checksum
        arguments in ``extra`` gets the same request without them at once, in the same attempt
        (a quirk, not weather: never retried with them), and none from then on."""

        def fn() -> Any:
            if not extra or "flexible checksums" in self.limits:
                return call({})
            try:
                return call(extra)
            except _bce.ClientError as err:
                if not _refuses_checksums(err):
                    raise
                first = err
            resp = call({})  # succeeded without them: the refusal was theirs
            code, status = _client_error_fields(first)
            self._note_limit(
                "flexible checksums",
                f"{kind} with x-amz-checksum-* answered {code or 'error'} (HTTP {status}): "
                "uploads go without them; single PUTs record their CRC32C in metadata",
            )
            self.keeps_checksums = False
            return resp

        return self._call(kind, key, fn)

    def list(
        self,
        prefix: Key,
        delimiter: str | None = "/",
        continuation: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        full_prefix = self._full(prefix)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": full_prefix,
            "MaxKeys": max_keys,
        }
        if delimiter:
            args["Delimiter"] = delimiter
        if continuation is not None:
            args["ContinuationToken"] = continuation

        def fn() -> Any:
            return self.client.list_objects_v2(**args)

        resp = self._call("list", prefix, fn)
        cut = len(self.prefix)
        objects = [
            ObjectInfo(
                key=Key(item["Key"][cut:]),
                size=int(item.get("Size", 0)),
                etag=_etag(item.get("ETag")),
                mtime_ns=_mtime_ns(item.get("LastModified")),
            )
            for item in resp.get("Contents", [])
            if len(item["Key"]) > cut
        ]
        prefixes = [Key(item["Prefix"][cut:]) for item in resp.get("CommonPrefixes", [])]
        token = resp.get("NextContinuationToken") if resp.get("IsTruncated") else None
        return ListPage(objects=objects, prefixes=prefixes, continuation=token)

    def delete(self, key: Key) -> None:
        # S3 answers 204 for an absent key; a NotFound here means the bucket is gone.
        def fn() -> Any:
            return self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

        self._call("delete", key, fn)

    def copy(
        self,
        src: Key,
        dst: Key,
        metadata: Mapping[str, str] | None = None,
        src_etag: ETag | None = None,
    ) -> ETag:
        info = self.head(src)
        if src_etag is not None and info.etag != src_etag:
            raise PreconditionFailed(
                f"copy {self._where(src)}: ETag is {info.etag}, expected {src_etag}"
            )
        if info.size > self._max_single_copy:
            keep = metadata if metadata is not None else (info.metadata or {})
            return self._multipart_copy(src, dst, info, keep)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._full(dst),
            "CopySource": {"Bucket": self.bucket, "Key": self._full(src)},
            "MetadataDirective": "COPY" if metadata is None else "REPLACE",
            **self._sse_args(),
        }
        if metadata is not None:
            args["Metadata"] = _lower_metadata(metadata)
            if info.checksum is not None and info.checksum.source == "metadata":
                # the same bytes: their recorded CRC32C goes with them (S-INTEG-1)
                args["Metadata"][CRC_METADATA] = info.checksum.b64()
        if src_etag is not None:
            args["CopySourceIfMatch"] = src_etag

        def call(extra: dict[str, Any]) -> Any:
            return self.client.copy_object(**args, **extra)

        try:
            resp = self._upload_call("copy", dst, call, self._checksum_args())
        except (NotFound, NotSupported) as err:
            if isinstance(err, NotFound):
                # NoSuchKey for a source the HEAD above found: s3rver cannot copy from a key
                # holding "=" (its copy-source decoding). Unless the source went meanwhile
                # (then NotFound stands), that is an answer: copy through this host.
                again = self.head(src)
                if again.etag != info.etag:
                    raise PreconditionFailed(
                        f"copy {self._where(src)}: changed during the copy"
                    ) from err
            self._note_limit(
                "CopyObject of some keys",
                f"copy {self._where(src)} answered {type(err).__name__}: copying such objects "
                f"through this host (one GET and PUT up to {_FALLBACK_COPY >> 20} MiB, part by "
                "part above)",
            )
            keep = metadata if metadata is not None else (info.metadata or {})
            return self._copy_through_host(src, dst, info, keep)
        result = resp["CopyObjectResult"]
        self._check_server_checksum(f"copy {self._where(src)}", info.checksum, result)
        return _etag(result.get("ETag"))

    def _check_server_checksum(
        self, what: str, expected: Checksum | None, answer: Mapping[str, Any]
    ) -> None:
        """Compare the checksum the server computed for bytes whose checksum is known (a copy's)
        with it: a server that gets it wrong is not trusted for checksums again (S-SRV-6)."""
        if expected is None or not self.trust_server_checksums:
            return
        got = answer.get(f"Checksum{expected.algorithm}")
        if not isinstance(got, str) or got == expected.b64():
            return
        self.trust_server_checksums = False
        self.keeps_checksums = False  # single PUTs record their CRC32C in metadata from now on
        self._note_limit(
            "checksums right",
            f"{what}: the copy's {expected.algorithm} is {got}, its source's {expected.b64()} "
            "(moto without the crc32c package computes a CRC32 instead): the checksums it "
            "reports are not checked from now on, only those fusionfs records in metadata",
        )

    def _copy_through_host(
        self, src: Key, dst: Key, info: ObjectInfo, metadata: Mapping[str, str]
    ) -> ETag:
        """A copy the server cannot do itself: the source's bytes, pinned to its ETag, are
        read and written to ``dst`` with ``metadata``; one PUT up to ``_FALLBACK_COPY``, a
        multipart upload of ``_FALLBACK_PART`` parts above (one part in memory at a time).
        The source is checked again just before the PUT, so a source replaced meanwhile is
        ``PreconditionFailed``, not overwritten with the older bytes (a window of one
        request remains: S3 has no conditional PUT on most servers)."""
        if info.size > _FALLBACK_COPY:
            return self._multipart_copy(src, dst, info, metadata, server_side=False)
        data = self.get_range(src, 0, info.size, etag=info.etag) if info.size else b""
        if len(data) != info.size:
            raise PreconditionFailed(f"copy {self._where(src)}: source changed size")
        if self.head(src).etag != info.etag:
            raise PreconditionFailed(f"copy {self._where(src)}: changed during the copy")
        return self.put(dst, data, metadata)

    def _multipart_copy(
        self,
        src: Key,
        dst: Key,
        info: ObjectInfo,
        metadata: Mapping[str, str],
        *,
        server_side: bool = True,
    ) -> ETag:
        if "UploadPartCopy" in self.limits:
            server_side = False
        upload_id = self.create_multipart(dst, metadata)
        try:
            preferred = _COPY_PART if server_side else _FALLBACK_PART
            part_size = _part_size(info.size, min(preferred, self._max_single_copy))
            parts: list[UploadPart] = []
            pos = 0
            number = 1
            while pos < info.size:
                n = min(part_size, info.size - pos)
                if server_side:
                    try:
                        parts.append(
                            self.upload_part_copy(
                                dst, upload_id, number, src, pos, n, src_etag=info.etag
                            )
                        )
                    except NotSupported:
                        self._note_limit(
                            "UploadPartCopy", "copying large objects through this host"
                        )
                        server_side = False
                        if number == 1:
                            part_size = _part_size(
                                info.size, min(_FALLBACK_PART, self._max_single_copy)
                            )
                        continue
                else:
                    data = self.get_range(src, pos, n, etag=info.etag)
                    if len(data) != n:
                        raise PreconditionFailed(f"copy {self._where(src)}: source shrank")
                    parts.append(self.upload_part(dst, upload_id, number, data))
                pos += n
                number += 1
            return self.complete_multipart(dst, upload_id, parts)
        except BaseException:
            try:
                self.abort_multipart(dst, upload_id)
            except StoreError as err:
                _log.debug("abort of multipart copy to %s failed: %s", self._where(dst), err)
            raise

    def create_multipart(self, key: Key, metadata: Mapping[str, str] | None = None) -> str:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._full(key),
            "Metadata": _lower_metadata(metadata),
            **self._sse_args(),
        }

        def call(extra: dict[str, Any]) -> Any:
            return self.client.create_multipart_upload(**args, **extra)

        extra = self._checksum_args()
        if extra:  # one checksum over the whole object, whatever the parts (S-INTEG-1)
            extra["ChecksumType"] = "FULL_OBJECT"
        return str(self._upload_call("create_multipart", key, call, extra)["UploadId"])

    def upload_part(
        self, key: Key, upload_id: str, number: int, data: bytes | memoryview
    ) -> UploadPart:
        algorithm = _checksum.UPLOAD_ALGORITHM
        crc = _checksum.encode(algorithm, _checksum.compute(algorithm, data))

        def call(extra: dict[str, Any]) -> Any:
            return self.client.upload_part(
                Bucket=self.bucket,
                Key=self._full(key),
                UploadId=upload_id,
                PartNumber=number,
                Body=_Payload(data),
                **extra,
            )

        extra = self._checksum_args(crc)
        resp = self._upload_call("upload_part", key, call, extra)
        self._uploaded(memoryview(data).nbytes)
        sent = crc if extra and "flexible checksums" not in self.limits else None
        return UploadPart(number=number, etag=_etag(resp.get("ETag")), checksum=sent)

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
        if start < 0 or length <= 0:
            raise ValueError(f"bad range start={start} length={length}")
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._full(key),
            "UploadId": upload_id,
            "PartNumber": number,
            "CopySource": {"Bucket": self.bucket, "Key": self._full(src)},
            "CopySourceRange": f"bytes={start}-{start + length - 1}",
        }
        if src_etag is not None:
            args["CopySourceIfMatch"] = src_etag

        def fn() -> Any:
            return self.client.upload_part_copy(**args)

        resp = self._call("upload_part_copy", key, fn)
        result = resp["CopyPartResult"]
        crc = result.get(f"Checksum{_checksum.UPLOAD_ALGORITHM}")
        return UploadPart(
            number=number,
            etag=_etag(result.get("ETag")),
            checksum=crc if isinstance(crc, str) else None,
        )

    def complete_multipart(
        self, key: Key, upload_id: str, parts: builtins.list[UploadPart]
    ) -> ETag:
        ordered = sorted(parts, key=lambda p: p.number)
        field = f"Checksum{_checksum.UPLOAD_ALGORITHM}"
        with_crc = "flexible checksums" not in self.limits and all(p.checksum for p in ordered)
        listed: list[dict[str, Any]] = []
        for p in ordered:
            listed.append({"PartNumber": p.number, "ETag": p.etag})
            if with_crc:
                listed[-1][field] = p.checksum
        payload = {"Parts": listed}

        def fn() -> Any:
            return self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self._full(key),
                UploadId=upload_id,
                MultipartUpload=payload,
            )

        resp = self._call("complete_multipart", key, fn)
        etag = _etag(resp.get("ETag"))
        if etag:
            return etag
        # Ceph RGW 16 answers <ETag></ETag>: the object's ETag is the one S3 defines for these
        # parts (what its HEAD and LIST then show), else whatever a HEAD says now.
        computed = _multipart_etag(ordered)
        if not self._said_no_complete_etag:
            self._said_no_complete_etag = True
            _log.info(
                "%s: the server answers CompleteMultipartUpload without an ETag; %s",
                self.description,
                "computing it from the parts" if computed else "asking HEAD for it",
            )
        return computed if computed is not None else self.head(key).etag

    def abort_multipart(self, key: Key, upload_id: str) -> None:
        def fn() -> Any:
            return self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._full(key), UploadId=upload_id
            )

        try:
            self._call("abort_multipart", key, fn)
        except NotFound:
            pass
        except NotSupported:
            # s3rver answers 405 to AbortMultipartUpload: the upload was never completed, so
            # nothing is visible; its parts stay on the server until the bucket goes
            self._note_limit("AbortMultipartUpload", "abandoned uploads are left to the server")
