"""Over-limit bodies are a 413 in the one error shape, declared or streamed: read and
dropped first up to four times the limit (the client then reads the answer on an open
connection), refused unread beyond it (the connection closed)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.api.errors import error_response
from keel.api.middleware import CorsPolicy, KeelMiddleware
from keel.errors import KeelError


async def echo_size(scope: Scope, receive: Receive, send: Send) -> None:
    body = await Request(scope, receive).body()
    await JSONResponse({"size": len(body)})(scope, receive, send)


async def answering_errors(scope: Scope, receive: Receive, send: Send) -> None:
    """``echo_size`` with keel's own errors answered by the app, as keel's app does."""
    try:
        await echo_size(scope, receive, send)
    except KeelError as exc:
        await error_response(exc)(scope, receive, send)


class Client(httpx.AsyncClient):
    """Through the middleware with a 10-byte limit; ``sent``: the body bytes the
    middleware and the app took from the request."""

    def __init__(self, app: ASGIApp = echo_size) -> None:
        self.sent = 0

        async def counting(scope: Scope, receive: Receive, send: Send) -> None:
            async def counted() -> Message:
                message = await receive()
                self.sent += len(message.get("body", b""))
                return message

            await middleware(scope, counted, send)

        middleware = KeelMiddleware(app, max_body_bytes=10, cors=CorsPolicy([]))
        super().__init__(transport=httpx.ASGITransport(app=counting), base_url="http://localhost")


def assert_413(response: httpx.Response, *, closed: bool = False) -> None:
    assert response.status_code == 413
    assert (response.headers.get("connection") == "close") is closed
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and error["type"] == "invalid_request_error"


async def test_a_body_under_the_limit_passes() -> None:
    async with Client() as http:
        response = await http.post("/", content=b"0123456789")
    assert response.json() == {"size": 10}


async def test_a_declared_length_over_the_limit_is_read_then_refused() -> None:
    async with Client() as http:
        assert_413(await http.post("/", content=b"x" * 40))
        assert http.sent == 40


async def test_a_declared_length_past_four_times_the_limit_is_refused_unread() -> None:
    async with Client() as http:
        assert_413(await http.post("/", content=b"x" * 41), closed=True)
        assert http.sent == 0


async def test_a_body_the_client_waits_to_send_is_refused_before_it_is_sent() -> None:
    """``Expect: 100-continue`` (curl's way with a body over 1 MB): the 413 comes before
    the client is told to go on, so the body is never sent; reading it made curl upload
    all of it first (12 MiB, to be dropped)."""
    async with Client() as http:
        response = await http.post("/", content=b"x" * 20, headers={"Expect": "100-continue"})
        assert_413(response, closed=True)
        assert http.sent == 0


@pytest.mark.parametrize(
    ("chunks", "sent", "closed"),
    [
        (3, 18, False),  # read to its end, then refused
        (10, 42, True),  # read up to the chunk that went past 40 bytes, then refused
    ],
)
@pytest.mark.parametrize("app", [echo_size, answering_errors], ids=["raised", "answered"])
async def test_a_streamed_body_over_the_limit_is_refused(
    chunks: int, sent: int, closed: bool, app: ASGIApp
) -> None:
    """Answered by the app (as keel's app answers its errors), the 413 came at once with
    its own words, and the rest of the body was read however long (2 GB, in 1.8 s), the
    connection kept."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield b"x" * 6

    async with Client(app) as http:
        response = await http.post("/", content=body())
        assert_413(response, closed=closed)
        assert "(server.max_body_bytes); send less context" in response.json()["error"]["message"]
        assert http.sent == sent
