"""The public API for programs that use a running fusionfs mount (snapstore, the CLI, tests).

A mount answers on its root directory through extended attributes, so no socket or extra file
is needed and the answer always comes from the daemon serving that exact mount (the names are
in ``fusionfs.xattrs``; ``fusionfs.control`` answers them):

- ``getxattr(root, "user.fusionfs.info")``: JSON about the mount (pid, source, cache dir, ...);
- ``getxattr(root, "user.fusionfs.stats")``: JSON counters since mount;
- ``setxattr(root, "user.fusionfs.flush", b"")``: returns once every file with data not yet
  durable has been committed to the store; fails with EIO if some could not be.
- ``setxattr(dir, "user.fusionfs.write-behind", b"1")``: ``close`` of files below ``dir`` starts
  their upload and returns at once; ``fsync`` and the flush above still wait (S-WRITE-7).
- ``setxattr(dir, "user.fusionfs.read-once", b"1")``: read-only opens of files below ``dir``
  bypass the kernel page cache, and what they fetch is not written to the chunk cache (S-READ-5).
- ``setxattr(dir, "user.fusionfs.no-cache", b"1")``: what reads of files below ``dir`` fetch is
  not written to the chunk cache; the page cache is used as usual (S-READ-6).
- ``setxattr(dir, "user.fusionfs.layout", b"chunked")``: new files below ``dir`` are stored in
  the chunked layout (compressed, de-duplicated, in shared packs); persisted (S-CHUNK-1);
  ``getxattr`` of it says which layout is in force.
- ``setxattr(dir, "user.fusionfs.dedup-from", b"<dir relative to the mount root>")``: files
  written next de-duplicate against the chunked files of that directory (S-CHUNK-6).
- ``getxattr(dir, "user.fusionfs.chunk-stats")``: JSON of what chunked commits stored in
  ``dir`` since mount (logical, stored and new bytes).
- ``setxattr(file, "user.fusionfs.verify", b"quick"|b"full [START END]")`` checks the file's
  committed version against the store past every cache (``fusionfs.verify``);
  ``getxattr(file, "user.fusionfs.verify")`` then returns the result as JSON (S-CHUNK-10).
- ``setxattr(root, "user.fusionfs.gc", b"<grace seconds>")``: garbage-collect unreferenced
  packs (two phases); ``getxattr(root, "user.fusionfs.gc")``: the last run's counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fusionfs import xattrs

__all__ = [
    "MountInfo",
    "chunk_stats",
    "collect_garbage",
    "dedup_from",
    "find_mount",
    "flush",
    "layout_of",
    "mount_root",
    "set_layout",
    "set_no_cache",
    "set_read_once",
    "set_write_behind",
    "stats",
    "verify",
]


@dataclasses.dataclass(frozen=True)
class MountInfo:
    mountpoint: Path
    pid: int
    source: str
    cache_dir: Path
    raw: dict[str, Any]


def mount_root(path: str | os.PathLike[str]) -> Path:
    """The mount point that ``path`` lives on (``/`` at worst)."""
    p = Path(os.path.realpath(path))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _getxattr_json(root: Path, name: str) -> dict[str, Any]:
    size = 1 << 16
    value = os.getxattr(root, name)
    if len(value) >= size:  # pragma: no cover - stats are far smaller
        value = os.getxattr(root, name)
    result: dict[str, Any] = json.loads(value)
    return result


def find_mount(path: str | os.PathLike[str]) -> MountInfo | None:
    """The fusionfs mount that ``path`` is on, or None if it is on some other filesystem."""
    root = mount_root(path)
    try:
        info = _getxattr_json(root, xattrs.INFO)
    except (OSError, ValueError):
        return None
    return MountInfo(
        mountpoint=root,
        pid=int(info.get("pid", 0)),
        source=str(info.get("source", "")),
        cache_dir=Path(str(info.get("cache_dir", ""))),
        raw=info,
    )


def stats(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """Counters since mount. Raises OSError if ``mountpoint`` is not a fusionfs mount."""
    return _getxattr_json(mount_root(mountpoint), xattrs.STATS)


def flush(path: str | os.PathLike[str]) -> None:
    """Make every file written through the mount that ``path`` is on durable in the store.

    Raises OSError (EIO) when some data could not be made durable; that data stays staged.
    """
    os.setxattr(mount_root(path), xattrs.FLUSH, b"")


def set_write_behind(directory: str | os.PathLike[str], enabled: bool = True) -> None:
    """Let ``close`` of files below ``directory`` return before their upload is done.

    For writers that make their data durable themselves at the end (fsync of each file, then
    ``flush``), as snapstore does for CRIU's images: many files then upload in parallel instead
    of one close at a time. Kept in memory by the mount while the directory is in use.
    Raises OSError if ``directory`` is not a directory on a fusionfs mount.
    """
    os.setxattr(directory, xattrs.WRITE_BEHIND, b"1" if enabled else b"0")


def set_read_once(directory: str | os.PathLike[str], enabled: bool = True) -> None:
    """Let read-only opens of files below ``directory`` bypass the kernel page cache (S-READ-5).

    For data read once in large reads, as CRIU's eager restore reads a snapshot's images: no
    page-cache copy and no memory kept for pages nobody reads again, and what the reads fetch
    is not written to the chunk cache either. Kept in memory by the mount while the directory
    is in use.
    Raises OSError if ``directory`` is not a directory on a fusionfs mount.
    """
    os.setxattr(directory, xattrs.READ_ONCE, b"1" if enabled else b"0")


def set_no_cache(directory: str | os.PathLike[str], enabled: bool = True) -> None:
    """Do not write what reads of files below ``directory`` fetch to the chunk cache (S-READ-6).

    For data read once in small reads, as CRIU's lazy-pages daemon reads a snapshot's images:
    the kernel page cache still serves the small reads, but no chunk cache file is written for
    pages that the restored task keeps in its own memory. Chunks already cached are used. Kept
    in memory by the mount while the directory is in use.
    Raises OSError if ``directory`` is not a directory on a fusionfs mount.
    """
    os.setxattr(directory, xattrs.NO_CACHE, b"1" if enabled else b"0")


def set_layout(directory: str | os.PathLike[str], layout: str = "chunked") -> None:
    """Store new files below ``directory`` in ``layout`` ("chunked" or "plain"). Persisted in
    the directory's marker object, so every mount of the bucket sees it.
    Raises OSError if ``directory`` is not a directory on a fusionfs mount."""
    os.setxattr(directory, xattrs.LAYOUT, layout.encode())


def layout_of(directory: str | os.PathLike[str]) -> str:
    """The layout of new files below ``directory``: "chunked" or "plain".
    Raises OSError if ``directory`` is not a directory on a fusionfs mount."""
    return os.getxattr(directory, xattrs.LAYOUT).decode()


def dedup_from(directory: str | os.PathLike[str], source: str | os.PathLike[str]) -> None:
    """Let files written next (in ``directory`` or anywhere on the mount) reuse the chunks of
    the chunked files in ``source`` (another directory on the same mount) without asking the
    store per chunk. Raises OSError (ENOENT if ``source`` does not exist)."""
    root = mount_root(directory)
    rel = os.path.relpath(os.path.realpath(source), root)
    os.setxattr(directory, xattrs.DEDUP_FROM, rel.encode())


def chunk_stats(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What chunked commits of files directly in ``directory`` stored since the mount started:
    ``files``, ``logical_bytes``, ``stored_bytes`` (their manifests' chunks), and
    ``new_stored_bytes`` (what was uploaded for them, de-duplication and compression done)."""
    result: dict[str, Any] = json.loads(os.getxattr(directory, xattrs.CHUNK_STATS))
    return result


def collect_garbage(
    path: str | os.PathLike[str], grace_seconds: float = 6 * 3600
) -> dict[str, Any]:
    """Run the chunked layout's garbage collection on the mount that ``path`` is on: packs no
    manifest references and older than ``grace_seconds`` are set aside, and those set aside by
    an earlier run at least ``grace_seconds`` before are deleted (two phases: space comes back
    one run later). Returns the run's counts. Raises OSError."""
    root = mount_root(path)
    os.setxattr(root, xattrs.GC, f"{grace_seconds:g}".encode())
    return _getxattr_json(root, xattrs.GC)


def verify(
    path: str | os.PathLike[str],
    mode: str = "quick",
    start: int | None = None,
    end: int | None = None,
) -> dict[str, Any]:
    """Check one file of a mount against the store (see ``fusionfs.verify``); the result dict.
    Raises ``OSError`` when the check could not run (EINVAL: not a committed file; EOPNOTSUPP:
    an older fusionfs; EIO: the store could not be asked)."""
    value = mode if start is None else f"{mode} {start} {end if end is not None else ''}"
    os.setxattr(path, xattrs.VERIFY, value.strip().encode())
    result: dict[str, Any] = json.loads(os.getxattr(path, xattrs.VERIFY))
    return result
