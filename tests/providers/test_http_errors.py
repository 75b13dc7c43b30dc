"""Every kind's failures become keel's error tree, against a misbehaving real server."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing

import pytest

from keel.config import CHAT_KINDS, COMPLETION_KINDS, EMBEDDING_KINDS
from keel.errors import (
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from keel.providers.base import (
    ChatCall,
    ChatMessage,
    CompletionCall,
    CompletionProvider,
    GenerationParams,
)
from keel.providers.http_base import ANSWER_CHARS
from keel.router.classify import Failure, classify
from tests.fakes.upstreams import Behaviour, FakeUpstream

STREAM_KINDS = (*COMPLETION_KINDS, *CHAT_KINDS)
SSE_KINDS = tuple(kind for kind in STREAM_KINDS if not kind.startswith("ollama/"))
PARAMS = GenerationParams(max_tokens=8)


def call_for(provider, params: GenerationParams = PARAMS) -> CompletionCall | ChatCall:
    if isinstance(provider, CompletionProvider):
        return CompletionCall("x", params, suffix=None)
    return ChatCall((ChatMessage("user", "x"),), params)


def stream(
    provider, params: GenerationParams = PARAMS, call: CompletionCall | ChatCall | None = None
):
    call = call or call_for(provider, params)
    if isinstance(call, CompletionCall):
        return provider.stream_completion(call)
    return provider.stream_chat(call)


async def run(provider, params: GenerationParams = PARAMS) -> list[str]:
    """Pieces of a stream, or the embedding call; what arrived before a failure is kept."""
    received: list[str] = []
    if hasattr(provider, "embed"):
        await provider.embed(["x"])
        return received
    try:
        async with aclosing(stream(provider, params)) as pieces:
            async for piece in pieces:
                received.append(piece)
    except Exception as exc:
        exc.received = received  # type: ignore[attr-defined]
        raise
    return received


ALL_KINDS = pytest.mark.parametrize("kind", [*STREAM_KINDS, *EMBEDDING_KINDS])
STREAMING = pytest.mark.parametrize("kind", STREAM_KINDS)


@ALL_KINDS
async def test_connection_refused(make_provider, dead_url, kind):
    provider = make_provider(kind, endpoint=dead_url)
    with pytest.raises(UpstreamConnectError) as caught:
        await run(provider)
    assert caught.value.provider == f"test-{kind}"
    assert caught.value.status_code == 502


@ALL_KINDS
async def test_401_is_an_auth_error(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.error(401, {"error": {"message": "Incorrect API key provided"}}))
    with pytest.raises(UpstreamAuthError, match="Incorrect API key provided") as caught:
        await run(make_provider(kind))
    assert caught.value.upstream_status == 401


async def test_an_exhausted_quota_is_no_pause_but_the_accounts_trouble(
    upstream: FakeUpstream, make_provider
):
    """OpenAI's 429 ``insufficient_quota`` (no Retry-After) was a 1 s rate limit: the
    backend asked again every second and clients told to retry in 1 s, for as long as
    the account was out of credit. It is the account's trouble, as a rejected key is."""
    quota = {"message": "You exceeded your current quota", "code": "insufficient_quota"}
    upstream.behave(Behaviour.error(429, {"error": {**quota, "type": "insufficient_quota"}}))
    with pytest.raises(UpstreamAuthError, match="quota is used up") as caught:
        await run(make_provider("openai/chat"))
    assert (caught.value.code, caught.value.retry_after) == ("upstream_quota_exhausted", None)
    assert classify(caught.value) is Failure.AUTH


async def test_403_is_an_auth_error(upstream: FakeUpstream, make_provider):
    upstream.behave(Behaviour.error(403, {"detail": "forbidden"}))
    with pytest.raises(UpstreamAuthError, match="forbidden"):
        await run(make_provider("voyage/embedding"))


@ALL_KINDS
async def test_500_carries_the_backends_message(upstream: FakeUpstream, make_provider, kind):
    body = (
        {"error": "model 'x' not found"}  # Ollama's shape
        if kind.startswith("ollama/")
        else {"error": {"message": "CUDA out of memory", "type": "server_error", "code": 500}}
    )
    upstream.behave(Behaviour.error(500, body))
    with pytest.raises(UpstreamStatusError) as caught:
        await run(make_provider(kind))
    error = caught.value
    assert type(error) is UpstreamStatusError
    assert error.upstream_status == 500
    assert error.retry_after is None
    expected = "model 'x' not found" if kind.startswith("ollama/") else "CUDA out of memory"
    assert expected in error.message
    assert "HTTP 500" in error.message


