"""The shared pieces: Retry-After, error bodies, the SSE reader, the rate limiter, the factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from keel.config import HttpModelConfig
from keel.errors import ConfigError, UpstreamProtocolError, UpstreamStatusError
from keel.providers.base import CompletionCall, GenerationParams
from keel.providers.http import build_http_provider
from keel.providers.http_base import (
    BATCH_BYTES,
    NdJson,
    RateLimiter,
    SseEvent,
    SseJson,
    SseParser,
    auth_headers,
    body_line_batches,
    error_message,
    parse_retry_after,
    payload_batches,
    status_error,
)
from tests.fakes.upstreams import FakeUpstream


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("inf", None),
        ("1e999", None),
        ("nan", None),
        ("86400", 3600.0),
    ],
)
def test_retry_after_seconds(value, expected):
    assert parse_retry_after(value) == expected


def test_retry_after_http_date():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(header, now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now=now) == 0.0


def test_a_404_names_the_url_keel_called():
    """An api_endpoint ending in the route keel adds (Tabby's docs warn of it) called
    .../chat/completions/chat/completions and said only "HTTP 404: Not Found"."""
    url = "http://127.0.0.1:9/v1/chat/completions/chat/completions?key=secret"
    error = status_error("p", 404, b"Not Found", {}, url)
    assert "127.0.0.1:9/v1/chat/completions/chat/completions?key=***" in error.message
    assert "api_endpoint" in error.message and "secret" not in error.message
    assert "api_endpoint" not in status_error("p", 500, b"boom", {}, url).message


def test_a_retry_after_date_is_read_against_the_answers_own_date():
    """A backend's clock an hour ahead of keel's (keel's not yet set right after a
    resume): its "in 30 s" as a date was an hour of 429s, capped, kept after the
    clocks agreed again. Its answer's ``Date`` says when it wrote the date."""
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    theirs = now + timedelta(hours=1)
    headers = {
        "retry-after": format_datetime(theirs + timedelta(seconds=30), usegmt=True),
        "date": format_datetime(theirs, usegmt=True),
    }
    assert status_error("p", 429, b"{}", headers).retry_after == 30.0
    assert parse_retry_after(headers["retry-after"], sent="not a date", now=now) == 3600.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "bad key", "type": "invalid_request_error"}}', "bad key"),
        (b'{"error": "model not found"}', "model not found"),
        (b'{"object": "error", "message": "Unauthorized"}', "Unauthorized"),
        (b'{"detail": "Provided API key is invalid."}', "Provided API key is invalid."),
        (b'{"detail": [{"loc": ["body"], "msg": "field required"}]}', "field required"),
        (b"<html>502 Bad Gateway</html>", "<html>502 Bad Gateway</html>"),
        (b"", "(empty body)"),
    ],
)
def test_error_message_shapes(body, expected):
    assert expected in error_message(body)


def test_an_error_body_cannot_write_lines_into_keels_log():
    """A backend's error text goes into keel's log and its clients' errors: its line
    breaks made lines of the backend's choosing ("2026-01-01 FAKE LOG LINE")."""
    said = error_message(b"<b>bad</b>\r\nX-Injected: yes\n2026-01-01 FAKE LOG LINE\x1b[31m")
    assert said == "<b>bad</b>\\r\\nX-Injected: yes\\n2026-01-01 FAKE LOG LINE\\x1b[31m"
    nested = error_message(b'{"error": {"message": "line one\\nline two"}}')
    assert nested == "line one\\nline two"


def test_error_message_is_shortened():
    assert len(error_message(b"x" * 10_000)) == 500


def test_auth_headers():
    assert auth_headers("sk-1") == {"Authorization": "Bearer sk-1"}
    assert auth_headers(None) == {}
    assert auth_headers("") == {}


def events_of(*lines: str) -> list[SseEvent]:
    parser = SseParser("p")
    return [event for line in lines if (event := parser.feed(line)) is not None]


async def batches_of(*batches: list[str]) -> AsyncIterator[list[str]]:
    for lines in batches:
        yield lines


async def payloads(parser: SseJson | NdJson, *batches: list[str]) -> list[list[dict[str, object]]]:
    return [batch async for batch in payload_batches(batches_of(*batches), parser)]


