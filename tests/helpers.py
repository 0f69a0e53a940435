"""Small helpers shared by the test suites (import as ``from helpers import ...``).

``missing`` is the one way to react to an absent component (FUSE, CRIU, the S3 test server):
it skips with the reason locally and fails under ``CI=true``, so CI never goes green by
skipping. ``wait_for`` (blocking) and ``wait_until`` (trio) are the way to wait for something
to happen: on the event itself with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import pytest

__all__ = ["free_port", "missing", "wait_for", "wait_until"]

_T = TypeVar("_T")


def missing(what: str, why: str) -> NoReturn:
    """Skip the test because ``what`` is unavailable (``why``); fail instead under CI=true."""
    reason = f"{what} is not available: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing component is a failure)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual, racy, way)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], _T], timeout: float, what: str, *, interval: float = 0.05
) -> _T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds. The predicate is
    always tried once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_until(
    predicate: Callable[[], _T | Awaitable[_T]],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
) -> _T:
    """``wait_for`` for trio tests: poll ``predicate`` (a function or a coroutine function)
    until it returns something truthy, and return that, sleeping ``interval`` between tries in
    trio, so the code under test runs meanwhile.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds of trio's clock. The
    predicate is always tried once more at the deadline.
    """
    import trio

    deadline = trio.current_time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if trio.current_time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await trio.sleep(interval)
