"""The circuit breaker's state machine, driven by an injected clock."""

from __future__ import annotations

from keel.router.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from tests.router.conftest import FakeClock

POLICY = BreakerPolicy(
    consecutive_failures=3, failure_rate=0.5, min_volume=10, window=60.0, cooldown=30.0
)


def breaker(clock: FakeClock, policy: BreakerPolicy = POLICY) -> tuple[CircuitBreaker, list]:
    changes: list[tuple[str, BreakerState, BreakerState]] = []
    made = CircuitBreaker(
        "p", policy, clock=clock, on_change=lambda *change: changes.append(change)
    )
    return made, changes


def test_opens_after_exactly_the_consecutive_threshold(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    for _ in range(POLICY.consecutive_failures - 1):
        assert cb.allow()
        cb.record_failure()
        assert cb.state is BreakerState.CLOSED
    cb.record_failure()
    assert cb.state is BreakerState.OPEN
    assert not cb.allow() and not cb.available()
    assert changes == [("p", BreakerState.CLOSED, BreakerState.OPEN)]


def test_a_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    for _ in range(5):
        cb.record_failure()
        cb.record_failure()
        cb.record_success()
    assert cb.state is BreakerState.CLOSED


def test_opens_on_failure_rate_once_the_window_has_volume(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    # Alternating outcomes never make 3 in a row, but half of them fail.
    for _ in range(4):
        cb.record_failure()
        cb.record_success()
    cb.record_failure()
    assert cb.state is BreakerState.CLOSED, "9 outcomes are below min_volume"
    cb.record_success()
    assert cb.state is BreakerState.CLOSED, "a success never opens"
    cb.record_failure()
    assert cb.state is BreakerState.OPEN  # 6 of 11 failed


def test_the_rate_only_counts_the_window(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    for _ in range(8):
        cb.record_failure()
        cb.record_success()
    clock.advance(POLICY.window + 1)
    # The old outcomes are gone: 1 failure of 1 is below min_volume.
    cb.record_failure()
    assert cb.state is BreakerState.CLOSED


def test_below_the_rate_stays_closed(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    for _ in range(20):
        cb.record_success()
        cb.record_success()
        cb.record_failure()
    assert cb.state is BreakerState.CLOSED


def test_cooldown_then_exactly_one_probe(clock: FakeClock) -> None:
    cb, changes = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(POLICY.cooldown - 0.1)
    assert cb.state is BreakerState.OPEN
    assert cb.retry_after() > 0
    assert not cb.allow()
    clock.advance(0.1)
    assert cb.retry_after() == 0
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.available()
    assert cb.allow()
    assert not cb.available()
    assert not cb.allow(), "a second request while the probe is out"
    assert not cb.allow()
    cb.record_success()
    assert cb.state is BreakerState.CLOSED
    assert cb.allow() and cb.allow()
    assert [new for _, _, new in changes] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_a_failed_probe_opens_for_a_full_cooldown_again(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(POLICY.cooldown)
    assert cb.allow()
    clock.advance(5.0)  # the probe took a while
    cb.record_failure()
    assert cb.state is BreakerState.OPEN
    assert cb.retry_after() == POLICY.cooldown
    clock.advance(POLICY.cooldown - 1)
    assert not cb.allow()
    clock.advance(1)
    assert cb.allow()


def test_an_ignored_outcome_releases_the_probe_without_counting(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    clock.advance(POLICY.cooldown)
    assert cb.allow()
    cb.record_ignored()  # the client cancelled, or sent a bad request
    assert cb.state is BreakerState.HALF_OPEN
    assert cb.allow(), "the probe slot is free again"


def test_ignored_outcomes_do_not_count_towards_opening(clock: FakeClock) -> None:
    cb, _ = breaker(clock)
    for _ in range(50):
        cb.record_ignored()
    cb.record_failure()
    cb.record_failure()
    assert cb.state is BreakerState.CLOSED


def test_closing_forgets_the_failures_before_it(clock: FakeClock) -> None:
    cb, _ = breaker(clock, BreakerPolicy(consecutive_failures=100, min_volume=4, cooldown=10))
    for _ in range(4):
        cb.record_failure()
    assert cb.state is BreakerState.OPEN
    clock.advance(10)
    assert cb.allow()
    cb.record_success()
    cb.record_failure()
    assert cb.state is BreakerState.CLOSED, "the failures that opened it are forgotten"
