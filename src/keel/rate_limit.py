"""The one token bucket, behind both of keel's rate limits.

``[auth] requests_per_minute`` limits each key (``auth.KeyRateLimiter``: a
request over the limit is refused with its wait at once); an HTTP provider's
``rate_limit.request_per_minute`` limits what keel sends a backend
(``providers.http_base.RateLimiter``: a request waits for its turn when that
comes soon, else it is refused). Both are this bucket with a different
``max_wait``. The clock is a parameter, so tests drive time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
