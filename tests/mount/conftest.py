"""Fixtures for the real-mount tests: ``target`` is the store a test mounts, parametrized over
a local directory (``local``) and a bucket on the moto S3 server (``s3``); ``s3_target`` is the
S3 variant alone. Both give out-of-band access to the objects (see ``mount_support.Target``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mount_support import Target


def _make(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if kind == "local":
        root = tmp_path / "source"
        root.mkdir()
        return Target(kind="local", source=str(root), mount_args=(), root=root)
    bucket = request.getfixturevalue("s3_bucket")
    return Target(
        kind="s3",
        source=bucket.source,
        mount_args=("--endpoint-url", bucket.endpoint),
        client=bucket.client,
        bucket=bucket.name,
    )


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh, empty store: a local directory, or a moto bucket."""
    return _make(str(request.param), request, tmp_path)


@pytest.fixture
def s3_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh, empty bucket on the moto server."""
    return _make("s3", request, tmp_path)


@pytest.fixture
def local_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh, empty local source directory."""
    return _make("local", request, tmp_path)
