"""Chat tools through keel: what the client sends reaches an OpenAI-compatible backend
whole, and the model's tool calls come back whole (assembled) or as streamed, in the
form the openai SDK reads.

The fake backend (tests/fakes/upstreams.py) calls the tools it is given, streaming each
call in three parts as real servers do: id and name, then the arguments in two halves.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from tests.api.conftest import USER, USER_KEY, Backends
from tests.conftest import sse_events

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the workspace",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "encoding": {"default": None}},
                "required": ["path"],
            },
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "run_tests", "parameters": {"type": "object"}}},
]

ASK = [{"role": "user", "content": "What does main.py do?"}]


async def test_tools_reach_the_backend_and_its_calls_come_back_whole(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "auto"}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text

    sent = backends.fallback.last_request.json
    assert sent["tools"] == TOOLS  # every field, the schema's nulls and `strict` too
    assert sent["tool_choice"] == "auto"
    assert "parallel_tool_calls" not in sent

    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(call["id"], call["type"], call["function"]["name"]) for call in calls] == [
        ("call_0", "function", "read_file"),
        ("call_1", "function", "run_tests"),
    ]
    assert [json.loads(call["function"]["arguments"]) for call in calls] == [
        {"call": 0, "messages": 1},
        {"call": 1, "messages": 1},
    ]
    assert response.json()["usage"]["completion_tokens"] > 0  # the arguments count


async def test_a_streamed_answer_passes_each_call_part_on(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    body = {
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "run_tests"}},
        "parallel_tool_calls": False,
        "stream": True,
    }
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    assert backends.fallback.last_request.json["tool_choice"] == body["tool_choice"]
    assert backends.fallback.last_request.json["parallel_tool_calls"] is False

    chunks = sse_events(response.text)
    deltas = [chunk["choices"][0]["delta"].get("tool_calls", []) for chunk in chunks]
    parts = [part for delta in deltas for part in delta]
    arguments = json.dumps({"call": 0, "messages": 1})
    # The parts that came in one read are one entry a call (the backend's three here,
    # however the reads fell), as OpenAI streams them.
    assert all(len({part["index"] for part in delta}) == len(delta) for delta in deltas)
    assert {part["index"] for part in parts} == {0}
    first = parts[0]
    assert (first["id"], first["type"], first["function"]["name"]) == (
        "call_0",
        "function",
        "run_tests",
    )
    assert "".join(part["function"].get("arguments", "") for part in parts) == arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_the_calls_and_their_results_go_back_with_the_conversation(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "main.py"}'},
    }
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": "print('hi')"},
    ]
    response = await client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 8}, headers=USER
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello, world",
    }
    sent = backends.fallback.last_request.json["messages"]
    assert sent[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert sent[2] == {"role": "tool", "content": "print('hi')", "tool_call_id": "call_0"}


async def test_the_openai_sdk_reads_the_calls_whole_and_streamed(
    client: httpx.AsyncClient,
) -> None:
    import openai  # here: ~0.5 s of CPU for each pytest worker that imports it

    sdk = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key=USER_KEY, http_client=client)
    answer = await sdk.chat.completions.create(
        model="any",
        messages=ASK,
        tools=TOOLS,
        parallel_tool_calls=False,  # type: ignore[arg-type]
    )
    (call,) = answer.choices[0].message.tool_calls or []
    assert (call.id, call.function.name) == ("call_0", "read_file")
    assert json.loads(call.function.arguments) == {"call": 0, "messages": 1}
    assert answer.choices[0].finish_reason == "tool_calls"

    stream = await sdk.chat.completions.create(
        model="any",
        messages=ASK,
        tools=TOOLS,
        stream=True,  # type: ignore[arg-type]
    )
    arguments: dict[int, str] = {}
    async for chunk in stream:
        if not chunk.choices:
            continue
        for part in chunk.choices[0].delta.tool_calls or []:
            assert part.function is not None
            arguments[part.index] = arguments.get(part.index, "") + (part.function.arguments or "")
    assert {index: json.loads(text) for index, text in arguments.items()} == {
        0: {"call": 0, "messages": 1},
        1: {"call": 1, "messages": 1},
    }


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}},
            "tool_choice",
            "'rm' is not among the tools (read_file, run_tests)",
        ),
        (  # an earlier answer held only in audio: dropped, an empty assistant turn
            {
                "messages": [
                    {"role": "assistant", "audio": {"id": "a1"}},
                    {"role": "user", "content": "?"},
                ]
            },
            "messages[0].audio",
            "send the turn's transcript as its content",
        ),
        (  # OpenAI's newer choice: it was told only "'none', 'auto' or 'required'"
            {"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
            "tool_choice",
            "or {'type': 'function', 'function': {'name': ...}}",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "read file"}}]},
            "tools[0].function.name",
            "should match pattern",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "data": "A"}]}]},
            "messages[0].content",
            "a part of type 'input_audio': keel passes on text and images",
        ),
    ],
)
async def test_a_bad_tool_request_is_a_400_naming_the_field(
    client: httpx.AsyncClient, backends: Backends, extra: dict[str, Any], param: str, says: str
) -> None:
    sent_before = len(backends.fallback.requests)
    response = await client.post(
        "/v1/chat/completions", json={"messages": ASK, **extra}, headers=USER
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert len(backends.fallback.requests) == sent_before


async def test_an_image_reaches_a_chat_backend_with_the_text(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """Content parts with images go to an OpenAI-compatible backend as sent (a vision
    model); a local model refuses them (tests/integration/test_embedded_model.py)."""
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
    }
    content = [{"type": "text", "text": "What is on this screenshot?"}, image]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    assert backends.fallback.last_request.json["messages"] == [{"role": "user", "content": content}]