def test_sse_reader_follows_the_format():
    events = events_of(
        ": keep-alive comment",
        "event: ping",
        "",
        'data: {"a":',
        "data: 1}",
        "id: 3",
        "",
        "data:no-space",
        "",
        "retry: 100",
        "data: unterminated at the end",
    )
    assert events == [SseEvent("message", '{"a":\n1}'), SseEvent("message", "no-space")]


def test_sse_reader_refuses_lines_that_are_not_sse():
    """A JSON body, from a server that ignores ``"stream": true``, is said to be one (it
    was an "unexpected line")."""
    with pytest.raises(UpstreamProtocolError, match="not an event stream: one JSON body"):
        events_of('{"choices": []}')
    with pytest.raises(UpstreamProtocolError, match="not an event stream: unexpected line"):
        events_of("<html>")


async def test_sse_json_needs_done_marker():
    batches = payload_batches(batches_of(['data: {"x": 1}', ""]), SseJson("p"))
    assert await anext(batches) == [{"x": 1}]
    with pytest.raises(UpstreamProtocolError, match="end marker"):
        await anext(batches)


async def test_sse_json_stops_at_done_and_batches_what_arrived_together():
    got = await payloads(
        SseJson("p"),
        ['data: {"x": 1}', "", 'data: {"x": 2}'],
        ["", "data: [DONE]", "", 'data: {"x": 3}', ""],
    )
    assert got == [[{"x": 1}], [{"x": 2}]]


async def test_sse_json_refuses_non_objects():
    with pytest.raises(UpstreamProtocolError, match="JSON object"):
        await payloads(SseJson("p"), ["data: [1, 2]", ""])


async def test_ndjson_reader():
    lines = ['{"response": "a"}', "", '{"response": "b", "done": true}']
    assert await payloads(NdJson("p"), lines) == [
        [{"response": "a"}, {"response": "b", "done": True}]
    ]
    with pytest.raises(UpstreamStatusError, match="out of memory"):
        await payloads(NdJson("p"), ['{"error": "out of memory"}'])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_rate_limiter_allows_a_burst_then_paces():
    clock = FakeClock()
    limiter = RateLimiter(60, burst=2, max_wait=5, clock=clock, sleep=clock.sleep)
    await limiter.acquire("p")
    await limiter.acquire("p")
    assert clock.slept == []
    await limiter.acquire("p")
    assert clock.slept == [pytest.approx(1.0)]
    clock.now += 10
    assert limiter.available == pytest.approx(2.0)


async def test_rate_limiter_queues_concurrent_waiters_in_turn():
    """Two callers arriving together on an empty bucket wait one and two intervals."""
    clock = FakeClock()
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    limiter = RateLimiter(60, burst=1, max_wait=5, clock=clock, sleep=record)
    await limiter.acquire("p")
    await limiter.acquire("p")
    await limiter.acquire("p")
    assert waits == [pytest.approx(1.0), pytest.approx(2.0)]


async def test_rate_limiter_refuses_a_long_wait():
    clock = FakeClock()
    limiter = RateLimiter(6, burst=1, max_wait=1, clock=clock, sleep=clock.sleep)
    await limiter.acquire("p")
    with pytest.raises(UpstreamStatusError) as caught:
        await limiter.acquire("p")
    assert caught.value.code == "rate_limit_reached"
    assert caught.value.upstream_status is None
    assert caught.value.retry_after == pytest.approx(10.0)
    assert clock.slept == []


@pytest.mark.parametrize(("per_minute", "burst"), [(60, 10), (1200, 200), (600, 100), (6, 1)])
async def test_a_configured_rate_limit_bursts_ten_seconds_worth_as_tabbys(
    per_minute: int, burst: int
) -> None:
    """Tabby's leaky bucket lets ten seconds' worth through after a pause; keel let a
    whole minute's go at once (60 chats in 50 ms for ``request_per_minute = 60``), which
    a backend counting its quota per second answered with 429s Tabby never caused."""
    clock = FakeClock()
    limiter = RateLimiter(per_minute, max_wait=0, clock=clock, sleep=clock.sleep)
    for _ in range(burst):
        await limiter.acquire("p")
    with pytest.raises(UpstreamStatusError):
        await limiter.acquire("p")
    clock.now += 60 / per_minute * 1.001  # then at the rate configured
    await limiter.acquire("p")


