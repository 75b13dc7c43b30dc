"""``[auth] public_metrics``: a scrape without a key (Kubernetes' annotation-based
scraping cannot send one), and nothing else opened; off by default."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.api.conftest import USER, Backends, build_app, serving
from tests.fakes.upstreams import Behaviour


@pytest.mark.parametrize("public", [False, True])
async def test_metrics_without_a_key_only_when_asked(
    backends: Backends, tmp_path: Path, public: bool
) -> None:
    config = backends.config().replace(
        "[auth]\n", f"[auth]\npublic_metrics = {str(public).lower()}\n"
    )
    app = build_app(tmp_path / "keel", config)
    async with serving(app) as client:
        scrape = await client.get("/metrics")
        assert scrape.status_code == (200 if public else 401), scrape.text
        assert (await client.get("/metrics", headers=USER)).status_code == 200
        for path in ("/v1/models", "/v1/providers", "/v1/stats"):
            assert (await client.get(path)).status_code == 401, path


async def test_a_request_no_provider_served_is_nobodys_traffic(
    backends: Backends, tmp_path: Path
) -> None:
    """A refusal (no key) is counted with no provider: it was counted as the primary's."""
    app = build_app(tmp_path / "keel", backends.config())
    async with serving(app) as client:
        refused = await client.post("/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 401
        text = (await client.get("/metrics", headers=USER)).text
    labels = [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "keel_requests_total" and sample.labels["status"] == "401"
    ]
    assert labels and all(label["provider"] == "" for label in labels), labels


async def test_a_keyless_keels_public_metrics_keep_to_loopback_names(
    backends: Backends, tmp_path: Path
) -> None:
    """With no keys, every route answers only a loopback Host (DNS rebinding); public
    metrics skipped that check, and a rebound page read them."""
    config = backends.config()
    config = (
        config[: config.index("[auth]")]
        + "[auth]\npublic_metrics = true\n\n"
        + (config[config.index("[model.completion]") :])
    )
    app = build_app(tmp_path / "keel", config)
    async with serving(app) as client:
        assert (await client.get("/metrics", headers={"host": "127.0.0.1:1"})).status_code == 200
        rebound = await client.get("/metrics", headers={"host": "rebind.example:1"})
        assert rebound.status_code == 403, rebound.text


async def test_a_backend_that_is_down_is_no_model_loaded_and_serving(
    backends: Backends, tmp_path: Path
) -> None:
    """An HTTP backend's state is always "ok" (no process of keel's): one failing every
    request was counted in ``keel_model_loaded`` and ``keel_models_loaded`` (the
    dashboard's "Models loaded") as serving."""
    app = build_app(tmp_path / "keel", backends.config())
    async with serving(app) as client:

        def loaded(text: str) -> dict[str, float]:
            return {
                sample.labels["provider"]: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "keel_model_loaded"
            }

        before = loaded((await client.get("/metrics", headers=USER)).text)
        primary = next(name for name in before if backends.primary.url in name)
        assert before[primary] == 1
        backends.primary.behave(Behaviour.error(500))
        try:
            for _ in range(2):  # two failed requests: unhealthy, routed around
                body = {"prompt": "def f(", "max_tokens": 2}
                answer = await client.post("/v1/completions", json=body, headers=USER)
                assert answer.status_code == 200, answer.text  # by the fallback
            text = (await client.get("/metrics", headers=USER)).text
        finally:
            backends.primary.reset_behaviour()
    assert loaded(text)[primary] == 0, loaded(text)
    total = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "keel_models_loaded"
    ]
    assert total == [sum(before.values()) - 1]
