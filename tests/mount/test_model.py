"""Model-based test of a real mount: random operations against an in-memory model.

A Hypothesis ``RuleBasedStateMachine`` drives one fusionfs mount of a fresh moto bucket per
example with plain ``os`` calls (write, overwrite, append, rewrite in the middle, truncate,
unlink, mkdir, rmdir, rename of files and directories, reads, listings), changes the bucket
behind the mount's back through boto3, and remounts (with the same cache, or a fresh one as
"another machine"). The model is ``files: path -> bytes`` plus the directories made with
``mkdir`` (``markers``); a directory exists if it has a marker or holds a file, as in S3.
After every step the bucket itself must hold exactly the model's files (a closed file is
durable at once), and reads and listings through the mount must agree with the model.

Caveats: the mount runs with ``--metadata-ttl 0`` so out-of-band changes are visible at once
and the test needs no sleeps; the lifetimes themselves are tested in test_posix.py. Names come
from a small fixed set (files a, b, c at the root or in d1, d2) so collisions are common. Set
``FUSIONFS_MODEL_SEED`` to replay a run and ``FUSIONFS_MODEL_EXAMPLES`` to run longer; a
failing run prints its seed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from mount_support import Target

pytestmark = pytest.mark.mount

_FILE_NAMES = ("a", "b", "c")
_DIRS = ("d1", "d2")
_FILE_PATHS = tuple([*_FILE_NAMES, *(f"{d}/{n}" for d in _DIRS for n in _FILE_NAMES)])
_MOUNT_ARGS = ("--metadata-ttl", "0", "--chunk-size", "16K")

settings.register_profile(
    "fusionfs-mount-model",
    max_examples=int(os.environ.get("FUSIONFS_MODEL_EXAMPLES", "15")),
    stateful_step_count=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_SETTINGS = settings.get_profile("fusionfs-mount-model")


def _blob(n: int, salt: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{salt}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


# contents: mostly small, sometimes a few 16K chunks; (length, salt) shrinks well
_data = st.builds(
    _blob,
    st.one_of(st.integers(0, 100), st.integers(0, 70_000)),
    st.integers(0, 3),
)
_files = st.sampled_from(_FILE_PATHS)
_dirs = st.sampled_from(_DIRS)


def _errno(fn: Any, *args: Any) -> int | None:
    try:
        fn(*args)
    except OSError as err:
        return err.errno
    return None


class _Context:
    """What the test function hands the machine: the mount factory and where stores go."""

    kind: str = "s3"  # or "local"
    factory: Any = None
    client: Any = None  # s3
    endpoint: str = ""  # s3
    tmp: Path = Path("/nonexistent")  # local
    examples: int = 0
    steps: int = 0  # checks of the invariant, i.e. steps run, over all examples


class MountModel(RuleBasedStateMachine):
    ctx = _Context()

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.markers: set[str] = set()
        self.mount: Any = None
        name = f"model-{uuid.uuid4().hex[:20]}"
        if self.ctx.kind == "s3":
            self.target = Target(
                kind="s3",
                source=f"s3://{name}",
                mount_args=("--endpoint-url", self.ctx.endpoint),
                client=self.ctx.client,
                bucket=name,
            )
        else:
            root = self.ctx.tmp / name
            self.target = Target(kind="local", source=str(root), mount_args=(), root=root)
        # a local directory keeps a directory when its last file goes; S3 has no such thing
        self.dirs_persist = self.ctx.kind == "local"

    # -- model helpers -----------------------------------------------------------------------
    def _dir_exists(self, d: str) -> bool:
        return d in self.markers or any(p.startswith(d + "/") for p in self.files)

    def _parent_exists(self, path: str) -> bool:
        parent = path.rpartition("/")[0]
        return not parent or self._dir_exists(parent)

    def _listing(self, d: str) -> set[str]:
        prefix = d + "/" if d else ""
        names = {p[len(prefix) :].split("/")[0] for p in self.files if p.startswith(prefix)}
        if not d:
            names |= self.markers
        return names

    def _add_file(self, path: str, data: bytes) -> None:
        self.files[path] = data
        parent = path.rpartition("/")[0]
        if parent and self.dirs_persist:
            self.markers.add(parent)

    def _p(self, rel: str) -> Path:
        path: Path = self.mount.path / rel
        return path

    # -- lifecycle ---------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        self.ctx.examples += 1
        if self.target.kind == "s3":
            self.ctx.client.create_bucket(Bucket=self.target.bucket)
        else:
            assert self.target.root is not None
            self.target.root.mkdir()
        self.mount = self.ctx.factory(self.target.source, (*self.target.mount_args, *_MOUNT_ARGS))
        note(f"{self.target.source} mounted at {self.mount.path}")

    def teardown(self) -> None:
        try:
            if self.mount is not None:
                self.mount.unmount()
        finally:
            if self.target.kind == "s3":
                client, bucket = self.ctx.client, self.target.bucket
                try:
                    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                        if keys:
                            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
                    client.delete_bucket(Bucket=bucket)
                except client.exceptions.NoSuchBucket:
                    pass

    # -- file operations ---------------------------------------------------------------------
    @rule(path=_files, data=_data)
    def write(self, path: str, data: bytes) -> None:
        if not self._parent_exists(path):
            assert _errno(self._p(path).write_bytes, data) == errno.ENOENT
            return
        self._p(path).write_bytes(data)
        self._add_file(path, data)

    @rule(path=_files, data=_data)
    def append(self, path: str, data: bytes) -> None:
        if path not in self.files:
            return
        with open(self._p(path), "ab") as f:
            f.write(data)
        self.files[path] += data

    @rule(path=_files, data=_data, where=st.floats(0, 1))
    def rewrite_middle(self, path: str, data: bytes, where: float) -> None:
        if path not in self.files:
            return
        old = self.files[path]
        off = int(len(old) * where)
        with open(self._p(path), "r+b") as f:
            f.seek(off)
            f.write(data)
        new = bytearray(old)
        new[off : off + len(data)] = data
        self.files[path] = bytes(new)

    @rule(path=_files, size=st.one_of(st.integers(0, 50), st.integers(0, 80_000)))
    def truncate(self, path: str, size: int) -> None:
        if path not in self.files:
            assert _errno(os.truncate, self._p(path), size) == errno.ENOENT
            return
        os.truncate(self._p(path), size)
        old = self.files[path]
        self.files[path] = old[:size] + bytes(max(0, size - len(old)))

    @rule(path=_files)
    def unlink(self, path: str) -> None:
        if path not in self.files:
            assert _errno(os.unlink, self._p(path)) == errno.ENOENT
            return
        os.unlink(self._p(path))
        del self.files[path]

    @rule(src=_files, dst=_files)
    def rename_file(self, src: str, dst: str) -> None:
        if src not in self.files:
            assert _errno(os.rename, self._p(src), self._p(dst)) == errno.ENOENT
            return
        if not self._parent_exists(dst):
            assert _errno(os.rename, self._p(src), self._p(dst)) == errno.ENOENT
            return
        os.rename(self._p(src), self._p(dst))
        self._add_file(dst, self.files.pop(src))

    # -- directories -------------------------------------------------------------------------
    @rule(d=_dirs)
    def mkdir(self, d: str) -> None:
        if self._dir_exists(d):
            assert _errno(os.mkdir, self._p(d)) == errno.EEXIST
            return
        os.mkdir(self._p(d))
        self.markers.add(d)

    @rule(d=_dirs)
    def rmdir(self, d: str) -> None:
        if not self._dir_exists(d):
            assert _errno(os.rmdir, self._p(d)) == errno.ENOENT
        elif self._listing(d):
            assert _errno(os.rmdir, self._p(d)) == errno.ENOTEMPTY
        else:
            os.rmdir(self._p(d))
            self.markers.discard(d)

    @rule(src=_dirs, dst=_dirs)
    def rename_dir(self, src: str, dst: str) -> None:
        if src == dst or not self._dir_exists(src) or self._dir_exists(dst):
            return
        os.rename(self._p(src), self._p(dst))
        for path in [p for p in self.files if p.startswith(src + "/")]:
            self.files[dst + path[len(src) :]] = self.files.pop(path)
        if src in self.markers:
            self.markers.discard(src)
            self.markers.add(dst)
        elif not self._dir_exists(dst):
            self.markers.add(dst)  # an empty directory moved keeps existing

    # -- reads -------------------------------------------------------------------------------
    @rule(path=_files)
    def read(self, path: str) -> None:
        if path not in self.files:
            assert _errno(self._p(path).read_bytes) in (errno.ENOENT, errno.ENOTDIR)
            return
        got = self._p(path).read_bytes()
        assert got == self.files[path], (
            f"{path}: read {len(got)} bytes, model has {len(self.files[path])}"
        )

    @rule(d=st.sampled_from(("", *_DIRS)))
    def listdir(self, d: str) -> None:
        if d and not self._dir_exists(d):
            assert _errno(os.listdir, self._p(d)) == errno.ENOENT
            return
        assert set(os.listdir(self._p(d))) == self._listing(d)

    # -- out of band and remounts ------------------------------------------------------------
    @rule(path=_files, data=_data)
    def oob_put(self, path: str, data: bytes) -> None:
        if self.target.kind == "local" and path.rpartition("/")[0] in self.files:
            return  # not possible in a directory tree
        self.target.put(path, data)
        self._add_file(path, data)

    @rule(path=_files)
    def oob_delete(self, path: str) -> None:
        if path in self.files:
            self.target.delete(path)
            del self.files[path]

    @rule(fresh=st.booleans())
    def remount(self, fresh: bool) -> None:
        self.mount = self.mount.remount(fresh_cache=fresh)

    # -- after every step ----------------------------------------------------------------------
    @invariant()
    def bucket_matches_model(self) -> None:
        if self.mount is None:
            return
        self.ctx.steps += 1
        file_keys = {k for k in self.target.keys() if not k.endswith("/")}
        assert file_keys == set(self.files), "the store's objects differ from the model"
        for path, data in self.files.items():
            body = self.target.get(path)
            assert body == data, (
                f"{path} in the store: {body and len(body)} bytes, model {len(data)}"
            )
        assert set(os.listdir(self.mount.path)) == self._listing("")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["s3", "local"])
def test_mount_against_model(
    fusion_mount: Any, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """Random operations, out-of-band changes and remounts agree with the model."""
    ctx = MountModel.ctx = _Context()
    ctx.kind = kind
    ctx.factory = fusion_mount
    ctx.tmp = tmp_path
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        ctx.client, ctx.endpoint = bucket.client, bucket.endpoint
    run_seed = int(os.environ.get("FUSIONFS_MODEL_SEED") or random.randrange(1 << 32))
    try:
        run_state_machine_as_test(  # type: ignore[no-untyped-call]
            seed(run_seed)(MountModel), settings=_SETTINGS
        )
    except BaseException:
        print(
            f"\nmodel test failed with seed {run_seed}: rerun with "
            f"FUSIONFS_MODEL_SEED={run_seed} python -m pytest {__file__}"
        )
        raise
    print(f"\nmodel: {ctx.examples} examples, {ctx.steps} steps, seed {run_seed}")
    # the run did something: most examples got past their first few steps
    assert ctx.examples >= _SETTINGS.max_examples
    assert ctx.steps >= ctx.examples * 5
