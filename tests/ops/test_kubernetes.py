"""deploy/kubernetes/ validates against Kubernetes' own schemas (strict: an unknown or
misspelt field fails), offline: the schemas ship in the PyPI package kubernetes-validate.
And the manifests keep the promises the README makes about them."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from keel.config import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes the manifests are for (its schemas are the strictest test)."""
FILES = sorted(MANIFESTS.rglob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources() -> dict[str, dict[str, Any]]:
    found = {}
    for path in FILES:
        for doc in documents(path):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(MANIFESTS)) for p in FILES])
@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_each_manifest_validates_strictly(path: Path, version: str) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_fails_validation() -> None:
    deployment = resources()["Deployment/keel"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def configured() -> Settings:
    config = resources()["ConfigMap/keel-config"]["data"]["config.toml"]
    environ = {"KEEL_REDIS_URL": "redis://redis:6379/0", "KEEL_DATABASE_URL": "postgresql://db/k"}
    return parse_settings(tomllib.loads(config), "configmap.yaml", environ=environ)


def test_the_config_map_is_a_valid_keel_config_with_shared_state() -> None:
    settings = configured()
    assert settings.state.redis_url == "redis://redis:6379/0"
    assert settings.events.is_postgres
    assert settings.auth.keys_file == "/etc/keel/keys/keys.toml"
    annotations = resources()["Deployment/keel"]["spec"]["template"]["metadata"]["annotations"]
    if annotations.get("prometheus.io/scrape") == "true":  # a scrape that sends no key
        assert settings.auth.public_metrics
    for role in ("completion", "chat", "embedding"):
        assert getattr(settings.model, role).http is not None, role


def container(kind: str = "Deployment/keel") -> dict[str, Any]:
    [found] = resources()[kind]["spec"]["template"]["spec"]["containers"]
    return found  # type: ignore[no-any-return]


def test_probes_drain_and_grace_period() -> None:
    pod = resources()["Deployment/keel"]["spec"]["template"]["spec"]
    keel = container()
    assert keel["livenessProbe"]["httpGet"]["path"] == "/health"
    assert keel["readinessProbe"]["httpGet"]["path"] == "/ready?any=true"
    pause = keel["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    grace = configured().server.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] > float(pause[1]) + grace


def test_the_mounts_match_the_config() -> None:
    pod = resources()["Deployment/keel"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    args = container()["args"]
    config_dir = mounts[next(n for n, v in volumes.items() if "configMap" in v)]["mountPath"]
    assert f"--config={config_dir}/config.toml" in args
    keys = next(m for n, m in mounts.items() if "secret" in volumes[n])
    assert "subPath" not in keys, "a subPath mount never sees the Secret's updates"
    assert configured().auth.keys_file == f"{keys['mountPath']}/keys.toml"
    referenced = {
        ref["valueFrom"]["secretKeyRef"]["key"] for ref in container()["env"] if "valueFrom" in ref
    }
    assert referenced <= set(resources()["Secret/keel-stores"]["stringData"])
    secret_keys = tomllib.loads(resources()["Secret/keel-keys"]["stringData"]["keys.toml"])
    assert set(secret_keys) == {"api_keys", "admin_key"}


def test_the_service_pdb_and_hpa_select_the_deployment() -> None:
    found = resources()
    labels = found["Deployment/keel"]["spec"]["template"]["metadata"]["labels"]
    assert found["Service/keel"]["spec"]["selector"].items() <= labels.items()
    assert found["PodDisruptionBudget/keel"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    target = found["HorizontalPodAutoscaler/keel"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "keel")


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Running at scale\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has a '## Running at scale' section"
    return match.group(1)


def test_the_readme_config_example_is_a_working_config() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", readme_section(), re.S)
    assert blocks, "the section has a config example"
    environ = {**os.environ, "KEEL_REDIS_URL": "redis://r/0", "KEEL_DATABASE_URL": "postgresql://d"}
    for block in blocks:
        settings = parse_settings(tomllib.loads(block), "README.md", environ=environ)
        assert settings.state.redis_url is not None
        assert settings.events.is_postgres
