"""Walk a restore's path on the mount while the program is still importing (``_start``).

On a fresh mount every name on the way to a snapshot costs the store a round trip or three (the
root, the task dir and its listing, the manifest, the images dir and its listing, then a lookup
per image file), and the restore asks for them one after the other. The imports before it
(40-60 ms from a cold page cache) use one core and wait on nothing. So ``start`` walks the same
path in threads at once, reading only (listings, ``stat``, the manifest's bytes): the restore
then finds the answers in the kernel's and the mount's caches, or joins a lookup in flight.

It decides nothing: the restore parses its arguments, checks the root, picks the snapshot,
verifies and reads everything again itself, and reports every error. A warm-up that fails (a
bad argument, a dead mount, no such task) stays silent. Its threads are daemons, and the
``restore`` command leaves with ``os._exit``: one stuck on a hung mount holds nothing up that
the restore would not meet anyway.

The layout walked (``ROOT/TASK/N.json`` and ``ROOT/TASK/N/``) is ``catalog.Catalog``'s; a unit
test holds the two together. Only ``os`` and ``threading`` are imported, both loaded already.
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False  # typing itself is not imported: 3 ms before the first request
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["checked", "covers", "imported", "latest", "restore_target", "start"]

_ROOT_ENV = "SNAPSTORE_ROOT"  # root.ROOT_ENV
_DEFAULT_ROOT = "/fusion/snapshots"  # root.DEFAULT_ROOT
_TASK_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_STATS = 8  # lookups of the image files at once (the quick check's own concurrency)


def _option(argv: Sequence[str], name: str) -> str | None:
    """The last value of ``--name VALUE`` or ``--name=VALUE`` in ``argv`` before a ``--`` (what
    follows is ``run``'s task command, not ours); None if absent."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def restore_target(argv: Sequence[str]) -> tuple[str, str, int | None] | None:
    """(root, task, snapshot or None for the latest) of a ``restore`` or ``run`` command line,
    or None when it names no valid task (then nothing is warmed; the parser will say what is
    wrong)."""
    task = _option(argv, "--task")
    if not task or len(task) > 128 or task[0] in ".-" or not set(task) <= _TASK_CHARS:
        return None
    root = _option(argv, "--root") or os.environ.get(_ROOT_ENV) or _DEFAULT_ROOT
    snapshot = _option(argv, "--snapshot")
    if snapshot is None:
        return os.path.abspath(root), task, None
    if not _is_number(snapshot):
        return None
    return os.path.abspath(root), task, int(snapshot)


_WAIT_S = 10.0  # the restore waits this long at most for a listing the warm-up has in flight


class _Warmed:
    """What the warm-up found, for the restore to use instead of asking again."""

    def __init__(self, root: str, task: str, snapshot: int | None) -> None:
        self.root, self.task, self.snapshot = root, task, snapshot
        self.task_listed = threading.Event()  # set when the task dir's listing ended
        self.latest: int | None = None  # the latest committed snapshot in that listing
        self.images: str | None = None  # the images dir it lists (known with the snapshot)
        if snapshot is not None:
            self.images = os.path.join(root, task, str(snapshot))
        # the chunked image files' quick checks (fusionfs's verify hook), by path: started as
        # soon as the manifest names them; the event is set when the answer (or None) is in
        self.checks: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self.checks_known = threading.Event()  # set once ``checks`` has all it will have


_warmed: _Warmed | None = None

#: Set by the command once ``json`` is imported (it does that first). The warm-up's threads
#: import nothing, and use ``json`` only after this: two threads importing at once can meet in
#: a cycle of module locks, and Python then hands one of them a module half initialized (seen:
#: ``typing`` without ``ClassVar`` in ``dataclasses``, while this thread imported ``json``).
imported = threading.Event()

_VERIFY_XATTR = "user.fusionfs.verify"  # fusionfs.xattrs.VERIFY (fusionfs.client is not imported)


def latest(root: str, task: str) -> int | None:
    """The latest committed snapshot of ``task`` under ``root`` as the warm-up listed it (at
    the command's start; waiting for that listing if it is in flight), or None: no warm-up
    of that task, or its listing failed (the restore then lists, and reports what is wrong)."""
    w = _warmed
    if w is None or w.snapshot is not None or (w.root, w.task) != (root, task):
        return None
    w.task_listed.wait(_WAIT_S)
    return w.latest


def covers(images: str) -> bool:
    """Whether the warm-up lists ``images`` (and looks up every entry in it)."""
    w = _warmed
    return w is not None and w.images == images


def checked(path: str) -> dict[str, Any] | None:
    """The result of the warm-up's quick check of the chunked file ``path`` (what
    ``fusionfs.client.verify(path, "quick")`` returns), waiting for it if it is in flight; None
    if the warm-up did not check it, or could not (the quick check then asks itself)."""
    w = _warmed
    if w is None:
        return None
    w.checks_known.wait(_WAIT_S)
    check = w.checks.get(path)
    if check is None:
        return None
    done, result = check
    done.wait(_WAIT_S)
    return result[0] if result else None


def _is_number(text: str) -> bool:
    """``catalog._NUM_RE``: 1 to 10 ASCII digits, no leading zero."""
    return 0 < len(text) <= 10 and text[0] != "0" and all("0" <= c <= "9" for c in text)


def _is_manifest(name: str) -> bool:
    """``catalog._MANIFEST_RE``: ``N.json``."""
    return name.endswith(".json") and _is_number(name[:-5])


def _check(path: str, done: threading.Event, result: list[dict[str, Any]]) -> None:
    try:  # fusionfs.client.verify(path, "quick"), with nothing to import
        import json  # imported already (``imported``)

        os.setxattr(path, _VERIFY_XATTR, b"quick")
        result.append(json.loads(os.getxattr(path, _VERIFY_XATTR)))
    except Exception:  # the quick check asks again, and reports what it meets
        pass
    finally:
        done.set()


def _check_chunked(w: _Warmed, manifest: str, images: str) -> None:
    """Read the manifest, and start the quick check of every chunked file it names (the
    longest part of the restore's check: a HEAD, its chunked manifest, a LIST of the packs)."""
    try:
        with open(manifest, "rb") as f:
            text = f.read()
        if not imported.wait(_WAIT_S):
            return
        import json  # imported already

        data = json.loads(text)
        names = [
            str(f["name"])
            for f in data["files"]
            if str(f.get("digest", "")).startswith("chunked:") and "/" not in str(f["name"])
        ]
        for name in names:
            path = os.path.join(images, name)
            done = threading.Event()
            result: list[dict[str, Any]] = []
            w.checks[path] = (done, result)
            threading.Thread(target=_check, args=(path, done, result), daemon=True).start()
    except Exception:  # a damaged manifest: the restore's own check says what is wrong
        pass
    finally:
        w.checks_known.set()


def _stat_all(images: str) -> None:
    entries = list(os.scandir(images))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not entries:
                    return
                entry = entries.pop()
            try:
                entry.stat()
            except Exception:
                pass

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(_STATS - 1)]
    for w in workers:
        w.start()
    worker()
    for w in workers:
        w.join()


def _walk(w: _Warmed) -> None:
    task_dir = os.path.join(w.root, w.task)
    n = w.snapshot
    checking = False
    try:
        if n is None:
            try:
                numbers = [int(name[:-5]) for name in os.listdir(task_dir) if _is_manifest(name)]
                n = max(numbers, default=None)
                if n is not None:
                    w.images = os.path.join(task_dir, str(n))
                w.latest = n
            finally:
                w.task_listed.set()
            if n is None:
                return
        assert w.images is not None
        manifest = os.path.join(task_dir, f"{n}.json")
        check = threading.Thread(target=_check_chunked, args=(w, manifest, w.images), daemon=True)
        check.start()
        checking = True
        _stat_all(w.images)
    except Exception:  # the restore finds it again, and reports it
        pass
    finally:
        if not checking:
            w.checks_known.set()


def start(argv: Sequence[str]) -> threading.Thread | None:
    """Start warming the mount for ``snapstore restore|run ARGV...``; the thread, or None."""
    global _warmed
    target = restore_target(argv)
    if target is None:
        return None
    _warmed = _Warmed(*target)
    thread = threading.Thread(target=_walk, args=(_warmed,), name="snapstore-warm", daemon=True)
    thread.start()
    return thread
