"""``snapstore check``: will a checkpoint fit the window on this machine, before relying on it?

It measures, through the snapshot root's own mount, the rate at which a checkpoint's memory
goes out, and compares the estimated checkpoint times with the window:

1. A sample (``--sample-mib``, default 256 MiB) is written into a scratch directory below the
   root, laid out as a snapshot's images are (chunked layout, write-behind), then fsync'd: the
   rate of *new* memory (compression, hashing, upload through the link). The sample is the
   task's own memory with ``--pid`` (read from ``/proc/PID/mem``, so its compressibility is
   the task's), else random bytes (incompressible: the worst case).
2. The same sample is written again into a second directory that de-duplicates against the
   first, as an incremental snapshot does: the rate of *unchanged* memory (CRIU's copy and
   hashing, nothing uploaded).
3. The task's size is ``--size``, or the resident memory of the process tree of ``--pid``; its
   churn is ``--churn`` (the fraction of memory changed between the last periodic checkpoint
   and the notice), or, with ``--pid``, measured over ``--measure`` seconds: with the kernel's
   soft-dirty bits (``/proc/PID/clear_refs``, ``/proc/PID/pagemap`` bit 55) where the kernel
   tracks them, else by comparing a CRC of every 128 KiB block of the task's memory before and
   after (the chunked layout de-duplicates at about that granularity). That gives the longest
   ``--checkpoint-interval`` that keeps the final checkpoint inside the window.

Estimates: a full checkpoint takes ``FIXED_S + size / new_rate``; an incremental one
``FIXED_S + size * (1 - churn) / same_rate + size * churn / new_rate``. Both are compared with
the deadline (window minus margin, as ``snapstore run`` computes it). The scratch directories
are removed; the chunks of the sample are freed by the root's next garbage collection, as a
removed snapshot's are. The sample holds process memory when ``--pid`` is given: it is written
only below the root, where snapshots (which hold the same memory) already are.

Exit codes: 0 both fit, 3 only an incremental checkpoint fits (use ``--checkpoint-interval``),
4 neither fits, 2 bad usage, 1 a failed measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from fusionfs import client as fusion_client
from snapstore.errors import SnapstoreError, UsageError
from snapstore.root import Root

__all__ = [
    "EXIT_FULL_TOO_SLOW",
    "EXIT_NOTHING_FITS",
    "CheckResult",
    "parse_size",
    "run_check",
]

EXIT_FULL_TOO_SLOW = 3
EXIT_NOTHING_FITS = 4
FIXED_S = 1.0  # freezing, CRIU's walk of the task, the commit: measured 0.3-1 s here
_BLOCK = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
CHURN_BLOCK = 128 << 10
_SOFT_DIRTY = 1 << 55
_PRESENT = 1 << 63


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5GiB``, ``123456`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if m is None:
        raise UsageError(f"not a size: {text!r} (e.g. 4G, 512M, 1073741824)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise UsageError(f"the size must be positive, not {text!r}")
    return value


@dataclasses.dataclass
class CheckResult:
    window: float
    deadline: float
    size: int
    size_from: str
    sample_bytes: int
    sample_from: str
    new_rate: float  # bytes of task memory per second, new
    same_rate: float  # bytes per second, unchanged since the previous snapshot
    churn: float  # fraction changed at the notice
    churn_from: str
    churn_rate: float | None  # bytes per second (measured with --pid)
    full_s: float
    incremental_s: float
    max_interval_s: float | None

    @property
    def full_fits(self) -> bool:
        return self.full_s <= self.deadline

    @property
    def incremental_fits(self) -> bool:
        return self.incremental_s <= self.deadline

    @property
    def exit_code(self) -> int:
        if self.full_fits:
            return 0
        return EXIT_FULL_TOO_SLOW if self.incremental_fits else EXIT_NOTHING_FITS


def _tree(pid: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        raise UsageError(f"no process {pid}") from None
    except psutil.Error as err:
        raise UsageError(f"cannot inspect process {pid}: {err}") from None


def _rss(pid: int) -> int:
    total = 0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _private_ranges(pid: int) -> Iterator[tuple[int, int]]:
    """Writable private mappings of ``pid`` (what a checkpoint writes out)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            perms = fields[1]
            if "w" in perms and "p" in perms and not line.rstrip().endswith("[vsyscall]"):
                yield lo, hi


