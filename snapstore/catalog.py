"""Where snapshots live under the root, and their manifests (the commit point).

Layout under ROOT (``--root``, default ``$SNAPSTORE_ROOT``, else ``/fusion/snapshots``)::

    ROOT/<task>/<n>/        CRIU images dir of snapshot n (and CRIU's dump.log)
    ROOT/<task>/<n>.json    manifest: written LAST; its presence is what makes n committed

Rules (docs/snapstore.md has the long form):
- a snapshot is committed iff ``<n>.json`` exists and parses; ``latest`` is the highest
  committed n; directories without a manifest (a dump that failed or crashed) are ignored by
  ``committed``/``latest`` and listed only on request;
- the next dump takes ``n = max(every numbered dir, every manifest) + 1`` and claims it with an
  atomic ``mkdir``, so it never reuses a half-written directory, even with concurrent dumps;
- the manifest is written to a hidden temporary name, fsynced, renamed into place, and the
  directory fsynced (on fusionfs, fsync returns once the object is committed in the store);
- ``rm`` removes the manifest first, so a half-removed snapshot is never restorable;
- the manifest records a digest of every image file and of itself (format 2): a manifest that
  does not parse or whose digest does not match is ``SnapshotCorrupt`` (exit 177), never read
  as a snapshot; format 1 manifests (no digests) are still read, their files checked by size.

Caveat: on a filesystem where rename is not atomic (fusionfs renames as copy then delete), a
crash mid-rename can leave both the temporary and the final name; the final name is only ever
written complete, and temporaries are ignored.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3

from snapstore.errors import SnapshotCorrupt, SnapstoreError, UsageError

__all__ = [
    "MANIFEST_FORMAT",
    "Catalog",
    "ImageFile",
    "Manifest",
    "fsync_dir",
    "fsync_file",
    "validate_task_id",
]

MANIFEST_FORMAT = 2
_FORMATS = (1, 2)  # 1: no digests
_TASK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_NUM_RE = re.compile(r"^[1-9][0-9]{0,9}$")
_MANIFEST_RE = re.compile(r"^([1-9][0-9]{0,9})\.json$")


def validate_task_id(task: str) -> str:
    """Return ``task`` if it is a valid task id, else raise UsageError."""
    if not _TASK_RE.match(task):
        raise UsageError(
            f"invalid task id {task!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )
    return task


def fsync_file(path: Path) -> None:
    """fsync one file through a read-only descriptor (enough on Linux, and on fusionfs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class ImageFile:
    name: str
    size: int
    # "blake3:<hex>" of the bytes, or "chunked:<hex>": the BLAKE3 trailer of the file's
    # chunked-layout manifest in fusionfs (it covers every chunk's digest); "" if not recorded
    digest: str = ""


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def manifest_digest(data: dict[str, Any]) -> str:
    """The digest a manifest records of itself: BLAKE3 of its canonical JSON without it."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return "blake3:" + blake3.blake3(_canonical(body)).hexdigest()


@dataclasses.dataclass
class Manifest:
    """What a committed snapshot records. Times are seconds; sizes are bytes."""

    task: str
    snapshot: int
    created: str  # ISO 8601, UTC
    host: str
    pid: int
    pids: list[int]
    tids: list[int]
    command: list[str]
    criu_version: str
    kernel: str
    arch: str
    options: dict[str, bool]
    files: list[ImageFile]
    total_bytes: int
    timings: dict[str, float]
    criu_stats: dict[str, int]
    format: int = MANIFEST_FORMAT
    # the chunked layout (fusionfs): logical_bytes, stored_bytes (all chunks the images
    # reference), new_stored_bytes (uploaded by this dump); empty when not on fusionfs
    storage: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["digest"] = manifest_digest(data)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest. ``ValueError`` (or ``KeyError``/``TypeError``) if it is damaged:
        not JSON, fields missing, or (format 2) its digest does not match its content;
        ``UnsupportedFormat`` for a format this snapstore does not know."""
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") not in _FORMATS:
            raise UnsupportedFormat(f"unsupported manifest format {data.get('format')!r}")
        if data["format"] >= 2 and data.get("digest") != manifest_digest(data):
            raise ValueError("its digest does not match its content")
        files = [
            ImageFile(str(f["name"]), int(f["size"]), str(f.get("digest", "")))
            for f in data["files"]
        ]
        return cls(
            task=str(data["task"]),
            snapshot=int(data["snapshot"]),
            created=str(data["created"]),
            host=str(data.get("host", "")),
            pid=int(data["pid"]),
            pids=[int(p) for p in data.get("pids", [data["pid"]])],
            tids=[int(p) for p in data.get("tids") or data.get("pids") or [data["pid"]]],
            command=[str(a) for a in data.get("command", [])],
            criu_version=str(data.get("criu_version", "")),
            kernel=str(data.get("kernel", "")),
            arch=str(data.get("arch", "")),
            options={str(k): bool(v) for k, v in data.get("options", {}).items()},
            files=files,
            total_bytes=int(data.get("total_bytes", sum(f.size for f in files))),
            timings={str(k): float(v) for k, v in data.get("timings", {}).items()},
            criu_stats={str(k): int(v) for k, v in data.get("criu_stats", {}).items()},
            storage={str(k): int(v) for k, v in data.get("storage", {}).items()},
        )


class UnsupportedFormat(Exception):
    """A manifest written by another version of snapstore (not damaged)."""


def utc_now() -> str:
    import datetime  # only where a time is written: not on a restore's path (2 ms cold)

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _fusion_problem(path: Path) -> str | None:
    """What fusionfs finds wrong with ``path`` when read from the store past every cache (its
    ``full`` check: S-CHUNK-10, S-INTEG-2), or None: not on a fusionfs mount, or nothing wrong
    (then an EIO was the store failing, not the bytes)."""
    from fusionfs import client as fusion_client

    if fusion_client.find_mount(path) is None:
        return None
    try:
        result = fusion_client.verify(path, "full")
    except (OSError, ValueError):
        return None
    return None if result.get("ok", True) else str(result.get("problem") or "does not verify")


class Catalog:
    """The snapshots under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- paths

    def task_dir(self, task: str) -> Path:
        return self.root / validate_task_id(task)

    def images_dir(self, task: str, n: int) -> Path:
        return self.task_dir(task) / str(n)

    def manifest_path(self, task: str, n: int) -> Path:
        return self.task_dir(task) / f"{n}.json"

    # -- reading

    def tasks(self) -> list[str]:
        """Task ids with a directory under the root (committed snapshots or not)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise SnapstoreError(f"cannot list {self.root}: {err.strerror}") from err
        return sorted(e.name for e in entries if _TASK_RE.match(e.name) and e.is_dir())

    def _entries(self, task: str) -> Iterator[os.DirEntry[str]]:
        try:
            yield from os.scandir(self.task_dir(task))
        except FileNotFoundError:
            return
        except OSError as err:
            raise SnapstoreError(f"cannot list {self.task_dir(task)}: {err.strerror}") from err

    def committed(self, task: str) -> list[int]:
        """Snapshot numbers with a manifest, ascending."""
        found = []
        for entry in self._entries(task):
            match = _MANIFEST_RE.match(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def uncommitted(self, task: str) -> list[int]:
        """Numbered image dirs without a manifest: failed or interrupted dumps."""
        committed = set(self.committed(task))
        return sorted(
            int(e.name)
            for e in self._entries(task)
            if _NUM_RE.match(e.name) and e.is_dir() and int(e.name) not in committed
        )

    def latest(self, task: str) -> int | None:
        numbers = self.committed(task)
        return numbers[-1] if numbers else None

    def load(self, task: str, n: int) -> Manifest:
        path = self.manifest_path(task, n)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(
                f"task {task!r} has no committed snapshot {n} in {self.root}"
            ) from None
        except OSError as err:
            problem = _fusion_problem(path) if err.errno == errno.EIO else None
            if problem is not None:  # fusionfs refused bytes that do not match their checksum
                raise SnapshotCorrupt(
                    f"snapshot {n} of {task!r} is damaged: its manifest {path}: {problem}"
                ) from None
            raise SnapstoreError(f"cannot read {path}: {err.strerror}") from err
        try:
            manifest = Manifest.from_json(text)
        except UnsupportedFormat as err:
            raise SnapstoreError(f"{path}: {err} (written by another snapstore?)") from None
        except (ValueError, KeyError, TypeError) as err:
            what = f"{type(err).__name__} {err}" if isinstance(err, KeyError) else str(err)
            raise SnapshotCorrupt(
                f"snapshot {n} of {task!r} is damaged: its manifest {path} is not valid "
                f"({len(text)} bytes): {what}"
            ) from None
        if manifest.task != task or manifest.snapshot != n:
            raise SnapshotCorrupt(
                f"{path} names task {manifest.task!r} snapshot {manifest.snapshot}, "
                f"not {task!r} {n}"
            )
        return manifest

    def resolve(self, task: str, n: int | None) -> int:
        """``n`` if given (it must be committed), else the latest committed snapshot."""
        if n is not None:
            if n not in self.committed(task):
                if n in self.uncommitted(task):
                    raise UsageError(
                        f"snapshot {n} of task {task!r} was never committed (its dump failed "
                        f"or was interrupted); its files are in {self.images_dir(task, n)}"
                    )
                raise UsageError(f"task {task!r} has no snapshot {n} in {self.root}")
            return n
        latest = self.latest(task)
        if latest is None:
            if not self.task_dir(task).is_dir():
                raise UsageError(f"no task {task!r} in {self.root}")
            raise UsageError(f"task {task!r} has no committed snapshot in {self.root}")
        return latest

    # -- writing

    def reserve(self, task: str) -> int:
        """Claim the next snapshot number by creating its images dir; return the number."""
        task_dir = self.task_dir(task)
        try:
            task_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SnapstoreError(f"cannot create {task_dir}: {err.strerror}") from err
        for _ in range(100):  # bounded: only concurrent dumps of one task can collide
            used = [int(e.name) for e in self._entries(task) if _NUM_RE.match(e.name)]
            used += self.committed(task)
            n = max(used, default=0) + 1
            try:
                self.images_dir(task, n).mkdir()
            except FileExistsError:
                continue
            except OSError as err:
                raise SnapstoreError(
                    f"cannot create {self.images_dir(task, n)}: {err.strerror}"
                ) from err
            return n
        raise SnapstoreError(f"could not claim a new snapshot number under {task_dir}")

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest: temporary name, fsync, rename, fsync the directory."""
        final = self.manifest_path(manifest.task, manifest.snapshot)
        tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
        data = manifest.to_json().encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(final.parent)
        return final

    def remove(self, task: str, n: int | None) -> list[int]:
        """Remove snapshot n (committed or not), or the whole task; manifest first."""
        if n is None:
            targets = sorted(set(self.committed(task)) | set(self.uncommitted(task)))
            if not self.task_dir(task).is_dir():
                raise UsageError(f"no task {task!r} in {self.root}")
        else:
            if n not in self.committed(task) and n not in self.uncommitted(task):
                raise UsageError(f"task {task!r} has no snapshot {n} in {self.root}")
            targets = [n]
        for number in targets:
            self.manifest_path(task, number).unlink(missing_ok=True)
        if targets:
            fsync_dir(self.task_dir(task))
        for number in targets:
            shutil.rmtree(self.images_dir(task, number), ignore_errors=True)
        if n is None:
            for entry in self._entries(task):  # leftovers: temporaries of crashed commits
                if entry.name.startswith("."):
                    Path(entry.path).unlink(missing_ok=True)
            try:
                self.task_dir(task).rmdir()
            except OSError as err:
                raise SnapstoreError(
                    f"removed the snapshots of {task!r}, but {self.task_dir(task)} is not "
                    f"empty: {err.strerror}"
                ) from err
        return targets
