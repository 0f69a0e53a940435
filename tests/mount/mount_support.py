"""Shared pieces of the mount tests: a store "target" (local directory or moto bucket) with
out-of-band access to its objects, and small wrappers around the ``fusionfs`` command line.

Caveat: the out-of-band view of a local-directory target reads the directory itself, so it
sees the LocalStore's layout (``.fusionfs-tmp`` is skipped, directories are markers); the S3
view goes through boto3 against the moto server, exactly as another S3 client would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["REPO_ROOT", "Target", "cli", "cli_env", "is_mounted", "stats"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_TMP = ".fusionfs-tmp"


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mount point per /proc/self/mountinfo (true for a dead FUSE mount
    too, unlike ``os.path.ismount``)."""
    target = os.path.abspath(os.fspath(path))
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                point = fields[4].encode().decode("unicode_escape")
                if point.encode("latin-1").decode(errors="replace") == target:
                    return True
    return False


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m fusionfs`` subprocess (repo on PYTHONPATH)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    env.update(extra or {})
    return env


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fusionfs ARGS`` and return its result (never raises on exit code)."""
    return subprocess.run(
        [sys.executable, "-m", "fusionfs", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def stats(mountpoint: Path) -> dict[str, Any]:
    """``fusionfs stats MP --json``, parsed."""
    result = cli("stats", str(mountpoint), "--json", timeout=30)
    assert result.returncode == 0, f"fusionfs stats failed: {result.stderr.strip()}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@dataclasses.dataclass
class Target:
    """Where a mount's objects live, with a view of them that bypasses the mount."""

    kind: str  # "local" or "s3"
    source: str
    mount_args: tuple[str, ...]
    root: Path | None = None  # local
    client: Any = None  # s3: boto3 client
    bucket: str = ""

    # -- out-of-band access ------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        if self.kind == "s3":
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
            return
        assert self.root is not None
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.oob-tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        if self.kind == "s3":
            try:
                body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None
            return body
        assert self.root is not None
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def delete(self, key: str) -> None:
        if self.kind == "s3":
            self.client.delete_object(Bucket=self.bucket, Key=key)
            return
        assert self.root is not None
        path = self.root / key
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)

    def keys(self, prefix: str = "") -> set[str]:
        """Every object key under ``prefix`` (files; for S3 also directory markers)."""
        if self.kind == "s3":
            out: set[str] = set()
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                out.update(item["Key"] for item in page.get("Contents", []))
            return out
        assert self.root is not None
        found: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d != _TMP]
                rel = ""
            for name in filenames:
                key = f"{rel}/{name}" if rel else name
                if key.startswith(prefix):
                    found.add(key)
        return found

    def metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata (S3 only)."""
        assert self.kind == "s3"
        md: dict[str, str] = self.client.head_object(Bucket=self.bucket, Key=key)["Metadata"]
        return md
