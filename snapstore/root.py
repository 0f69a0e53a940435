"""The snapshot root: where it is, that it is on a fusionfs mount, and flushing that mount.

``--root`` defaults to ``$SNAPSTORE_ROOT``, else ``/fusion/snapshots``. The root must be on a
fusionfs mount (``fusionfs.client.find_mount``): snapshots are meant to outlive the machine.

Testing aid: with ``SNAPSTORE_ALLOW_ANY_ROOT=1`` in the environment any directory is accepted
and ``flush`` only fsyncs (there is no fusionfs to ask). It exists so the CRIU tests can run
against a plain directory; do not use it in production, since a snapshot on local disk does not
survive the machine.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

from fusionfs import client as fusion_client
from snapstore.errors import SnapstoreError, UsageError, os_error_text

__all__ = ["ALLOW_ANY_ROOT_ENV", "DEFAULT_ROOT", "ROOT_ENV", "Root", "default_root", "open_root"]

DEFAULT_ROOT = Path("/fusion/snapshots")
ROOT_ENV = "SNAPSTORE_ROOT"
ALLOW_ANY_ROOT_ENV = "SNAPSTORE_ALLOW_ANY_ROOT"
GC_GRACE_ENV = "SNAPSTORE_GC_GRACE_S"
DEFAULT_GC_GRACE_S = 6 * 3600.0


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


@dataclasses.dataclass(frozen=True)
class Root:
    """A checked snapshot root; ``mountpoint`` is None only under SNAPSTORE_ALLOW_ANY_ROOT."""

    path: Path
    mountpoint: Path | None

    def flush(self) -> None:
        """Make everything written through the mount durable (fusionfs's flush xattr)."""
        if self.mountpoint is None:
            return
        try:
            fusion_client.flush(self.mountpoint)
        except OSError as err:
            raise SnapstoreError(
                f"flushing the fusionfs mount {self.mountpoint} failed: "
                f"{err.strerror or err}; some data is not durable in the store"
            ) from err

    def write_behind(self, directory: Path) -> None:
        """Ask fusionfs not to make CRIU's every close wait for its upload: the dump fsyncs
        each image and flushes the mount before committing, so durability is unchanged, and
        the images upload in parallel while CRIU writes instead of one close at a time."""
        self._mark(directory, "write-behind", fusion_client.set_write_behind)

    def read_once(self, directory: Path) -> None:
        """Ask fusionfs to serve CRIU's reads of the images below ``directory`` past the
        kernel page cache (S-READ-5): an eager restore reads each image once."""
        self._mark(directory, "read-once", fusion_client.set_read_once)

    def no_cache(self, directory: Path) -> None:
        """Ask fusionfs not to write what the reads of the images below ``directory`` fetch to
        its chunk cache (S-READ-6): a lazy restore reads each page once, into the task."""
        self._mark(directory, "no-cache", fusion_client.set_no_cache)

    def _mark(self, directory: Path, what: str, setter: Callable[[Path], None]) -> None:
        if self.mountpoint is None:
            return
        try:
            setter(directory)
        except OSError as err:  # an older fusionfs: the same result, only slower
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise SnapstoreError(f"cannot set {what} on {directory}: {err}") from err

    def use_chunked_layout(self) -> None:
        """Ask fusionfs to store new files below the root (CRIU's images) in its chunked
        layout: compressed, de-duplicated between snapshots, in shared pack objects. The flag
        is persisted on the root directory, so it is set once."""
        if self.mountpoint is None:
            return
        try:
            if fusion_client.layout_of(self.path) == "chunked":
                return
            fusion_client.set_layout(self.path, "chunked")
        except OSError as err:  # an older fusionfs: plain objects, which is slower but right
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENODATA):
                raise SnapstoreError(
                    f"cannot set the chunked layout on {self.path}: {err}"
                ) from err

    def dedup_from(self, directory: Path, previous: Path) -> str | None:
        """Let the images written into ``directory`` de-duplicate against those of the
        ``previous`` snapshot (fusionfs reads its manifests into the mount's chunk index).
        Best effort: returns a message instead of raising when it cannot."""
        if self.mountpoint is None:
            return None
        try:
            fusion_client.dedup_from(directory, previous)
        except OSError as err:
            return f"no de-duplication against {previous}: {err.strerror or err}"
        return None

    def chunk_stats(self, directory: Path) -> dict[str, int]:
        """Bytes the chunked layout stored for the images in ``directory`` ({} if none)."""
        if self.mountpoint is None:
            return {}
        try:
            raw = fusion_client.chunk_stats(directory)
        except (OSError, ValueError):
            return {}
        keys = ("logical_bytes", "stored_bytes", "new_stored_bytes")
        return {k: int(raw[k]) for k in keys if k in raw}

    def collect_garbage(self) -> str | None:
        """Free the pack space of removed snapshots (fusionfs's two-phase collection; space
        comes back one run later). Grace period: ``$SNAPSTORE_GC_GRACE_S``, default 6 h.
        Returns a one-line summary, or None when there is no fusionfs mount."""
        if self.mountpoint is None:
            return None
        grace = float(os.environ.get(GC_GRACE_ENV) or DEFAULT_GC_GRACE_S)
        try:
            r = fusion_client.collect_garbage(self.mountpoint, grace)
        except (OSError, ValueError) as err:
            return f"garbage collection failed (nothing lost, run it again): {err}"
        return (
            f"garbage collection: {r.get('referenced', 0)} packs in use, "
            f"{r.get('fossilized', 0)} set aside, {r.get('deleted', 0)} deleted "
            f"({r.get('bytes_deleted', 0) / 1e6:.1f} MB freed)"
        )


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mountpoint_of(path: Path) -> Path | None:
    """The mount point (per /proc/self/mountinfo) that ``path`` is below, without touching
    ``path`` itself (on a dead FUSE mount every access fails, or is answered from the
    kernel's caches as if nothing were wrong)."""
    target = os.path.abspath(path)
    best: str | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) > len(best)):
                    best = point
    except OSError:
        return None
    return Path(best) if best is not None else None


