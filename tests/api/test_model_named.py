"""The model a chat names and the one its answer names: Tabby's ``supported_models``
rule for what goes upstream, and the model that answered in the response (it echoed
the client's ``model`` and, after a fallback, named the primary)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.api.conftest import Backends, build_app, serving
from tests.conftest import sse_events
from tests.fakes.upstreams import Behaviour, FakeUpstream


@pytest.fixture
async def client(backends: Backends, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    primary, fallback = backends.primary, backends.fallback
    config = (
        "[routing]\nprobe_interval_seconds = 60\nbreaker_consecutive_failures = 100\n"
        f'[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "{primary.url}/v1"\n'
        'model_name = "big"\nsupported_models = ["big", "mini", "/models/qwen"]\n'
        f'[[model.chat.fallback]]\nkind = "openai/chat"\napi_endpoint = "{fallback.url}/v1"\n'
        'model_name = "fallback-chat"\n'
        # Completion and embedding from the fakes too: no engine starts for a test of chat.
        "[model.completion]\nembedded_last_resort = false\n"
        f'[model.completion.http]\nkind = "openai/completion"\napi_endpoint = "{primary.url}/v1"\n'
        f'[model.embedding.http]\nkind = "openai/embedding"\napi_endpoint = "{fallback.url}/v1"\n'
    )
    primary.model, fallback.model = "big-2026-11", "fallback-chat-q8"  # as the backends say
    async with serving(build_app(tmp_path / "keel", config)) as http:
        yield http
    primary.model = fallback.model = "fake-model"


def asked(upstream: FakeUpstream) -> str:
    chats = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
    model: str = chats[-1].json["model"]
    return model


async def chat(client: httpx.AsyncClient, model: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


async def test_a_listed_model_goes_upstream_and_the_answer_names_the_backends(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    assert (await chat(client, "mini")).json()["model"] == "big-2026-11"
    assert asked(backends.primary) == "mini"
    streamed = sse_events((await chat(client, "other", stream=True)).text)
    assert asked(backends.primary) == "big", "not listed: the configured model"
    assert {chunk["model"] for chunk in streamed} == {"big-2026-11"}


async def test_after_a_fallback_the_answer_names_the_model_that_answered(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    for stream in (False, True):
        backends.primary.behave(Behaviour.error(500), times=10)
        response = await chat(client, "mini", stream=stream)
        backends.primary.reset_behaviour()
        chunks = sse_events(response.text) if stream else [response.json()]
        assert {chunk["model"] for chunk in chunks} == {"fallback-chat-q8"}
        assert asked(backends.fallback) == "fallback-chat", "no list there: its own model"
    # what keel did that no one asked for shows in /v1/providers too (in /metrics alone)
    role = (await client.get("/v1/providers")).json()["roles"]["chat"]
    primary, fallback = role["providers"][:2]
    assert role["serving_fallback"] is True
    assert primary["retries"] == 0 and fallback["fallbacks_to"] == 2, role


async def test_the_listed_models_are_what_tabbys_clients_are_offered(
    client: httpx.AsyncClient,
) -> None:
    models = (await client.get("/v1beta/models")).json()
    assert models["chat"] == ["big", "mini", "/models/qwen"]


async def test_the_listed_models_are_in_the_model_list(client: httpx.AsyncClient) -> None:
    """A client filling its model picker from /v1/models never offered ``mini``, and
    ``models.retrieve("mini")`` said 404, though a chat naming it is served by it."""
    listed = [card["id"] for card in (await client.get("/v1/models")).json()["data"]]
    assert {"big", "mini"} <= set(listed), listed
    one = await client.get("/v1/models/mini")
    assert one.status_code == 200 and one.json()["id"] == "mini", one.text
    # vLLM started with --model /path names its model by that path: a doubled slash
    # in the route is the id's, not a base URL's
    path = await client.get("/v1/models/%2Fmodels%2Fqwen")
    assert path.status_code == 200 and path.json()["id"] == "/models/qwen", path.text


async def test_a_backends_400_names_the_field_it_named(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """The backend's ``param`` was dropped: a client could not see which field it
    objected to."""
    said = {"message": "bad thing", "type": "invalid_request_error", "param": "messages[0]"}
    backends.primary.behave(Behaviour.error(400, {"error": said}), times=1)
    body = {"model": "mini", "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("messages[0]", "upstream_rejected_request")
    assert "bad thing" in error["message"]
