"""A circuit breaker per provider endpoint: closed, open, half-open.

Closed lets everything through and counts outcomes. It opens after
``consecutive_failures`` failures in a row, or when the failure rate over the
last ``window`` seconds reaches ``failure_rate`` with at least ``min_volume``
outcomes. Open refuses everything for ``cooldown`` seconds, then the breaker
is half-open: exactly one probe goes through; its success closes the breaker,
its failure opens it again for another cooldown.

Only upstream failures count. Client errors and cancelled requests release
the probe slot without counting (:meth:`CircuitBreaker.record_ignored`).
The clock is injected; state changes go to ``on_change`` (metrics, logs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from keel.router.window import WindowCounts

log = logging.getLogger("keel.router")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_volume: int = 20
    window: float = 60.0
    cooldown: float = 60.0


BreakerListener = Callable[[str, BreakerState, BreakerState], None]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: BreakerListener | None = None,
    ) -> None:
        self.name = name
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._outcomes = WindowCounts(self.policy.window)
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose cooldown is over moves to half-open as
        it is read (``on_change`` hears of it then)."""
        if (now := self.state_now()) is not self._state:
            self._transition(now)
        return self._state

    def state_now(self) -> BreakerState:
        """:attr:`state` without the move: what a request would find now, for readers
        that must not act on the breaker (the metrics' scrape)."""
        if self._state is BreakerState.OPEN and self._clock() >= self.reopens_at:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def reopens_at(self) -> float:
        """When an open breaker lets its probe through (monotonic clock)."""
        return self._opened_at + self.policy.cooldown

    def retry_after(self) -> float:
        """Seconds until this breaker lets a request through (0 if it does now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self.reopens_at - self._clock())
        return 0.0

    def available(self) -> bool:
        """Would :meth:`allow` let a request through now (without taking the probe)?"""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._probe_in_flight
        )

    def allow(self) -> bool:
        """Take permission for one request; in half-open only one is given at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._probe_in_flight = False
        self._consecutive = 0
        self._remember(ok=True)
        if self._state is not BreakerState.CLOSED:
            self._outcomes.clear()
            self._transition(BreakerState.CLOSED)

    def record_failure(self, cause: str = "") -> None:
        """``cause``: what failed, said in the log line if this opens the breaker."""
        self._probe_in_flight = False
        self._consecutive += 1
        self._remember(ok=False)
        if self._state is BreakerState.HALF_OPEN or self._should_open():
            self._open(cause)

    def record_ignored(self) -> None:
        """A request ended without saying anything about the provider's health."""
        self._probe_in_flight = False

    def _remember(self, *, ok: bool) -> None:
        self._outcomes.add(self._clock(), marked=not ok)

    def _should_open(self) -> bool:
        if self._state is not BreakerState.CLOSED:
            return False
        if self._consecutive >= self.policy.consecutive_failures:
            return True
        volume = self._outcomes.total
        if volume < self.policy.min_volume:
            return False
        return self._outcomes.marked / volume >= self.policy.failure_rate

    def _open(self, cause: str) -> None:
        self._opened_at = self._clock()
        self._transition(BreakerState.OPEN, f"; the last failure: {cause}" if cause else "")

    def _transition(self, new: BreakerState, why: str = "") -> None:
        old, self._state = self._state, new
        if old is new:
            return
        # A probe that fails opens the breaker again, once a cooldown, for as long as the
        # backend is down: said once at WARNING (closed -> open), then at INFO.
        quiet = old is BreakerState.HALF_OPEN or new is BreakerState.HALF_OPEN
        (log.info if quiet else log.warning)("breaker %s: %s -> %s%s", self.name, old, new, why)
        if self._on_change is not None:
            self._on_change(self.name, old, new)
