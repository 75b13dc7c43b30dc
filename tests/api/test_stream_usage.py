"""The usage of an answer from an OpenAI-compatible backend is the backend's own count:
keel streams from it, and asks for the stream's usage (``stream_options``), which
OpenAI's API and vLLM send only when asked. A backend that refuses the field is asked
again at once without it, and never again; keel's estimate then counts what the backend
read: tools, tool calls and every message's turn, not the messages' text alone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.api.conftest import USER, build_app, serving
from tests.conftest import sse_events
from tests.fakes.upstreams import Behaviour, FakeUpstream, RecordedRequest

USAGE = {"prompt_tokens": 1234, "completion_tokens": 3, "total_tokens": 1237}


def asks_usage(request: RecordedRequest) -> bool:
    body = request.json if request.method == "POST" else None
    return isinstance(body, dict) and "stream_options" in body


class UsageWhenAsked(FakeUpstream):
    """Sends :data:`USAGE` in a chunk of its own only when the request asks for it, as
    OpenAI's API and vLLM do."""

    async def _respond(self, request: RecordedRequest, behaviour: Behaviour, *rest: Any) -> None:
        asked = asks_usage(request) and request.json["stream_options"] == {"include_usage": True}
        self.usage, self.usage_apart = (dict(USAGE), True) if asked else (None, False)
        await super()._respond(request, behaviour, *rest)


REFUSAL = {
    "error": {
        "message": "Unrecognized request argument supplied: stream_options",
        "type": "invalid_request_error",
        "param": None,
    }
}


class RefusesStreamOptions(FakeUpstream):
    """A 400 naming ``stream_options`` whenever a request sends it, as older
    OpenAI-compatible servers answer; no usage ever."""

    async def _respond(self, request: RecordedRequest, behaviour: Behaviour, *rest: Any) -> None:
        if asks_usage(request):
            behaviour = Behaviour.error(400, REFUSAL)
        await super()._respond(request, behaviour, *rest)


def config(url: str) -> str:
    return f"""
[model.completion]
embedded_last_resort = false

[model.completion.http]
kind = "openai/completion"
api_endpoint = "{url}/v1"
model_name = "coder"

[model.chat.http]
kind = "openai/chat"
api_endpoint = "{url}/v1"
model_name = "chat"

[model.embedding.http]
kind = "openai/embedding"
api_endpoint = "{url}/v1"
model_name = "embed"
"""


@pytest.fixture
def asked() -> Iterator[FakeUpstream]:
    with UsageWhenAsked() as upstream:
        yield upstream
    assert not upstream.errors


@pytest.fixture
def refusing() -> Iterator[FakeUpstream]:
    with RefusesStreamOptions() as upstream:
        yield upstream
    assert not upstream.errors


@contextlib.asynccontextmanager
async def keel_of(upstream: FakeUpstream, root: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(root, config(upstream.url))) as client:
        yield client


HI = [{"role": "user", "content": "hi"}]


async def usages(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """The usage of a chat, a streamed chat and a completion."""
    whole = await client.post("/v1/chat/completions", json={"messages": HI}, headers=USER)
    assert whole.status_code == 200, whole.text
    streamed = await client.post(
        "/v1/chat/completions",
        json={"messages": HI, "stream": True, "stream_options": {"include_usage": True}},
        headers=USER,
    )
    assert streamed.status_code == 200, streamed.text
    completed = await client.post(
        "/v1/completions", json={"prompt": "def f(", "max_tokens": 8}, headers=USER
    )
    assert completed.status_code == 200, completed.text
    return [
        whole.json()["usage"],
        sse_events(streamed.text)[-1]["usage"],
        completed.json()["usage"],
    ]


async def providers(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    snapshot = (await client.get("/v1/providers", headers=USER)).json()
    return {
        role: state["providers"][0]
        for role, state in snapshot["roles"].items()
        if role in ("chat", "completion")
    }


async def test_the_backends_usage_is_asked_for_and_reported(
    asked: FakeUpstream, tmp_path: Path
) -> None:
    async with keel_of(asked, tmp_path / "keel") as client:
        assert await usages(client) == [USAGE] * 3
        sent = [request.json for request in asked.requests if request.method == "POST"]
        assert all(body["stream_options"] == {"include_usage": True} for body in sent)
        shown = await providers(client)
        assert {state["worker"]["stream_usage"] for state in shown.values()} == {"asked"}


async def test_a_backend_refusing_stream_options_is_asked_without_it(
    refusing: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each route's first request goes twice, with the field and without it; every later
    one once, without it. The refusal is no failure of the backend's, no fallback's turn."""
    async with keel_of(refusing, tmp_path / "keel") as client:
        for usage in await usages(client):
            assert usage["prompt_tokens"] > 0
        sent = [asks_usage(request) for request in refusing.requests if request.method == "POST"]
        # chat: asked, then not; the streamed chat: not; completion: asked, then not
        assert sent == [True, False, False, True, False]
        await usages(client)
        later = [asks_usage(request) for request in refusing.requests if request.method == "POST"]
        assert later[5:] == [False] * 3
        for state in (await providers(client)).values():
            assert state["worker"]["stream_usage"].startswith("refused, estimated: HTTP 400")
            assert "stream_options" in state["worker"]["stream_usage"]
            assert state["last_error"] is None
            assert state["breaker"] == "closed"
            assert state["fallbacks_to"] == 0
    said = [record for record in caplog.records if "refused stream_options" in record.message]
    assert len(said) == 2  # once for each endpoint: chat's, completion's


DESCRIPTION = "Reads a file from the workspace and returns its content. " * 60
TOOL_CHAT = {
    "max_tokens": 5,
    "messages": [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {
                        "name": "read_file",
                        "arguments": json.dumps({"path": "x" * 2000}),
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "read_file",
                "description": DESCRIPTION,
                "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
            },
        }
    ],
}


@pytest.mark.parametrize("stream", [False, True])
async def test_an_estimate_counts_tools_calls_and_turns(
    refusing: FakeUpstream, tmp_path: Path, stream: bool
) -> None:
    """A backend that sends no usage: the estimate counts the 5.9 KB that went to it
    (OpenAI's tokenizer makes ~1,500 tokens of them), where the messages' text alone
    was 2 tokens."""
    body = {**TOOL_CHAT, "stream": stream, "stream_options": {"include_usage": True}}
    if not stream:
        del body["stream_options"]
    async with keel_of(refusing, tmp_path / "keel") as client:
        response = await client.post("/v1/chat/completions", json=body, headers=USER)
        assert response.status_code == 200, response.text
        usage = sse_events(response.text)[-1]["usage"] if stream else response.json()["usage"]
        assert usage["prompt_tokens"] >= 1500
