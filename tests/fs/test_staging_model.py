"""Model test of the staging writer under concurrent requests, on the core without a kernel.

Hypothesis draws plans (``tests/staging_plans.py``): phases in which several workers write into
one file at once through their own handles (byte ranges no other worker touches in the phase,
from 1 byte to several MiB, straddling chunks, past the end), with fsyncs in between, then
truncates, renames and cold remounts. Every phase is checked against the in-memory model: the
files read through the filesystem, the objects in the store, and nothing left staged.

The interleavings: the workers are trio tasks; every store call runs in a worker thread and
sleeps a random 0-2 ms first (seeded per example), and trio's own scheduler, which shuffles the
tasks that are ready at each step, is seeded per example too, so each example runs a different
interleaving of the awaits in the writer. CI runs a few hundred examples per store;
``pytest --stress`` (or ``FUSIONFS_STRESS_EXAMPLES=N``) runs many thousands.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio._core._run as trio_run
from fs_harness import CHUNK, FsFactory, Harness, MiB
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from staging_plans import (
    Model,
    Plan,
    Remount,
    Rename,
    Truncate,
    Writes,
    by_worker,
    plans,
    requests,
)

from fusionfs.store import FaultyStore, LocalStore, ObjectStore

_KERNEL_IO = 128 * 1024


class _Jitter:
    """Delegates to a store; each call first sleeps a random 0-2 ms (seeded), in its thread."""

    def __init__(self, inner: ObjectStore, seed: int) -> None:
        self._inner = inner
        self._rng = random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            time.sleep(self._rng.random() * 0.002)
            return attr(*args, **kwargs)

        return call


def _examples(request: pytest.FixtureRequest, default: int) -> int:
    env = os.environ.get("FUSIONFS_STRESS_EXAMPLES")
    if env:
        return int(env)
    return 10_000 if request.config.getoption("--stress") else default


async def _check(h: Harness, model: Model) -> None:
    for name, data in model.files.items():
        got = await h.read_file(name)
        assert got == bytes(data), f"{name} through the filesystem differs from the model"
        stored = await h.get(name)
        assert stored == bytes(data), f"{name} in the store differs from the model"
    assert not list(h.staging_dir.glob("*.data")), "a staged file was left behind"


async def _writes(h: Harness, phase: Writes) -> None:
    flags = os.O_RDWR if phase.read_write else os.O_WRONLY
    fhs = [await h.open(phase.name, flags) for _ in range(phase.workers)]

    async def worker(fh: int, pieces: list[Any]) -> None:
        for piece in pieces:
            for off, data in requests(piece, _KERNEL_IO):
                assert await h.write(fh, off, data) == len(data)
            if piece.fsync_after:
                await h.fs.fsync(fh)

    try:
        async with trio.open_nursery() as nursery:
            for fh, pieces in zip(fhs, by_worker(phase), strict=True):
                nursery.start_soon(worker, fh, pieces)
    finally:
        for fh in fhs:
            await h.close(fh)


async def _run(plan: Plan, make_store: Callable[[], FaultyStore], tmp: Path) -> None:
    async with trio.open_nursery() as nursery:
        factory = FsFactory(nursery, tmp)
        store = make_store()
        try:
            h = await factory(store)
            model = Model()
            for name, size, seed in plan.initial:
                data = random.Random(seed).randbytes(size)
                await h.write_file(name, data)
                model.files[name] = bytearray(data)
            await _check(h, model)
            for phase in plan.phases:
                note(f"phase {phase}")
                if isinstance(phase, Writes):
                    await _writes(h, phase)
                elif isinstance(phase, Truncate):
                    await h.truncate(phase.name, phase.size)
                elif isinstance(phase, Rename):
                    await h.rename(phase.src, phase.dst)
                elif isinstance(phase, Remount):
                    h = await factory(store)  # a fresh cache: another machine
                model.apply(phase)
                await _check(h, model)
            fresh = await factory(store)
            await _check(fresh, model)
        finally:
            store.clear()
            with trio.CancelScope(shield=True):
                for harness in factory.harnesses:
                    await harness.shutdown()
            store.close()
            nursery.cancel_scope.cancel()


def _run_example(plan: Plan, seed: int, make_inner: Callable[[Path], ObjectStore]) -> None:
    saved = trio_run._r.getstate()
    trio_run._r.seed(seed)  # trio's scheduler shuffles ready tasks with this generator
    try:
        with tempfile.TemporaryDirectory(prefix="staging-model-") as tmp:
            root = Path(tmp)
            trio.run(_run, plan, lambda: FaultyStore(_Jitter(make_inner(root), seed)), root)
    finally:
        trio_run._r.setstate(saved)


def _local(root: Path) -> ObjectStore:
    (root / "store").mkdir(exist_ok=True)
    return LocalStore(root / "store")


_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


@pytest.fixture
def examples(request: pytest.FixtureRequest) -> Iterator[int]:
    yield _examples(request, 200)


@pytest.mark.timeout(0)  # bounded by its example count; a hang fails the harness's own timeouts
def test_concurrent_writers_against_model_local(examples: int) -> None:
    """S-WRITE-10, S-CONS-5: concurrent writers, fsyncs, truncates, renames and cold remounts
    on the local store agree with the model after every phase, whatever the interleaving."""

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=_SUPPRESS,
        print_blob=True,
        derandomize=False,
    )
    @given(plan=plans(max_size=6 * MiB, chunk=CHUNK), seed=st.integers(0, 1 << 32))
    def run(plan: Plan, seed: int) -> None:
        _run_example(plan, seed, _local)

    run()


@pytest.mark.s3
@pytest.mark.timeout(0)
def test_concurrent_writers_against_model_moto(
    examples: int, moto: Any, request: pytest.FixtureRequest
) -> None:
    """S-WRITE-10, S-CONS-5: the same on moto (smaller files: moto copies the whole object on
    every ranged GET)."""
    from s3servers import bucket_on

    from fusionfs.store.s3 import S3Store

    with bucket_on(moto) as bucket:
        counter = iter(range(1 << 62))

        def make(_root: Path) -> ObjectStore:
            return S3Store(
                bucket.name,
                f"ex{next(counter)}",
                endpoint_url=bucket.endpoint,
                region="us-east-1",
                deadline_s=10,
            )

        @settings(
            max_examples=max(1, examples // 4),
            deadline=None,
            suppress_health_check=_SUPPRESS,
            print_blob=True,
        )
        @given(
            plan=plans(max_size=1 * MiB, chunk=CHUNK, max_phases=4), seed=st.integers(0, 1 << 32)
        )
        def run(plan: Plan, seed: int) -> None:
            _run_example(plan, seed, make)

        run()
