"""Sliding-window counts: what the breaker and the retry budget count with."""

from __future__ import annotations

from keel.router.window import SLICES, WindowCounts


def test_counts_follow_the_window_and_memory_does_not_follow_the_rate() -> None:
    counts = WindowCounts(60.0)
    now = 1000.0
    for n in range(120_000):  # 2,000 a second for a minute, one in four marked
        counts.add(now + n / 2000, marked=n % 4 == 0)
    assert (counts.total, counts.marked) == (120_000, 30_000)
    assert len(counts._slices) <= SLICES + 1
    counts.trim(now + 90.0)  # the first half minute has left
    assert 59_000 <= counts.total <= 61_000
    assert counts.marked * 4 == counts.total
    counts.trim(now + 200.0)
    assert (counts.total, counts.marked) == (0, 0)


def test_an_event_leaves_only_once_the_window_has_passed_it() -> None:
    counts = WindowCounts(5.0)
    counts.add(1000.0)
    counts.trim(1004.9)
    assert counts.total == 1
    counts.trim(1005.1)
    assert counts.total == 0
