"""Chat with the embedded model: what it cannot serve is refused naming the field, and
earlier tool calls and their results reach its prompt."""

from __future__ import annotations

from typing import Any

import pytest

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
