"""Content-defined chunking at page granularity: where a chunked file's chunks begin and end.

Purpose: ``Chunker`` cuts a sequential stream only at 4 KiB page boundaries of the file, after a
page whose XXH3-64 is 0 modulo a divisor, within the min/max bounds of a ``ChunkPolicy``. Since a
cut depends only on the page's own content, boundaries move with inserted or removed pages and
re-synchronise after them (``docs/design/chunked-layout.md`` has the measurements).

Not thread-safe: one ``Chunker`` per stream, driven by the thread feeding it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import xxhash

from fusionfs.chunked.format import MAX_CHUNK

__all__ = ["ChunkPolicy", "Chunker", "chunk_lengths"]


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkPolicy:
    """Content-defined chunking at page granularity.

    A chunk ends after page p when it holds at least ``min_size`` bytes and
    ``xxh3_64(page p) % divisor == 0`` (``divisor = (avg_size - min_size) / page_size``), or when
    it reaches ``max_size``. The expected chunk size is then about ``avg_size``.
    """

    page_size: int = 4096
    min_size: int = 32 << 10
    avg_size: int = 128 << 10
    max_size: int = 512 << 10

    def __post_init__(self) -> None:
        p = self.page_size
        if p <= 0 or any(s % p for s in (self.min_size, self.avg_size, self.max_size)):
            raise ValueError("chunk sizes must be positive multiples of the page size")
        if not p <= self.min_size < self.avg_size <= self.max_size <= MAX_CHUNK:
            raise ValueError("need page_size <= min_size < avg_size <= max_size <= MAX_CHUNK")

    @property
    def divisor(self) -> int:
        return (self.avg_size - self.min_size) // self.page_size


def _as_is(view: memoryview) -> memoryview:
    return view


class Chunker:
    """Splits a sequential stream into chunks by a ``ChunkPolicy``. Not thread-safe.

    ``push(data)`` returns the chunks completed so far; ``flush()`` returns the last, partial one.
    A page (stream offsets ``k * page_size``) past the chunk's minimum size ends the chunk when
    its XXH3-64 is 0 modulo the policy's divisor, or when the chunk reaches its maximum size.

    Pages are judged where they lie in the pushed data. A chunk that lies within one pushed
    buffer of immutable bytes (a FUSE write's own buffer, usually) is a view of it, not a copy;
    a chunk that spans pushes, or comes from a mutable buffer, is copied once. Only the
    unfinished chunk's bytes (at most ``max_size``) are kept between pushes.
    """

    def __init__(self, policy: ChunkPolicy) -> None:
        self.policy = policy
        self._held: list[bytes | memoryview] = []  # the unfinished chunk's earlier bytes
        self._held_len = 0
        self._judged = 0  # bytes of the unfinished chunk already judged (a page multiple)

    def push(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        pol = self.policy
        page, lo, hi, div = pol.page_size, pol.min_size, pol.max_size, pol.divisor
        cut_hash = xxhash.xxh3_64_intdigest  # see docs/design/chunked-layout.md: not CRC-32
        out: list[bytes | memoryview] = []
        # Slices of immutable bytes stay valid whatever the caller does next (and after the
        # ``with`` below releases ``view``); anything else is copied: a caller may reuse it.
        immutable = isinstance(data, bytes) or isinstance(getattr(data, "obj", None), bytes)
        keep: Callable[[memoryview], bytes | memoryview] = _as_is if immutable else bytes
        with memoryview(data) as whole, whole.cast("B") as view:
            n = len(view)
            # offsets below are relative to the unfinished chunk's start; it starts at ``start``
            # in ``view`` (negative: in the bytes held from earlier pushes)
            start = -self._held_len
            pos = self._judged  # next page to judge, relative to the chunk start
            while start + pos + page <= n:
                end = pos + page
                if end < lo:  # pages before the minimum are never judged: skip to it
                    pos = lo - page
                    continue
                at = start + pos  # the page's offset in view (negative: it began earlier)
                if at >= 0:
                    cut = end >= hi or cut_hash(view[at : at + page]) % div == 0
                else:
                    cut = end >= hi or cut_hash(self._held_tail(-at) + view[: at + page]) % div == 0
                if cut:
                    if start >= 0:
                        out.append(keep(view[start : start + end]))
                    else:
                        out.append(b"".join([*self._held, view[: start + end]]))
                        self._held, self._held_len = [], 0
                    start += end
                    pos = 0
                else:
                    pos = end
            if start >= 0:
                self._held = [keep(view[start:])] if start < n else []
                self._held_len = n - start
            elif n:
                self._held.append(keep(view[:]))
                self._held_len += n
            self._judged = pos
        if len(self._held) > 64:  # many tiny pushes: keep the unfinished chunk in one piece
            self._held = [b"".join(self._held)]
        return out

    def _held_tail(self, count: int) -> bytes:
        """The last ``count`` bytes held from earlier pushes."""
        parts: list[bytes | memoryview] = []
        for piece in reversed(self._held):
            if count <= 0:
                break
            parts.append(piece[-count:] if count < len(piece) else piece)
            count -= len(piece)
        return b"".join(reversed(parts))

    def flush(self) -> bytes | None:
        """The remaining bytes as the last chunk (None if there are none); resets the chunker."""
        data = b"".join(self._held) if self._held_len else None
        self._held, self._held_len, self._judged = [], 0, 0
        return data


def chunk_lengths(data: bytes | memoryview, policy: ChunkPolicy | None = None) -> list[int]:
    """Chunk lengths for ``data`` in one piece (for tests and measurements)."""
    chunker = Chunker(policy or ChunkPolicy())
    lengths = [len(c) for c in chunker.push(data)]
    tail = chunker.flush()
    if tail is not None:
        lengths.append(len(tail))
    return lengths
