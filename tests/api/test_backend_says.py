"""What an OpenAI-compatible backend says of its answer reaches the client: why it
stopped (``finish_reason``), the tokens it counted (``usage``), and tool calls whose
parts come without an ``index`` (Ollama's and Gemini's OpenAI APIs) numbered call by
call, streamed and whole.

Chat and the OpenAI completion route go to the fake backend ``fallback`` of
tests/api/conftest.py (completion to ``primary``); each test sets what it says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.api.conftest import USER, USER_KEY, Backends, build_app, serving
from tests.api.test_llamacpp_completion import events
from tests.api.test_tools import ASK, TOOLS
from tests.conftest import sse_events
from tests.fakes.upstreams import Behaviour, FakeUpstream


@pytest.fixture
def said(backends: Backends) -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """The backends, put back to saying nothing special afterwards."""
    yield backends.fallback, backends.primary
    for upstream in (backends.fallback, backends.primary):
        upstream.finish_reason, upstream.usage, upstream.indexed_calls = None, None, True
        upstream.usage_apart, upstream.call_ids = False, True
        upstream.tokens = ("Hello", ",", " world")


async def chat(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/chat/completions", json={"messages": ASK, **fields}, headers=USER
    )
    assert response.status_code == 200, response.text
    if fields.get("stream"):
        return {"chunks": sse_events(response.text)}
    answer: dict[str, Any] = response.json()
    return answer


@pytest.mark.parametrize("reason", ["length", "content_filter", "stop"])
async def test_the_backends_finish_reason_reaches_the_client(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream], reason: str
) -> None:
    backend, completions = said
    backend.finish_reason = completions.finish_reason = reason
    # max_tokens 3: the 3 pieces' estimate reaches it, which says nothing when the
    # backend said why it stopped.
    whole = await chat(client, max_tokens=3)
    assert whole["choices"][0]["finish_reason"] == reason
    streamed = await chat(client, max_tokens=3, stream=True)
    assert streamed["chunks"][-1]["choices"][0]["finish_reason"] == reason
    response = await client.post(
        "/v1/completions", json={"prompt": "def f(", "max_tokens": 3}, headers=USER
    )
    assert response.json()["choices"][0]["finish_reason"] == reason


@pytest.mark.parametrize("reason", ["length", "content_filter"])
async def test_a_tool_call_the_backend_cut_short_ends_as_it_said(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream], reason: str
) -> None:
    """A tool call whose arguments the token limit cut ended "tool_calls", as if whole,
    and an agent ran the tool with half its arguments."""
    backend, _ = said
    backend.finish_reason = reason
    whole = await chat(client, tools=TOOLS)
    assert whole["choices"][0]["message"]["tool_calls"]
    assert whole["choices"][0]["finish_reason"] == reason
    streamed = await chat(client, tools=TOOLS, stream=True)
    assert streamed["chunks"][-1]["choices"][0]["finish_reason"] == reason


async def test_tool_calls_begun_without_an_id_get_one_the_next_turn_takes(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """A call with no ``id`` came back with ``"id": null``, and the conversation sent
    back with its result was a 400 (``tool_calls[0].id``: expected a string)."""
    backend, _ = said
    backend.call_ids = False
    calls = (await chat(client, tools=TOOLS))["choices"][0]["message"]["tool_calls"]
    ids = [call["id"] for call in calls]
    assert all(isinstance(i, str) and i.startswith("call_") for i in ids) and len(set(ids)) == 2
    chunks = (await chat(client, tools=TOOLS, stream=True))["chunks"]
    parts = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls") or []]
    streamed = {part["index"]: part["id"] for part in parts if part.get("id")}
    assert sorted(streamed) == [0, 1] and all(i.startswith("call_") for i in streamed.values())
    results = [{"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids]
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}, *results]
    response = await client.post("/v1/chat/completions", json={"messages": turn}, headers=USER)
    assert response.status_code == 200, response.text


async def test_half_a_surrogate_pair_from_a_backend_is_a_replacement_character(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """An emoji sent as its two UTF-16 halves in two frames (``"\\ud83d"``, then
    ``"\\ude00"``): a 500 for the whole answer, and a stream cut off with no end."""
    backend, _ = said
    backend.tokens = ("smile ", "\ud83d", "\ude00", "!")
    whole = await chat(client)
    assert whole["choices"][0]["message"]["content"] == "smile \ufffd\ufffd!"
    response = await client.post(
        "/v1/chat/completions", json={"messages": ASK, "stream": True}, headers=USER
    )
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    chunks = sse_events(response.text)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "smile \ufffd\ufffd!" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # in a tool call's arguments, passed on as sent (escaped), and counted
    backend.tokens = ("Hello", ",", " world")
    backend.call_ids = True
    calls = (await chat(client, tools=TOOLS))["choices"][0]["message"]["tool_calls"]
    assert calls and (await chat(client, tools=TOOLS, stream=True))["chunks"]


async def test_a_backend_past_max_tokens_is_cut_there_for_length(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """The fake sends three pieces whatever it is asked, and says it stopped: asked for
    2, the answer is the first two, ended for ``length``, streamed and whole."""
    backend, completions = said
    backend.finish_reason = completions.finish_reason = "stop"
    whole = await chat(client, max_tokens=2)
    assert whole["choices"][0]["message"]["content"] == "Hello,"
    assert whole["choices"][0]["finish_reason"] == "length"
    chunks = (await chat(client, max_tokens=2, stream=True))["chunks"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello,"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    response = await client.post(
        "/v1/completions", json={"prompt": "def f(", "max_tokens": 2}, headers=USER
    )
    assert response.json()["choices"][0]["text"] == "Hello,"
    assert response.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("apart", [False, True], ids=["on the last chunk", "a chunk after it"])
async def test_the_backends_usage_is_the_answers(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream], apart: bool
) -> None:
    """The backend's counts, where its stream carries them: on the finish chunk
    (llama.cpp) or in a chunk after it (OpenAI's, vLLM's), which keel stopped before
    and answered with its own estimate."""
    backend, completions = said
    backend.usage = completions.usage = {"prompt_tokens": 1234, "completion_tokens": 7}
    backend.usage_apart = completions.usage_apart = apart
    expected = {"prompt_tokens": 1234, "completion_tokens": 7, "total_tokens": 1241}
    assert (await chat(client))["usage"] == expected
    streamed = await chat(client, stream=True, stream_options={"include_usage": True})
    assert streamed["chunks"][-1]["usage"] == expected
    response = await client.post("/v1/completions", json={"prompt": "def f("}, headers=USER)
    assert response.json()["usage"] == expected


async def test_the_prompt_tokens_the_backends_cache_held_reach_the_client(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """OpenAI's and vLLM's ``usage.prompt_tokens_details.cached_tokens``, in keel's
    OpenAI answers and as llama.cpp's ``timings.cache_n`` (and the tokens read,
    ``timings.prompt_n``) on its ``/completion`` route, which Continue and Twinny use;
    ``tokens_cached`` is llama-server's, what the cache holds after: 40 + 7 - 1."""
    backend, completions = said
    usage = {"prompt_tokens": 40, "completion_tokens": 7, "prompt_tokens_details": {}}
    usage["prompt_tokens_details"] = {"cached_tokens": 32}
    backend.usage = completions.usage = usage
    expected = {**usage, "total_tokens": 47}
    assert (await chat(client))["usage"] == expected
    response = await client.post("/v1/completions", json={"prompt": "def f("}, headers=USER)
    assert response.json()["usage"] == expected
    for stream in (False, True):
        answer = await client.post(
            "/completion", json={"prompt": "def f(", "stream": stream}, headers=USER
        )
        final = events(answer)[-1] if stream else answer.json()
        assert (final["tokens_evaluated"], final["tokens_cached"]) == (40, 46), final
        assert final["timings"] == {"predicted_n": 7, "prompt_n": 8, "cache_n": 32}, final


