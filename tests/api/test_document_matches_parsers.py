"""A body /openapi.json allows is one keel takes, and an answer it gives is documented.

A review validated bodies against the served document and sent them: many it allowed
met a 400 (a Tabby body with nothing to complete, two prompts, 17 stop sequences,
``echo: true``, chat's deprecated ``functions``, llama.cpp's ``grammar``), and one it
refused was served (``"encoding_format": null``). Each body here is checked with
jsonschema against the served document, then sent: allowed means not a 400, and the
bodies keel refuses are refused by the document too.
"""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest
from tests.api.conftest import USER


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


SEVENTEEN_STOPS = [f"s{index}" for index in range(17)]
SIXTEEN_STOPS = SEVENTEEN_STOPS[:16]

REFUSED = [
    # nothing to complete: no prompt, no segments (nor a raw prompt)
    ("/v1/completions", {}),
    ("/v1/completions", {"language": "python"}),
    ("/v1/completions", {"language": "python", "segments": None}),
    ("/v1/completions", {"debug_options": {"return_prompt": True}}),
    # one prompt only
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": []}),
    # at most 16 stop sequences of 1 to 256 characters
    ("/v1/completions", {"prompt": "x", "stop": SEVENTEEN_STOPS}),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 300}),
    ("/v1/completions", {"prompt": "x", "stop": ["s" * 257]}),
    ("/v1/completions", {"prompt": "x", "stop": [""]}),
    ("/v1/chat/completions", _chat(stop=SEVENTEEN_STOPS)),
    ("/v1/chat/completions", _chat(stop="s" * 257)),
    ("/completion", {"prompt": "x", "stop": SEVENTEEN_STOPS}),
    ("/infill", {"input_prefix": "x", "stop": ["s" * 257]}),
    # what keel does not do, asked for
    ("/v1/completions", {"prompt": "x", "echo": True}),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}),
    ("/v1/completions", {"prompt": "x", "best_of": 2}),
    ("/v1/chat/completions", _chat(logprobs=True)),
    ("/v1/chat/completions", _chat(top_logprobs=2)),
    ("/v1/chat/completions", _chat(functions=[{"name": "f", "parameters": {}}])),
    ("/v1/chat/completions", _chat(function_call="auto")),
    ("/completion", {"prompt": "x", "grammar": 'root ::= "a"'}),
    ("/completion", {"prompt": "x", "json_schema": {"type": "object"}}),
    ("/completion", {"prompt": "x", "n_probs": 2}),
    # a seed past 64 bits (the document's bound was the float 2**64)
    ("/v1/completions", {"prompt": "x", "seed": 2**64}),
    ("/v1/completions", {"segments": {"prefix": "x"}, "seed": 2**64}),
    ("/infill", {"input_prefix": "x", "seed": 2**64}),
    ("/completion", {"prompt": "x", "seed": 2**63}),
    # found sending the document's own examples (schemathesis's positive cases)
    ("/v1/completions", {"prompt": "x", "max_tokens": 5, "max_completion_tokens": 6}),
    ("/v1/completions", {"prompt": "x", "max_completion_tokens": 5, "n_predict": 6}),
    ("/v1/chat/completions", _chat(tool_choice="auto")),
    ("/v1/chat/completions", _chat(tool_choice="required", tools=[])),
    ("/v1/chat/completions", _chat(n_predict=0, stream=True)),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
    ),
    ("/infill", {"input_prefix": "x", "stream": True}),
    ("/v1/completions", {"prompt": "x", "n_predict": 0}),
    ("/v1/completions", {"prompt": "", "suffix": None}),
    ("/v1/chat/completions", _chat(response_format={"type": "json_schema"})),
    # stream_options only with a stream
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", _chat(stream=False, stream_options={"include_usage": True})),
]
"""Allowed by the document once, each refused by keel: refused by both now."""

