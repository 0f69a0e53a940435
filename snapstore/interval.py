"""``--checkpoint-interval auto``: periodic checkpoints just often enough for the final one to fit.

When a notice comes, the final checkpoint uploads what changed since the last snapshot. Its
duration is modelled from the checkpoints this run has already taken as ``a + b * N``: a fixed
part ``a`` (freezing, CRIU's walk of the task, hashing every page, the commit) and ``b`` seconds
per byte newly stored. With two or more checkpoints whose new bytes differ enough, ``a`` and ``b``
come from a least-squares line through the last few; with one, three quarters of its time is
taken as proportional to its bytes and a quarter as fixed. The task's churn ``c`` (bytes newly
stored per second of running) is the largest rate seen between consecutive checkpoints, so a
burst is not averaged away. The next interval ``I`` is then the longest for which the final
checkpoint still fits: ``a + b * min(c * I, S) <= SAFETY * budget``, where ``budget`` is the
window minus the margin and ``S`` the stored size of the whole task (nothing can change more
than all of it). Bounds: at least ``MIN_INTERVAL_S`` and twice the last checkpoint's duration
(the task must not spend more than a third of its time frozen or competing with uploads), at
most ``MAX_INTERVAL_S``.

Before any measurement the first checkpoint comes after half the budget: until it commits, a
notice can only be answered with a full checkpoint. Every choice is logged with its inputs.
"""

from __future__ import annotations

import dataclasses
import itertools

__all__ = ["AutoInterval", "Plan"]

MIN_INTERVAL_S = 5.0
MAX_INTERVAL_S = 1800.0
SAFETY = 0.8
_HISTORY = 5


@dataclasses.dataclass(frozen=True)
class _Sample:
    started: float  # time.monotonic() when the checkpoint began
    new_bytes: int  # bytes it stored that were not stored before
    stored_bytes: int  # bytes every chunk of the snapshot takes in the store
    seconds: float  # its whole duration


@dataclasses.dataclass(frozen=True)
class Plan:
    interval: float
    reason: str  # one line for the log


class AutoInterval:
    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._samples: list[_Sample] = []

    def first(self) -> Plan:
        delay = max(MIN_INTERVAL_S, 0.5 * self.budget)
        return Plan(delay, f"first checkpoint in {delay:.0f} s (half the {self.budget:g} s budget)")

    def _model(self) -> tuple[float, float]:
        """(a, b): fixed seconds and seconds per new byte."""
        pts = [(s.new_bytes, s.seconds) for s in self._samples[-_HISTORY:]]
        xs = [x for x, _ in pts]
        if len(pts) >= 2 and max(xs) > 1.5 * max(1, min(xs)):
            n = len(pts)
            mx = sum(xs) / n
            my = sum(y for _, y in pts) / n
            sxx = sum((x - mx) ** 2 for x in xs)
            b = sum((x - mx) * (y - my) for x, y in pts) / sxx
            if b > 0:
                a = max(0.0, my - b * mx)
                # never below what was seen: the line is fitted, the slowest point is a fact
                a = max(a, min(y - b * x for x, y in pts))
                return a, b
        last = self._samples[-1]
        return 0.25 * last.seconds, 0.75 * last.seconds / max(1, last.new_bytes)

    def after(self, started: float, new_bytes: int, stored_bytes: int, seconds: float) -> Plan:
        """A checkpoint that began at ``started`` committed: when should the next one come?"""
        self._samples.append(_Sample(started, new_bytes, stored_bytes, seconds))
        if len(self._samples) < 2:
            plan = self.first()
            return Plan(plan.interval, f"next in {plan.interval:.0f} s (measuring the churn)")
        a, b = self._model()
        recent = self._samples[-_HISTORY - 1 :]
        churn = max(
            cur.new_bytes / max(1e-3, cur.started - prev.started)
            for prev, cur in itertools.pairwise(recent)
        )
        whole = max(s.stored_bytes for s in self._samples[-_HISTORY:])
        target = SAFETY * self.budget
        floor = max(MIN_INTERVAL_S, 2 * seconds)
        inputs = (
            f"checkpoint model {a:.1f} s + {b * 1e6:.3f} s/MB, churn {churn / 1e6:.1f} MB/s, "
            f"task {whole / 1e6:.0f} MB stored, final budget {target:.1f} s"
        )
        if a + b * whole <= target:
            return Plan(
                MAX_INTERVAL_S,
                f"even a full checkpoint fits; next in {MAX_INTERVAL_S:.0f} s ({inputs})",
            )
        if a >= target or churn <= 0:
            return Plan(
                floor,
                f"warning: a final checkpoint cannot fit the window even right "
                f"after a periodic one; next in {floor:.0f} s ({inputs})",
            )
        interval = (target - a) / (b * churn)
        if interval < floor:
            return Plan(
                floor,
                f"warning: the task changes faster than a final checkpoint can "
                f"keep up with; next in {floor:.0f} s, a final one may not fit ({inputs})",
            )
        interval = min(interval, MAX_INTERVAL_S)
        return Plan(interval, f"next in {interval:.0f} s ({inputs})")
