"""The one restart policy both supervisors use: backoff and the start limit."""

from __future__ import annotations

from collections import deque

from keel.restart import RestartPolicy


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_initial=1.0, backoff_max=5.0)
    assert [policy.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_the_start_limit_counts_only_starts_within_the_window() -> None:
    policy = RestartPolicy(start_limit=3, start_window=10.0)
    starts: deque[float] = deque([0.0, 5.0])
    assert not policy.exhausted(starts, now=6.0)
    starts.append(6.0)
    assert policy.exhausted(starts, now=9.0)  # three starts within 10 s: give up
    assert not policy.exhausted(starts, now=10.5)  # the first start left the window
    assert list(starts) == [5.0, 6.0]
