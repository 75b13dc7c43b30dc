"""A request that does not arrive in time, and connections past what keel takes.

A connection that sent nothing, or a head or a body a byte at a time, was held open for
ever, and some thousands of them used every file descriptor: keel answered no one. Run
on keel's own HTTP server on a real loopback socket, the time limit shortened for the
test.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from tests.api.conftest import USER, Backends, build_app, listening

from keel.ops import http_limits
from keel.ops.http_limits import HeadLimitedProtocol
from keel.ops.server import FD_HEADROOM, OWN_FDS, max_connections

LIMIT = 0.5


@pytest.fixture
async def port(
    backends: Backends, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[int]:
    monkeypatch.setattr(http_limits, "REQUEST_SECONDS", LIMIT)
    app = build_app(tmp_path_factory.mktemp("slow") / "keel", backends.config())
    async with listening(app) as url:
        yield int(url.rsplit(":", 1)[1])


def answer_to(client: socket.socket, within: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    client.settimeout(within)
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received


def one_answer(client: socket.socket) -> bytes:
    """One whole answer (its head and ``Content-Length`` bytes of body) off a kept-alive
    connection: a recv may return part of it."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = client.recv(65536)
        if not chunk:  # closed before a whole head: the caller's assertion says so
            return received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += client.recv(65536)
    return head + b"\r\n\r\n" + body


def request(body: bytes = b"") -> bytes:
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {USER['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("sends", ["nothing", "half a head", "a head and half a body"])
async def test_a_request_that_does_not_arrive_in_time_is_a_408(port: int, sends: str) -> None:
    body = json.dumps({"input": "hello", "model": "x"}).encode()
    sent = {"nothing": b"", "half a head": request()[:20], "a head and half a body": request(body)}
    data = sent[sends][: -len(body) // 2] if sends.endswith("body") else sent[sends]
    started = time.monotonic()

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(data)
            return answer_to(client)

    answer = await asyncio.to_thread(run)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code": "request_timeout"' in answer
    assert time.monotonic() - started < LIMIT + 3


async def test_a_connection_kept_open_between_requests_is_not_timed(port: int) -> None:
    """The limit runs from a request's first byte: idle time between two requests on a
    kept-alive connection counts for neither."""
    body = json.dumps({"input": "hello", "model": "x"}).encode()

    def run() -> list[bytes]:
        answers = []
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.settimeout(5)
            for _ in range(2):
                client.sendall(request(body))
                answers.append(one_answer(client))
                time.sleep(LIMIT + 0.3)
        return answers

    answers = await asyncio.to_thread(run)
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers), answers


async def test_connections_past_the_cap_are_turned_away(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(HeadLimitedProtocol, "max_connections", 2)

    def run() -> bytes:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            with socket.create_connection(("127.0.0.1", port)) as extra:
                return answer_to(extra)
        finally:
            for client in held:
                client.close()

    key = (503, "too_many_connections")
    before = HeadLimitedProtocol.refusals.get(key, 0)
    answer = await asyncio.to_thread(run)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in answer and b'"code": "too_many_connections"' in answer
    assert HeadLimitedProtocol.refusals[key] == before + 1  # keel_http_refusals_total


def test_connections_leave_each_one_a_backend_socket_and_keel_its_own() -> None:
    """At a limit of 128, 64 clients took half and their 64 backend sockets the rest:
    keel's own "Too many open files" was counted against the model server."""
    for limit in (64, 128, 1024, 65536):
        taken = max_connections(limit)
        assert taken * FD_HEADROOM + OWN_FDS <= max(limit, 8 * FD_HEADROOM + OWN_FDS)
    assert max_connections(1024) == 480


async def test_a_body_too_slow_is_counted_as_its_408(port: int) -> None:
    """It was answered 408 and counted (metrics, access log) as the client's 499."""
    body = json.dumps({"input": "hello", "model": "x"}).encode()

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(request(body)[: -len(body) // 2])
            return answer_to(client)

    answer = await asyncio.to_thread(run)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"x-request-id: " in answer and b"cache-control: no-store" in answer
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(50):  # counted as the app's request ends (the connection's close)
            metrics = (await http.get("/metrics", headers=USER)).text
            if 'route="/v1/embeddings",status="408"' in metrics:
                break
            await asyncio.sleep(0.1)
    assert 'route="/v1/embeddings",status="408"' in metrics
    assert 'status="499"' not in metrics
