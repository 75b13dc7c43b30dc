"""Recent request figures for the status page: a ring of per-minute buckets.

Prometheus keeps the long history; this keeps just enough for the page to
draw the last hour without a Prometheus server: per minute, how many model
requests came in, how many failed, and a bounded sample of completion
latencies (reservoir sampling, so a busy minute costs the same memory as a
quiet one). Memory is fixed: ``window_minutes`` buckets of at most
``samples_per_minute`` floats each.

Also here: :class:`Throttled`, which keeps a costly figure (acceptance, a
scan of the events table) from being recomputed on every refresh of every
open page, and the resident memory of a process, read from ``/proc``.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from keel.errors import failed

T = TypeVar("T")

BUCKET_SECONDS = 60


def is_error(status: int) -> bool:
    """A request keel failed to serve: :func:`~keel.errors.failed`, or a 429 (overloaded,
    or its backends rate limited; a key over its own limit is told apart where it is
    recorded)."""
    return failed(status) or status == 429


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence; None when it is empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(len(ordered) * fraction))
    return ordered[min(len(ordered), rank) - 1]


@dataclass(slots=True)
class Minute:
    start: float
    requests: int = 0
    errors: int = 0
    completions: int = 0
    """Completions that succeeded; ``latencies`` samples their durations."""
    latencies: list[float] = field(default_factory=list)

    def to_json(self, wall_start: float) -> dict[str, object]:
        ordered = sorted(self.latencies)
        p50, p95 = percentile(ordered, 0.5), percentile(ordered, 0.95)
        return {
            "t": wall_start,
            "requests": self.requests,
            "errors": self.errors,
            "completions": self.completions,
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p95_ms": None if p95 is None else round(p95 * 1000, 1),
        }


class RequestStats:
    """Per-minute request counts and completion latencies over a sliding window.

    The minutes are counted on ``clock`` (monotonic) and labelled with ``wall`` time
    when drawn (the page's axes): a step of the wall clock (NTP setting it right, a
    resume) emptied the chart while the totals still counted, or dropped the last hour's
    outage from both. ``rng`` drives the reservoir, so tests can make it deterministic.
    """

    def __init__(
        self,
        *,
        window_minutes: int = 60,
        samples_per_minute: int = 2048,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if window_minutes < 1 or samples_per_minute < 1:
            raise ValueError("window_minutes and samples_per_minute must be at least 1")
        self.window_minutes = window_minutes
        self.samples_per_minute = samples_per_minute
        self.clock = clock
        self.wall = wall
        self._rng = rng or random.Random()
        self._minutes: deque[Minute] = deque(maxlen=window_minutes)

    def _minute(self, now: float) -> Minute:
        start = now - now % BUCKET_SECONDS
        if not self._minutes or self._minutes[-1].start < start:
            self._minutes.append(Minute(start))
        return self._minutes[-1]

    def record(self, *, role: str, status: int, seconds: float, keel: bool = True) -> None:
        """One finished model request (``role`` completion, chat or embedding); ``keel``:
        its status is keel's to answer for (a key over its own rate limit's 429 is not:
        one client's throttle showed as half of keel's requests failing)."""
        minute = self._minute(self.clock())
        minute.requests += 1
        if keel and is_error(status):
            minute.errors += 1
        if role != "completion" or status >= 400:
            return
        minute.completions += 1
        if len(minute.latencies) < self.samples_per_minute:
            minute.latencies.append(seconds)
        else:
            slot = self._rng.randrange(minute.completions)
            if slot < self.samples_per_minute:
                minute.latencies[slot] = seconds

    def series(self) -> list[dict[str, object]]:
        """One entry per minute of the window, oldest first; quiet minutes are zeros."""
        now = self.clock()
        offset = self.wall() - now  # the same for every minute, and from poll to poll
        current = now - now % BUCKET_SECONDS
        kept = {minute.start: minute for minute in self._minutes}
        starts = [current - BUCKET_SECONDS * i for i in range(self.window_minutes - 1, -1, -1)]
        return [kept.get(start, Minute(start)).to_json(start + offset) for start in starts]

    def summary(self) -> dict[str, object]:
        """Totals over the whole window, latency percentiles over all samples in it."""
        oldest = self.clock() - BUCKET_SECONDS * self.window_minutes
        minutes = [m for m in self._minutes if m.start > oldest]
        ordered = sorted(s for m in minutes for s in m.latencies)
        p50, p95 = percentile(ordered, 0.5), percentile(ordered, 0.95)
        return {
            "requests": sum(m.requests for m in minutes),
            "errors": sum(m.errors for m in minutes),
            "completions": sum(m.completions for m in minutes),
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p95_ms": None if p95 is None else round(p95 * 1000, 1),
        }


class Throttled(Generic[T]):
    """A value computed at most once per ``ttl`` seconds; callers in between share it,
    and concurrent callers wait for one computation instead of starting their own."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._value: T | None = None
        self._at: float | None = None
        self._lock = asyncio.Lock()

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            if self._value is None or self._at is None or self.clock() - self._at >= self.ttl:
                self._value = await compute()
                self._at = self.clock()
            return self._value


def rss_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Resident memory of ``pid`` in bytes, or None if it is gone or unreadable."""
    try:
        fields = (proc / str(pid) / "statm").read_text(encoding="ascii").split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
