"""The staging files' disk I/O, their crash records, and recovery of what a dead daemon left.

Purpose: the blocking half of ``fusionfs.writer`` (which runs these functions in worker
threads): create a staging file with a second O_DIRECT descriptor, write a batch of queued
writes (aligned stretches past the page cache), read back aligned ranges past it, and keep the
small JSON crash record beside each staging file; at mount, ``recover_leftovers`` moves what a
daemon that died left into ``recovered/``. ``docs/design/staging.md`` says what a crash leaves
at each step; ``docs/design/data-path.md`` why O_DIRECT.

Caveats: a filesystem that refuses O_DIRECT (tmpfs) gets ``-1`` for the direct descriptor, or a
``None``/``False`` answer at its first refusal, and the caller goes on buffered. Nothing here
touches trio: every function blocks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from fusionfs.directio import ALIGN, O_DIRECT, round_up, thread_buffer
from fusionfs.store.base import Key, ObjectStore, StoreError

__all__ = [
    "close_and_remove",
    "crash_record",
    "open_staging",
    "pread_direct",
    "recover_leftovers",
    "write_batch",
    "write_record",
]


def open_staging(path: Path) -> tuple[int, int]:
    """Create a staging file: a read-write fd, and a second one with O_DIRECT (-1 where the
    filesystem refuses O_DIRECT)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    dfd = -1
    if O_DIRECT:
        try:
            dfd = os.open(path, os.O_RDWR | os.O_CLOEXEC | O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                os.close(fd)
                raise
    return fd, dfd


_DIRECT_BUFFER = 8 << 20  # bytes copied and written with O_DIRECT at a time


def pread_direct(dfd: int, length: int, off: int) -> bytes | None:
    """``length`` bytes at the block-aligned ``off`` read with O_DIRECT into this thread's
    buffer and copied out; None if the filesystem refuses (read buffered instead).

    Why: what is read back from staging (a streamed part, a chunk-feed step behind the writes
    held in memory) was written with O_DIRECT, so a buffered read would first fill new
    page-cache pages from disk, then copy: a GiB of fresh pages per GiB uploaded, which on VMs
    whose balloon returns free memory to the host is the dearest step (see write_batch). The
    kernel writes back any dirty cached pages of the range before an O_DIRECT read, so bytes
    written through the buffered fd (unaligned heads and tails) are seen too."""
    if length <= 0:
        return b""
    padded = round_up(length)
    buf = thread_buffer(padded)
    view = memoryview(buf)[:padded]
    try:
        try:
            n = os.preadv(dfd, [view], off)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise
        return bytes(view[: min(n, length)])
    finally:
        view.release()


def write_batch(fd: int, batch: Sequence[tuple[int, bytes | None]], dfd: int = -1) -> bool:
    """pwrite a batch of (offset, data), contiguous neighbours together, in order; an entry
    whose data is None truncates the file to its offset.

    With ``dfd`` (the staging file opened with O_DIRECT), the block-aligned part of each stretch
    that starts on a block boundary is copied into a reused aligned buffer and written past the
    page cache; the rest (an unaligned start, the tail of the file) goes through ``fd``. The
    kernel keeps the two coherent (an O_DIRECT write flushes and drops cached pages of its
    range). Why: on this project's CI machines (a VM whose balloon reports free pages), new
    page-cache pages plus ext4's block allocation at writeback cost 1.7 ms of CPU per MiB,
    O_DIRECT 0.12 ms plus 0.1 ms for the copy; see docs/design/data-path.md. Returns False if
    the filesystem refused O_DIRECT (the caller stops using ``dfd``; nothing was lost).
    """
    direct_ok = True
    i = 0
    while i < len(batch):
        off, data = batch[i]
        i += 1
        if data is None:
            os.ftruncate(fd, off)
            continue
        bufs: list[bytes | memoryview] = [data]
        end = off + len(data)
        while i < len(batch) and batch[i][0] == end and len(bufs) < 512:
            nxt = batch[i][1]
            if nxt is None:
                break
            bufs.append(nxt)
            end += len(nxt)
            i += 1
        if dfd >= 0 and direct_ok and off % ALIGN == 0 and end - off >= ALIGN:
            try:
                done = _write_direct(dfd, bufs, off, end)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                direct_ok, done = False, 0
            if done:
                bufs = _skip(bufs, done)
                off += done
        if off < end:
            _pwrite_all(fd, bufs, off)
    return direct_ok


def _write_direct(dfd: int, bufs: list[bytes | memoryview], off: int, end: int) -> int:
    """Write the block-aligned head of ``bufs`` (``end - off`` bytes at ``off``) with O_DIRECT;
    how many bytes it wrote (a multiple of the block size)."""
    total = (end - off) // ALIGN * ALIGN
    buf = thread_buffer(_DIRECT_BUFFER)
    done = 0
    src = iter(bufs)
    pending = memoryview(b"")
    while done < total:
        n = min(_DIRECT_BUFFER, total - done)
        filled = 0
        while filled < n:
            if not pending:
                pending = memoryview(next(src)).cast("B")
            take = min(n - filled, len(pending))
            buf[filled : filled + take] = pending[:take]
            pending = pending[take:]
            filled += take
        view = memoryview(buf)[:n]
        try:
            written = 0
            while written < n:
                w = os.pwrite(dfd, view[written:], off + done + written)
                if w <= 0:
                    raise OSError(errno.EIO, "O_DIRECT pwrite wrote nothing")
                written += w
        finally:
            view.release()
        done += n
    return done


def _skip(bufs: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """``bufs`` without its first ``n`` bytes."""
    out: list[bytes | memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(memoryview(b)[n:] if n else b)
        n = 0
    return out


def _pwrite_all(fd: int, bufs: list[bytes | memoryview], off: int) -> None:
    end = off + sum(len(b) for b in bufs)
    written = os.pwritev(fd, bufs, off)
    if written != end - off:  # short write: finish it plainly
        rest = b"".join(bufs)[written:]
        while rest:
            n = os.pwrite(fd, rest, off + written)
            written += n
            rest = rest[n:]


def crash_record(key: Key, upload_id: str | None, data_path: Path) -> dict[str, object]:
    """The crash record kept beside a staging file (see ``recover_leftovers``)."""
    return {"key": key, "created": time.time(), "upload_id": upload_id, "data": data_path.name}


def close_and_remove(fd: int, data: Path, record: Path, dfd: int = -1) -> None:
    os.close(fd)
    if dfd >= 0:
        os.close(dfd)
    _remove_quietly(data, record)


def write_record(path: Path, record: dict[str, object]) -> None:
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:12]}.tmp")  # two writers never share a temp
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _remove_quietly(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def recover_leftovers(staging_dir: Path, recovered_dir: Path, store: ObjectStore) -> list[str]:
    """At mount: move staged files left by a daemon that died into ``recovered_dir``.

    Their data was never acknowledged (fsync/close would have committed it), so it is not
    uploaded (that could overwrite a newer version written elsewhere): it is kept and reported.
    Multipart uploads they had started are aborted. Returns one message per file kept.
    """
    messages = []
    for record_path in sorted(staging_dir.glob("*.json")):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        data = staging_dir / str(record.get("data", record_path.stem + ".data"))
        upload_id = record.get("upload_id")
        key = str(record.get("key", "?"))
        if upload_id:
            with contextlib.suppress(StoreError):
                store.abort_multipart(Key(key), str(upload_id))
        if data.exists() and data.stat().st_size > 0:
            recovered_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            target = recovered_dir / f"{record_path.stem}.data"
            os.replace(data, target)
            (recovered_dir / record_path.name).write_text(json.dumps(record))
            messages.append(f"unsaved data of '{key}' from an earlier run kept in {target}")
        _remove_quietly(record_path, data)
    for stray in staging_dir.glob("*"):
        _remove_quietly(stray)
    return messages
