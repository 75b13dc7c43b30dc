"""The one token bucket: a burst, then one token per interval; refusals take nothing."""

from __future__ import annotations

import pytest

from keel.auth import KeyRateLimiter
from keel.rate_limit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_a_refusal_that_takes_nothing() -> None:
    clock = Clock()
    bucket = TokenBucket(60, burst=2, clock=clock)
    assert [bucket.take(), bucket.take()] == [0.0, 0.0]
    assert bucket.take() == pytest.approx(1.0)
    assert bucket.take() == pytest.approx(1.0)  # refused twice: the wait did not grow
    clock.now += 1.0
    assert bucket.take() == 0.0


def test_waiters_within_max_wait_reserve_their_turn() -> None:
    bucket = TokenBucket(60, burst=1, clock=Clock())
    waits = [bucket.take(max_wait=5) for _ in range(3)]
    assert waits == [0.0, pytest.approx(1.0), pytest.approx(2.0)]
    assert bucket.available == pytest.approx(-2.0)


def test_the_bucket_refills_up_to_its_capacity_only() -> None:
    clock = Clock()
    bucket = TokenBucket(6, clock=clock)
    for _ in range(6):
        bucket.take()
    clock.now += 3600
    assert bucket.available == pytest.approx(6.0)


def test_a_rate_under_one_a_minute_is_refused() -> None:
    with pytest.raises(ValueError, match="per_minute"):
        TokenBucket(0)


def test_each_key_has_its_own_bucket() -> None:
    clock = Clock()
    limiter = KeyRateLimiter(1, clock=clock)
    assert limiter.take("key-a") == 0.0
    assert limiter.take("key-a") == pytest.approx(60.0)
    assert limiter.take("key-b") == 0.0
    clock.now += 60
    assert limiter.take("key-a") == 0.0
