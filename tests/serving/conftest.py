"""An in-process keel whose completions come from a fake llama.cpp server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from keel.api.state import AppState
from tests.api.conftest import build_app
from tests.fakes.upstreams import FakeUpstream

__all__ = ["build_app"]  # the serving tests' app, as the API tests build it


def llamacpp_config(url: str, *, fallback: str | None = None, others: str | None = None) -> str:
    """Completion from llama.cpp's server API at ``url`` (then ``fallback``); chat and
    embedding from the same fake (or ``others``) through OpenAI's API; no embedded model."""
    others = others or url
    chain = (
        f'[[model.completion.fallback]]\nkind = "llama.cpp/completion"\n'
        f'api_endpoint = "{fallback}"\nprompt_template = "<PRE>{{prefix}}<SUF>{{suffix}}<MID>"\n'
        if fallback
        else ""
    )
    return f"""
[server]
completion_timeout = 10

[routing]
probe_interval_seconds = 60
breaker_consecutive_failures = 2

[model.completion]
embedded_last_resort = false

[model.completion.http]
kind = "llama.cpp/completion"
api_endpoint = "{url}"
prompt_template = "<PRE>{{prefix}}<SUF>{{suffix}}<MID>"

{chain}
[model.chat]
embedded_last_resort = false

[model.chat.http]
kind = "openai/chat"
api_endpoint = "{others}/v1"
model_name = "fake-chat"

[model.embedding]
embedded_last_resort = false

[model.embedding.http]
kind = "openai/embedding"
api_endpoint = "{others}/v1"
model_name = "fake-embed"
"""


@pytest.fixture
def llamacpp() -> Iterator[FakeUpstream]:
    """A fake llama.cpp server that writes a few tokens, one every 50 ms."""
    with FakeUpstream(tokens=("compute", "(a", ", b", ")"), token_delay=0.05) as server:
        yield server
    assert not server.errors, server.errors


@pytest.fixture
async def keel(llamacpp: FakeUpstream, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(tmp_path / "keel", llamacpp_config(llamacpp.url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            yield http


def state_of(client: httpx.AsyncClient) -> AppState:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    app: FastAPI = transport.app  # type: ignore[assignment]
    state: AppState = app.state.keel
    return state


def model_calls(upstream: FakeUpstream) -> int:
    """The generations asked of a fake llama.cpp server (its ``/completion`` requests)."""
    return sum(r.path == "/completion" for r in upstream.requests)
