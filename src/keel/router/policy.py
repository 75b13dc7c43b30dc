"""What to do after a failed attempt: again here, here with less context, the
next endpoint, or give the error to the caller.

Each rule is a small object answering for the failures it knows and passing
(``None``) on the rest; :class:`FirstOf` asks them in order, as tenacity
combines its strategies. Anything no rule claims moves to the next endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from keel.router.classify import Failure
from keel.router.retry import RetryBudget, RetryPolicy


class Decision(StrEnum):
    AGAIN = "again"
    """The same endpoint, after a jittered backoff."""
    SHRINK = "shrink"
    """The same endpoint at once, asked for a shorter prompt."""
    NEXT = "next"
    """The next endpoint of the chain."""
    GIVE_UP = "give_up"
    """The request itself is wrong: the caller gets a 4xx, no provider is blamed."""


@dataclass(frozen=True, slots=True)
class Failed:
    """What a rule sees of the attempt that just failed."""

    failure: Failure
    number: int
    """1 for the first attempt on this endpoint, 2 for its first retry, ..."""
    shrunk: bool
    """This attempt already asked for less context."""
    last_resort: bool
    """No endpoint after this one is left to try."""
    breaker_available: Callable[[], bool]


class Rule(Protocol):
    def decide(self, failed: Failed) -> Decision | None: ...


class ClientErrorsGoBack:
    """A 4xx the backend blames on the request is the caller's, as is."""

    def decide(self, failed: Failed) -> Decision | None:
        return Decision.GIVE_UP if failed.failure is Failure.CLIENT else None


@dataclass(frozen=True, slots=True)
class ShrinkOnce:
    """A prompt over the context: once more with less context, if the caller builds
    the prompt (``shrinkable``), then the next endpoint (it may have a larger window).
    A prompt the caller wrote itself is never cut: the next endpoint may take it, and
    where none is left it is the caller's 400."""

    shrinkable: bool

    def decide(self, failed: Failed) -> Decision | None:
        if failed.failure is not Failure.TOO_LONG:
            return None
        if not self.shrinkable:
            return Decision.GIVE_UP if failed.last_resort else Decision.NEXT
        return Decision.NEXT if failed.shrunk else Decision.SHRINK


@dataclass(frozen=True, slots=True)
class RetryLastResort:
    """A transient failure is retried only where nothing else is left to try (a
    fallback beats waiting), up to ``attempts_per_provider``, within the budget."""

    policy: RetryPolicy
    budget: RetryBudget

    def decide(self, failed: Failed) -> Decision | None:
        if failed.failure is not Failure.RETRYABLE or not failed.last_resort:
            return None
        if (
            failed.number < self.policy.attempts_per_provider
            and failed.breaker_available()
            and self.budget.try_spend()
        ):
            return Decision.AGAIN
        return None


@dataclass(frozen=True, slots=True)
class FirstOf:
    """The first rule with an answer decides; without one, the next endpoint."""

    rules: tuple[Rule, ...]

    def decide(self, failed: Failed) -> Decision:
        for rule in self.rules:
            decision = rule.decide(failed)
            if decision is not None:
                return decision
        return Decision.NEXT


def default_rules(policy: RetryPolicy, budget: RetryBudget, *, shrinkable: bool) -> FirstOf:
    return FirstOf((ClientErrorsGoBack(), ShrinkOnce(shrinkable), RetryLastResort(policy, budget)))
