"""A route keel does not serve is a 404 in the one error shape that says where to go,
where the path tells what the client meant: OpenAI's Responses API (the openai SDK's
``responses.create``), Mistral's FIM route, a base URL that ends in ``/v1`` and a
client that adds its own."""

from __future__ import annotations

import httpx
import pytest
from tests.api.conftest import USER


@pytest.mark.parametrize(
    ("method", "path", "said"),
    [
        ("POST", "/v1/responses", "does not serve OpenAI's Responses API"),
        ("GET", "/v1/responses/resp_1", "send the conversation to POST /v1/chat/completions"),
        ("POST", "/v1/fim/completions", "POST /v1/completions"),
        ("POST", "/v1/fim/completions", "as suffix"),
        ("POST", "/v1/v1/chat/completions", "drop one /v1 from the client's base URL"),
        ("GET", "/v1/v1/models", "the route is /v1/models"),
        ("GET", "/v1/no-such-thing", "no such route; see GET /docs for the API"),
    ],
)
async def test_an_unserved_route_says_where_to_go(
    client: httpx.AsyncClient, method: str, path: str, said: str
) -> None:
    body = {"model": "keel", "input": "hi", "prompt": "def f(", "suffix": "\n"}
    response = await client.request(
        method, path, json=body if method == "POST" else None, headers=USER
    )
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert said in error["message"], error
    assert set(error) == {"message", "type", "code", "param"}
