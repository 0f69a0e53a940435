"""Object versions and blocking store calls: what every read path and the writer share.

Purpose: ``ObjectRef`` names one version of one object (key and ETag, so bytes of two versions
are never mixed), and ``run_store_call`` runs one blocking store call in a worker thread under a
``trio.CapacityLimiter`` and the mount's store-call timeout. Plain reads (``reader``), chunked
reads (``chunked``), the writer and the filesystem all import them from here, so none of them
needs another to name an object or bound a call.

Caveat: a worker thread cannot be interrupted; when a call overruns its timeout the caller gets
``Transient`` and the thread is abandoned (the store's own deadline ends it later).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import trio

from fusionfs.errors import Stale
from fusionfs.store.base import Checksum, ETag, Key, NotFound, PreconditionFailed, Transient

__all__ = ["ObjectRef", "run_pinned_call", "run_store_call"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectRef:
    """One version of one object: what a chunk belongs to."""

    key: Key
    etag: ETag
    size: int
    chunked: bool = False  # a chunked-layout manifest: ``size`` is the logical size
    checksum: Checksum | None = None  # the version's full-object checksum, if known (S-INTEG-2)

    @property
    def verifiable(self) -> bool:
        return self.checksum is not None and not self.chunked


async def run_store_call(
    fn: Callable[[], T], *, limiter: trio.CapacityLimiter, timeout: float, what: str
) -> T:
    """Run a blocking store call in a worker thread, bounded by ``timeout`` seconds."""
    with trio.move_on_after(timeout) as scope:
        return await trio.to_thread.run_sync(fn, limiter=limiter, abandon_on_cancel=True)
    assert scope.cancelled_caught
    raise Transient(f"{what}: no answer from the store within {timeout:g} s")


async def run_pinned_call(
    fn: Callable[[], T], key: Key, *, limiter: trio.CapacityLimiter, timeout: float, what: str
) -> T:
    """``run_store_call`` for a call pinned to one version of ``key`` (``If-Match`` its ETag):
    a version that is gone or replaced meanwhile is ``Stale`` (S-READ-3)."""
    try:
        return await run_store_call(fn, limiter=limiter, timeout=timeout, what=what)
    except (PreconditionFailed, NotFound) as e:
        raise Stale(f"{key} changed in the store while being read") from e