def test_rate_limiter_needs_a_positive_rate():
    with pytest.raises(ValueError, match="per_minute"):
        RateLimiter(0)


async def test_provider_applies_request_per_minute(upstream: FakeUpstream, make_provider):
    provider = make_provider("llama.cpp/completion", rate_limit={"request_per_minute": 1})
    call = CompletionCall("x", GenerationParams(max_tokens=1))
    assert [p async for p in provider.stream_completion(call)]
    with pytest.raises(UpstreamStatusError, match="1 requests/minute"):
        async for _ in provider.stream_completion(call):
            pass
    assert len(upstream.requests) == 1


def test_factory_refuses_a_kind_of_another_role():
    config = HttpModelConfig(kind="openai/chat", api_endpoint="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="unknown kind for role completion"):
        build_http_provider("completion", config, name="p", timeout=1)


def test_factory_needs_an_endpoint_where_there_is_no_default():
    with pytest.raises(ConfigError, match="api_endpoint: required for kind llama.cpp/completion"):
        build_http_provider(
            "completion", HttpModelConfig(kind="llama.cpp/completion"), name="p", timeout=1
        )


async def test_factory_info_and_completion_attributes(upstream: FakeUpstream):
    config = HttpModelConfig(
        kind="vllm/completion",
        api_endpoint=upstream.url + "/v1/",
        model_name="deepseek-coder",
        prompt_template="<|fim▁begin|>{prefix}<|fim▁hole|>{suffix}<|fim▁end|>",
        additional_stop_words=["<|EOT|>", "\n\n\n"],
        max_input_length=4096,
    )
    provider = build_http_provider("completion", config, name="vllm-1", timeout=1)
    try:
        assert provider.info.name == "vllm-1"
        assert provider.name == "vllm-1"
        assert provider.info.kind == "vllm/completion"
        assert provider.info.model == "deepseek-coder"
        assert provider.info.endpoint == upstream.url + "/v1"
        assert provider.stop_words == ("<|EOT|>", "\n\n\n")
        assert provider.max_input_length == 4096
        call = CompletionCall("x", GenerationParams(max_tokens=1))
        assert [p async for p in provider.stream_completion(call)]
        assert upstream.last_request.path == "/v1/completions"  # no double slash
    finally:
        await provider.aclose()


async def test_a_read_is_a_bounded_batch_of_lines() -> None:
    """All aiohttp had buffered became one batch, one piece and one write to a client
    that read slowly or not at all: a stalled stream held ~4.5 MiB in keel."""
    loop = asyncio.get_running_loop()
    content = aiohttp.StreamReader(BaseProtocol(loop), 2**20, loop=loop)
    line = b"data: " + b"x" * 200 + b"\n"
    content.feed_data(line * 5000)  # 1 MiB buffered at once
    content.feed_eof()
    batches = [batch async for batch in body_line_batches(content, "p")]
    sizes = [sum(len(line) + 1 for line in batch) for batch in batches]
    assert max(sizes) <= BATCH_BYTES + len(line), sizes
    assert sum(len(batch) for batch in batches) == 5000


async def test_a_raw_prompt_kind_without_a_template_takes_its_models_family(make_provider):
    """vLLM serving Qwen2.5-Coder, no prompt_template set (the shipped ConfigMap's): keel
    sent the prefix alone, the suffix dropped, as a local model of that family never is."""
    qwen = make_provider("vllm/completion", model_name="Qwen/Qwen2.5-Coder-7B")
    assert qwen.prompt_template is not None and "<|fim_prefix|>" in qwen.prompt_template
    ollama = make_provider("ollama/completion", api_key=None, model_name="qwen2.5-coder:1.5b")
    assert ollama.prompt_template == qwen.prompt_template
    unknown = make_provider("vllm/completion", model_name="some/model")
    assert unknown.prompt_template is None  # prefix alone, as before
    set_by_hand = make_provider(
        "vllm/completion", model_name="Qwen/Qwen2.5-Coder-7B", prompt_template="{prefix}|{suffix}"
    )
    assert set_by_hand.prompt_template == "{prefix}|{suffix}"
