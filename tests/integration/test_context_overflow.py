"""A prompt over the embedded model's context is the caller's 400, with the
numbers, and takes nothing away from anyone else (issue 13's six requests that
opened the local breaker)."""

from __future__ import annotations

import pytest

from tests.conftest import KeelProcess

pytestmark = pytest.mark.integration

LONG = "x = 1\n" * 8000


def test_over_long_prompts_are_400s_and_the_local_breaker_stays_closed(
    keel_server: KeelProcess,
) -> None:
    with keel_server.client() as client:
        for _ in range(8):
            response = client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 4})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "context_length_exceeded"
            assert error["prompt_tokens"] > error["context_size"] > 0
            chat = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 4}
            response = client.post("/v1/chat/completions", json=chat)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "context_length_exceeded"
            assert response.json()["error"]["param"] == "messages"  # chat has no prompt
        body = {
            "language": "python",
            "segments": {"prefix": "def add(a, b):\n    ", "suffix": "\n", "filepath": "o.py"},
        }
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.get("/ready").status_code == 200
        roles = client.get("/v1/providers").json()["roles"]
    for role in ("completion", "chat"):
        for provider in roles[role]["providers"]:
            assert provider["breaker"] == "closed" and provider["healthy"], provider
