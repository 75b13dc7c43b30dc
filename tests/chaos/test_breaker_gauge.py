"""``keel_breaker_state`` after an open breaker's cooldown, with no request between.

The gauge was set only when the breaker changed state, and an open breaker turns
half-open lazily, when something reads it: the gauge read "open" (2) long after the
cooldown (75 s past a 60 s one), until a request came, and an alert on "breaker open"
fired on for a provider ready to be tried again. ``/v1/providers`` said "half_open"
already (its read makes the move); it is checked after the scrape, which must not need
it."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.conftest import FALLBACK_TEXT, Keel, chain_config, posts, primary_name
from tests.fakes.upstreams import Behaviour, FakeUpstream

pytestmark = pytest.mark.integration

COOLDOWN = 2.0


def breaker_gauge(keel: Keel, provider: str) -> float:
    text = httpx.get(f"{keel.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "keel_breaker_state" and sample.labels == {"provider": provider}:
                return sample.value
    raise AssertionError(f"no keel_breaker_state for {provider}")


def test_the_breaker_gauge_and_providers_say_half_open_once_the_cooldown_is_over(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    primary, fallback = backends
    routing = {
        "breaker_consecutive_failures": 2,
        "breaker_cooldown_seconds": COOLDOWN,
        "retry_attempts_per_provider": 1,
        # No health check in the test's time: nothing but the scrape reads the breaker.
        "probe_interval_seconds": 600,
    }
    keel = keel_factory(chain_config(primary.url, fallback.url, routing=routing))
    name = primary_name("completion")
    assert breaker_gauge(keel, name) == 0
    primary.behave(Behaviour.error(500))
    for _ in range(2):
        assert keel.completion().json()["choices"][0]["text"] == FALLBACK_TEXT
    assert breaker_gauge(keel, name) == 2  # open
    at_open = posts(primary)

    time.sleep(COOLDOWN + 0.5)  # no request: nothing but time tells the breaker's state
    assert breaker_gauge(keel, name) == 1, "still 'open' after the cooldown"
    state = keel.endpoint("completion", name)
    assert state["breaker"] == "half_open", state
    assert posts(primary) == at_open, "the scrape sent a request to the provider"
