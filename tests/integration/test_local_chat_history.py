"""Chat with the embedded model: what it cannot serve is refused naming the field, and
earlier tool calls and their results reach its prompt."""

from __future__ import annotations

from typing import Any

import pytest

from keel.providers.base import ChatMessage
from keel.providers.local import engine_messages
from tests.conftest import KeelProcess

pytestmark = pytest.mark.integration

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
}


def _chat_provider(client: Any) -> dict[str, Any]:
    provider: dict[str, Any] = client.get("/v1/providers").json()["roles"]["chat"]["providers"][0]
    return provider


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "What is it?"}, IMAGE]},
                ]
            },
            "messages[1].content[1]",
        ),
        ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"web_search_options": {}}, "web_search_options"),  # it does not search
        (  # the engine continues one assistant message at the end: it said so with no field
            {
                "messages": [
                    {"role": "user", "content": "Write a haiku"},
                    {"role": "user", "content": "about rain"},
                    {"role": "assistant", "content": "Rain on"},
                    {"role": "assistant", "content": "the roof"},
                ]
            },
            "messages",
        ),
        (
            {
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "read_file"}},
            },
            "tool_choice",
        ),
    ],
)
def test_what_the_local_model_cannot_serve_names_the_field(
    keel_server: KeelProcess, change: dict[str, Any], param: str
) -> None:
    """They were 400s with code upstream_rejected_request, param null and the provider's
    name before the message, though no upstream was called."""
    body = {"messages": [{"role": "user", "content": "Read main.py"}], "max_tokens": 4, **change}
    with keel_server.client() as client:
        name = _chat_provider(client)["name"]
        for _ in range(6):  # more than the breaker's default threshold (5)
            refused = client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert (error["param"], error["code"]) == (param, "unsupported_for_model"), error
            assert not error["message"].startswith(name), error
            assert param in error["message"] or "tool_choice" in error["message"], error
        provider = _chat_provider(client)
    assert (provider["breaker"], provider["healthy"]) == ("closed", True), provider


CALL = {
    "id": "call_7",
    "type": "function",
    "function": {"name": "read_file", "arguments": '{"path": "src/main.py"}'},
}
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "What does main.py print?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_7", "content": "print('hello')"},
]


def test_earlier_tool_calls_and_results_reach_the_local_models_prompt(
    keel_server: KeelProcess,
) -> None:
    """The embedded model's template renders no tool calls: they are written into the
    assistant's turn, and the result under its function's name (both were dropped: the
    model read an empty assistant turn, then a bare result)."""

    def prompt_tokens(messages: list[dict[str, Any]]) -> int:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0, "tools": [TOOL]}
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        tokens: int = answer.json()["usage"]["prompt_tokens"]
        return tokens

    bare = [
        HISTORY[0],
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "print('hello')"},
    ]
    with keel_server.client() as client:
        kept, dropped = prompt_tokens(HISTORY), prompt_tokens(bare)
    # the call's name, its arguments and the result's name: a dozen tokens at least
    assert kept - dropped >= 12, (kept, dropped)


def test_a_template_that_takes_tool_calls_is_given_them() -> None:
    """OpenAI's fields, where the model's template renders them; as text where not."""
    messages = tuple(
        ChatMessage(
            m["role"], m["content"] or "", tuple(m.get("tool_calls", ())), m.get("tool_call_id")
        )
        for m in HISTORY
    )
    given = engine_messages(messages, takes_calls=True)
    assert given[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert given[2] == {
        "role": "tool",
        "content": "print('hello')",
        "tool_call_id": "call_7",
        "name": "read_file",
    }
    written = engine_messages(messages, takes_calls=False)
    assert set(written[1]) == {"role", "content"} and set(written[2]) == {"role", "content"}
    assert "read_file" in written[1]["content"] and "src/main.py" in written[1]["content"]
    assert written[2]["content"].startswith("Result of read_file")
    assert written[2]["content"].endswith("print('hello')")
