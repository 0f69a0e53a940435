"""Fixtures for testing the fusionfs core (``Filesystem``) without a kernel.

``make_fs(store, **options)`` (an ``fs_harness.FsFactory``) builds a core with
``fusionfs.core.build_core``, the builder the mount uses (chunk cache -> ``ChunkSource`` ->
``Uploader`` -> ``Filesystem``, with their background tasks and the retry loop), each inside
its own nursery run as a background task of the fixture, and returns an
``fs_harness.Harness``: the parts plus a small API that makes the calls the kernel would make
(lookup, create/open, read/write, flush+release, opendir/readdir/releasedir, ...). pyfuse3 is
never imported here.

Stores: ``any_store`` is parametrized over ``LocalStore`` and ``S3Store`` (against the
``s3_bucket`` moto server fixture from ``tests/conftest.py``); ``local_store`` is LocalStore only
(for big files: moto copies the whole object on every ranged GET), ``s3_store`` S3Store only.
All come wrapped in a ``FaultyStore`` so that every test can count calls and inject faults;
``.inner`` is the real one.

``clock`` is trio's clock as a ``MockClock`` that stands still until the test moves it
(``clock.jump``), for tests of TTLs: a TTL expires exactly when the test says so.

Caveat: teardown does not flush: a test that wants data durable closes its files (or calls
``fs.flush_all()``). Teardown releases every stall first, so no worker thread stays blocked in a
``FaultyStore``, then stops every filesystem, then closes the stores.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from fs_harness import FsFactory
from trio.testing import MockClock

from fusionfs.store import FaultyStore, LocalStore, ObjectStore


@pytest.fixture
async def make_fs(tmp_path: Path) -> AsyncIterator[FsFactory]:
    async with trio.open_nursery() as nursery:
        factory = FsFactory(nursery, tmp_path)
        try:
            yield factory
        finally:
            for h in factory.harnesses:
                h.store.clear()  # release stalled worker threads
            with trio.CancelScope(shield=True), trio.fail_after(30):
                for h in factory.harnesses:
                    await h.shutdown()
            for store in {id(h.store): h.store for h in factory.harnesses}.values():
                store.close()


@pytest.fixture
def clock() -> MockClock:
    """trio's clock for the test (pytest-trio runs a test with the clock it is given), standing
    still: only ``clock.jump(s)`` moves it, so an attribute TTL expires exactly when the test
    says, however long the store calls take (they run in threads, in real time). Caveat:
    nothing that waits on trio's clock moves on by itself (``trio.sleep``, ``wait_until``,
    ``Harness.settle``, timeouts): a test with this clock does not use them."""
    return MockClock(rate=0.0)


def _wrap(inner: ObjectStore) -> Iterator[FaultyStore]:
    store = FaultyStore(inner)
    try:
        yield store
    finally:
        store.clear()
        store.close()


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[FaultyStore]:
    """A ``FaultyStore`` over an empty ``LocalStore``."""
    root = tmp_path / "store"
    root.mkdir()
    yield from _wrap(LocalStore(root))


def _s3(request: pytest.FixtureRequest) -> ObjectStore:
    from fusionfs.store.s3 import S3Store

    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket.name, endpoint_url=bucket.endpoint, region="us-east-1", deadline_s=10)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FaultyStore]:
    """A ``FaultyStore`` over an empty ``LocalStore``, then over an empty ``S3Store`` (moto)."""
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        yield from _wrap(LocalStore(root))
    else:
        yield from _wrap(_s3(request))


@pytest.fixture
def s3_store(request: pytest.FixtureRequest) -> Iterator[FaultyStore]:
    """A ``FaultyStore`` over an empty ``S3Store`` on the moto server."""
    yield from _wrap(_s3(request))
