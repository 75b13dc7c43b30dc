"""Request bodies are strict about JSON types, as OpenAI's API and Tabby's serde are.

``"max_tokens": "5"``, ``"stream": "yes"``, ``"temperature": "0.5"``, ``5.5`` (or
``5.0``) for an integer were served as if the client had sent 5, true, 0.5 and 5
(pydantic's lax mode): a client with such a bug never heard of it. Each is a 400 in the
one error shape, naming the field (its JSON path) and saying what was expected and what
came; nothing reaches a backend. What JSON and OpenAI take stays taken: an integer where
a number belongs, null for an optional field, and the bodies real clients send.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from tests.api.conftest import ADMIN, USER, Backends

COMPLETION = {"prompt": "def f():", "max_tokens": 5}
TABBY = {"language": "python", "segments": {"prefix": "def f():\n    "}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
EMBEDDING = {"input": ["a"]}
INFILL = {"input_prefix": "import os\n", "prompt": "x = ", "input_suffix": "\n"}
LLAMACPP = {"prompt": "x = ", "n_predict": 8}
EVENT = {"type": "view", "completion_id": "cmpl-1", "choice_index": 0}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def with_value(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``body`` with ``value`` at ``path`` (``a.b``; ``a[0]`` for a list's item)."""
    changed: Any = copy.deepcopy(body)
    node = changed
    names = path.replace("[", ".").replace("]", "").split(".")
    steps = [int(name) if name.isdigit() else name for name in names]
    for step in steps[:-1]:
        node = node[step]
    node[steps[-1]] = value
    return changed


# (route, valid body, field, wrong value, what is expected, what was given)
WRONG_TYPES = [
    ("/v1/completions", COMPLETION, "max_tokens", "5", "an integer", 'a string ("5")'),
    ("/v1/completions", COMPLETION, "max_tokens", 5.5, "an integer", "a decimal number (5.5)"),
    ("/v1/completions", COMPLETION, "max_tokens", 5.0, "an integer", "a decimal number (5.0)"),
    ("/v1/completions", COMPLETION, "max_tokens", True, "an integer", "a boolean (true)"),
    ("/v1/completions", COMPLETION, "stream", "yes", "true or false", 'a string ("yes")'),
    ("/v1/completions", COMPLETION, "stream", 1, "true or false", "an integer (1)"),
    ("/v1/completions", COMPLETION, "temperature", "0.5", "a number", 'a string ("0.5")'),
    ("/v1/completions", COMPLETION, "temperature", False, "a number", "a boolean (false)"),
    ("/v1/completions", COMPLETION, "seed", "42", "an integer", 'a string ("42")'),
    ("/v1/completions", COMPLETION, "n", 1.0, "an integer", "a decimal number (1.0)"),
    ("/v1/completions", COMPLETION, "suffix", 5, "a string", "an integer (5)"),
    ("/v1/completions", COMPLETION, "model", 5, "a string", "an integer (5)"),
    (
        "/v1/completions",
        COMPLETION,
        "stop",
        5,
        "a string or an array of strings",
        "an integer (5)",
    ),
    ("/v1/completions", COMPLETION, "echo", "false", "true or false", 'a string ("false")'),
    ("/v1/chat/completions", CHAT, "top_logprobs", "0", "an integer", 'a string ("0")'),
    ("/v1/completions", TABBY, "temperature", "0.1", "a number", 'a string ("0.1")'),
    ("/v1/completions", TABBY, "seed", "1", "an integer", 'a string ("1")'),
    ("/v1/completions", TABBY, "segments.prefix", 5, "a string", "an integer (5)"),
    ("/v1/completions", TABBY, "segments", "x", "an object", 'a string ("x")'),
    (
        "/v1/completions",
        {**TABBY, "debug_options": {"return_prompt": False}},
        "debug_options.return_prompt",
        "true",
        "true or false",
        'a string ("true")',
    ),
    (
        "/v1/completions",
        {**TABBY, "segments": {"prefix": "x", "declarations": [{"filepath": "a", "body": "b"}]}},
        "segments.declarations[0].body",
        1,
        "a string",
        "an integer (1)",
    ),
    ("/v1/chat/completions", CHAT, "max_tokens", "5", "an integer", 'a string ("5")'),
    ("/v1/chat/completions", CHAT, "max_completion_tokens", 9.5, "an integer", "a decimal"),
    ("/v1/chat/completions", CHAT, "stream", "true", "true or false", 'a string ("true")'),
    ("/v1/chat/completions", CHAT, "top_p", "1", "a number", 'a string ("1")'),
    ("/v1/chat/completions", CHAT, "n_predict", "8", "an integer", 'a string ("8")'),
    (
        "/v1/chat/completions",
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        "stream_options.include_usage",
        "true",
        "true or false",
        'a string ("true")',
    ),
    ("/v1/chat/completions", CHAT, "messages[0].content", 5, "a string or an array", "an integer"),
    (
        "/v1/chat/completions",
        {**CHAT, "tools": [TOOL]},
        "tools[0].function.strict",
        "yes",
        "true or false",
        'a string ("yes")',
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "tools": [TOOL]},
        "parallel_tool_calls",
        0,
        "true or false",
        "an integer (0)",
    ),
    ("/v1/chat/completions", CHAT, "response_format", "json", "an object", 'a string ("json")'),
    ("/v1/embeddings", EMBEDDING, "dimensions", "4", "an integer", 'a string ("4")'),
    ("/v1/embeddings", EMBEDDING, "input", 5, "a string or an array of strings", "an integer"),
    ("/v1/embeddings", EMBEDDING, "user", 7, "a string", "an integer (7)"),
    ("/infill", INFILL, "n_predict", "16", "an integer", 'a string ("16")'),
    ("/infill", INFILL, "n_indent", 4.0, "an integer", "a decimal number (4.0)"),
    ("/infill", INFILL, "cache_prompt", "true", "true or false", 'a string ("true")'),
    ("/infill", INFILL, "temperature", "0.1", "a number", 'a string ("0.1")'),
    (
        "/infill",
        {**INFILL, "input_extra": [{"text": "y"}]},
        "input_extra[0].text",
        5,
        "a string",
        "an integer",
    ),
    ("/completion", LLAMACPP, "n_predict", "8", "an integer", 'a string ("8")'),
    ("/completion", LLAMACPP, "stream", "false", "true or false", 'a string ("false")'),
    ("/completion", LLAMACPP, "temperature", "0.2", "a number", 'a string ("0.2")'),
    ("/v1/events", EVENT, "choice_index", "0", "an integer", 'a string ("0")'),
    ("/v1/events", EVENT, "elapsed", 1.5, "an integer", "a decimal number (1.5)"),
    # TabbyAPI's management routes take what its lax pydantic takes ("4096", "false",
    # 0: tests/integration/test_tabby_loader.py); what it refuses is still a 400
    (
        "/v1/model/load",
        {"model_name": "m"},
        "stream",
        "maybe",
        "true or false",
        'a string ("maybe")',
    ),
    ("/v1/model/load", {"model_name": "m"}, "max_seq_len", "lots", "an integer", "a string"),
    ("/v1/model/download", {"model": "org/repo"}, "stream", 2, "true or false", "an integer (2)"),
]


