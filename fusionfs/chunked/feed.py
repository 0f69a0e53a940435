"""Streaming a staged file into a ``ChunkWriter`` while it is being written (trio side).

Purpose: a staged file in a chunked directory feeds a ``ChunkWriter`` from its staging file as
bytes are staged sequentially (several MiB behind the write front), so ``close`` only waits for
the tail; a write behind what was already fed abandons the stream, and the commit feeds the whole
content again (unchanged chunks cost a hash, no upload).

Concurrency: state on the trio thread; ``ChunkWriter.feed``/``finish``/``close`` block, so they
run in worker threads under the layout's ``limiter``; the writer spreads the CPU work over the
mount's ``PackThreads``. The pump runs in the nursery the writer's ``wrote`` is given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from fusionfs.chunked.format import Manifest
from fusionfs.chunked.layout import ChunkedLayout
from fusionfs.chunked.packer import ChunkWriter

__all__ = ["FEED_STEP", "ChunkFeed"]

FEED_STEP = 4 << 20  # bytes read from staging and fed at a time
_FEED_LAG = 4 << 20  # stay this far behind the write front (kernel writeback reorders a little)


def _feed_pieces(writer: ChunkWriter, offset: int, pieces: list[bytes | memoryview]) -> None:
    for piece in pieces:
        writer.feed(offset, piece)
        offset += memoryview(piece).nbytes


class ChunkFeed:
    """Feeds one staged file's bytes, in order, into a ``ChunkWriter`` (trio side).

    ``read(off, n)`` returns the file's current bytes (staging over base) as a list of pieces,
    short at the end of the file. ``wrote`` is told of
    every write; ``finish`` feeds what is left and returns the manifest once its packs are
    durable. Abandon with ``close``.
    """

    def __init__(
        self,
        layout: ChunkedLayout,
        read: Callable[[int, int], Awaitable[list[bytes | memoryview]]],
        size: Callable[[], int],
    ) -> None:
        self._layout = layout
        self._read = read
        self._size = size
        self.writer = layout.new_writer()
        self.valid = True
        self.read_until = 0  # bytes [0, read_until) were taken from staging (or are being)
        self._idle = trio.Event()
        self._idle.set()
        self._progress = trio.Event()  # set (and replaced) each time a piece has been fed
        self.error: BaseException | None = None

    def wrote(self, off: int, nursery: trio.Nursery) -> None:
        """A write at ``off`` happened: feed what is far enough behind in the background."""
        if not self.valid:
            return
        if off < self.read_until:
            self.valid = False  # a byte already fed changed: the commit starts again
            return
        if self._idle.is_set() and self._size() - self.read_until >= FEED_STEP + _FEED_LAG:
            self._idle = trio.Event()
            nursery.start_soon(self._pump)

    async def _pump(self) -> None:
        try:
            while self.valid and self._size() - self.read_until >= FEED_STEP + _FEED_LAG:
                await self._feed_piece(FEED_STEP)
        except Exception as e:
            self.error = e
            self.valid = False
        finally:
            self._idle.set()
            self._advanced()

    async def keep_up(self, max_lag: int) -> None:
        """Wait while the feed is busy and more than ``max_lag`` bytes behind the write front.

        The staged file keeps only its newest writes in memory; a feed that falls further behind
        reads its bytes back from disk, which costs more CPU than the chunking itself on a busy
        machine. Awaited by a write before it is acknowledged, so the kernel holds the writing
        process back to the pace of the chunks going out."""
        while self.valid and not self._idle.is_set() and self._size() - self.read_until > max_lag:
            await self._progress.wait()

    def _advanced(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _feed_piece(self, n: int) -> None:
        start = self.read_until
        self.read_until += n
        pieces = await self._read(start, n)
        short = n - sum(memoryview(p).nbytes for p in pieces)
        if short > 0:
            pieces.append(bytes(short))
        await trio.to_thread.run_sync(
            _feed_pieces, self.writer, start, pieces, limiter=self._layout.limiter
        )
        self._advanced()

    async def finish(self, size: int) -> Manifest:
        """Feed ``[fed, size)`` and return the manifest (packs durable). Raises on failure."""
        await self._idle.wait()
        if not self.valid:
            raise self.error or ValueError("stream abandoned")
        while self.read_until < size:
            await self._feed_piece(min(FEED_STEP, size - self.read_until))
        manifest: Manifest = await trio.to_thread.run_sync(
            self.writer.finish, limiter=self._layout.limiter
        )
        return manifest

    async def close(self) -> None:
        self.valid = False
        await self._idle.wait()
        await trio.to_thread.run_sync(self.writer.close, limiter=self._layout.limiter)
