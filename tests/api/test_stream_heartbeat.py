"""A stream whose first token is slow keeps its connection alive with SSE comments.

A reverse proxy's read timeout (nginx's ``proxy_read_timeout``, 60 s) cut a stream that
sent nothing until its first token: a 504 at the proxy, a 499 in keel's log. Past the
heartbeat interval (shortened for the test) keel commits the 200 and sends
``: keep-alive`` until the first piece; before it, nothing changes.
"""

from __future__ import annotations

import asyncio
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


async def test_a_heartbeat_commit_names_the_provider_working_on_it(
    backends: Backends, tmp_path: Path
) -> None:
    """Committed before the provider was known, the stream had no X-Keel-Provider."""
    backends.fallback.behave(Behaviour.slow_first_token(1.0))
    response = await stream(backends, tmp_path)
    assert response.text.startswith(": keep-alive\n\n"), response.text[:200]
    assert response.headers.get("x-keel-provider") == "chat/openai/chat", response.headers


async def test_a_stream_waiting_for_admission_keeps_its_429(
    backends: Backends, tmp_path: Path
) -> None:
    """Heartbeats committed the 200 of a stream still queued for a slot: its 429 came as
    an error event in a 200, Retry-After lost, and clients that back off on a 429 read a
    success."""
    backends.fallback.behave(Behaviour.slow_first_token(1.0))
    config = chat_config(backends) + "[model.chat]\nmax_concurrent = 1\nqueue_timeout = 0.6\n"
    async with serving(build_app(tmp_path / "keel", config)) as http:
        first = asyncio.create_task(http.post("/v1/chat/completions", json=BODY, headers=USER))
        await asyncio.sleep(0.1)  # the first holds the one slot
        queued = await http.post("/v1/chat/completions", json=BODY, headers=USER)
        assert (await first).status_code == 200
    assert queued.status_code == 429, queued.text[:300]
    assert "retry-after" in queued.headers and "keep-alive" not in queued.text
