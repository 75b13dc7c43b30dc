"""Mistral FIM (Codestral) against the fake upstream."""

from __future__ import annotations

from keel.config import HttpModelConfig
from keel.providers.base import CompletionCall, GenerationParams, llamacpp_seed
from keel.providers.http import build_http_provider


async def test_fim_request_and_stream(upstream, make_provider):
    provider = make_provider("mistral/completion", additional_stop_words=["\n\n"])
    assert provider.supports_suffix is True
    assert provider.prompt_template is None
    assert provider.info.model == "codestral-latest"

    params = GenerationParams(max_tokens=64, temperature=0.0, stop=("\n\n",), seed=42)
    call = CompletionCall(prompt="def fib(n):\n    ", suffix="\n\nprint(fib(10))", params=params)
    assert "".join([p async for p in provider.stream_completion(call)]) == "Hello, world"

    request = upstream.last_request
    assert request.path == "/v1/fim/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.json == {
        "model": "codestral-latest",
        "prompt": "def fib(n):\n    ",
        "suffix": "\n\nprint(fib(10))",
        "max_tokens": 64,
        "temperature": 0.0,
        "stop": ["\n\n"],
        "random_seed": 42,
        "stream": True,
    }


async def test_a_seed_out_of_range_is_sent_as_a_non_negative_one(upstream, make_provider):
    """Mistral's ``random_seed`` is non-negative: Tabby's u64 seed 2**64 - 1 went as -1."""
    provider = make_provider("mistral/completion")
    for seed in (2**40, -1):
        call = CompletionCall("x", params=GenerationParams(max_tokens=4, seed=seed))
        assert "".join([p async for p in provider.stream_completion(call)]) == "Hello, world"
        sent = upstream.last_request.json["random_seed"]
        assert sent == llamacpp_seed(seed) and 0 <= sent < 2**32, sent


async def test_empty_suffix_is_left_out(upstream, make_provider):
    provider = make_provider("mistral/completion", model_name="codestral-2501")
    call = CompletionCall(prompt="x", suffix="", params=GenerationParams(max_tokens=8))
    assert "".join([p async for p in provider.stream_completion(call)]) == "Hello, world"
    assert "suffix" not in upstream.last_request.json
    assert upstream.last_request.json["model"] == "codestral-2501"


async def test_default_endpoint():
    config = HttpModelConfig(kind="mistral/completion", api_key="k")
    provider = build_http_provider("completion", config, name="codestral", timeout=1)
    try:
        assert provider.info.endpoint == "https://api.mistral.ai"
    finally:
        await provider.aclose()
