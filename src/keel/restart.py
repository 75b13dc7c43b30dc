"""When to restart a crashed process, and when to give up: one policy for both supervisors.

``keel serve --supervise`` restarts keel itself and the worker supervisor
restarts a local model's worker; both wait an exponential backoff before each
restart and give up once ``start_limit`` starts fall within ``start_window``
seconds (systemd's StartLimitBurst / StartLimitIntervalSec), so a crash loop
ends with a message instead of running unnoticed for days. Exits that no
restart can fix (:data:`keel.errors.NO_RESTART`) end supervision at once.

Kept free of heavy imports: the supervisor of ``keel serve`` imports it
before anything else of keel.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    start_limit: int = 5
    start_window: float = 300.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before restarting after ``failures`` crashes within the window."""
        return float(min(self.backoff_max, self.backoff_initial * 2 ** max(0, failures - 1)))

    def exhausted(self, starts: deque[float], now: float) -> bool:
        """Whether to give up: drops the starts older than the window from ``starts``,
        then tells if ``start_limit`` of them remain."""
        while starts and now - starts[0] > self.start_window:
            starts.popleft()
        return len(starts) >= self.start_limit
