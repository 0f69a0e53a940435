"""Shared pieces of the compatibility tests: the tree fingerprint that a cold remount must
give back, the store with its mounts (``CompatMount``, handed out by the ``compat_mount``
fixture of ``conftest.py``), and ``run``, which runs a program with a timeout and fails the test
with the program's output and the mount's log tail when it fails or hangs.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CompatMount", "Entry", "run", "tree", "tree_of"]


# --------------------------------------------------------------------------------------------
# the tree's fingerprint


Entry = tuple[str, int, str]  # (kind, permission bits, sha256 of a file / target of a link)


def tree(root: Path) -> dict[str, Entry]:
    """Every entry under ``root`` (relative path -> kind, mode bits, content digest).

    Walks in the test process; use ``tree_of`` on a mount, so that a hung mount fails the test
    instead of hanging it."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            bits = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", bits, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", bits, "")
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                out[rel] = ("file", bits, f"{st.st_size}:{digest.hexdigest()}")
            else:
                out[rel] = (f"other:{stat.S_IFMT(st.st_mode):o}", bits, "")
    return out


def tree_of(
    root: Path, *, timeout: float = 120, mount: CompatMount | None = None
) -> dict[str, Entry]:
    """``tree(root)`` computed by a child process that is killed after ``timeout`` seconds."""
    result = run([sys.executable, __file__, "tree", str(root)], timeout=timeout, mount=mount)
    raw: dict[str, list[Any]] = json.loads(result.stdout)
    return {rel: (str(e[0]), int(e[1]), str(e[2])) for rel, e in raw.items()}


def _tree_diff(before: dict[str, Entry], after: dict[str, Entry], limit: int = 30) -> str:
    lines = []
    for rel in sorted(before.keys() | after.keys()):
        was, now = before.get(rel), after.get(rel)
        if was != now:
            lines.append(f"  {rel}: before {was}, after {now}")
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


# --------------------------------------------------------------------------------------------
# the store and its mounts


class CompatMount:
    """A store (``name``: local or a server) and the mounts of it a test made."""

    def __init__(
        self,
        name: str,
        source: str,
        env: dict[str, str],
        factory: Any,
        extra_args: tuple[str, ...],
    ) -> None:
        self.name = name
        self.source = source
        self.env = env
        self.extra_args = extra_args
        self._factory = factory
        self.main = factory(source, extra_args=extra_args, env=env)
        self.nodes = [self.main]

    @property
    def path(self) -> Path:
        path: Path = self.main.path
        return path

    def add_node(self, extra_args: tuple[str, ...] = ()) -> Path:
        """Another mount of the same store, with its own (empty) cache: another machine."""
        mount = self._factory(self.source, extra_args=(*self.extra_args, *extra_args), env=self.env)
        self.nodes.append(mount)
        path: Path = mount.path
        return path

    def log_tails(self) -> str:
        return "\n".join(m.log_tail() for m in self._factory.mounts)

    def remount_cold(self, first: Callable[[], object] | None = None) -> dict[str, Entry]:
        """Fingerprint the tree, unmount every mount of the store, empty the main mount's cache,
        mount it again and check that the same tree comes back. Returns the tree.

        ``first`` runs on the fresh mount before anything else reads it."""
        before = tree_of(self.path, mount=self)
        for node in self.nodes[1:]:
            node.unmount()
        self.nodes = [self.main]
        self.main = self.main.remount(fresh_cache=True)
        self.nodes = [self.main]
        if first is not None:
            first()
        after = tree_of(self.path, mount=self)
        assert after == before, (
            f"the tree differs after a cold remount on {self.name} "
            f"({len(before)} entries before, {len(after)} after):\n"
            f"{_tree_diff(before, after)}\n{self.log_tails()}"
        )
        return after


# --------------------------------------------------------------------------------------------
# running programs


def run(
    argv: list[str] | str,
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    mount: CompatMount | None = None,
    shell: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a program; a non-zero exit or a timeout fails the test with its output (and the
    mount's log tail when ``mount`` is given)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    shown = argv if isinstance(argv, str) else " ".join(argv)
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            shell=shell,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-3000:], (err.stderr or b"")[-3000:]
        pytest.fail(
            f"{shown!r} did not finish in {timeout:g} s\nstdout: {out[0]!r}\n"
            f"stderr: {out[1]!r}\n{mount.log_tails() if mount else ''}",
            pytrace=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"{shown!r} exited with {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
            f"stderr:\n{result.stderr[-4000:]}\n{mount.log_tails() if mount else ''}",
            pytrace=False,
        )
    return result


if __name__ == "__main__":  # python compat_support.py tree ROOT: the tree as JSON (tree_of)
    if len(sys.argv) != 3 or sys.argv[1] != "tree":
        sys.exit("usage: compat_support.py tree ROOT")
    json.dump(tree(Path(sys.argv[2])), sys.stdout)
