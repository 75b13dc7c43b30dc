"""Backoff and the retry budget, on an injected clock."""

from __future__ import annotations

from keel.router.retry import RetryBudget, RetryPolicy
from tests.router.conftest import FakeClock


def test_backoff_is_full_jitter_capped() -> None:
    policy = RetryPolicy(backoff_initial=0.1, backoff_max=1.0)
    assert policy.backoff(1, rng=lambda: 1.0) == 0.2
    assert policy.backoff(3, rng=lambda: 1.0) == 0.8
    assert policy.backoff(10, rng=lambda: 1.0) == 1.0
    assert policy.backoff(10, rng=lambda: 0.0) == 0.0
    assert 0.0 <= policy.backoff(2) <= 0.4


def test_budget_is_a_floor_plus_a_share_of_requests(clock: FakeClock) -> None:
    budget = RetryBudget(RetryPolicy(budget_ratio=0.2, budget_floor=3), clock=clock)
    for _ in range(10):
        budget.record_request()
    spent = sum(budget.try_spend() for _ in range(100))
    assert spent == 3 + 2


def test_an_outage_cannot_multiply_load(clock: FakeClock) -> None:
    """Every request fails and wants a retry: retries stay a share of requests."""
    policy = RetryPolicy(budget_ratio=0.1, budget_floor=2, budget_window=10.0)
    budget = RetryBudget(policy, clock=clock)
    retries = 0
    for _ in range(200):
        budget.record_request()
        retries += budget.try_spend()
        clock.advance(0.01)  # all inside one window
    assert retries <= 2 + 0.1 * 200
    assert retries >= 0.1 * 200


def test_the_budget_refills_as_the_window_moves(clock: FakeClock) -> None:
    budget = RetryBudget(
        RetryPolicy(budget_ratio=0.0, budget_floor=2, budget_window=5.0), clock=clock
    )
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend()
    clock.advance(4.9)
    assert not budget.try_spend()
    clock.advance(0.2)
    assert budget.try_spend()


def test_zero_ratio_and_floor_means_no_retries(clock: FakeClock) -> None:
    budget = RetryBudget(RetryPolicy(budget_ratio=0.0, budget_floor=0), clock=clock)
    budget.record_request()
    assert not budget.try_spend()
