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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


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
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for events in (self._requests, self._retries):
            while events and now - events[0] > self.policy.budget_window:
                events.popleft()

    def record_request(self) -> None:
        now = self._clock()
        self._trim(now)
        self._requests.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one left."""
        now = self._clock()
        self._trim(now)
        allowed = self.policy.budget_floor + self.policy.budget_ratio * len(self._requests)
        if len(self._retries) + 1 > allowed:
            return False
        self._retries.append(now)
        return True
