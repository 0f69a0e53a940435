"""One bounded retry loop for store calls: jittered exponential backoff under a deadline.

Every backend funnels its requests through :func:`call_with_retry`, so there is exactly one
retry loop in fusionfs (boto3's own retries are switched off in ``S3Store``). A call is retried
only while ``is_transient`` says its error is worth retrying, and never past whichever comes
first: ``max_attempts`` attempts or ``deadline_s`` seconds since the first attempt started.

Backoff is "full jitter" (AWS architecture blog): before retry *n* the helper sleeps a uniform
random time in ``[0, min(max_delay_s, base_delay_s * 2**(n-1))]``, and never sleeps past the
deadline.

Caveats:

- The deadline bounds when a *new* attempt may start. An attempt already running is bounded only
  by the backend's own socket timeouts, so the worst case is about ``deadline_s`` plus one
  attempt's timeout.
- The helper sleeps with ``time.sleep``: call it from a worker thread, never on the trio thread.
- Retries are logged at DEBUG; giving up on a transient error is logged once at WARNING.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from ..stats import Stats

__all__ = ["call_with_retry"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: A thread-safe source of jitter (``random.random`` on the module-level generator is).
_random = random.random


def call_with_retry(
    fn: Callable[[], _T],
    *,
    is_transient: Callable[[BaseException], bool],
    deadline_s: float,
    max_attempts: int,
    stats: Stats | None = None,
    what: str = "",
    translate: Callable[[Exception], BaseException] | None = None,
    base_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = _random,
) -> _T:
    """Call ``fn()`` until it succeeds, fails for good, or the retry budget is spent.

    ``is_transient(err)`` decides whether an ``Exception`` raised by ``fn`` is worth another
    attempt. When the call fails for good (a permanent error, the last attempt, or the deadline),
    the error is raised as ``translate(err)`` (chained ``from err``) if ``translate`` is given,
    else as is. ``BaseException``s that are not ``Exception``s (``KeyboardInterrupt``,
    ``trio.Cancelled``, ...) are never retried nor translated.

    ``stats.retries`` is incremented once per retry (not per attempt). ``what`` names the
    operation in log messages (it must not contain credentials).

    ``sleep``, ``clock`` and ``jitter`` (a function returning a float in ``[0, 1)``) exist for
    tests.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if deadline_s < 0:
        raise ValueError(f"deadline_s must be >= 0, got {deadline_s}")
    started = clock()
    deadline = started + deadline_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                _raise_final(err, translate)
            remaining = deadline - clock()
            if attempt >= max_attempts or remaining <= 0:
                _log.warning(
                    "giving up on %s after %d attempt(s) in %.1f s: %s",
                    what or "store call",
                    attempt,
                    clock() - started,
                    _one_line(err),
                )
                _raise_final(err, translate)
            cap = min(max_delay_s, base_delay_s * (2 ** (attempt - 1)))
            delay = min(cap * jitter(), remaining)
            _log.debug(
                "retrying %s (attempt %d failed: %s) in %.3f s",
                what or "store call",
                attempt,
                _one_line(err),
                delay,
            )
            if stats is not None:
                stats.add("retries")
            if delay > 0:
                sleep(delay)


def _raise_final(
    err: Exception, translate: Callable[[Exception], BaseException] | None
) -> NoReturn:
    if translate is None:
        raise err
    translated = translate(err)
    if translated is err:
        raise err
    raise translated from err


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
