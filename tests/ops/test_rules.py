"""The shipped alert rules and dashboard name only metrics and labels keel exports,
every alert is documented in the runbook, and every alert has promtool tests
that see it both fire and stay quiet."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from keel.ops.metrics import Metrics
from tests.conftest import KeelProcess

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "keel-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "keel-rules.test.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
DASHBOARD = REPO / "deploy" / "grafana" / "keel-dashboard.json"
_SCRAPE_LABELS = {"le", "instance", "job"}

_METRIC = re.compile(r"\b(keel_[a-z0-9_]+)\b(\{[^}]*\})?")
_LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def expressions() -> list[str]:
    """The PromQL of every alert rule and every dashboard panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    return [rule["expr"] for rule in alerts()] + queries


def referenced() -> dict[str, set[str]]:
    """Metric name -> label names the rules and the dashboard select on."""
    found: dict[str, set[str]] = {}
    for expr in expressions():
        for name, selector in _METRIC.findall(expr):
            found.setdefault(name, set()).update(_LABEL.findall(selector or ""))
    return found


def exported_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def exercised_labels() -> dict[str, set[str]]:
    """Label names per sample name, with every method of Metrics called once."""
    metrics = Metrics(environ={})
    metrics.request(route="/x", method="GET", status=200, seconds=0.1, role="chat", provider="p")
    metrics.observe_generation("chat", "p", 1.0, 0.1, 3)
    metrics.breaker_changed("p", "open")
    metrics.provider_health("p", True)
    metrics.provider_auth_failed("p", False)
    metrics.health_check("p", 0.1, True)
    metrics.fallback("chat", "p", "q")
    metrics.fallback_active("chat", True)
    metrics.retry("p")
    metrics.rejected("chat", "queue_full")
    metrics.queue_depth("chat", 1)
    metrics.queue_capacity("chat", 2)
    metrics.completion_event("view", "python")
    metrics.config_reload(True)
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


@pytest.mark.integration
def test_every_metric_the_rules_and_dashboard_use_is_exported_by_a_real_keel(
    keel_server: KeelProcess,
) -> None:
    with keel_server.client() as client:
        text = client.get("/metrics").text
    exported = exported_names(text)
    names = referenced()
    assert len(names) >= 10  # the regex found the rules' metrics
    missing = sorted(set(names) - exported)
    assert not missing, f"rules use metrics keel does not export: {missing}"


def test_every_label_the_rules_select_on_exists() -> None:
    labels = exercised_labels()
    # Worker series come from the provider collector; their labels are fixed there.
    labels.setdefault("keel_worker_state", set()).update({"provider", "state"})
    labels.setdefault("keel_worker_restarts_total", set()).add("provider")
    labels.setdefault("keel_role_ready", set()).update({"role", "provider"})
    problems = [
        f"{name}: {sorted(used - labels.get(name, set()) - _SCRAPE_LABELS)}"
        for name, used in referenced().items()
        if used - labels.get(name, set()) - _SCRAPE_LABELS
    ]
    assert not problems, f"rules select on labels keel does not set: {problems}"


def test_each_alert_is_complete_and_in_the_runbook() -> None:
    anchors = {
        re.sub(r"[^a-z0-9-]", "", line[3:].strip().lower().replace(" ", "-"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    rules = alerts()
    assert len(rules) >= 10
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        url = notes["runbook_url"]
        assert url.startswith("docs/runbook.md#"), name
        assert url.split("#", 1)[1] in anchors, f"{name}: no runbook section for {url}"


def test_each_alert_has_promtool_tests_that_fire_and_stay_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts never seen firing"
    assert names - quiet == set(), "alerts never seen quiet"
