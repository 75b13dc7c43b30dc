"""Every provider keel routes to has its gauges from the start (they were set only on a
change: Grafana's health and breaker panels were empty), a reload sets them as the new
providers are, and a provider the config no longer names leaves them (an open breaker of
a removed fallback kept KeelBreakerOpen firing)."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tests.api.conftest import ADMIN, USER, Backends, build_app, serving
from tests.fakes.upstreams import Behaviour

GAUGES = ("keel_provider_healthy", "keel_breaker_state", "keel_provider_auth_failed")


async def gauges(client: httpx.AsyncClient) -> dict[str, dict[str, float]]:
    text = (await client.get("/metrics", headers=USER)).text
    found: dict[str, dict[str, float]] = {name: {} for name in GAUGES}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name][sample.labels["provider"]] = sample.value
    return found


async def test_gauges_follow_the_providers_in_use(backends: Backends, tmp_path: Path) -> None:
    root = tmp_path / "keel"
    app = build_app(root, backends.config())
    async with serving(app) as client:
        names = {
            provider["name"]
            for role in (await client.get("/v1/providers", headers=USER)).json()["roles"].values()
            for provider in role["providers"]
        }
        fallback = "completion/openai/completion#1"
        assert fallback in names
        start = await gauges(client)
        for name in GAUGES:
            assert set(start[name]) == names, (name, start[name])
        assert set(start["keel_provider_healthy"].values()) == {1.0}
        assert set(start["keel_breaker_state"].values()) == {0.0}

        config = backends.config()
        head, tail = config.split("[[model.completion.fallback]]")
        (root / "config.toml").write_text(head + tail.split("\n\n", 1)[1])
        reloaded = await client.post("/v1/admin/reload", headers=ADMIN)
        assert reloaded.status_code == 200, reloaded.text
        after = await gauges(client)
        for name in GAUGES:
            assert set(after[name]) == names - {fallback}, (name, after[name])
        # The retired provider's late outcomes (requests it still finishes) do not
        # bring its gauges back.
        metrics = app.state.keel.metrics
        metrics.breaker_changed(fallback, "open")
        metrics.provider_health(fallback, False)
        late = await gauges(client)
        for name in GAUGES:
            assert fallback not in late[name], (name, late[name])
        (root / "config.toml").write_text(config)  # the fallback back: its gauges too
        assert (await client.post("/v1/admin/reload", headers=ADMIN)).status_code == 200
        back = await gauges(client)
        for name in GAUGES:
            assert set(back[name]) == names, (name, back[name])


async def test_ready_shows_a_failing_primary_as_such_and_who_serves(
    backends: Backends, tmp_path: Path
) -> None:
    """A primary backend failing every request read ``"state": "ok"`` in ``/ready``
    (and in ``keel verify``) while a fallback answered everything."""
    app = build_app(tmp_path / "keel", backends.config())
    async with serving(app) as client:
        backends.primary.behave(Behaviour.error(500))
        body = {"prompt": "def add(a, b):", "max_tokens": 4}
        for _ in range(4):
            served = await client.post("/v1/completions", json=body, headers=USER)
            assert served.status_code == 200, served.text
        ready = await client.get("/ready", headers=USER)
        assert ready.status_code == 200, ready.text
        completion = ready.json()["roles"]["completion"]
        assert completion["state"] == "unhealthy", completion
        assert completion["serving"] == f"completion/openai/completion@{backends.fallback.url}/v1"
        public = (await client.get("/ready")).json()["roles"]["completion"]
        assert public == {"usable": True, "state": "unhealthy"}
        assert ready.json()["roles"]["chat"]["state"] == "ok"


async def test_a_refused_key_keeps_the_provider_unhealthy_across_a_reload(
    backends: Backends, tmp_path: Path
) -> None:
    """``keel_provider_healthy`` went back to 1 at any reload for a provider whose key
    the backend still refused: the dashboard's panel turned green with nothing mended."""
    root = tmp_path / "keel"
    app = build_app(root, backends.config())
    async with serving(app) as client:
        primary = f"completion/openai/completion@{backends.primary.url}/v1"
        backends.primary.behave(Behaviour.error(401))
        body = {"prompt": "def add(a, b):", "max_tokens": 4}
        assert (await client.post("/v1/completions", json=body, headers=USER)).status_code == 200
        refused = await gauges(client)
        assert refused["keel_provider_auth_failed"][primary] == 1.0
        assert refused["keel_provider_healthy"][primary] == 0.0
        assert (await client.post("/v1/admin/reload", headers=ADMIN)).status_code == 200
        reloaded = await gauges(client)
        assert reloaded["keel_provider_auth_failed"][primary] == 1.0
        assert reloaded["keel_provider_healthy"][primary] == 0.0