def _dead_mount(path: Path) -> str | None:
    """Why ``path`` cannot be reached because the mount it is on lost its daemon (ENOTCONN:
    a FUSE daemon that died), or None. ``statfs`` always reaches the daemon; ``stat`` may be
    answered from the kernel's attribute cache."""
    point = _mountpoint_of(path)
    if point is None:
        return None
    try:
        os.statvfs(point)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            return os_error_text(err)
    return None


def open_root(path: Path | None, *, create: bool) -> Root:
    """Check the root (and create it when ``create``); raise UsageError if it is unusable,
    ``SnapstoreError`` (the command's failure code) if its mount's daemon is gone."""
    root = Path(os.path.abspath(path if path is not None else default_root()))
    allow_any = os.environ.get(ALLOW_ANY_ROOT_ENV) == "1"
    dead = _dead_mount(root)
    if dead is not None:
        raise SnapstoreError(
            f"snapshot root {root} is on a mount whose daemon is gone ({dead}): unmount it "
            "(fusermount3 -u) and mount it again"
        )
    if root.exists() and not root.is_dir():
        raise UsageError(f"snapshot root {root} is not a directory")
    mount = fusion_client.find_mount(_existing_ancestor(root))
    if mount is None and not allow_any:
        raise UsageError(
            f"snapshot root {root} is not on a fusionfs mount (mount one, e.g. "
            f"'fusionfs mount s3://BUCKET /fusion', or pass --root / set ${ROOT_ENV})"
        )
    if create and not root.is_dir():  # a missing root is an empty one for reading commands
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create snapshot root {root}: {err.strerror}") from err
    return Root(root, mount.mountpoint if mount is not None else None)