async def test_a_keel_several_people_share_keeps_the_cache_figures(
    backends: Backends, said: tuple[FakeUpstream, FakeUpstream], tmp_path: Path
) -> None:
    """Their prompts share the engines' caches: ``cached_tokens`` told a colleague, token
    by token, how much of another's recent prompt theirs matched (a key's 6 digits in 60
    requests). With one key (above) the figures are the client's own."""
    backend, completions = said
    usage = {"prompt_tokens": 40, "completion_tokens": 7}
    backend.usage = completions.usage = {**usage, "prompt_tokens_details": {"cached_tokens": 32}}
    config = backends.config().replace(
        f'api_keys = ["{USER_KEY}"]', f'api_keys = ["{USER_KEY}", "colleague-key-0123456789"]'
    )
    async with serving(build_app(tmp_path / "keel", config)) as client:
        answer = await chat(client)
        llama = await client.post("/completion", json={"prompt": "def f("}, headers=USER)
    assert answer["usage"] == {**usage, "total_tokens": 47}, answer["usage"]
    assert "cache_n" not in llama.json()["timings"], llama.json()


async def test_a_backend_that_says_nothing_is_counted_and_inferred(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    backend, _ = said
    backend.finish_reason = ""  # a backend that ends without saying why (falsy: "stop")
    answer = await chat(client)
    assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] > 0
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_tool_calls_without_an_index_come_back_call_by_call(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    backend, _ = said
    backend.indexed_calls = False
    whole = await chat(client, tools=TOOLS)
    calls = whole["choices"][0]["message"]["tool_calls"]
    assert [call["function"]["name"] for call in calls] == ["read_file", "run_tests"]
    assert [call["id"] for call in calls] == ["call_0", "call_1"]
    assert [json.loads(call["function"]["arguments"])["call"] for call in calls] == [0, 1]

    streamed = await chat(client, tools=TOOLS, stream=True)
    deltas = [chunk["choices"][0]["delta"].get("tool_calls", []) for chunk in streamed["chunks"]]
    indexes = [part["index"] for delta in deltas for part in delta]
    assert set(indexes) == {0, 1} and indexes == sorted(indexes), indexes
    assert all(len({part["index"] for part in delta}) == len(delta) for delta in deltas)


async def test_a_stream_that_ends_in_an_error_counts_as_that_error(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """Its 200 went out with the first piece; the request metrics, the status page and
    the access log count it by the error it ended with (a 5xx alert never saw one)."""
    backend, _ = said
    backend.behave(Behaviour.cut(after=2), times=1)
    streamed = await client.post(
        "/v1/chat/completions", json={"messages": ASK, "stream": True}, headers=USER
    )
    assert streamed.status_code == 200
    assert "error" in streamed.text
    text = (await client.get("/metrics", headers=USER)).text
    counted = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "keel_requests_total" and sample.labels["route"] == "/v1/chat/completions"
    }
    assert counted.get("502") == 1, counted


async def test_the_request_id_reaches_the_backend(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """One request followed from keel's log into the backend's."""
    backend, _ = said
    headers = {**USER, "X-Request-ID": "trace-0123456789"}
    await client.post("/v1/chat/completions", json={"messages": ASK}, headers=headers)
    assert backend.last_request.headers["x-request-id"] == "trace-0123456789"


@pytest.mark.parametrize("retry_after", ["inf", "1e999"])
async def test_a_backends_endless_retry_after_is_a_429_with_a_finite_wait(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream], retry_after: str
) -> None:
    """``Retry-After: inf`` made every chat a 500 (``math.ceil(inf)``) until a restart."""
    backend, _ = said
    backend.behave(Behaviour.error(429, retry_after=retry_after))
    try:
        for _ in range(2):
            response = await client.post(
                "/v1/chat/completions", json={"messages": ASK}, headers=USER
            )
            assert response.status_code == 429, response.text
            assert 0 < int(response.headers["retry-after"]) <= 3600
    finally:
        backend.reset_behaviour()


async def test_a_reasoning_models_fields_reach_the_backend_as_sent(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """``reasoning_effort``, ``prediction`` and ``verbosity`` change a reasoning model's
    answer, cost and time: they were dropped as unknown fields, and the backend's defaults
    answered; a request without them sends none."""
    backend, _ = said
    fields = {
        "reasoning_effort": "low",
        "prediction": {"type": "content", "content": "def f():"},
        "verbosity": "low",
    }
    await chat(client, **fields)
    sent = backend.last_request.json
    assert {name: sent.get(name) for name in fields} == fields, sent
    await chat(client)
    assert not set(fields) & set(backend.last_request.json)


async def test_a_messages_speaker_reaches_the_backend(
    client: httpx.AsyncClient, said: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """OpenAI's ``name`` tells apart speakers of one role (a group chat, an agent's
    personas): it was dropped as an unknown field."""
    backend, _ = said
    messages = [
        {"role": "user", "name": "alice", "content": "Who wrote this?"},
        {"role": "user", "content": "Not me."},
    ]
    await chat(client, messages=messages)
    assert backend.last_request.json["messages"] == messages
