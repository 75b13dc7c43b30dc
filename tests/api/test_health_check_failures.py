"""A failed health check is a failed call to its provider: ``keel_provider_failures_total``
counts it, as its HELP and the README say, under ``kind="health_check"``. The gauges went
0 and the log said the check failed while the counter did not move, and a dead fallback,
which no request reaches, had no series at all."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tests.api.conftest import ADMIN_KEY, USER, USER_KEY, Backends, build_app, serving
from tests.ports import free_port

FAILURES = "keel_provider_failures_total"


def config(primary: str, dead: str) -> str:
    return f"""
[routing]
probe_interval_seconds = 600

[auth]
api_keys = ["{USER_KEY}"]
admin_key = "{ADMIN_KEY}"

[model.completion]
embedded_last_resort = false

[model.completion.http]
kind = "openai/completion"
api_endpoint = "{primary}/v1"
model_name = "primary-coder"

[[model.completion.fallback]]
kind = "vllm/completion"
api_endpoint = "{dead}/v1"
model_name = "dead-fallback"

[model.chat.http]
kind = "openai/chat"
api_endpoint = "{primary}/v1"
model_name = "primary-chat"

[model.embedding.http]
kind = "openai/embedding"
api_endpoint = "{primary}/v1"
model_name = "primary-embed"
"""


async def samples(client: httpx.AsyncClient, name: str) -> list[tuple[dict[str, str], float]]:
    text = (await client.get("/metrics", headers=USER)).text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


async def test_a_dead_fallbacks_failed_checks_are_counted(
    backends: Backends, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    app = build_app(tmp_path / "keel", config(backends.primary.url, dead))
    async with serving(app) as client:
        routing = app.state.keel.routing
        for _ in range(2):  # what the prober does every probe_interval_seconds
            await routing.probe_all()
        providers = (await client.get("/v1/providers", headers=USER)).json()
        chain = providers["roles"]["completion"]["providers"]
        [fallback] = [p for p in chain if p["endpoint"] == f"{dead}/v1"]
        assert not fallback["healthy"] and fallback["last_error"], fallback
        failures = await samples(client, FAILURES)
        checks = [
            value
            for labels, value in failures
            if labels["provider"] == fallback["name"] and labels["kind"] == "health_check"
        ]
        assert checks and sum(checks) >= 2, failures
        # the live primary's checks passed: none counted against it
        assert not [labels for labels, _ in failures if labels["provider"] != fallback["name"]]
        healthy = {
            labels["provider"]: value
            for labels, value in await samples(client, "keel_provider_healthy")
        }
        assert healthy[fallback["name"]] == 0
