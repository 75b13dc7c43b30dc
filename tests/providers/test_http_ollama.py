"""Ollama kinds against the fake upstream."""

from __future__ import annotations

import pytest

from keel.config import HttpModelConfig
from keel.errors import ConfigError
from keel.providers.base import CompletionCall, GenerationParams, Reported, llamacpp_seed
from keel.providers.http import build_http_provider
from tests.fakes.upstreams import embedding_usage


async def test_generate_request_and_stream(upstream, make_provider):
    provider = make_provider(
        "ollama/completion",
        api_key=None,
        prompt_template="<PRE> {prefix} <SUF>{suffix} <MID>",
        max_input_length=2048,
    )
    assert provider.supports_suffix is False
    assert provider.info.model == "qwen2.5-coder:1.5b"
    params = GenerationParams(max_tokens=24, temperature=0.0, stop=("\n",), seed=1, top_p=0.5)
    pieces = [p async for p in provider.stream_completion(CompletionCall("<PRE> a", params))]
    assert "".join(pieces) == "Hello, world"

    request = upstream.last_request
    assert request.path == "/api/generate"
    assert "authorization" not in request.headers
    assert request.json == {
        "model": "qwen2.5-coder:1.5b",
        "prompt": "<PRE> a",
        "raw": True,
        "stream": True,
        "options": {
            "num_predict": 24,
            "temperature": 0.0,
            "top_p": 0.5,
            "stop": ["\n"],
            "seed": 1,
            "num_ctx": 2048,
        },
    }


async def test_a_seed_over_32_bits_is_one_ollamas_engine_keeps(upstream, make_provider):
    """Tabby's u64 seed went as it came: 2**64 - 1 as -1 (a random seed to llama.cpp,
    under Ollama), 2**40 as one llama.cpp cuts to 0."""
    provider = make_provider("ollama/completion", api_key=None, model_name="m")
    for seed in (2**40, -1):
        call = CompletionCall("x", GenerationParams(max_tokens=4, seed=seed))
        assert "".join([p async for p in provider.stream_completion(call)]) == "Hello, world"
        sent = upstream.last_request.json["options"]["seed"]
        assert sent == llamacpp_seed(seed) and 0 < sent < 2**32 - 1, sent


async def test_generate_sends_key_when_configured(upstream, make_provider):
    provider = make_provider("ollama/completion", api_key="behind-a-proxy")
    params = GenerationParams(max_tokens=2)
    assert [p async for p in provider.stream_completion(CompletionCall("x", params))]
    assert upstream.last_request.headers["authorization"] == "Bearer behind-a-proxy"
    assert upstream.last_request.json["options"] == {"num_predict": 2}


async def test_embed(upstream, make_provider):
    provider = make_provider("ollama/embedding", model_name="nomic-embed-text")
    assert await provider.embed(["hello", "x"]) == [[5.0, 0.0, 0.5], [1.0, 1.0, 0.5]]
    request = upstream.last_request
    assert request.path == "/api/embed"
    assert request.json == {"model": "nomic-embed-text", "input": ["hello", "x"]}
    reported = Reported()  # Ollama's count of what it read: usage.prompt_tokens
    await provider.embed(["hello", "x"], reported)
    assert reported.prompt_tokens == embedding_usage(["hello", "x"])


@pytest.mark.parametrize(
    ("role", "kind"), [("completion", "ollama/completion"), ("embedding", "ollama/embedding")]
)
def test_model_name_is_required(role, kind):
    with pytest.raises(ConfigError, match="model_name"):
        build_http_provider(role, HttpModelConfig(kind=kind), name="o", timeout=1)
