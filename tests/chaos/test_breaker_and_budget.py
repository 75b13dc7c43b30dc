"""The breaker and the retry budget as seen from outside: /v1/providers and the
request counts of the fake backends."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.chaos.conftest import (
    FALLBACK_TEXT,
    PRIMARY_TEXT,
    Keel,
    chain_config,
    fallback_name,
    live,
    posts,
    primary_name,
)
from tests.fakes.upstreams import Behaviour, FakeUpstream

pytestmark = pytest.mark.integration

COOLDOWN = 2.0
COMPLETIONS = "/v1/completions"


def breaker(keel: Keel) -> str:
    return str(keel.endpoint("completion", primary_name("completion"))["breaker"])


def test_breaker_opens_at_the_threshold_and_sends_one_probe_per_cooldown(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    primary, fallback = backends
    # Threshold 2 = the failures after which health routes around the primary too,
    # so live traffic reaches it exactly as often as the threshold. A probe every second:
    # at 0.2 s one failed between the two completions of a loaded run, health routed the
    # second around the primary, and the breaker stayed closed.
    routing = {
        "breaker_consecutive_failures": 2,
        "breaker_cooldown_seconds": COOLDOWN,
        "retry_attempts_per_provider": 1,
        "probe_interval_seconds": 1.0,
    }
    keel = keel_factory(chain_config(primary.url, fallback.url, routing=routing))
    primary.behave(Behaviour.error(500))

    assert keel.completion().json()["choices"][0]["text"] == FALLBACK_TEXT
    assert breaker(keel) == "closed"
    second = time.monotonic()  # the breaker opens after this
    assert keel.completion().json()["choices"][0]["text"] == FALLBACK_TEXT
    opened = time.monotonic()
    assert breaker(keel) == "open"
    at_open = posts(primary, COMPLETIONS)
    # Read as it opened: read after the loop below, a loaded machine's last completion
    # ran past the cooldown, and the breaker was half-open by then.
    state = keel.endpoint("completion", primary_name("completion"))
    assert state["breaker"] == "open" and not state["usable"]

    # During the cooldown: clients are served, nothing (live or probe) reaches the primary.
    # (Counted before each: the last may end past the cooldown, where a probe is due.)
    while time.monotonic() < opened + COOLDOWN - 0.4:
        assert posts(primary, COMPLETIONS) == at_open, "a request reached an open breaker"
        response = keel.completion()
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == (
            FALLBACK_TEXT
        )
        time.sleep(0.05)

    # Half-open: one probe, it fails, the breaker opens for another cooldown, which ends
    # two cooldowns after the breaker first opened at the earliest. Counted before each
    # request, as above: counted after the last, a loaded run's last completion ran past
    # the second cooldown and was the next probe (4 posts, not 3).
    keel.wait_for("the half-open probe", lambda: posts(primary, COMPLETIONS) > at_open, 3.0)
    keel.wait_for("open again after the failed probe", lambda: breaker(keel) == "open", 1.0)
    while time.monotonic() < second + 2 * COOLDOWN - 0.1:
        assert posts(primary, COMPLETIONS) == at_open + 1, "exactly one probe in half-open"
        assert keel.completion().status_code == 200
        time.sleep(0.05)

    # The fault goes away: the next probe closes the breaker and the primary serves.
    primary.reset_behaviour()
    keel.wait_for("breaker closed", lambda: breaker(keel) == "closed", COOLDOWN + 3)
    keel.wait_for(
        "primary serving",
        lambda: keel.completion().json()["choices"][0]["text"] == PRIMARY_TEXT,
    )


@pytest.mark.parametrize("with_fallback", [True, False], ids=["fallback", "alone"])
def test_upstream_attempts_stay_within_the_retry_budget(
    with_fallback: bool,
    backends: tuple[FakeUpstream, FakeUpstream],
    keel_factory: Callable[[str], Keel],
) -> None:
    primary, fallback = backends
    attempts, ratio, floor = 5, 0.1, 3  # floor: RetryPolicy.budget_floor
    routing = {
        "breaker_consecutive_failures": 1000,
        "breaker_min_volume": 1000,
        "retry_attempts_per_provider": attempts,
        "retry_budget_ratio": ratio,
        "probe_interval_seconds": 600,
    }
    chain = chain_config(primary.url, fallback.url if with_fallback else None, routing=routing)
    keel = keel_factory(chain)
    primary.behave(Behaviour.error(503))
    requests = 30
    for _ in range(requests):
        response = keel.completion()
        if with_fallback:
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == FALLBACK_TEXT
        else:
            assert response.status_code in (502, 503), response.text
    sent = live(primary, COMPLETIONS)
    assert sent <= requests + floor + ratio * requests, f"{sent} attempts for {requests} requests"
    if not with_fallback:
        assert sent > requests, "some retries were made"


def test_other_4xx_go_back_to_the_client_as_is(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    primary, fallback = backends
    keel = keel_factory(chain_config(primary.url, fallback.url))
    message = {"error": {"message": "'temperature' must be between 0 and 2"}}
    primary.behave(Behaviour.error(422, message))
    for call, role in ((keel.completion, "completion"), (keel.chat, "chat")):
        response = call()
        assert response.status_code == 422, response.text
        assert "'temperature' must be between 0 and 2" in response.json()["error"]["message"]
        # named as the backend that refused it (it was counted under provider "")
        assert response.headers["x-keel-provider"] == primary_name(role), response.headers
    metrics = keel.http.get("/metrics").text
    counted = (
        f'provider="{primary_name("chat")}",role="chat",route="/v1/chat/completions",status="422"'
    )
    assert counted in metrics, [line for line in metrics.splitlines() if 'status="422"' in line]
    assert live(fallback) == 0, "no fallback for the client's own mistake"
    assert live(primary, COMPLETIONS) == 1 and live(primary, "/chat/completions") == 1
    state = keel.endpoint("completion", primary_name("completion"))
    assert state["breaker"] == "closed" and state["healthy"]


def test_a_4xx_to_a_request_keel_built_is_the_backends_failure(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """A Tabby completion is keel's request (prompt, suffix, stop words, sampling): a
    backend refusing it (vLLM takes no ``suffix``) was the editor's 400, which no editor
    can mend, while the fallback sat idle and the backend stayed healthy (its probe sends
    no suffix)."""
    primary, fallback = backends
    keel = keel_factory(chain_config(primary.url, fallback.url))
    refusal = {"error": {"message": "suffix is not currently supported", "param": "suffix"}}
    primary.behave(Behaviour.error(400, refusal))
    served = keel.tabby()
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["text"] == FALLBACK_TEXT
    assert served.headers["x-keel-provider"] == fallback_name("completion")
    state = keel.endpoint("completion", primary_name("completion"))
    said = state["last_error"] or ""
    assert "refused the request keel built" in said and "suffix is not" in said, state
    failures = [
        line
        for line in keel.http.get("/metrics").text.splitlines()
        if line.startswith("keel_provider_failures_total{")
    ]
    assert any(
        'kind="retryable"' in line and primary_name("completion") in line for line in failures
    ), failures


def test_a_backends_timeout_and_its_named_pause_are_no_client_error(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """A 408 (a proxy's timeout on keel's request) was the client's 408
    ``invalid_request_error``, never tried elsewhere; a 503 naming a pause
    (``Retry-After: 20``: overloaded, loading a model) was resent at once and the client
    told to come back in 1 s."""
    primary, fallback = backends
    keel = keel_factory(
        chain_config(primary.url, fallback.url, routing={"probe_interval_seconds": 600})
    )
    primary.behave(Behaviour.error(408, ""), times=1)
    served = keel.completion()
    assert served.status_code == 200 and served.json()["choices"][0]["text"] == FALLBACK_TEXT

    primary.behave(Behaviour.error(503, "", retry_after="20"))
    fallback.behave(Behaviour.error(503, "", retry_after="20"))
    sent = live(primary, COMPLETIONS)
    paused = keel.completion()
    assert paused.status_code == 429, paused.text
    assert 19 <= int(paused.headers["retry-after"]) <= 20, paused.headers
    assert "retry in 2" in paused.json()["error"]["message"], paused.text
    assert live(primary, COMPLETIONS) == sent + 1, "not resent while it asked for a pause"
    again = keel.completion()
    assert again.status_code == 429 and live(primary, COMPLETIONS) == sent + 1, again.text


def test_completion_timeout_bounds_completions_not_every_backend_read(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """``[server] completion_timeout`` was every HTTP provider's read limit: lowered to
    keep completions snappy, it cut off a chat backend allowed 10 s for its first token,
    and every embedding backend, with 503s."""
    primary, _ = backends
    config = chain_config(
        primary.url,
        None,
        routing={"probe_interval_seconds": 600},
        primary_extra={"first_token_timeout": 10},
    ).replace("completion_timeout = 10", "completion_timeout = 1")
    keel = keel_factory(config)
    primary.behave(Behaviour.slow_first_token(1.5), times=2)
    chat = keel.chat()
    assert (
        chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == PRIMARY_TEXT
    )
    embedded = keel.embed()
    assert embedded.status_code == 200, embedded.text
    primary.behave(Behaviour.slow_first_token(1.5), times=1)
    slow = keel.tabby()  # the completion's own bound still holds
    assert slow.status_code == 408 and "took longer than 1s" in slow.text, slow.text
    # named as the backend it ran out on, not the role ("completion"), as every failure is
    name = primary_name("completion")
    assert slow.headers["x-keel-provider"] == name, slow.headers
    assert slow.json()["error"]["message"].startswith(f"{name}: "), slow.text
    # a 408, as Tabby answers (tabby-agent counts only 408/499 as timeouts), that still
    # says what to change, and is logged as the failure it is, with why
    assert slow.json()["error"]["code"] == "completion_timeout", slow.text
    assert "raise it" in slow.text, slow.text

    def timed_out() -> list[str]:  # the access line is written once the answer went
        return [line for line in keel.process.log.read_text().splitlines() if "-> 408" in line]

    keel.wait_for("the 408's access line", lambda: bool(timed_out()), within=5)
    assert len(timed_out()) == 1 and "WARNING" in timed_out()[0], timed_out()
    assert "CompletionTimeout: " in timed_out()[0], timed_out()


def test_a_backend_too_slow_for_the_completion_limit_is_its_failure(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """A backend sending tokens steadily, each within the stall limit, but too slowly to
    finish within ``completion_timeout``: keel's own limit ended each completion (504),
    and, tokens having flowed, the attempt counted as a success. The breaker never opened,
    health stayed good and the fallback was never asked."""
    primary, _ = backends
    config = chain_config(
        primary.url,
        backends[1].url,
        routing={"probe_interval_seconds": 600, "breaker_consecutive_failures": 2},
        primary_extra={"first_token_timeout": 10},
    ).replace("completion_timeout = 10", "completion_timeout = 1")
    keel = keel_factory(config)
    primary.token_delay = 0.6  # 3 tokens, 1.8 s: each in time, the whole not
    for _ in range(2):
        slow = keel.tabby()
        assert slow.status_code == 408 and "took longer than 1s" in slow.text, slow.text
    state = keel.endpoint("completion", primary_name("completion"))
    assert state["breaker"] == "open", state
    assert "time limit" in (state["last_error"] or ""), state
    served = keel.tabby()
    assert served.status_code == 200 and served.json()["choices"][0]["text"] == FALLBACK_TEXT


def test_an_answer_the_client_asked_the_length_of_has_no_completion_limit(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """An OpenAI completion is as long as its ``max_tokens``: cut at ``completion_timeout``
    while its backend sent every token in time, it was a 504 counted as the backend's
    failure, and a few such requests opened the breaker for every client (the embedded
    model asked for 1,500 tokens: every completion and chat a 503 for 60 s)."""
    primary, _ = backends
    config = chain_config(
        primary.url,
        None,
        routing={"probe_interval_seconds": 600, "breaker_consecutive_failures": 2},
        primary_extra={"first_token_timeout": 10},
    ).replace("completion_timeout = 10", "completion_timeout = 1")
    keel = keel_factory(config)
    primary.token_delay = 0.6  # 3 tokens, 1.8 s: each in time, the whole past the limit
    try:
        for _ in range(2):
            whole = keel.http.post(COMPLETIONS, json={"prompt": "chaos = ", "max_tokens": 16})
            assert whole.status_code == 200, whole.text
            assert whole.json()["choices"][0]["text"] == PRIMARY_TEXT
            streamed = keel.stream_completion()
            assert streamed.text == PRIMARY_TEXT and not streamed.errors and streamed.done
        state = keel.endpoint("completion", primary_name("completion"))
        assert state["breaker"] == "closed" and state["last_error"] is None, state
        # a code completion, whose length keel sets, is still held to the limit
        slow = keel.tabby()
        assert slow.status_code == 408 and "took longer than 1s" in slow.text, slow.text
    finally:
        primary.token_delay = 0.0


def test_a_fallback_left_too_little_of_the_completion_limit_is_not_failing(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """The primary hangs to its first-token limit and the fallback, answering in its own
    time, is cut by the whole request's limit: the fallback was charged the timeout, its
    breaker opened, and with the primary down every completion was a 503."""
    primary, fallback = backends
    config = chain_config(
        primary.url,
        fallback.url,
        routing={"probe_interval_seconds": 600, "breaker_consecutive_failures": 2},
        primary_extra={"first_token_timeout": 0.5},
    ).replace("completion_timeout = 10", "completion_timeout = 1.5")
    keel = keel_factory(config)
    primary.behave(Behaviour.hang())
    # 3 tokens in 1.2 s: in time alone, not after the 0.5 s lost. The primary's limit
    # ends 1 s before the whole request's, so a loaded machine's late timer does not
    # end the request on the primary (0.8 s of 1 s: it did once, in a fresh clone).
    fallback.token_delay = 0.4
    try:
        for _ in range(2):
            cut = keel.tabby()
            assert cut.status_code == 408, cut.text
            # named as the one it ran out on, and what the primary's failure took said
            message = cut.json()["error"]["message"]
            assert message.startswith(f"{fallback_name('completion')}: "), message
            assert f"after {primary_name('completion')}: " in message, message
        state = keel.endpoint("completion", fallback_name("completion"))
        assert state["breaker"] == "closed" and state["usable"], state
        assert state["last_error"] is None, state
    finally:
        fallback.token_delay = 0.0


def test_an_answer_without_a_choice_is_the_backends_failure(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """A stream whose chunks carry no choice (``"choices": []``, or none) was a 200
    with an empty answer and a made-up ``finish_reason: stop``: the backend healthy and
    the fallback idle, for every request."""
    primary, fallback = backends
    keel = keel_factory(chain_config(primary.url, fallback.url))
    events = 'data: {"id":"x","choices":[]}\n\ndata: {"id":"x"}\n\ndata: [DONE]\n\n'
    sse = (("Content-Type", "text/event-stream"),)
    primary.behave(Behaviour.respond(200, events, headers=sse))
    for call in (keel.tabby, keel.completion, keel.chat):
        served = call()
        assert served.status_code == 200, served.text
        choice = served.json()["choices"][0]
        assert FALLBACK_TEXT in (choice.get("text"), choice.get("message", {}).get("content"))
    state = keel.endpoint("completion", primary_name("completion"))
    assert "without a choice" in (state["last_error"] or ""), state
