"""A stream whose first token is slow keeps its connection alive with SSE comments.

A reverse proxy's read timeout (nginx's ``proxy_read_timeout``, 60 s) cut a stream that
sent nothing until its first token: a 504 at the proxy, a 499 in keel's log. Past the
heartbeat interval (shortened for the test) keel commits the 200 and sends
``: keep-alive`` until the first piece; before it, nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import USER, Backends, build_app, serving
from tests.fakes.upstreams import Behaviour

from keel.serving import streaming

BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8}


@pytest.fixture(autouse=True)
def short_heartbeat(monkeypatch: pytest.MonkeyPatch, backends: Backends) -> Iterator[None]:
    monkeypatch.setattr(streaming, "HEARTBEAT_SECONDS", 0.2)
    yield
    backends.fallback.reset_behaviour()


def chat_config(backends: Backends) -> str:
    """Chat from the fallback, its first token waited for 1.5 s at most."""
    return backends.config().replace(
        'model_name = "fallback-chat"', 'model_name = "fallback-chat"\nfirst_token_timeout = 1.5'
    )


async def stream(backends: Backends, tmp_path: Path) -> httpx.Response:
    app = build_app(tmp_path / "keel", chat_config(backends))
    async with serving(app) as http:
        return await http.post("/v1/chat/completions", json=BODY, headers=USER)


async def test_a_slow_first_token_is_preceded_by_heartbeats(
    backends: Backends, tmp_path: Path
) -> None:
    backends.fallback.behave(Behaviour.slow_first_token(1.0))
    response = await stream(backends, tmp_path)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    text = response.text
    assert text.startswith(": keep-alive\n\n"), text[:200]
    events = [line for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    said = "".join(
        json.loads(event[6:])["choices"][0]["delta"].get("content") or ""
        for event in events[:-1]
        if json.loads(event[6:])["choices"]
    )
    assert said, text


async def test_a_failure_after_heartbeats_is_the_streams_error_event(
    backends: Backends, tmp_path: Path
) -> None:
    backends.fallback.behave(Behaviour.hang())  # no first token: the 1.5 s limit
    response = await stream(backends, tmp_path)
    assert response.status_code == 200  # committed by the heartbeat
    text = response.text
    assert text.startswith(": keep-alive\n\n"), text[:200]
    events = [line for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert "error" in json.loads(events[-2][6:]), events


async def test_a_failure_before_the_interval_has_its_own_status(
    backends: Backends, tmp_path: Path
) -> None:
    backends.fallback.behave(Behaviour.error(400))
    response = await stream(backends, tmp_path)
    assert response.status_code == 400, response.text
    assert "keep-alive" not in response.text
