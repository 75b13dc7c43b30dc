"""Over-limit bodies are a 413 in the one error shape, declared or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from keel.api.middleware import CorsPolicy, KeelMiddleware


async def echo_size(scope: Scope, receive: Receive, send: Send) -> None:
    body = await Request(scope, receive).body()
    await JSONResponse({"size": len(body)})(scope, receive, send)


def client() -> httpx.AsyncClient:
    app = KeelMiddleware(echo_size, max_body_bytes=10, cors=CorsPolicy([]))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")


def assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and error["type"] == "invalid_request_error"


async def test_a_body_under_the_limit_passes() -> None:
    async with client() as http:
        response = await http.post("/", content=b"0123456789")
    assert response.json() == {"size": 10}


async def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    async with client() as http:
        assert_413(await http.post("/", content=b"x" * 11))


async def test_a_streamed_body_over_the_limit_is_refused() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 6

    async with client() as http:
        assert_413(await http.post("/", content=chunks()))
