"""The one token bucket, behind both of keel's rate limits.

``[auth] requests_per_minute`` limits each key (``auth.KeyRateLimiter``: a
request over the limit is refused with its wait at once); an HTTP provider's
``rate_limit.request_per_minute`` limits what keel sends a backend
(:class:`RateLimiter`: a request waits for its turn when that comes soon, else
it is refused). Both are this bucket with a different ``max_wait``. The clock
is a parameter, so tests drive time.

A backend has no limit unless its config sets one: a cap nobody chose is a
silent one (Tabby's default of 1,200 a minute made every request wait 50 ms
after the first burst). A configured limit's waits are never silent either:
:class:`RateLimiter` keeps them as a histogram, which ``/metrics``
(``keel_rate_limit_wait_seconds``), ``/v1/providers`` and the status page show.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable

from keel.errors import UpstreamStatusError

REFUSED = "rate_limit_reached"
"""The code of :class:`RateLimiter`'s refusal: keel's own limit, not the backend's 429
(counted as the provider's failure, its ``last_error`` and its failures' metric could not
tell keel's throttle from the backend's)."""

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds of the wait histogram, seconds; a provider's limiter waits at most 1 s."""


class TokenBucket:
    """``per_minute`` tokens a minute, refilled continuously, holding at most ``burst``
    (a minute's worth by default)."""

    def __init__(
        self,
        per_minute: int,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1 (got {per_minute})")
        self.per_minute = per_minute
        self.capacity = float(burst if burst is not None else per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._level = self.capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._level = min(self.capacity, self._level + elapsed * self._rate)
        self._updated = now

    @property
    def available(self) -> float:
        self._refill()
        return self._level

    def take(self, *, max_wait: float = 0.0) -> float:
        """Take a token; returns the seconds until it is the caller's.

        0 when one is there now. When the bucket is empty and the next token
        comes within ``max_wait`` seconds, it is reserved for the caller (the
        level goes negative, so concurrent callers are served in turn) and the
        wait is returned. Otherwise nothing is taken and the wait returned is
        over ``max_wait``: the caller refuses the request.
        """
        self._refill()
        wait = 0.0 if self._level >= 1.0 else (1.0 - self._level) / self._rate
        if wait <= max_wait:
            self._level -= 1.0
        return wait

    def give_back(self) -> None:
        """Return a token taken for a request that was refused after all."""
        self._refill()
        self._level = min(self.capacity, self._level + 1.0)


class RateLimiter:
    """A backend's ``rate_limit.request_per_minute``: a :class:`TokenBucket`, and the
    time requests waited on it.

    The bucket holds up to ``burst`` requests (by default ten seconds' worth, as
    Tabby's leaky bucket allows after a pause: a minute's worth went in one burst, which
    a backend enforcing its quota per second, as OpenAI does, answered with 429s Tabby
    never caused) and refills continuously at the configured rate (Tabby rounds it up
    to a request a second: 6 a minute sent 60). When it is empty a request waits
    for its turn if that comes within ``max_wait`` seconds; otherwise it fails
    at once with :class:`UpstreamStatusError` (code :data:`REFUSED`, no
    ``upstream_status``, ``retry_after`` set), so the router can use a fallback
    instead of queueing a code completion for seconds. Waiters reserve their
    turn, so concurrent callers are served in order. Every admitted request's
    wait (0 for most) goes into the histogram; every refusal is counted.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        burst: int | None = None,
        max_wait: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        tabby_burst = max(1, math.ceil(per_minute / 6))
        burst = tabby_burst if burst is None else burst
        self.bucket = TokenBucket(per_minute, burst=burst, clock=clock)
        self.max_wait = max_wait
        self._sleep = sleep
        self.bucket_counts = [0] * (len(WAIT_BUCKETS) + 1)
        """Admitted requests per wait bucket (not cumulative); the last is +Inf."""
        self.wait_sum = 0.0
        self.waited = 0
        """Admitted requests that had to wait for their turn."""
        self.refused = 0

    @property
    def available(self) -> float:
        return self.bucket.available

    @property
    def admitted(self) -> int:
        return sum(self.bucket_counts)

    async def acquire(self, provider: str) -> None:
        wait = self.bucket.take(max_wait=self.max_wait)
        if wait > self.max_wait:
            self.refused += 1
            raise UpstreamStatusError(
                f"keel's rate limit of {self.bucket.per_minute} requests/minute is reached",
                provider=provider,
                code=REFUSED,
                retry_after=wait,
            )
        self.bucket_counts[bisect_left(WAIT_BUCKETS, wait)] += 1
        if wait > 0:
            self.wait_sum += wait
            self.waited += 1
            await self._sleep(wait)

    def snapshot(self) -> dict[str, object]:
        """The limit and its waits so far, for ``/v1/providers`` and the status page."""
        admitted = self.admitted
        return {
            "request_per_minute": self.bucket.per_minute,
            "available": round(self.available, 1),
            "admitted": admitted,
            "waited": self.waited,
            "wait_seconds_total": round(self.wait_sum, 3),
            "wait_mean_ms": round(1000 * self.wait_sum / admitted, 2) if admitted else 0.0,
            "refused": self.refused,
        }
