"""What keel says of a chat request it will not serve as sent: a 400 in the one error
shape, naming the field and what to send instead (not served otherwise than asked)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from tests.api.conftest import USER, Backends
from tests.fakes.upstreams import FINGERPRINT

HI = [{"role": "user", "content": "hi"}]


async def refusal(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(route, json=body, headers=USER)
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"messages": HI}),
        ("/v1/completions", {"prompt": "def f("}),
    ],
)
async def test_two_names_of_one_limit_that_differ_are_refused_on_both_routes(
    client: httpx.AsyncClient, route: str, body: dict[str, Any]
) -> None:
    """Chat kept max_completion_tokens and dropped max_tokens: 20 tokens for max_tokens 3."""
    error = await refusal(client, route, {**body, "max_tokens": 3, "max_completion_tokens": 20})
    assert error["param"] == "max_completion_tokens"
    assert error["message"] == (
        "max_tokens 3 and max_completion_tokens 20 are one limit on the answer's tokens,"
        " given twice with different values: send one of them"
    )


async def test_two_names_of_one_limit_that_agree_are_one_limit(
    client: httpx.AsyncClient,
) -> None:
    body = {"messages": HI, "max_tokens": 2, "max_completion_tokens": 2}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
            "modalities",
        ),
        ({"modalities": ["audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ],
)
async def test_an_answer_in_audio_is_refused(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    """It was answered in text alone, which the client read as if its audio had come."""
    error = await refusal(client, "/v1/chat/completions", {"messages": HI, **fields})
    assert error["param"] == param
    assert "keel answers in text only" in error["message"]
    assert "leave" in error["message"]


OPENAI_FIELDS = {
    "service_tier": "flex",
    "prompt_cache_key": "session-42",
    "store": False,
    "metadata": {"team": "editor"},
    "safety_identifier": "user-hash-1",
    "web_search_options": {"search_context_size": "low"},
}


async def test_openais_own_fields_reach_an_openai_chat_backend_as_sent(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """They were dropped: a flex-tier client was served (and billed) at the default tier."""
    body = {"messages": HI, "modalities": ["text"], **OPENAI_FIELDS}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    sent = backends.fallback.last_request.json
    assert {name: sent.get(name) for name in OPENAI_FIELDS} == OPENAI_FIELDS


async def test_the_backends_system_fingerprint_is_passed_on(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """OpenAI documents it as how a client holding ``seed`` knows answers can repeat; it
    was dropped, whole and streamed."""
    body = {"messages": HI, "seed": 1}
    whole = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert whole.json()["system_fingerprint"] == FINGERPRINT, whole.text
    async with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=USER
    ) as streamed:
        chunks = [
            json.loads(line.removeprefix("data: "))
            async for line in streamed.aiter_lines()
            if line.startswith("data: {")
        ]
    assert chunks and all(chunk["system_fingerprint"] == FINGERPRINT for chunk in chunks)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": "no"}, "store"),
        ({"metadata": {"team": 5}}, "metadata.team"),
        ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
        ({"service_tier": 1}, "service_tier"),
        ({"prompt_cache_key": ["a"]}, "prompt_cache_key"),
    ],
)
async def test_openais_own_fields_of_the_wrong_type_are_refused(
    client: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    error = await refusal(client, "/v1/chat/completions", {"messages": HI, **fields})
    assert error["param"] == param


@pytest.mark.parametrize(
    ("route", "fields", "param", "said"),
    [
        ("/v1/chat/completions", {"n": 2}, "n", "send n 1 or leave it out"),
        ("/v1/completions", {"n": 0}, "n", "send n 1 or leave it out"),
        ("/v1/chat/completions", {"max_tokens": 200_000}, "max_tokens", "131072 or less"),
        (
            "/v1/chat/completions",
            {"max_completion_tokens": 200_000},
            "max_completion_tokens",
            "leave 'max_completion_tokens' out",
        ),
        ("/v1/completions", {"n_predict": 200_000}, "n_predict", "keel's limit of 131072"),
        ("/v1/chat/completions", {"stop": ""}, "stop", "leave 'stop' out, or give non-empty"),
        ("/v1/completions", {"stop": ["\n", ""]}, "stop", "must not be empty"),
    ],
)
async def test_a_value_out_of_bounds_is_told_what_to_send(
    client: httpx.AsyncClient, route: str, fields: dict[str, Any], param: str, said: str
) -> None:
    """Bounds alone said "Input should be less than or equal to 1" (or 131072), and
    "stop sequences must not be empty", with no word of what to send."""
    body = {"messages": HI} if route == "/v1/chat/completions" else {"prompt": "def f("}
    error = await refusal(client, route, {**body, **fields})
    assert error["param"] == param
    assert said in error["message"]
    assert "Input should be" not in error["message"]
