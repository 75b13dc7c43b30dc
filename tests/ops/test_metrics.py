"""Metrics: the methods feed the right series; a real keel exports them on /metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel import build_info
from keel.ops.metrics import EVENTS_REMEMBERED, Metrics
from tests.conftest import KeelProcess


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(environ={}), Metrics(environ={})
    first.retry("a")
    assert value(first.render().decode(), "keel_retries_total", provider="a") == 1
    assert ("keel_retries_total", frozenset({("provider", "a")})) not in samples(
        second.render().decode()
    )


def test_router_methods_feed_their_series() -> None:
    metrics = Metrics(environ={"KEEL_SUPERVISOR_RESTARTS": "3"})
    metrics.breaker_changed("up", "open")
    metrics.breaker_changed("down", "half_open")
    metrics.provider_health("up", False)
    metrics.provider_auth_failed("up", True)
    metrics.fallback("chat", "up", "down")
    metrics.fallback_active("chat", True)
    metrics.retry("up")
    metrics.provider_failed("up", "retryable", "UpstreamTimeout")
    metrics.prompt_shrunk("up")
    metrics.rejected("completion", "queue_full")
    metrics.queue_depth("completion", 7)
    metrics.queue_capacity("completion", 8)
    metrics.queue_wait("completion", 0.3)
    metrics.degraded("completion")
    metrics.observe_generation("completion", "up", 2.0, 0.5, 31)
    metrics.health_check("up", 0.25, True)
    metrics.config_reload(False)
    text = metrics.render().decode()
    assert value(text, "keel_breaker_state", provider="up") == 2
    assert value(text, "keel_breaker_state", provider="down") == 1
    assert value(text, "keel_provider_healthy", provider="up") == 0
    assert value(text, "keel_provider_auth_failed", provider="up") == 1
    assert (
        value(text, "keel_fallbacks_total", role="chat", from_provider="up", to_provider="down")
        == 1
    )
    assert value(text, "keel_serving_fallback", role="chat") == 1
    assert value(text, "keel_serving_fallback", role="completion") == 0
    assert value(text, "keel_retries_total", provider="up") == 1
    failed = {"provider": "up", "kind": "retryable", "error": "UpstreamTimeout"}
    assert value(text, "keel_provider_failures_total", **failed) == 1
    assert value(text, "keel_prompts_shrunk_total", provider="up") == 1
    assert value(text, "keel_rejections_total", role="completion", reason="queue_full") == 1
    assert value(text, "keel_queue_depth", role="completion") == 7
    assert value(text, "keel_queue_capacity", role="completion") == 8
    assert value(text, "keel_queue_wait_seconds_bucket", le="0.5", role="completion") == 1
    assert value(text, "keel_requests_degraded_total", role="completion") == 1
    assert value(text, "keel_generated_tokens_total", role="completion", provider="up") == 31
    ttft = {"role": "completion", "provider": "up"}
    assert value(text, "keel_time_to_first_token_seconds_bucket", le="0.5", **ttft) == 1
    assert value(text, "keel_time_to_first_token_seconds_bucket", le="0.25", **ttft) == 0
    # 30 tokens after the first in 1.5 s
    assert value(text, "keel_generation_tokens_per_second_bucket", le="20.0", **ttft) == 1
    assert value(text, "keel_generation_tokens_per_second_bucket", le="10.0", **ttft) == 0
    assert value(text, "keel_health_check_duration_seconds", provider="up") == 0.25
    assert value(text, "keel_config_reloads_total", result="error") == 1
    assert value(text, "keel_supervisor_restarts") == 3


def test_unknown_breaker_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="ajar"):
        Metrics(environ={}).breaker_changed("p", "ajar")


def test_event_languages_are_canonical_and_bounded() -> None:
    metrics = Metrics(environ={})
    metrics.completion_event("view", "Python")
    metrics.completion_event("view", "no-such-language-" + "x" * 40)
    metrics.completion_event("view", None)
    text = metrics.render().decode()
    assert value(text, "keel_completion_events_total", type="view", language="python") == 1
    assert value(text, "keel_completion_events_total", type="view", language="unknown") == 2


def test_editor_events_count_once_per_served_completion_and_type() -> None:
    """As the status page counts: a repeated select, or one for a completion keel never
    served, made Prometheus acceptance 300% where the page showed 50%."""
    metrics = Metrics(environ={})
    for completion_id in ("cmpl-a", "cmpl-b"):
        metrics.editor_event("view", completion_id, "python")
    for _ in range(5):
        metrics.editor_event("select", "cmpl-a", "python")
    metrics.editor_event("dismiss", "cmpl-b", "python")
    for n in range(3):
        metrics.editor_event("select", f"cmpl-never-served-{n}", None)
    metrics.editor_event("select", None, "python")
    text = metrics.render().decode()
    python = {"language": "python"}
    assert value(text, "keel_completion_events_total", type="view", **python) == 2
    assert value(text, "keel_completion_events_total", type="select", **python) == 1
    assert value(text, "keel_completion_events_total", type="dismiss", **python) == 1
    assert value(text, "keel_completion_events_total", type="select", language="unknown") == 0


def test_the_editor_events_remembered_are_bounded() -> None:
    """The oldest is forgotten past :data:`EVENTS_REMEMBERED` (its repeat counts again)."""
    metrics = Metrics(environ={})
    for n in range(EVENTS_REMEMBERED + 1):
        metrics.editor_event("view", f"cmpl-{n}", "python")
    metrics.editor_event("view", "cmpl-0", "python")  # forgotten: counted again
    metrics.editor_event("view", f"cmpl-{EVENTS_REMEMBERED}", "python")  # remembered
    counted = value(
        metrics.render().decode(), "keel_completion_events_total", type="view", language="python"
    )
    assert counted == EVENTS_REMEMBERED + 2


@pytest.mark.integration
def test_a_real_keel_counts_requests_workers_and_events(keel_server: KeelProcess) -> None:
    with keel_server.client() as client:
        before = samples(client.get("/metrics").text)
        served = client.post(
            "/v1/completions",
            json={"language": "python", "segments": {"prefix": "def add(a, b):\n"}},
        )
        assert served.status_code == 200, served.text
        completion_id = served.json()["id"]
        for kind in ("view", "select", "select"):  # the repeat is not counted again
            event = {"type": kind, "completion_id": completion_id, "choice_index": 0}
            assert client.post("/v1/events", json=event).status_code == 200
        assert client.get("/no/such/route").status_code == 404
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    provider = httpx.get(f"{keel_server.url}/ready").json()["roles"]["completion"]["provider"]
    request = {"route": "/v1/completions", "method": "POST", "role": "completion"}
    assert grew("keel_requests_total", provider=provider, status="200", **request) == 1
    assert (
        grew("keel_requests_total", route="other", method="GET", role="", provider="", status="404")
        == 1
    )
    for kind in ("served", "view", "select"):
        assert grew("keel_completion_events_total", type=kind, language="python") == 1
    assert (
        after[("keel_worker_state", frozenset({("provider", provider), ("state", "ready")}))] == 1
    )
    assert after[("keel_worker_restarts_total", frozenset({("provider", provider)}))] == 0
    for wait in ("keel_worker_slot_waits_total", "keel_worker_slot_wait_seconds_total"):
        assert after[(wait, frozenset({("provider", provider)}))] >= 0  # exported, per worker
    assert after[("keel_role_ready", frozenset({("role", "chat"), ("provider", provider)}))] == 1
    assert after[("keel_models_loaded", frozenset())] >= 1
    info = build_info()
    build = frozenset({("version", info["version"]), ("git_sha", info["git_sha"])})
    assert after[("keel_build_info", build)] == 1


def test_worker_restarts_count_on_across_a_replaced_supervisor() -> None:
    """A worker keel gave up on, replaced by a reload under the same name, started a new
    supervisor at 0 restarts: ``keel_worker_restarts_total`` fell from 4 to 0. And the
    replaced one's restarts after the last scrape were lost (4 read where 8 were)."""
    from keel.ops.metrics import _ProviderCollector

    class Worker:  # what the collector reads of a local provider: its name and status
        def __init__(self, name: str, restarts: int) -> None:
            self.name, self.count = name, restarts

        def status(self) -> dict[str, object]:
            return {"restarts": self.count}

    collector = _ProviderCollector()
    first, second = Worker("local/m", 4), Worker("local/m", 0)
    assert collector.restarts(first) == 4  # type: ignore[arg-type]
    first.count = 8  # four more before the reload, none scraped
    assert collector.restarts(second) == 8, "the replaced one's count kept, all of it"  # type: ignore[arg-type]
    second.count = 1
    assert collector.restarts(second) == 9  # type: ignore[arg-type]
    assert collector.restarts(Worker("local/other", 2)) == 2  # type: ignore[arg-type]