def completion_calls(backends: Backends) -> int:
    return sum(
        1
        for server in (backends.primary, backends.fallback)
        for request in server.requests
        if request.method == "POST" and request.path.endswith(("/completions", "/embeddings"))
    )


@pytest.mark.parametrize(
    ("path", "body", "field", "value", "expected", "given"),
    WRONG_TYPES,
    ids=[f"{case[0]}:{case[2]}={case[3]!r}" for case in WRONG_TYPES],
)
async def test_a_value_of_the_wrong_json_type_is_a_400_naming_the_field(
    client: httpx.AsyncClient,
    backends: Backends,
    path: str,
    body: dict[str, Any],
    field: str,
    value: Any,
    expected: str,
    given: str,
) -> None:
    headers = ADMIN if path.startswith("/v1/model/") else USER
    before = completion_calls(backends)
    response = await client.post(path, json=with_value(body, field, value), headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == ("invalid_field", field), error
    assert error["message"].startswith(f"'{field}': expected {expected}"), error["message"]
    assert f", got {given}" in error["message"], error["message"]
    assert completion_calls(backends) == before  # refused before any backend was asked


async def test_inside_a_union_the_wrong_item_is_named_where_it_is(
    client: httpx.AsyncClient,
) -> None:
    """``stop`` takes a string or a list of strings: a list holding a number is the
    number's fault, not the list's (keel said "should be a valid string" of the list)."""
    body = {**COMPLETION, "stop": ["\n", 7]}
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "stop"
    assert error["message"] == "'stop': at 'stop[1]': expected a string, got an integer (7)"
    part = {"type": "text", "text": 5}
    chat = {"messages": [{"role": "user", "content": [part]}]}
    response = await client.post("/v1/chat/completions", json=chat, headers=USER)
    error = response.json()["error"]
    assert error["param"] == "messages[0].content", error
    assert (
        "at 'messages[0].content[0].text': expected a string, got an integer (5)"
        in (error["message"])
    )
    assert "ImagePart" not in error["message"] and "more" not in error["message"], error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "[0].content[0].text"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "[0].content[0].image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {}]}]},
            "[0].content[1].type",
        ),
        ({**CHAT, "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ],
)
async def test_inside_a_union_a_missing_field_is_named(
    client: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    """A value of a type the field takes (an array of parts, an object for
    ``tool_choice``) missing something inside was told the first branch's type error:
    "'messages[0].content': expected a string, got an array", of an array keel takes."""
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    expected = param if param.startswith("tool") else f"messages{param}"
    assert error["param"] == expected, error
    assert error["message"].startswith(f"'{expected}' is required"), error


async def test_a_choice_of_the_wrong_type_names_the_choices(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "tools": [TOOL], "tool_choice": 1}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tool_choice"
    assert error["message"] == (
        "'tool_choice': expected one of 'none', 'auto' or 'required', or an object,"
        " got an integer (1)"
    )


@pytest.mark.parametrize(
    ("path", "body", "field", "value"),
    [
        ("/v1/completions", COMPLETION, "logprobs", True),
        ("/v1/completions", COMPLETION, "echo", 1),
        ("/v1/chat/completions", CHAT, "logprobs", 1),
        ("/v1/chat/completions", CHAT, "top_logprobs", True),
    ],
)
async def test_asking_for_what_keel_does_not_do_is_refused_for_that_in_either_type(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], field: str, value: Any
) -> None:
    """``echo`` and ``logprobs`` say "no" as false or 0 in either type (both taken, as
    before); asking for them in either type is refused for what it asks, not its type."""
    response = await client.post(path, json={**body, field: value}, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "keel does not" in error["message"], error
    assert f"leave '{field}' out" in error["message"], error


TAKEN = [
    # an integer is a JSON number: taken where a float belongs, as OpenAI takes it
    ("/v1/completions", {**COMPLETION, "temperature": 1, "top_p": 1, "presence_penalty": 0}),
    ("/v1/completions", {**TABBY, "temperature": 0}),
    (
        "/v1/completions",
        {
            **TABBY,
            "segments": {
                "prefix": "x",
                "relevant_snippets_from_changed_files": [
                    {"filepath": "a", "body": "b", "score": 1}
                ],
            },
        },
    ),
    ("/v1/chat/completions", {**CHAT, "temperature": 2, "frequency_penalty": -2}),
    # "no" to what keel does not do, in either type
    ("/v1/completions", {**COMPLETION, "echo": 0, "logprobs": False}),
    ("/v1/chat/completions", {**CHAT, "logprobs": 0, "top_logprobs": False}),
    ("/infill", {**INFILL, "temperature": 0}),
    ("/completion", {**LLAMACPP, "temperature": 1, "top_p": 1}),
    # null for an optional field: as if unset
    (
        "/v1/completions",
        {
            **COMPLETION,
            "max_tokens": None,
            "temperature": None,
            "n": None,
            "stream": None,
            "stop": None,
            "seed": None,
            "suffix": None,
            "user": None,
        },
    ),
    ("/v1/completions", {**TABBY, "temperature": None, "seed": None, "debug_options": None}),
    (
        "/v1/chat/completions",
        {**CHAT, "stream": None, "stream_options": None, "tools": None, "n": None, "top_p": None},
    ),
    ("/v1/embeddings", {**EMBEDDING, "dimensions": None, "user": None}),
    ("/completion", {**LLAMACPP, "stop": None, "seed": None}),
    ("/v1/events", {**EVENT, "elapsed": None, "view_id": None}),
]


@pytest.mark.parametrize(
    ("path", "body"), TAKEN, ids=[f"{p}-{i}" for i, (p, _) in enumerate(TAKEN)]
)
async def test_what_json_and_openai_take_is_taken(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    response = await client.post(path, json=body, headers=USER)
    assert response.status_code == 200, response.text


async def test_an_integer_temperature_goes_on_as_the_number(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    before = len(backends.primary.requests), len(backends.fallback.requests)
    body = {**COMPLETION, "temperature": 1, "seed": 7}
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    sent = [
        request.json
        for server, start in zip((backends.primary, backends.fallback), before, strict=True)
        for request in server.requests[start:]
        if request.path.endswith("/completions")
    ]
    assert sent and sent[0]["temperature"] == 1 and sent[0]["seed"] == 7, sent
