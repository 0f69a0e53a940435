"""``FaultyStore``: an ``ObjectStore`` wrapper that injects faults, for tests.

It wraps another store and covers every method of the protocol. Operations are named by their
method names (``"get_range"``, ``"complete_multipart"``, ...; see ``OPS``); a misspelt name is a
``ValueError``, so an injection can never silently miss. Injections:

- ``fail(op, error, nth=1, times=1)``: counting from the moment of the call, the ``nth`` call of
  ``op`` and the ``times - 1`` after it raise ``error`` (an exception instance, or a class,
  instantiated with a message). ``nth=1`` is the next call.
- ``fail_rate(op, p, error, seed)``: each call of ``op`` fails with probability ``p``
  (reproducible for a given seed).
- ``stall(op, event=None, seconds=None)``: calls of ``op`` block until ``event`` is set, or
  ``seconds`` pass, or ``clear``/``release`` is called; then they proceed to the inner store.
  ``waiting(op)`` says how many calls are blocked right now.
- ``corrupt(op="get_range", times=None)``: flips one byte in the data returned by
  ``get_range`` (or written by ``get_into``): corruption in flight.
- ``keep_checksums()``: from then on act as a server that keeps full-object checksums (S3 with
  ``ChecksumMode=ENABLED``): the CRC32C of every object written through this wrapper (``put``,
  ``complete_multipart``, ``copy``) is reported by ``head`` and ``get_head`` while the object is
  that version. ``rot(key)``: flip one byte of the stored object, keeping the checksum of the
  original (corruption at rest; the object gets a new ETag, as a rewrite on S3 would).

``calls[op]`` counts every call, including the failed ones. Order within a call: count, stall,
fail, then the inner store, then corruption. The injected errors are raised as they are: there is
no retry loop here (that lives in the backends).

Thread-safe: the injection tables are guarded by one lock that is never held while a call blocks
or runs in the inner store.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import io
import random
import threading
import time
from collections.abc import Mapping
from typing import BinaryIO

from . import checksum as _checksum
from .base import (
    Body,
    Checksum,
    ETag,
    Key,
    ListPage,
    ObjectInfo,
    ObjectStore,
    UploadPart,
    body_views,
)

__all__ = ["OPS", "FaultyStore"]

#: The operation names, one per ``ObjectStore`` method.
OPS: tuple[str, ...] = (
    "check",
    "head",
    "get_head",
    "get_range",
    "get_into",
    "put",
    "list",
    "delete",
    "copy",
    "create_multipart",
    "upload_part",
    "upload_part_copy",
    "complete_multipart",
    "abort_multipart",
)

_Error = BaseException | type[BaseException]


@dataclasses.dataclass
class _Fail:
    error: _Error
    first: int  # 1-based call numbers of the op, inclusive
    last: int


@dataclasses.dataclass
class _Rate:
    p: float
    error: _Error
    rng: random.Random


@dataclasses.dataclass
class _Stall:
    event: threading.Event | None
    seconds: float | None
    released: threading.Event = dataclasses.field(default_factory=threading.Event)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown store operation {op!r}; expected one of {', '.join(OPS)}")


def _flip(data: bytes) -> bytes:
    if not data:
        return data
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


class FaultyStore:
    """Wraps ``inner`` and injects failures, stalls and corruption on request."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.description = f"faulty({inner.description})"
        #: Calls per operation name since creation (failed and stalled calls included).
        self.calls: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._fails: dict[str, list[_Fail]] = collections.defaultdict(list)
        self._rates: dict[str, _Rate] = {}
        self._stalls: dict[str, _Stall] = {}
        self._corrupt: dict[str, int | None] = {}
        self._waiting: collections.Counter[str] = collections.Counter()
        self._keep_checksums = False
        self._checksums: dict[Key, tuple[ETag, Checksum]] = {}

    # -- injection API ---------------------------------------------------------------------
    def fail(self, op: str, error: _Error, *, nth: int = 1, times: int = 1) -> None:
        """The ``nth`` next call of ``op`` (and ``times - 1`` more) raises ``error``."""
        _check_op(op)
        if nth < 1 or times < 1:
            raise ValueError("nth and times must be >= 1")
        with self._lock:
            first = self.calls[op] + nth
            self._fails[op].append(_Fail(error, first, first + times - 1))

    def fail_rate(self, op: str, p: float, error: _Error, seed: int = 0) -> None:
        """Each call of ``op`` raises ``error`` with probability ``p``."""
        _check_op(op)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        with self._lock:
            self._rates[op] = _Rate(p, error, random.Random(seed))

    def stall(
        self, op: str, event: threading.Event | None = None, seconds: float | None = None
    ) -> None:
        """Calls of ``op`` block until ``event`` is set, ``seconds`` pass, or a release."""
        _check_op(op)
        with self._lock:
            old = self._stalls.get(op)
            if old is not None:
                old.released.set()
            self._stalls[op] = _Stall(event, seconds)

    def corrupt(self, op: str = "get_range", *, times: int | None = None) -> None:
        """Flip a byte in the data ``op`` returns (``times`` calls, or until cleared)."""
        if op not in ("get_range", "get_into"):
            raise ValueError(f"corrupt() applies to get_range and get_into, not {op!r}")
        with self._lock:
            self._corrupt[op] = times

    def release(self, op: str | None = None) -> None:
        """Unblock stalled calls of ``op`` (all ops if ``None``) and remove those stalls."""
        if op is not None:
            _check_op(op)
        with self._lock:
            for name in [op] if op is not None else list(self._stalls):
                stall = self._stalls.pop(name, None)
                if stall is not None:
                    stall.released.set()

    def clear(self, op: str | None = None) -> None:
        """Remove every injection for ``op`` (all ops if ``None``), releasing stalled calls."""
        self.release(op)
        with self._lock:
            for table in (self._fails, self._rates, self._corrupt):
                if op is None:
                    table.clear()
                else:
                    table.pop(op, None)

    def waiting(self, op: str) -> int:
        """How many calls of ``op`` are blocked in a stall right now."""
        _check_op(op)
        with self._lock:
            return self._waiting[op]

    # -- machinery -----------------------------------------------------------------------------
    def _enter(self, op: str) -> None:
        error: _Error | None = None
        with self._lock:
            self.calls[op] += 1
            n = self.calls[op]
            stall = self._stalls.get(op)
            fails = self._fails.get(op)
            if fails:
                for rule in fails:
                    if rule.first <= n <= rule.last:
                        error = rule.error
                        break
                fails[:] = [rule for rule in fails if rule.last > n]
            rate = self._rates.get(op)
            if error is None and rate is not None and rate.rng.random() < rate.p:
                error = rate.error
            if stall is not None:
                self._waiting[op] += 1
        if stall is not None:
            try:
                self._block(stall)
            finally:
                with self._lock:
                    self._waiting[op] -= 1
        if error is not None:
            if isinstance(error, type):
                raise error(f"injected failure in {op} (call {n})")
            raise error

    @staticmethod
    def _block(stall: _Stall) -> None:
        deadline = None if stall.seconds is None else time.monotonic() + stall.seconds
        while not stall.released.is_set():
            if stall.event is not None and stall.event.is_set():
                return
            timeout = 0.01 if stall.event is not None else 0.1
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                timeout = min(timeout, left)
            stall.released.wait(timeout)

    def _should_corrupt(self, op: str) -> bool:
        with self._lock:
            if op not in self._corrupt:
                return False
            left = self._corrupt[op]
            if left is not None:
                if left <= 1:
                    del self._corrupt[op]
                else:
                    self._corrupt[op] = left - 1
            return True

    def keep_checksums(self) -> None:
        """Report the CRC32C of objects written from now on (see the module docstring)."""
        self._keep_checksums = True

    def rot(self, key: Key) -> None:
        """Flip one byte of ``key`` in the inner store, keeping its recorded checksum."""
        info = self.inner.head(key)
        kept = self._checksums.get(key)
        data = self.inner.get_range(key, 0, info.size)
        etag = self.inner.put(key, _flip(data), info.metadata)
        if kept is not None:
            with self._lock:
                self._checksums[key] = (etag, kept[1])

    def _record(self, key: Key, etag: ETag, pieces: builtins.list[memoryview] | None) -> None:
        if not self._keep_checksums:
            return
        if pieces is None:  # read what was stored
            size = self.inner.head(key).size
            pieces = [memoryview(self.inner.get_range(key, 0, size, etag))] if size else []
        algorithm = _checksum.UPLOAD_ALGORITHM
        crc = Checksum(algorithm, _checksum.compute_all(algorithm, pieces))
        with self._lock:
            self._checksums[key] = (etag, crc)

    def _with_checksum(self, info: ObjectInfo) -> ObjectInfo:
        with self._lock:
            kept = self._checksums.get(info.key)
        if kept is None or kept[0] != info.etag:
            return info
        return dataclasses.replace(info, checksum=kept[1])

    def close(self) -> None:
        """Close the inner store if it has a ``close`` (not part of ``ObjectStore``)."""
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    # -- ObjectStore -------------------------------------------------------------------------
    def check(self) -> None:
        self._enter("check")
        self.inner.check()

    def head(self, key: Key) -> ObjectInfo:
        self._enter("head")
        return self._with_checksum(self.inner.head(key))

    def get_head(self, key: Key, length: int) -> tuple[ObjectInfo, bytes]:
        self._enter("get_head")
        info, data = self.inner.get_head(key, length)
        info = self._with_checksum(info)
        return info, (_flip(data) if data and self._should_corrupt("get_range") else data)

    def get_range(self, key: Key, start: int, length: int, etag: ETag | None = None) -> bytes:
        self._enter("get_range")
        data = self.inner.get_range(key, start, length, etag)
        return _flip(data) if self._should_corrupt("get_range") else data

    def get_into(
        self, key: Key, start: int, length: int, out: BinaryIO, etag: ETag | None = None
    ) -> int:
        self._enter("get_into")
        if not self._should_corrupt("get_into"):
            return self.inner.get_into(key, start, length, out, etag)
        buffer = io.BytesIO()
        n = self.inner.get_into(key, start, length, buffer, etag)
        out.write(_flip(buffer.getvalue()))
        return n

    def put(self, key: Key, data: Body, metadata: Mapping[str, str] | None = None) -> ETag:
        self._enter("put")
        etag = self.inner.put(key, data, metadata)
        self._record(key, etag, body_views(data))
        return etag

    def list(
        self,
        prefix: Key,
        delimiter: str | None = "/",
        continuation: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        self._enter("list")
        return self.inner.list(prefix, delimiter, continuation, max_keys)

    def delete(self, key: Key) -> None:
        self._enter("delete")
        self.inner.delete(key)

    def copy(
        self,
        src: Key,
        dst: Key,
        metadata: Mapping[str, str] | None = None,
        src_etag: ETag | None = None,
    ) -> ETag:
        self._enter("copy")
        etag = self.inner.copy(src, dst, metadata, src_etag)
        self._record(dst, etag, None)
        return etag

    def create_multipart(self, key: Key, metadata: Mapping[str, str] | None = None) -> str:
        self._enter("create_multipart")
        return self.inner.create_multipart(key, metadata)

    def upload_part(
        self, key: Key, upload_id: str, number: int, data: bytes | memoryview
    ) -> UploadPart:
        self._enter("upload_part")
        return self.inner.upload_part(key, upload_id, number, data)

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
        self._enter("upload_part_copy")
        return self.inner.upload_part_copy(key, upload_id, number, src, start, length, src_etag)

    def complete_multipart(
        self, key: Key, upload_id: str, parts: builtins.list[UploadPart]
    ) -> ETag:
        self._enter("complete_multipart")
        etag = self.inner.complete_multipart(key, upload_id, parts)
        self._record(key, etag, None)
        return etag

    def abort_multipart(self, key: Key, upload_id: str) -> None:
        self._enter("abort_multipart")
        self.inner.abort_multipart(key, upload_id)
