"""A thinking model behind keel: vLLM with a reasoning parser, or llama.cpp's server
(whose default reasoning format does this), streams ``delta.reasoning_content`` before
any answer text. keel read such a chunk as no piece: the first-token timer ran on while
the model streamed, a chat that thought longer than the limit was a 503 ("no first
token") that called the backend unhealthy, and a shorter one lost its reasoning."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import build_app, serving
from tests.conftest import sse_events
from tests.fakes.upstreams import FakeUpstream

THOUGHTS = ("The user", " asks", " for a", " greeting", ".")
ASK = {"messages": [{"role": "user", "content": "Say hello"}]}


@pytest.fixture(scope="module")
def thinker() -> Iterator[FakeUpstream]:
    """A chat backend that thinks for 5 × 0.3 s, past a first-token limit of 1 s."""
    with FakeUpstream(token_delay=0.3) as upstream:
        upstream.reasoning = THOUGHTS
        yield upstream


@pytest.fixture
async def client(thinker: FakeUpstream, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = f"""
[model.chat.http]
kind = "openai/chat"
api_endpoint = "{thinker.url}/v1"
model_name = "thinker"
first_token_timeout = 1
"""
    async with serving(build_app(tmp_path / "keel", config)) as http:
        yield http


async def test_reasoning_is_progress_and_comes_back_whole(
    client: httpx.AsyncClient, thinker: FakeUpstream
) -> None:
    response = await client.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "".join(THOUGHTS)
    assert message["content"] == "Hello, world"
    providers = (await client.get("/v1/providers")).json()
    (chat,) = providers["roles"]["chat"]["providers"]
    assert chat["healthy"] and chat["last_error"] is None, chat


async def test_streamed_reasoning_comes_before_the_answer(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
    assert response.status_code == 200, response.text
    deltas = [event["choices"][0]["delta"] for event in sse_events(response.text) if event]
    thought = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    said = [d["content"] for d in deltas if d.get("content")]
    assert "".join(thought) == "".join(THOUGHTS) and "".join(said) == "Hello, world"
    first_text = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("content" not in d or not d["content"] for d in deltas[: len(thought)])
    assert first_text >= len(thought) - 1
