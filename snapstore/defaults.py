"""Defaults shared by the commands and ``snapstore.supervisor``, in a module of their own so
that the command line parses without importing the supervisor (a restore's start-up time)."""

from __future__ import annotations

__all__ = ["DEFAULT_KEEP", "PROVIDERS", "SIGTERM_WINDOW_S", "default_margin"]

PROVIDERS = ("auto", "aws", "gcp", "azure", "none")
SIGTERM_WINDOW_S = 30.0  # Kubernetes' default terminationGracePeriodSeconds, ECS's stopTimeout
DEFAULT_KEEP = 2


def default_margin(window: float) -> float:
    """The safety margin kept free at the end of a window: 10% of it, at least 1 s."""
    return max(1.0, 0.1 * window)
