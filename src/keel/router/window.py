"""Counts over a sliding time window, in constant memory and time per event."""

from __future__ import annotations

from collections import deque

SLICES = 60
"""Slices a window is kept in: an event leaves at most window/60 early."""


class WindowCounts:
    """How many events (and how many of them ``marked``: failures, say) happened in
    the last ``window`` seconds.

    Events are counted in slices of ``window / SLICES`` seconds, each dropped as
    a whole once its first event is older than the window. A list of every event
    grew with the request rate (120,000 entries for the breaker's 60 s at 2,000
    requests a second, about 10 MiB) and its failure rate was summed over all of
    them at each failure, the moment a backend went down.
    """

    __slots__ = ("window", "_width", "_slices", "total", "marked")

    def __init__(self, window: float) -> None:
        self.window = window
        self._width = window / SLICES
        self._slices: deque[list[float]] = deque()  # [first event's time, events, marked]
        self.total = 0
        self.marked = 0

    def add(self, now: float, *, marked: bool = False) -> None:
        self.trim(now)
        if not self._slices or now >= self._slices[-1][0] + self._width:
            self._slices.append([now, 0, 0])
        last = self._slices[-1]
        last[1] += 1
        last[2] += marked
        self.total += 1
        self.marked += marked

    def trim(self, now: float) -> None:
        """Forget the slices that left the window."""
        while self._slices and now - self._slices[0][0] > self.window:
            _, events, marked = self._slices.popleft()
            self.total -= int(events)
            self.marked -= int(marked)

    def clear(self) -> None:
        self._slices.clear()
        self.total = self.marked = 0
