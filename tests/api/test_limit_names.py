"""A backend's refusal of the tokens asked for names the field the client sent: llama.cpp's
``n_predict`` goes to an OpenAI-style backend as ``max_tokens``, and the refusal named
``max_tokens``, a field the client had not sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.api.conftest import Backends, build_app, serving
from tests.fakes.upstreams import Behaviour, FakeUpstream

REFUSAL = {
    # vLLM's words for a prompt that fits and a limit that does not
    "message": "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's "
    "maximum context length is 2048 tokens and your request has 10 input tokens "
    "(4000 > 2048 - 10).",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}


@pytest.fixture
async def client(backends: Backends, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(tmp_path / "keel", backends.config(keys=False))) as http:
        yield http


def refuse(*upstreams: FakeUpstream) -> None:
    for upstream in upstreams:
        upstream.behave(Behaviour.error(400, {"error": REFUSAL}))


@pytest.mark.parametrize(
    ("path", "body", "sent"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "n_predict"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
        ("/completion", {"prompt": "def add(a, b):"}, "n_predict"),
    ],
)
async def test_a_refused_limit_is_named_as_the_client_sent_it(
    client: httpx.AsyncClient, backends: Backends, path: str, body: dict[str, Any], sent: str
) -> None:
    refuse(backends.primary, backends.fallback)
    try:
        response = await client.post(path, json={**body, sent: 4000})
    finally:
        backends.primary.reset_behaviour()
        backends.fallback.reset_behaviour()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", sent), error
    assert f"ask for fewer tokens ({sent})" in error["message"], error
    # What went upstream is the backend's own name for it.
    upstream = backends.fallback.last_request.json
    assert "n_predict" not in upstream and upstream["max_tokens"] <= 4000, upstream
