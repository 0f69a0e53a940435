"""Tests for fusionfs.store.retry.call_with_retry: attempts, deadline, backoff, translation."""

from __future__ import annotations

import time

import pytest

from fusionfs.stats import Stats
from fusionfs.store.base import StoreError, Transient
from fusionfs.store.retry import call_with_retry


class _Clock:
    """A fake monotonic clock that only moves when the helper sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class _Flaky:
    """Fails with ``errors`` in turn, then returns ``value``."""

    def __init__(self, errors: list[Exception], value: str = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def _transient(err: BaseException) -> bool:
    return isinstance(err, (Transient, ConnectionError))


def test_success_first_try_does_not_sleep() -> None:
    clock = _Clock()
    fn = _Flaky([])
    assert (
        call_with_retry(
            fn,
            is_transient=_transient,
            deadline_s=5,
            max_attempts=3,
            sleep=clock.sleep,
            clock=clock,
        )
        == "ok"
    )
    assert fn.calls == 1
    assert clock.sleeps == []


def test_transient_errors_are_retried_and_counted() -> None:
    clock = _Clock()
    stats = Stats()
    fn = _Flaky([Transient("a"), Transient("b")])
    result = call_with_retry(
        fn,
        is_transient=_transient,
        deadline_s=30,
        max_attempts=5,
        stats=stats,
        sleep=clock.sleep,
        clock=clock,
        jitter=lambda: 1.0,
    )
    assert result == "ok"
    assert fn.calls == 3
    assert stats.retries == 2
    # full jitter with jitter()=1.0 sleeps the whole cap: 50 ms, then 100 ms
    assert clock.sleeps == pytest.approx([0.05, 0.1])


def test_permanent_error_is_not_retried() -> None:
    clock = _Clock()
    fn = _Flaky([StoreError("denied"), Transient("never reached")])
    with pytest.raises(StoreError, match="denied") as info:
        call_with_retry(
            fn,
            is_transient=_transient,
            deadline_s=30,
            max_attempts=5,
            sleep=clock.sleep,
            clock=clock,
        )
    assert not isinstance(info.value, Transient)
    assert fn.calls == 1
    assert clock.sleeps == []


@pytest.mark.allow_logs("giving up on flaky op after 4 attempt(s)")
def test_stops_after_max_attempts_with_last_error() -> None:
    clock = _Clock()
    fn = _Flaky([Transient(f"e{i}") for i in range(10)])
    with pytest.raises(Transient, match="e3"):
        call_with_retry(
            fn,
            is_transient=_transient,
            deadline_s=1000,
            max_attempts=4,
            sleep=clock.sleep,
            clock=clock,
            what="flaky op",
        )
    assert fn.calls == 4
    assert len(clock.sleeps) == 3


@pytest.mark.allow_logs("giving up on")
def test_stops_at_the_deadline_and_never_sleeps_past_it() -> None:
    """[S-FAIL-1] transient errors are retried within a deadline, then the last one is raised."""
    clock = _Clock()
    fn = _Flaky([Transient("x")] * 1000)
    with pytest.raises(Transient):
        call_with_retry(
            fn,
            is_transient=_transient,
            deadline_s=10,
            max_attempts=1000,
            sleep=clock.sleep,
            clock=clock,
            jitter=lambda: 1.0,
        )
    assert clock.now - 100.0 == pytest.approx(10.0)
    # the backoff caps at 2 s: 0.05 0.1 0.2 0.4 0.8 1.6 2 2 2 then what is left of the 10 s
    assert max(clock.sleeps) == pytest.approx(2.0)
    assert fn.calls < 20


def test_backoff_doubles_to_the_cap() -> None:
    """[S-FAIL-1] the retries back off exponentially, up to a cap."""
    clock = _Clock()
    fn = _Flaky([Transient("x")] * 8)
    call_with_retry(
        fn,
        is_transient=_transient,
        deadline_s=1000,
        max_attempts=100,
        sleep=clock.sleep,
        clock=clock,
        jitter=lambda: 1.0,
    )
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])


def test_jitter_scales_the_sleep() -> None:
    """[S-FAIL-1] each backoff is jittered."""
    clock = _Clock()
    fn = _Flaky([Transient("x")] * 3)
    call_with_retry(
        fn,
        is_transient=_transient,
        deadline_s=1000,
        max_attempts=10,
        sleep=clock.sleep,
        clock=clock,
        jitter=lambda: 0.5,
    )
    assert clock.sleeps == pytest.approx([0.025, 0.05, 0.1])


def test_real_jitter_stays_within_the_cap() -> None:
    clock = _Clock()
    fn = _Flaky([Transient("x")] * 6)
    call_with_retry(
        fn,
        is_transient=_transient,
        deadline_s=1000,
        max_attempts=10,
        sleep=clock.sleep,
        clock=clock,
    )
    caps = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    assert all(0 <= s <= cap for s, cap in zip(clock.sleeps, caps, strict=True))


@pytest.mark.allow_logs("giving up")
def test_translate_applies_to_the_final_error_and_chains_it() -> None:
    clock = _Clock()
    native = ConnectionError("reset by peer")
    fn = _Flaky([ConnectionError("first"), native])

    def translate(err: Exception) -> BaseException:
        return Transient(f"translated: {err}")

    with pytest.raises(Transient, match="translated: reset by peer") as info:
        call_with_retry(
            fn,
            is_transient=_transient,
            deadline_s=1000,
            max_attempts=2,
            sleep=clock.sleep,
            clock=clock,
            translate=translate,
        )
    assert info.value.__cause__ is native


def test_translate_applies_to_permanent_errors_too() -> None:
    def fn() -> None:
        raise KeyError("boom")

    with pytest.raises(StoreError, match="boom"):
        call_with_retry(
            fn,
            is_transient=_transient,
            deadline_s=1,
            max_attempts=3,
            translate=lambda err: StoreError(f"wrapped {err}"),
        )


def test_base_exceptions_are_not_retried() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        call_with_retry(fn, is_transient=lambda e: True, deadline_s=10, max_attempts=5)
    assert calls == [1]


@pytest.mark.allow_logs("giving up")
def test_real_clock_deadline_bounds_wall_time() -> None:
    fn = _Flaky([Transient("x")] * 10_000)
    started = time.monotonic()
    with pytest.raises(Transient):
        call_with_retry(fn, is_transient=_transient, deadline_s=0.3, max_attempts=10_000)
    assert time.monotonic() - started < 1.0
    assert fn.calls >= 2


@pytest.mark.parametrize(("deadline", "attempts"), [(-1.0, 3), (1.0, 0)])
def test_bad_budget_is_rejected(deadline: float, attempts: int) -> None:
    with pytest.raises(ValueError):
        call_with_retry(
            lambda: 1, is_transient=_transient, deadline_s=deadline, max_attempts=attempts
        )


@pytest.mark.allow_logs("giving up on get thing")
def test_giving_up_is_logged_once_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    fn = _Flaky([Transient("x")] * 5)
    with pytest.raises(Transient):
        call_with_retry(
            fn,
            is_transient=_transient,
            deadline_s=100,
            max_attempts=3,
            sleep=clock.sleep,
            clock=clock,
            what="get thing",
        )
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "giving up on get thing after 3 attempt(s)" in warnings[0].getMessage()
