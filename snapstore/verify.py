"""Check a committed snapshot end to end without restoring it: digests, chunks, packs.

What a snapshot records (``catalog.ImageFile.digest``, written by ``dump``):

- ``chunked:<hex>`` for an image file stored in fusionfs's chunked layout (the pages): the
  BLAKE3 trailer of its chunked-layout manifest, which covers the digest, length and place of
  every chunk. fusionfs reports it through ``user.fusionfs.verify`` (``fusionfs.verify``);
- ``blake3:<hex>`` of the bytes, for every other file (CRIU's small images, stored as plain
  objects; every file when the root is not on fusionfs);
- and the manifest's own digest (``catalog.manifest_digest``), checked whenever it is read.

Two depths:

- ``quick`` (before every restore, and ``snapstore verify --quick``): the manifest parses and
  matches its digest; every file exists with its recorded size; small files (read whole by the
  restore anyway) match their digest; every chunked file is still the version recorded (its
  manifest's digest) and every pack it names exists and is long enough (one HEAD per pack,
  through the mount). No chunk is read: a flipped byte inside a pack is found when the chunk is
  read (fusionfs verifies every chunk it fetches) or by ``full``.
- ``full`` (``snapstore verify``; and after a restore failed, to tell corruption from other
  failures): every byte once. Chunked files: every chunk fetched from the store, past every
  cache, and checked against its BLAKE3 (in 128 MiB steps, with progress); plain files: read
  from the store (through the hook when on fusionfs) and hashed.

Any mismatch raises ``SnapshotCorrupt`` (exit 177) naming the file and what is wrong. A snapshot
that uses chunks of an older one (de-duplication) is checked through its own manifests, which
name every chunk it needs wherever it lies: a bad chunk shared with its parent makes both bad.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

from fusionfs import client as fusion_client
from snapstore.catalog import Catalog, ImageFile, Manifest
from snapstore.errors import SnapshotCorrupt, SnapstoreError, os_error_text
from snapstore.root import Root

__all__ = ["STEP", "Report", "file_digest", "record_digests", "verify_snapshot"]

STEP = 128 << 20  # bytes of a chunked file checked per request in a full check
SMALL = 1 << 20  # files this size or smaller are read whole even by a quick check
_THREADS = 8
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENODATA)


@dataclasses.dataclass
class Report:
    task: str
    snapshot: int
    full: bool
    files: int = 0
    bytes: int = 0  # logical bytes of the image files checked
    checked_bytes: int = 0  # bytes read (stored bytes for chunked files)
    chunks: int = 0
    packs: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def file_digest(path: Path) -> str:
    """``blake3:<hex>`` of a file's bytes (read through whatever filesystem it is on)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "blake3:" + h.hexdigest()


def _hook(
    path: Path, mode: str, start: int | None = None, end: int | None = None
) -> dict[str, Any] | None:
    """fusionfs's verify hook on ``path``; None if this fusionfs has none."""
    try:
        return fusion_client.verify(path, mode, start, end)
    except OSError as err:
        if err.errno in _UNSUPPORTED:
            return None
        raise


def record_digests(root: Root, images: Path, files: list[ImageFile]) -> list[ImageFile]:
    """The image files with their digests, for the manifest (called by ``dump`` once every
    image is durable). Chunked files cost one manifest GET each, plain ones a read."""

    def one(f: ImageFile) -> ImageFile:
        path = images / f.name
        if root.mountpoint is not None:
            info = _hook(path, "manifest")
            if info is not None and info["layout"] == "chunked" and info["digest"]:
                return dataclasses.replace(f, digest=f"chunked:{info['digest']}")
        return dataclasses.replace(f, digest=file_digest(path))

    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(one, files))


def _damaged(manifest: Manifest, what: str) -> SnapshotCorrupt:
    return SnapshotCorrupt(f"snapshot {manifest.snapshot} of {manifest.task!r} is damaged: {what}")