def _private_blocks(pid: int, size: int) -> Iterator[tuple[int, int, bytes]]:
    """``(pid, address, bytes)`` of every ``size``-byte block of the writable private memory of
    the tree of ``pid``; a mapping that stops being readable (unmapped meanwhile) ends there."""
    for proc in _tree(pid):
        try:
            mem = open(f"/proc/{proc.pid}/mem", "rb", buffering=0)
            ranges = list(_private_ranges(proc.pid))
        except OSError:
            continue
        with mem:
            for lo, hi in ranges:
                for off in range(lo, hi, size):
                    try:
                        mem.seek(off)
                        block = mem.read(min(size, hi - off))
                    except OSError:
                        break
                    if not block:
                        break
                    yield proc.pid, off, block


def _memory_sample(pid: int, limit: int) -> Iterator[bytes]:
    """Up to ``limit`` bytes of the task's private memory, in blocks (resident parts only)."""
    left = limit
    for _, _, block in _private_blocks(pid, _BLOCK):
        block = block[:left]
        left -= len(block)
        yield block
        if left <= 0:
            return


def _random_sample(limit: int) -> Iterator[bytes]:
    left = limit
    while left > 0:
        n = min(_BLOCK, left)
        left -= n
        yield os.urandom(n)


def _write(path: Path, blocks: list[bytes], progress: Callable[[str], None], what: str) -> float:
    """Write the blocks to ``path``, fsync, close; seconds taken."""
    total = sum(len(b) for b in blocks)
    started = time.monotonic()
    done = 0
    last_note = started
    with open(path, "wb", buffering=0) as f:
        for block in blocks:
            f.write(block)
            done += len(block)
            now = time.monotonic()
            if now - last_note >= 1.0:
                last_note = now
                progress(
                    f"{what}: {done / 1e6:.0f}/{total / 1e6:.0f} MB written "
                    f"({done / 1e6 / (now - started):.0f} MB/s)"
                )
        os.fsync(f.fileno())
    return max(1e-6, time.monotonic() - started)


