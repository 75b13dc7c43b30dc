"""Each fault on the primary, through a real keel: every client request is still
answered (by the fallback, whole, never spliced), /v1/providers says what is
wrong, and once the fault is gone the primary serves again without a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.chaos.conftest import (
    FALLBACK_DIM,
    FALLBACK_TEXT,
    PRIMARY_DIM,
    PRIMARY_TEXT,
    PRIMARY_TOKENS,
    ROLES,
    Keel,
    Streamed,
    chain_config,
    fallback_name,
    primary_name,
    role_live,
)
from tests.fakes.upstreams import Behaviour, FakeUpstream

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Fault:
    name: str
    behaviour: Behaviour | None
    """None: the primary stops listening (connection refused)."""
    streams_only: bool = False
    """One-body answers (embeddings) are unaffected."""
    probe_passes: bool = False
    """The one-token health check succeeds despite the fault."""


FAULTS = [
    Fault("connection_refused", None),
    Fault("accept_then_hang", Behaviour.hang()),
    Fault("slow_first_token", Behaviour.slow_first_token(3.0)),
    Fault("stream_cut_midway", Behaviour.cut(after=2), streams_only=True, probe_passes=True),
    Fault("error_500_storm", Behaviour.error(500)),
    Fault("reset", Behaviour.reset()),
    Fault("rate_limited_429", Behaviour.error(429, retry_after="1")),
    Fault("auth_401", Behaviour.error(401, {"error": {"message": "invalid api key"}})),
    Fault("malformed_json", Behaviour.malformed_json()),
    Fault("broken_sse", Behaviour.broken_sse()),
]


def check_stream(result: Streamed, *, may_fail_midway: bool) -> None:
    assert result.status == 200, result.body
    assert result.done, "a stream always ends with [DONE]"
    if result.errors:
        assert may_fail_midway, result.errors
        assert PRIMARY_TEXT.startswith(result.text) and result.text, "only the primary's tokens"
        return
    assert result.text == FALLBACK_TEXT


def every_surface_is_served(keel: Keel, fault: Fault) -> None:
    tabby = keel.tabby()
    assert tabby.status_code == 200, tabby.text
    assert tabby.json()["choices"][0]["text"] == FALLBACK_TEXT
    assert tabby.headers["x-keel-provider"] == fallback_name("completion")

    completion = keel.completion()
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == FALLBACK_TEXT

    chat = keel.chat()
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == FALLBACK_TEXT

    midway = fault.probe_passes  # the prober may have put the primary back in front
    check_stream(keel.stream_completion(), may_fail_midway=midway)
    check_stream(keel.stream_chat(), may_fail_midway=midway)

    embed = keel.embed()
    assert embed.status_code == 200, embed.text
    width = len(embed.json()["data"][0]["embedding"])
    assert width == (PRIMARY_DIM if fault.streams_only else FALLBACK_DIM)


def the_primary_serves_again(keel: Keel) -> None:
    def tabby_from_primary() -> bool:
        response = keel.tabby()
        return response.headers.get("x-keel-provider") == primary_name("completion")

    keel.wait_for("completion back on the primary", tabby_from_primary)
    keel.wait_for(
        "chat back on the primary",
        lambda: keel.chat().json()["choices"][0]["message"]["content"] == PRIMARY_TEXT,
    )
    keel.wait_for(
        "embeddings back on the primary",
        lambda: len(keel.embed().json()["data"][0]["embedding"]) == PRIMARY_DIM,
    )
    assert keel.stream_completion().text == PRIMARY_TEXT
    for role in ROLES:
        state = keel.endpoint(role, primary_name(role))
        assert state["breaker"] == "closed", state
        assert state["healthy"] and state["usable"] and not state["auth_failed"], state


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_fault_is_survived_then_recovered(
    fault: Fault,
    backends: tuple[FakeUpstream, FakeUpstream],
    keel_factory: Callable[[str], Keel],
) -> None:
    primary, fallback = backends
    # A short first-token limit: the hang and the slow first token are faults at 0.5 s.
    extra = {"first_token_timeout": 0.5}
    keel = keel_factory(chain_config(primary.url, fallback.url, primary_extra=extra))
    port = primary.port
    if fault.behaviour is None:
        primary.stop()
    else:
        primary.behave(fault.behaviour)

    every_surface_is_served(keel, fault)

    completion = keel.endpoint("completion", primary_name("completion"))
    assert completion["last_error"], completion
    if fault.name == "auth_401":
        for role in ROLES:
            state = keel.endpoint(role, primary_name(role))
            assert state["auth_failed"] and not state["usable"], state
            assert "invalid api key" in state["last_error"]
            # At most the one request that found out (the prober may have been first).
            assert role_live(primary, role) <= 1, f"{role}: no retries after a 401"
    elif fault.name == "rate_limited_429":
        assert "429" in completion["last_error"]
        assert completion["healthy"], "a busy backend is not a sick one"
    elif not fault.probe_passes:
        assert not completion["healthy"], completion

    restarted: FakeUpstream | None = None
    try:
        if fault.behaviour is None:
            restarted = FakeUpstream(tokens=PRIMARY_TOKENS, embedding_dim=PRIMARY_DIM, port=port)
            restarted.start()
        else:
            primary.reset_behaviour()
        the_primary_serves_again(keel)
    finally:
        if restarted is not None:
            restarted.stop()
