"""Retries that cannot multiply an outage: jittered backoff under a budget.

The budget allows retries of at most ``ratio`` of the requests seen over the
last ``window`` seconds (plus a small floor so a quiet server can still retry
at all). When a backend dies, every request fails at once; without a budget
each would retry and the dead backend, or its fallback, would see a multiple
of the normal load.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from keel.router.window import WindowCounts


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts_per_provider: int = 2
    backoff_initial: float = 0.05
    backoff_max: float = 1.0
    budget_ratio: float = 0.2
    budget_window: float = 10.0
    budget_floor: int = 3

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**attempt)]."""
        return float(rng() * min(self.backoff_max, self.backoff_initial * 2.0**attempt))


class RetryBudget:
    def __init__(
        self, policy: RetryPolicy | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._clock = clock
        self._requests = WindowCounts(self.policy.budget_window)
        self._retries = WindowCounts(self.policy.budget_window)

    def record_request(self) -> None:
        self._requests.add(self._clock())

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one left."""
        now = self._clock()
        self._requests.trim(now)
        self._retries.trim(now)
        allowed = self.policy.budget_floor + self.policy.budget_ratio * self._requests.total
        if self._retries.total + 1 > allowed:
            return False
        self._retries.add(now)
        return True