def soft_dirty_works() -> bool:
    """Whether this kernel tracks soft-dirty pages (CONFIG_MEM_SOFT_DIRTY), tried on ourselves."""
    page = mmap.mmap(-1, _PAGE)
    page[0] = 1
    anchor = ctypes.c_char.from_buffer(page)
    addr = ctypes.addressof(anchor)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4")
        page[0] = 2  # written after the clear: soft-dirty again where the kernel tracks it
        with open("/proc/self/pagemap", "rb", buffering=0) as pm:
            pm.seek(addr // _PAGE * 8)
            entry = int.from_bytes(pm.read(8), "little")
    except OSError:
        return False
    finally:
        del anchor
        page.close()
    return bool(entry & _SOFT_DIRTY)


def _block_sums(pid: int) -> dict[tuple[int, int], int]:
    """A CRC of every ``CHURN_BLOCK`` of the tree's private memory (the chunked layout's
    de-duplication works at about that granularity)."""
    return {(p, off): zlib.crc32(block) for p, off, block in _private_blocks(pid, CHURN_BLOCK)}


def _hashed_churn(pid: int, seconds: float) -> float:
    """Bytes per second the tree of ``pid`` changed over ``seconds``, by comparing checksums
    of its memory blocks before and after (for kernels without soft-dirty tracking)."""
    started = time.monotonic()
    before = _block_sums(pid)
    time.sleep(seconds)  # the measurement itself: the task runs and writes meanwhile
    after = _block_sums(pid)
    changed = sum(1 for key, crc in after.items() if before.get(key) != crc)
    return changed * CHURN_BLOCK / max(1e-3, time.monotonic() - started)


def _soft_dirty_churn(pid: int, seconds: float) -> float:
    """Bytes per second the tree of ``pid`` dirtied over ``seconds`` (soft-dirty bits)."""
    procs = _tree(pid)
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                f.write("4")
        except OSError as err:
            raise SnapstoreError(
                f"cannot clear the soft-dirty bits of {proc.pid} ({err.strerror}): pass --churn"
            ) from None
    started = time.monotonic()
    time.sleep(seconds)  # the measurement itself: the task runs and dirties pages meanwhile
    dirty = 0
    for proc in procs:
        try:
            ranges = list(_private_ranges(proc.pid))
            pagemap = open(f"/proc/{proc.pid}/pagemap", "rb", buffering=0)
        except OSError:
            continue
        with pagemap:
            for lo, hi in ranges:
                pagemap.seek(lo // _PAGE * 8)
                raw = pagemap.read((hi - lo) // _PAGE * 8)
                for i in range(0, len(raw), 8):
                    entry = int.from_bytes(raw[i : i + 8], "little")
                    if entry & _SOFT_DIRTY and entry & _PRESENT:
                        dirty += 1
    return dirty * _PAGE / max(1e-3, time.monotonic() - started)


def run_check(
    root: Root,
    *,
    window: float,
    deadline: float,
    size: int | None,
    pid: int | None,
    churn: float | None,
    interval: float,
    measure_s: float,
    sample_bytes: int,
    progress: Callable[[str], None],
) -> CheckResult:
    if pid is not None:
        size_from = f"resident memory of process {pid} and its children"
        size = _rss(pid)
        blocks = list(_memory_sample(pid, sample_bytes))
        sample_from = f"process {pid}'s memory"
        if not blocks:
            raise SnapstoreError(f"could not read any memory of process {pid}")
    else:
        assert size is not None
        size_from = "--size"
        blocks = list(_random_sample(sample_bytes))
        sample_from = "random bytes (incompressible: the worst case; --pid uses the task's own)"
    sample = sum(len(b) for b in blocks)
    scratch = root.path / f".check-{os.getpid()}"
    first, second = scratch / "a", scratch / "b"
    try:
        for d in (scratch, first, second):
            d.mkdir(exist_ok=True)
        if root.mountpoint is not None:
            fusion_client.set_layout(scratch, "chunked")
            for d in (first, second):
                with contextlib.suppress(OSError):
                    fusion_client.set_write_behind(d)
        new_s = _write(first / "sample", blocks, progress, "new memory")
        progress(f"new memory: {sample / 1e6:.0f} MB in {new_s:.2f} s")
        if root.mountpoint is not None:
            with contextlib.suppress(OSError):
                fusion_client.dedup_from(second, first.relative_to(Path(root.mountpoint)))
        same_s = _write(second / "sample", blocks, progress, "unchanged memory")
        progress(f"unchanged memory: {sample / 1e6:.0f} MB in {same_s:.2f} s")
    except OSError as err:
        raise SnapstoreError(f"cannot measure below {root.path}: {err}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    new_rate, same_rate = sample / new_s, sample / same_s
    churn_rate: float | None = None
    if churn is None and pid is not None:
        progress(f"measuring how fast process {pid} changes its memory for {measure_s:g} s")
        if soft_dirty_works():
            churn_rate = _soft_dirty_churn(pid, measure_s)
            churn_from = f"soft-dirty pages over {measure_s:g} s"
        else:  # this kernel has no soft-dirty tracking (CRIU's check: mem_dirty_track)
            churn_rate = _hashed_churn(pid, measure_s)
            churn_from = f"changed {CHURN_BLOCK >> 10} KiB blocks over {measure_s:g} s"
    else:
        churn_from = "--churn" if churn is not None else "default 10%"
    frac = churn if churn is not None else 0.1
    max_interval: float | None = None
    if churn_rate is not None:
        frac = min(1.0, churn_rate * interval / max(1, size))
        churn_from += f", over a {interval:g} s checkpoint interval"
        # the longest interval whose churn still fits: FIXED + unchanged + changed <= deadline
        budget = deadline - FIXED_S - size / same_rate
        per_s = churn_rate * (1 / new_rate - 1 / same_rate)
        if budget > 0:
            max_interval = budget / per_s if per_s > 0 else float("inf")
    full_s = FIXED_S + size / new_rate
    inc_s = FIXED_S + size * (1 - frac) / same_rate + size * frac / new_rate
    return CheckResult(
        window=window,
        deadline=deadline,
        size=size,
        size_from=size_from,
        sample_bytes=sample,
        sample_from=sample_from,
        new_rate=new_rate,
        same_rate=same_rate,
        churn=frac,
        churn_from=churn_from,
        churn_rate=churn_rate,
        full_s=full_s,
        incremental_s=inc_s,
        max_interval_s=max_interval,
    )
