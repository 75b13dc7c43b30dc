"""Typing speed through a real keel process with the embedded model: the
worker reuses the prompt prefix it holds, and a newer keystroke's request
cancels the older one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import KeelProcess

pytestmark = pytest.mark.integration

SOURCE = Path(httpx.__file__).with_name("_models.py").read_text()


def generation_stats(server: KeelProcess) -> dict[str, object]:
    providers = httpx.get(f"{server.url}/v1/providers", timeout=10).json()
    local = next(p for p in providers["roles"]["completion"]["providers"] if p["kind"] == "local")
    stats: dict[str, object] = local["worker"]["generation"]
    return stats


def tabby(prefix: str, filepath: str) -> dict[str, object]:
    return {
        "language": "python",
        "segments": {"prefix": prefix, "suffix": "\n", "filepath": filepath},
        "temperature": 0,
    }


def test_next_keystroke_reuses_the_cached_prefix(keel_server: KeelProcess) -> None:
    prefix = SOURCE[:1500]
    with keel_server.client() as client:
        assert client.post("/v1/completions", json=tabby(prefix, "a.py")).status_code == 200
        cold = generation_stats(keel_server)["last"]
        assert client.post("/v1/completions", json=tabby(prefix + "x", "a.py")).status_code == 200
        warm = generation_stats(keel_server)["last"]
    assert isinstance(cold, dict) and isinstance(warm, dict)
    assert cold["prompt_tokens"] > 250
    evaluated_cold = cold["prompt_tokens"] - cold["reused_tokens"]
    evaluated_warm = warm["prompt_tokens"] - warm["reused_tokens"]
    assert evaluated_warm <= 5, warm  # only the new keystroke's tokens are read
    assert evaluated_cold > 20 * evaluated_warm
    assert warm["first_token_ms"] < cold["first_token_ms"]


def test_a_newer_keystroke_supersedes_the_older_request(keel_server: KeelProcess) -> None:
    prefix = SOURCE[8000:11000]  # not cached: the first request has a long prefill
    responses: dict[str, httpx.Response] = {}

    def send(name: str, body: dict[str, object]) -> None:
        responses[name] = httpx.post(f"{keel_server.url}/v1/completions", json=body, timeout=120)

    before = generation_stats(keel_server)
    first = threading.Thread(target=send, args=("first", tabby(prefix, "b.py")))
    first.start()
    time.sleep(0.3)
    send("second", tabby(prefix + "d", "b.py"))
    first.join(60)
    assert responses["first"].status_code == 200
    assert responses["first"].headers.get("X-Keel-Superseded") == "1"
    assert responses["first"].json()["choices"] == [{"index": 0, "text": ""}]
    assert responses["second"].status_code == 200
    assert "X-Keel-Superseded" not in responses["second"].headers
    after = generation_stats(keel_server)
    assert isinstance(after["cancelled"], int) and isinstance(before["cancelled"], int)
    assert after["cancelled"] > before["cancelled"]