class _Checker:
    def __init__(
        self,
        root: Root,
        manifest: Manifest,
        images: Path,
        full: bool,
        progress: Callable[[str], None],
        listed: bool = False,
        ahead: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        self.root = root
        self.listed = listed
        self.ahead = ahead
        self.manifest = manifest
        self.images = images
        self.full = full
        self.progress = progress
        self.report = Report(manifest.task, manifest.snapshot, full)
        self.total = sum(f.size for f in manifest.files)
        self.started = time.monotonic()
        self.last_note = 0.0

    def note(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_note < 1.0:
            return
        self.last_note = now
        r = self.report
        elapsed = max(now - self.started, 1e-6)
        pct = 100.0 * r.bytes / self.total if self.total else 100.0
        self.progress(
            f"verified {r.bytes / 1e6:.1f} of {self.total / 1e6:.1f} MB ({pct:.0f} %), "
            f"{r.files}/{len(self.manifest.files)} files, {r.chunks} chunks, "
            f"{r.checked_bytes / 1e6 / elapsed:.0f} MB/s read"
        )

    def stat(self, f: ImageFile) -> None:
        path = self.images / f.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise _damaged(self.manifest, f"{path} is missing") from None
        if size != f.size:
            raise _damaged(self.manifest, f"{path} has {size} bytes, the manifest says {f.size}")

    def plain(self, f: ImageFile) -> None:
        """A ``blake3:`` (or unrecorded) file: size, then the digest when it is read."""
        path = self.images / f.name
        self.stat(f)
        if not f.digest or not (self.full or f.size <= SMALL):
            return
        got: str | None = None
        if self.full and self.root.mountpoint is not None:
            info = _hook(path, "full")  # from the store, past the mount's caches
            if info is not None:
                if not info["ok"]:
                    raise _damaged(self.manifest, str(info["problem"]))
                if info["layout"] == "plain":
                    got = f"blake3:{info['digest']}"
                self.report.checked_bytes += int(info["checked_bytes"])
        if got is None:
            got = file_digest(path)
            self.report.checked_bytes += f.size
        if got != f.digest:
            raise _damaged(
                self.manifest,
                f"{path} does not match its digest (the manifest records "
                f"{f.digest[:23]}..., its bytes hash to {got[:23]}...)",
            )

    def chunked(self, f: ImageFile) -> None:
        path = self.images / f.name
        self.stat(f)
        info = self.ahead(str(path)) if self.ahead is not None and not self.full else None
        if info is None:
            info = _hook(path, "quick" if not self.full else "manifest")
        if info is None:
            raise SnapstoreError(
                f"{path} was stored in fusionfs's chunked layout, and this fusionfs mount "
                "cannot check it (no user.fusionfs.verify: an older fusionfs?)"
            )
        self.check_info(path, f, info)
        self.report.packs += int(info["packs"])
        if not self.full:
            self.report.chunks += int(info["chunks"])
            return
        for start in range(0, max(f.size, 1), STEP):
            step = _hook(path, "full", start, start + STEP)
            assert step is not None
            self.check_info(path, f, step)
            self.report.chunks += int(step["chunks"])
            self.report.checked_bytes += int(step["checked_bytes"])
            self.report.bytes += min(STEP, f.size - start)
            self.note()
        self.report.bytes -= f.size  # counted once by the caller

    def check_info(self, path: Path, f: ImageFile, info: dict[str, Any]) -> None:
        if not info["ok"]:
            raise _damaged(self.manifest, str(info["problem"]))
        if info["layout"] != "chunked" or f"chunked:{info['digest']}" != f.digest:
            raise _damaged(
                self.manifest,
                f"{path} is not the version the snapshot recorded (its "
                "chunked-layout manifest does not match the recorded digest)",
            )
        if int(info["size"]) != f.size:
            raise _damaged(
                self.manifest, f"{path} has {info['size']} bytes, the manifest says {f.size}"
            )

    def one(self, f: ImageFile) -> None:
        if f.digest.startswith("chunked:"):
            self.chunked(f)
        else:
            self.plain(f)
        self.report.files += 1
        self.report.bytes += f.size

    def run(self) -> Report:
        if not self.listed:
            _list(self.images)
        small = [f for f in self.manifest.files if not f.digest.startswith("chunked:")]
        large = [f for f in self.manifest.files if f.digest.startswith("chunked:")]
        if not self.full:  # in parallel: on a mount each costs a round trip or a few
            # the chunked files first: each is a HEAD of every pack it uses, the longest part,
            # which the small files' reads then overlap
            with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
                for _ in pool.map(self.one, large + small):
                    pass
        else:
            with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
                for _ in pool.map(self.one, small):
                    pass
            self.note(force=True)
            for f in large:
                self.one(f)
                self.note()
        self.report.seconds = time.monotonic() - self.started
        if self.full:
            self.note(force=True)
        return self.report


def _list(path: Path) -> None:
    """One LIST of the images dir before the per-file checks: on a fresh mount each lookup that
    follows is then answered with the small files' bytes (one round trip each)."""
    try:
        os.listdir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise SnapstoreError(f"cannot list {path}: {os_error_text(err)}") from None


def verify_snapshot(
    root: Root,
    task: str,
    n: int,
    *,
    full: bool,
    progress: Callable[[str], None] = lambda _msg: None,
    manifest: Manifest | None = None,
    listed: bool = False,
    ahead: Callable[[str], dict[str, Any] | None] | None = None,
) -> Report:
    """Check snapshot ``n`` of ``task``; raise ``SnapshotCorrupt`` if it does not verify.

    ``listed``: the caller listed the images dir just now (its lookups are primed), so the
    check does not list it again. ``ahead``: a quick check only; the answers of fusionfs's
    quick check of chunked files the caller asked for already, by path (None: ask now).

    ``OSError`` from the mount (a dead daemon, the store unreachable) propagates: that says
    nothing about the snapshot."""
    catalog = Catalog(root.path)
    if manifest is None:
        manifest = catalog.load(task, n)
    images = catalog.images_dir(task, n)
    return _Checker(root, manifest, images, full, progress, listed, ahead).run()
