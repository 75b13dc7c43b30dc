"""What OpenAI clients and Prometheus are told about a request: real token usage
(streaming included, with ``stream_options.include_usage``) and the provider
that actually served it."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.chaos.conftest import (
    FALLBACK_TEXT,
    PRIMARY_TEXT,
    Keel,
    chain_config,
    fallback_name,
    primary_name,
)
from tests.fakes.upstreams import Behaviour, FakeUpstream, embedding_usage

pytestmark = pytest.mark.integration


def estimated(text: str) -> int:
    """keel's token estimate for backends whose tokenizer it cannot see."""
    return (len(text.encode()) + 2) // 3


def test_usage_is_counted_for_every_openai_response(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    primary, fallback = backends
    keel = keel_factory(chain_config(primary.url, fallback.url))
    usage = keel.completion().json()["usage"]
    assert usage == {
        "prompt_tokens": estimated("chaos = "),
        "completion_tokens": estimated(PRIMARY_TEXT),
        "total_tokens": estimated("chaos = ") + estimated(PRIMARY_TEXT),
    }
    # the message as a template's turn: its role's markers are read too
    assert keel.chat().json()["usage"]["prompt_tokens"] == estimated("<|im_start|>user\nchaos")
    # an embedding backend's own count (OpenAI's usage), where it gives one
    assert keel.embed().json()["usage"]["prompt_tokens"] == embedding_usage(["chaos"])

    body = {
        "prompt": "chaos = ",
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with keel.http.stream("POST", "/v1/completions", json=body) as response:
        events = [
            line.removeprefix("data: ")
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"] == usage
    chunks = [json.loads(e) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == PRIMARY_TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    del body["stream_options"]
    with keel.http.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert all(json.loads(line.removeprefix("data: "))["choices"] for line in lines)


def test_metrics_name_the_provider_that_served(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    primary, fallback = backends
    keel = keel_factory(chain_config(primary.url, fallback.url))
    primary.behave(Behaviour.error(500))
    assert keel.tabby().json()["choices"][0]["text"] == FALLBACK_TEXT
    assert keel.completion().json()["choices"][0]["text"] == FALLBACK_TEXT
    assert keel.chat().json()["choices"][0]["message"]["content"] == FALLBACK_TEXT
    metrics = keel.http.get("/metrics").text
    for role, route in (("completion", "/v1/completions"), ("chat", "/v1/chat/completions")):
        served = (
            f'keel_requests_total{{method="POST",provider="{fallback_name(role)}",'
            f'role="{role}",route="{route}",status="200"}}'
        )
        assert served in metrics, [m for m in metrics.splitlines() if "keel_requests_total" in m]


def test_a_failed_answer_is_counted_under_the_provider_that_failed(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """Non-streamed failures (every Tabby completion is one) were counted under
    provider "", so 5xx by provider undercounted what editors see."""
    primary, _ = backends
    keel = keel_factory(chain_config(primary.url, None))
    primary.behave(Behaviour.error(500))
    assert keel.tabby().status_code >= 500
    assert keel.chat().status_code >= 500
    lines = [m for m in keel.http.get("/metrics").text.splitlines() if "keel_requests_total{" in m]
    for role in ("completion", "chat"):
        failed = [m for m in lines if f'role="{role}"' in m and 'status="5' in m]
        assert failed and all(f'provider="{primary_name(role)}"' in m for m in failed), lines
