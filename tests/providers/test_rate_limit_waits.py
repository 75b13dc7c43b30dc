"""No silent cap: an HTTP provider has no rate limit unless its config sets one, and a
configured limit's waits show in the provider's status, ``/metrics`` and `keel config check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import HttpModelConfig
from keel.ops.metrics import Metrics
from keel.providers.base import CompletionCall, GenerationParams
from keel.providers.catalog import ProviderEntry, Providers
from keel.rate_limit import RateLimiter
from tests.fakes.upstreams import FakeUpstream
from tests.forked import run_keel
from tests.providers.test_http_base import FakeClock


async def test_a_provider_without_a_configured_limit_sends_every_request(
    upstream: FakeUpstream, make_provider
):
    provider = make_provider("llama.cpp/completion")
    call = CompletionCall("x", GenerationParams(max_tokens=1))
    for _ in range(30):
        assert [p async for p in provider.stream_completion(call)]
    assert len(upstream.requests) == 30
    assert provider.upstream.rate_limiter is None
    assert provider.status()["rate_limit"] is None


async def test_waits_on_a_configured_limit_are_counted():
    clock = FakeClock()
    limiter = RateLimiter(60, burst=1, max_wait=5, clock=clock, sleep=clock.sleep)
    await limiter.acquire("p")  # from the burst: no wait
    await limiter.acquire("p")  # waits 1 s
    snapshot = limiter.snapshot()
    assert snapshot["admitted"] == 2 and snapshot["waited"] == 1
    assert snapshot["wait_seconds_total"] == pytest.approx(1.0)
    assert snapshot["request_per_minute"] == 60 and snapshot["refused"] == 0


async def test_the_wait_histogram_is_exported_per_limited_provider(
    upstream: FakeUpstream, make_provider
):
    limited = make_provider("llama.cpp/completion", rate_limit={"request_per_minute": 1})
    free = make_provider("openai/completion")
    call = CompletionCall("x", GenerationParams(max_tokens=1))
    assert [p async for p in limited.stream_completion(call)]
    with pytest.raises(Exception, match="requests/minute"):
        async for _ in limited.stream_completion(call):
            pass
    chain = [[ProviderEntry(p, HttpModelConfig(kind=p.info.kind))] for p in (limited, free)]
    metrics = Metrics(environ={})
    metrics.track_providers(Providers({"completion": chain, "chat": chain, "embedding": chain}))
    text = metrics.render().decode()
    name = limited.name
    assert f'keel_rate_limit_wait_seconds_count{{provider="{name}"}} 1.0' in text
    assert f'keel_rate_limit_wait_seconds_bucket{{le="0.001",provider="{name}"}} 1.0' in text
    assert f'keel_rate_limit_refusals_total{{provider="{name}"}} 1.0' in text
    assert free.name not in text.split("keel_rate_limit_wait_seconds", 1)[1]


def test_config_check_prints_the_effective_limit_per_provider(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(
        '[model.completion.http]\nkind = "openai/completion"\n'
        'api_endpoint = "http://127.0.0.1:9/v1"\n'
        '[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "http://127.0.0.1:9/v1"\n'
        "rate_limit = { request_per_minute = 600 }\n"
        '[[model.completion.fallback]]\nkind = "vllm/completion"\nmodel_name = "m"\n'
        'api_endpoints = ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"]\n'
        "rate_limit = { request_per_minute = 2 }\n"
    )
    checked = run_keel(
        ["config", "check", str(config)],
        {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    checked.check_returncode()
    out = checked.stdout
    assert "openai/completion: rate limit: none" in out
    assert "openai/chat: rate limit: 600 requests/minute" in out
    # each replica has its own: said so (it read "2 requests/minute" while 4 went)
    assert "rate limit: 2 requests/minute per endpoint (2 endpoints: 4 in all)" in out, out
    # and what each role admits at once, at a local model too
    server, local = "1024 at once (8 at a local model)", "embedding: local:"
    assert out.count(f"admission: {server}, then 64 waiting up to 10 s, then 429") == 2, out
    assert out.split(local, 1)[1].splitlines()[1].strip().startswith("admission: 8 at once,"), out
