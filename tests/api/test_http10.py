"""An HTTP/1.0 client gets a stream it can read: no chunked framing (RFC 9112 section
6.1 forbids it for a 1.0 request), the body as is, ended by the connection's close.
uvicorn chunked it, and the client (ApacheBench, a proxy speaking 1.0 upstream, as
nginx does by default) read the chunk sizes as part of the text. On keel's own server,
over a real loopback socket."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
from tests.api.conftest import USER_KEY, Backends, build_app, listening

STREAM = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}


@pytest.fixture
async def port(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[int]:
    app = build_app(tmp_path_factory.mktemp("http10") / "keel", backends.config())
    async with listening(app) as url:
        yield int(url.rsplit(":", 1)[1])


def ask(port: int, version: bytes, path: str, body: dict[str, object]) -> tuple[bytes, bytes]:
    """The head and body of the answer to one request, read until the server closes."""
    data = json.dumps(body).encode()
    head = (
        b"POST %s HTTP/%s\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (path.encode(), version, USER_KEY.encode(), len(data))
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(head + data)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    answer_head, _, answer_body = received.partition(b"\r\n\r\n")
    return answer_head.lower(), answer_body


async def test_a_stream_to_an_http_1_0_client_is_not_chunked(port: int) -> None:
    head, body = await asyncio.to_thread(ask, port, b"1.0", "/v1/chat/completions", STREAM)
    assert head.startswith(b"http/1.1 200"), head
    assert b"transfer-encoding" not in head and b"connection: close" in head, head
    events = [line for line in body.split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]", body
    assert all(event.startswith(b"data: ") for event in events), body  # no chunk sizes
    # HTTP/1.1 keeps its chunked stream; a JSON answer its length, either way
    head, body = await asyncio.to_thread(ask, port, b"1.1", "/v1/chat/completions", STREAM)
    assert b"transfer-encoding: chunked" in head, head
    plain = {**STREAM, "stream": False}
    head, body = await asyncio.to_thread(ask, port, b"1.0", "/v1/chat/completions", plain)
    assert b"content-length: %d" % len(body) in head and json.loads(body)["choices"], head