@ALL_KINDS
async def test_429_with_retry_after(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(
        Behaviour.error(429, {"message": "Requests rate limit exceeded"}, retry_after="7")
    )
    with pytest.raises(UpstreamStatusError, match="rate limit exceeded") as caught:
        await run(make_provider(kind))
    assert caught.value.upstream_status == 429
    assert caught.value.retry_after == 7.0


@ALL_KINDS
@pytest.mark.parametrize("status", [301, 307])
async def test_a_redirect_is_not_followed(upstream: FakeUpstream, make_provider, kind, status):
    """A redirect fails the call, naming where it points, and nothing is sent there:
    followed, a 301 (HTTP to HTTPS in front of vLLM) turned the POST into a bodiless GET,
    whose 405 was blamed on the backend; a 307 to another host was answered there, with
    the API key dropped; a loop sent 10 requests a try, reported as "not HTTP: "."""
    with FakeUpstream() as elsewhere:
        where = elsewhere.url + "/v1/anything"
        upstream.behave(Behaviour.respond(status, "moved", headers=(("Location", where),)))
        with pytest.raises(UpstreamStatusError, match=f"redirected to {where}") as caught:
            await run(make_provider(kind))
        assert caught.value.upstream_status == status
        assert "api_endpoint" in caught.value.message
        assert elsewhere.requests == []
        assert classify(caught.value) is Failure.RETRYABLE  # the backend's, then fall back


async def test_plain_text_error_body(upstream: FakeUpstream, make_provider):
    upstream.behave(Behaviour.error(502, "upstream connect error or disconnect/reset"))
    with pytest.raises(UpstreamStatusError, match="disconnect/reset") as caught:
        await run(make_provider("openai/chat"))
    assert caught.value.upstream_status == 502


@ALL_KINDS
async def test_malformed_json(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.malformed_json())
    with pytest.raises(UpstreamProtocolError, match="malformed JSON"):
        await run(make_provider(kind))


@ALL_KINDS
async def test_body_that_is_not_the_protocol(upstream: FakeUpstream, make_provider, kind):
    """A 200 with an HTML page: SSE kinds say 'not an event stream', the others bad JSON."""
    upstream.behave(Behaviour.broken_sse())
    with pytest.raises(UpstreamProtocolError) as caught:
        await run(make_provider(kind))
    if kind in SSE_KINDS:
        assert "not an event stream" in caught.value.message


@ALL_KINDS
async def test_hang_times_out(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.hang())
    provider = make_provider(kind, timeout=0.3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout, match="waiting for data") as caught:
        await run(provider)
    assert asyncio.get_running_loop().time() - started < 2
    assert caught.value.status_code == 504


@STREAMING
async def test_slow_first_token_beyond_timeout(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.slow_first_token(1.5))
    with pytest.raises(UpstreamTimeout):
        await run(make_provider(kind, timeout=0.3))


@STREAMING
async def test_slow_first_token_within_timeout(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.slow_first_token(0.2))
    assert "".join(await run(make_provider(kind, timeout=2))) == "Hello, world"


@STREAMING
async def test_stream_cut_mid_way(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.cut(after=2))
    with pytest.raises(UpstreamProtocolError) as caught:
        await run(make_provider(kind))
    assert "".join(caught.value.received) == "Hello,"


@STREAMING
async def test_error_object_inside_a_stream(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.stream_error("out of KV cache slots", after=1, status=503))
    with pytest.raises(UpstreamStatusError, match="out of KV cache slots") as caught:
        await run(make_provider(kind))
    assert caught.value.received == ["Hello"]


@ALL_KINDS
async def test_connection_reset(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.reset())
    with pytest.raises(UpstreamConnectError):
        await run(make_provider(kind))


@ALL_KINDS
async def test_closed_without_answer(upstream: FakeUpstream, make_provider, kind):
    upstream.behave(Behaviour.disconnect())
    with pytest.raises(UpstreamProtocolError, match="closed mid-response"):
        await run(make_provider(kind))


@STREAMING
async def test_a_backend_past_max_tokens_is_cut_there(upstream: FakeUpstream, make_provider, kind):
    """Each piece with text holds a token at least: a backend that sends more pieces
    than ``max_tokens`` ignored it. The answer ends at the limit and the connection is
    closed, which stops the backend: one that never stopped, given 5, took keel to 4 GB
    in 15 s."""
    upstream.tokens = tuple(f" t{n}" for n in range(40))
    upstream.token_delay = 0.01
    provider = make_provider(kind)
    call = call_for(provider, GenerationParams(max_tokens=3))
    assert "".join([piece async for piece in stream(provider, call=call)]) == " t0 t1 t2"
    assert call.reported.finish_reason == "length"
    await upstream.wait_for(lambda: upstream.disconnects == 1)
    assert upstream.completed == 0

    upstream.behave(Behaviour.endless())
    received = await run(make_provider(kind), GenerationParams(max_tokens=5))
    assert "".join(received) == " t0" * 5
    await upstream.wait_for(lambda: upstream.disconnects == 2)


@STREAMING
async def test_a_backend_that_never_stops_fails_past_an_answers_size(
    upstream: FakeUpstream, make_provider, kind
):
    """With no ``max_tokens`` (a chat's default), an answer of 16 M characters, past any
    model's output, is a backend that does not stop: its error, the connection closed."""
    upstream.tokens = ("z" * 4000,)
    upstream.behave(Behaviour.endless())
    with pytest.raises(UpstreamProtocolError, match="did not stop") as caught:
        await run(make_provider(kind, timeout=30), GenerationParams(max_tokens=None))
    assert sum(map(len, caught.value.received)) <= ANSWER_CHARS
    await upstream.wait_for(lambda: upstream.disconnects == 1)
    assert classify(caught.value) is Failure.RETRYABLE  # the backend's failure: counted against it


@pytest.mark.parametrize("kind", ["openai/chat", "mistral/chat"])
async def test_reasoning_that_never_ends_fails_past_an_answers_size(
    upstream: FakeUpstream, make_provider, kind
):
    """A thinking model's reasoning is not the answer's text, and counts all the same."""
    upstream.reasoning = ("y" * 4000,)
    upstream.behave(Behaviour.endless())
    with pytest.raises(UpstreamProtocolError, match="did not stop") as caught:
        await run(make_provider(kind, timeout=30), GenerationParams(max_tokens=None))
    assert "".join(caught.value.received) == ""
    await upstream.wait_for(lambda: upstream.disconnects == 1)


@pytest.mark.parametrize("kind", SSE_KINDS)
async def test_an_event_that_never_ends_is_refused(upstream: FakeUpstream, make_provider, kind):
    """``data:`` lines that no blank line ends: kept in full, they took keel to 8.5 GB
    within a chat's first-token limit."""
    upstream.behave(Behaviour.endless_event())
    with pytest.raises(UpstreamProtocolError, match="an event over") as caught:
        await run(make_provider(kind))
    assert caught.value.received == []
    await upstream.wait_for(lambda: upstream.disconnects == 1)


async def test_failure_then_recovery(upstream: FakeUpstream, make_provider):
    upstream.behave(Behaviour.error(503, {"error": {"message": "loading model"}}), times=1)
    provider = make_provider("llama.cpp/completion")
    with pytest.raises(UpstreamStatusError, match="loading model"):
        await run(provider)
    assert "".join(await run(provider)) == "Hello, world"


# --- cancelling upstream work -------------------------------------------------


@STREAMING
async def test_closing_the_stream_closes_the_upstream_request(
    upstream: FakeUpstream, make_provider, kind
):
    upstream.token_delay = 0.2
    pieces = stream(make_provider(kind))
    assert await anext(pieces) == "Hello"
    await pieces.aclose()
    await upstream.wait_for(lambda: upstream.disconnects == 1)
    assert upstream.completed == 0


@STREAMING
async def test_cancelling_the_consumer_closes_the_upstream_request(
    upstream: FakeUpstream, make_provider, kind
):
    upstream.token_delay = 0.2
    provider = make_provider(kind)
    first = asyncio.Event()

    async def consume() -> None:
        async with aclosing(stream(provider)) as pieces:
            async for _ in pieces:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await upstream.wait_for(lambda: upstream.disconnects == 1)
    assert upstream.completed == 0


async def test_provider_keeps_working_after_a_cancelled_stream(
    upstream: FakeUpstream, make_provider
):
    upstream.token_delay = 0.05
    provider = make_provider("openai/completion")
    pieces = stream(provider)
    await anext(pieces)
    await pieces.aclose()
    upstream.token_delay = 0.0
    assert "".join(await run(provider)) == "Hello, world"


def _chunks(*choices: dict[str, object]) -> str:
    events = [f"data: {json.dumps({'choices': [choice]})}\n\n" for choice in choices]
    return "".join(events) + "data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("kind", "answer"),
    [
        ("openai/chat", _chunks({"index": 0, "text": "hi", "finish_reason": "stop"})),
        ("mistral/chat", _chunks({"index": 0, "text": "hi", "finish_reason": "stop"})),
        ("openai/completion", _chunks({"index": 0, "delta": {"content": "hi"}})),
        ("vllm/completion", _chunks({"index": 0, "delta": {"content": "hi"}})),
    ],
)
async def test_an_answer_in_the_other_openai_shape_is_the_backends_failure(
    upstream: FakeUpstream, make_provider, kind: str, answer: str
):
    """A chat kind pointed at a completions server (or the reverse): its text was read as
    none, and the client got a 200 with an empty answer, counted a success."""
    sse = (("Content-Type", "text/event-stream"),)
    upstream.behave(Behaviour.respond(200, answer, headers=sse))
    with pytest.raises(UpstreamProtocolError, match="does this kind match") as caught:
        await run(make_provider(kind))
    assert classify(caught.value) is Failure.RETRYABLE


@STREAMING
async def test_an_answer_cut_short_is_said_in_plain_words(
    upstream: FakeUpstream, make_provider, kind
):
    """aiohttp's text went to the client and ``last_error`` as it was, and read as the
    backend's HTTP 400: "<TransferEncodingError: 400, message='Not enough data to
    satisfy transfer length header.'>"."""
    upstream.behave(Behaviour.cut(after=1))
    with pytest.raises(UpstreamProtocolError) as caught:
        await run(make_provider(kind))
    said = caught.value.message
    assert "cut short" in said and "400" not in said and "Error" not in said, said
