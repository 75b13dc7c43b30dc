"""Deep health generates a real token per role, caches the finding, and names failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KeelProcess, free_port, running_keel

pytestmark = pytest.mark.integration


def test_deep_health_passes_and_caches_its_findings(keel_server: KeelProcess) -> None:
    with keel_server.client() as client:
        first = client.get("/health/deep", params={"timeout": 60})
        assert first.status_code == 200, first.text
        second = client.get("/health/deep", params={"timeout": 60})
        metrics = client.get("/metrics").text
    body = first.json()
    assert body["status"] == "ok"
    assert set(body["roles"]) == {"completion", "chat", "embedding"}
    for finding in body["roles"].values():
        assert finding["ok"] is True and finding["error"] is None
    # Within the TTL the second answer is the same finding, older.
    for role, finding in second.json()["roles"].items():
        assert finding["seconds"] == body["roles"][role]["seconds"]
        assert finding["age_seconds"] >= body["roles"][role]["age_seconds"]
    assert "keel_health_check_ok{" in metrics


def test_deep_health_fails_naming_the_role(broken_chat_keel: KeelProcess) -> None:
    with broken_chat_keel.client() as client:
        response = client.get("/health/deep")
        assert client.get("/health").status_code == 200  # liveness stays cheap and true
    assert response.status_code == 503
    roles = response.json()["roles"]
    assert roles["chat"]["ok"] is False
    assert "broken" in roles["chat"]["error"] or "gave up" in roles["chat"]["error"]
    assert roles["completion"]["ok"] is True


def test_head_is_answered_as_get_without_the_body(keel_server: KeelProcess) -> None:
    """Uptime monitors send HEAD: it was a 405 on every route, /health and /ready too."""
    with keel_server.client() as client:
        for path in ("/health", "/ready", "/v1/health", "/metrics", "/"):
            got = client.get(path)
            head = client.head(path)
            assert head.status_code == got.status_code == 200, (path, head.status_code)
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
        refused = client.head("/v1/completions")  # a POST route: GET's 405, no body
        assert refused.status_code == 405 and refused.content == b""
        assert refused.headers["allow"] == "POST"
        counted = client.get("/metrics").text  # by route, as a GET is (they were "other")
    assert 'method="HEAD",provider="",role="",route="/ready",status="200"' in counted
    assert not [
        line for line in counted.splitlines() if 'method="HEAD"' in line and '"other"' in line
    ]


def test_a_role_served_by_its_fallback_passes_the_deep_check(tmp_path: Path) -> None:
    """A completion backend down, the embedded model serving in its place (``/ready``
    200): the deep check probed the primary alone and said "failing", a 503 that took a
    serving keel out of its load balancer."""
    dead = f"http://127.0.0.1:{free_port()}"
    config = (
        f'[model.completion.http]\nkind = "llama.cpp/completion"\napi_endpoint = "{dead}"\n'
        'prompt_template = "<PRE> {prefix} <SUF>{suffix} <MID>"\n'
    )
    with running_keel(tmp_path / "keel", config) as keel, keel.client() as client:
        deep = client.get("/health/deep", params={"timeout": 60})
        metrics = client.get("/metrics").text
    assert deep.status_code == 200, deep.text
    completion = deep.json()["roles"]["completion"]
    assert completion["ok"] is True and completion["provider"].startswith("local/"), completion
    # each provider probed has its own finding in the metrics: the dead one's failure too
    assert 'keel_health_check_ok{provider="completion/llama.cpp/completion"} 0.0' in metrics