TAKEN = [
    ("/v1/completions", {"segments": {"prefix": "def f():"}}),
    ("/v1/completions", {"language": "python", "debug_options": {"raw_prompt": "def f():"}}),
    ("/v1/completions", {"prompt": ["x = "]}),
    ("/v1/completions", {"prompt": "x", "stop": SIXTEEN_STOPS}),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 256}),
    ("/v1/completions", {"prompt": "x", "stop": []}),
    ("/v1/completions", {"prompt": "x", "echo": False, "logprobs": 0, "best_of": 1}),
    ("/v1/completions", {"prompt": "x", "echo": None, "logprobs": None, "best_of": None}),
    ("/v1/chat/completions", _chat(stop=SIXTEEN_STOPS)),
    ("/v1/chat/completions", _chat(logprobs=False, top_logprobs=0)),
    ("/v1/chat/completions", _chat(functions=None, function_call=None)),
    ("/completion", {"prompt": "x", "stop": SIXTEEN_STOPS, "grammar": "", "n_probs": 0}),
    ("/completion", {"prompt": "x", "grammar": None, "json_schema": {}}),
    ("/infill", {"input_prefix": "x", "stop": SIXTEEN_STOPS}),
    ("/v1/completions", {"prompt": "x", "seed": 2**64 - 1}),
    ("/v1/completions", {"segments": {"prefix": "x"}, "seed": 2**64 - 1}),
    ("/infill", {"input_prefix": "x", "seed": 2**64 - 1}),
    ("/completion", {"prompt": "x", "seed": 2**63 - 1}),
    # null for a field with a default: as if unset, for OpenAI's clients
    ("/v1/embeddings", {"input": "x", "encoding_format": None}),
    ("/v1/completions", {"prompt": "x", "n": None, "stream": None}),
    ("/v1/chat/completions", _chat(stream=True, stream_options={"include_usage": None})),
    ("/v1/chat/completions", _chat(stream=False, stream_options=None)),
    ("/v1/chat/completions", _chat(stream_options={"include_usage": False})),
    ("/completion", {"prompt": "x", "stream": None, "response_fields": None}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5, "n_predict": -1}),
    ("/v1/chat/completions", _chat(tool_choice="none")),
    ("/v1/chat/completions", _chat(response_format={"type": "json_object"})),
    ("/v1/chat/completions", _chat(n_predict=0, stream=False)),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                {"role": "user", "content": [{"type": "text", "text": "please"}]},
            ]
        },
    ),
]
"""Near the same limits, on the side both take."""


def _validator(document: dict[str, Any], path: str) -> jsonschema.Draft202012Validator:
    body = document["paths"][path]["post"]["requestBody"]
    schema = {**body["content"]["application/json"]["schema"]}
    schema["components"] = document["components"]  # for any #/components/ $ref
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get("/openapi.json")
    assert answer.status_code == 200
    served: dict[str, Any] = answer.json()
    return served


async def test_bodies_keel_refuses_the_document_refuses(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    wrong = []
    for path, body in REFUSED:
        answer = await client.post(path, json=body, headers=USER)
        if answer.status_code != 400 or _validator(document, path).is_valid(body):
            wrong.append((path, body, answer.status_code))
    assert not wrong


async def test_bodies_the_document_allows_keel_takes(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    wrong = []
    for path, body in TAKEN:
        errors = [error.message for error in _validator(document, path).iter_errors(body)]
        answer = await client.post(path, json=body, headers=USER, timeout=30)
        if errors or answer.status_code == 400:
            wrong.append((path, body, errors, answer.status_code, answer.text[:200]))
    assert not wrong


def _answer_validator(document: dict[str, Any], path: str) -> jsonschema.Draft202012Validator:
    answer = document["paths"][path]["get"]["responses"]["200"]
    schema = {**answer["content"]["application/json"]["schema"]}
    schema["components"] = document["components"]
    return jsonschema.Draft202012Validator(schema)


async def test_the_providers_answer_is_documented(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    """It was documented as any object, though the README says every answer is."""
    validator = _answer_validator(document, "/v1/providers")
    schema = document["components"]["schemas"]["ProvidersSnapshot"]
    assert {"roles", "superseded", "shared_state", "repositories"} <= set(schema["required"])
    await client.post("/v1/completions", json={"prompt": "x = "}, headers=USER)
    answer = (await client.get("/v1/providers", headers=USER)).json()
    assert [error.message for error in validator.iter_errors(answer)] == []
    assert answer["roles"]["completion"]["providers"][0]["latency_p50_ms"] is not None
    answer["roles"]["completion"]["providers"][0]["breaker"] = "ajar"
    del answer["shared_state"]["events"]["up"]
    assert len(list(validator.iter_errors(answer))) == 2
