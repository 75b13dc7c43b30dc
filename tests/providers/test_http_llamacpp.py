"""llama.cpp server kinds against the fake upstream."""

from __future__ import annotations

import asyncio

import pytest

from keel.errors import UpstreamProtocolError
from keel.providers.base import CompletionCall, GenerationParams, Reported, llamacpp_seed
from keel.providers.http_llamacpp import llamacpp_embeddings
from tests.fakes.upstreams import Behaviour, FakeUpstream, llamacpp_timings


async def test_completion_request_and_stream(upstream: FakeUpstream, make_provider):
    template = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    provider = make_provider(
        "llama.cpp/completion", prompt_template=template, additional_stop_words=["<|endoftext|>"]
    )
    assert provider.supports_suffix is False
    assert provider.prompt_template == template
    assert provider.stop_words == ("<|endoftext|>",)
    assert provider.info.endpoint == upstream.url

    params = GenerationParams(max_tokens=32, temperature=0.1, stop=("\n\n",), seed=3)
    prompt = "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>"
    pieces = [p async for p in provider.stream_completion(CompletionCall(prompt, params))]
    assert "".join(pieces) == "Hello, world"

    request = upstream.last_request
    assert request.path == "/completion"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.json == {
        "prompt": prompt,
        "n_predict": 32,
        "temperature": 0.1,
        "stop": ["\n\n"],
        "seed": 3,
        "cache_prompt": True,
        "stream": True,
        "return_tokens": True,
        "timings_per_token": True,
    }


async def test_a_seed_over_32_bits_is_sent_as_one_llamacpp_keeps(
    upstream: FakeUpstream, make_provider
):
    """llama-server cuts a seed to 32 bits (2**40 would be seed 0, -1 a random one)."""
    provider = make_provider("llama.cpp/completion")
    for seed in (2**40, -1):
        call = CompletionCall("x", GenerationParams(max_tokens=4, seed=seed))
        assert "".join([p async for p in provider.stream_completion(call)]) == "Hello, world"
        sent = upstream.last_request.json["seed"]
        assert sent == llamacpp_seed(seed) and sent not in (0, 2**32 - 1), sent


async def test_stream_ends_at_stop_without_done_marker(upstream: FakeUpstream, make_provider):
    """llama.cpp sends no ``[DONE]``: ``stop: true`` is the end, so nothing is raised."""
    provider = make_provider("llama.cpp/completion")
    call = CompletionCall("x", GenerationParams(max_tokens=4))
    assert "".join([p async for p in provider.stream_completion(call)]) == "Hello, world"
    for _ in range(100):  # the upstream writes its last chunk after the client has its text
        if upstream.completed:
            break
        await asyncio.sleep(0.01)
    assert upstream.completed == 1  # a whole answer, not a connection cut at the stop


async def test_the_servers_timings_are_reported(upstream: FakeUpstream, make_provider):
    """The last chunk's ``timings``: the prompt's tokens (read and from the cache), the
    time reading took, the tokens generated."""
    provider = make_provider("llama.cpp/completion")
    call = CompletionCall("def total(items):\n    return", GenerationParams(max_tokens=4))
    call.reported.note_usage({"prompt_tokens": 900})  # as a failed attempt's backend left it
    assert "".join([p async for p in provider.stream_completion(call)]) == "Hello, world"
    said = llamacpp_timings(call.prompt, len(upstream.tokens))
    assert call.reported == Reported(
        prompt_tokens=said["prompt_n"] + said["cache_n"],
        completion_tokens=said["predicted_n"],
        cached_tokens=said["cache_n"],
        prompt_ms=said["prompt_ms"],
    )


@pytest.mark.parametrize(
    "timings",
    [
        None,
        "fast",
        {"prompt_n": -1, "cache_n": True, "prompt_ms": float("inf"), "predicted_n": "3"},
        {"prompt_n": 1.5, "prompt_ms": float("nan")},
        {"prompt_ms": True},
    ],
)
def test_timings_that_are_not_figures_are_not_taken(timings: object) -> None:
    """A server's ``timings`` are taken only where they are counts and times: an
    infinite time would have made the /infill answer's JSON unwritable (a 500)."""
    reported = Reported()
    reported.note_timings(timings)
    assert reported == Reported()


async def test_embedding_batch(upstream: FakeUpstream, make_provider):
    provider = make_provider("llama.cpp/embedding", api_key=None)
    assert await provider.embed(["ab", "c"]) == [[2.0, 0.0, 0.5], [1.0, 1.0, 0.5]]
    request = upstream.last_request
    assert request.path == "/embeddings"
    assert "authorization" not in request.headers
    assert request.json == {"content": ["ab", "c"]}


async def test_embedding_before_b4356_asks_its_route_a_text_at_a_time(
    upstream: FakeUpstream, make_provider
):
    """Tabby's ``llama.cpp/before_b4356_embedding``: the servers before that build have
    ``/embedding`` and read one ``content`` string."""
    provider = make_provider("llama.cpp/before_b4356_embedding")
    assert await provider.embed(["ab", "cde"]) == [[2.0, 0.0, 0.5], [3.0, 0.0, 0.5]]
    sent = [(r.path, r.json) for r in upstream.requests]
    assert sent == [("/embedding", {"content": "ab"}), ("/embedding", {"content": "cde"})]
    assert upstream.last_request.headers["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize(
    "payload",
    [
        [{"index": 0, "embedding": [[1, 2]]}],  # b4357 and later
        [{"embedding": [1, 2]}],  # before
        {"embedding": [1, 2]},  # /embedding, one input
    ],
)
def test_embedding_response_shapes(payload):
    assert llamacpp_embeddings(payload, 1, "p") == [[1.0, 2.0]]


def test_embedding_per_token_vectors_are_refused():
    with pytest.raises(UpstreamProtocolError, match="pooling"):
        llamacpp_embeddings([{"index": 0, "embedding": [[1.0], [2.0]]}], 1, "p")


async def test_llamacpp_error_line_in_stream(upstream: FakeUpstream, make_provider):
    upstream.behave(Behaviour.stream_error("context shift disabled", after=1, status=400))
    provider = make_provider("llama.cpp/completion")
    received = []
    with pytest.raises(Exception) as caught:
        async for piece in provider.stream_completion(
            CompletionCall("x", GenerationParams(max_tokens=4))
        ):
            received.append(piece)
    assert received == ["Hello"]
    assert "context shift disabled" in str(caught.value)
    assert getattr(caught.value, "upstream_status", None) == 400
