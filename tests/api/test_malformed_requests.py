"""A malformed request gets keel's error shape, after the answers before it.

uvicorn answered a request its parser refused with a plain-text ``400 Invalid HTTP
request received.`` written at once, and closed the connection: a pipelined request's
answer before it was lost (logged as a 499), and the 400 said nothing of what was
wrong. Run on keel's own HTTP server on a real loopback socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from tests.api.conftest import USER, Backends, build_app, listening

from keel.ops import http_limits

EMBED = json.dumps({"input": "hello", "model": "x"}).encode()


def post(body: bytes = EMBED, length: int | None = None, extra: str = "") -> bytes:
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {USER['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n"
    ).encode() + body


@pytest.fixture
async def url(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    app = build_app(tmp_path_factory.mktemp("malformed") / "keel", backends.config())
    async with listening(app) as base:
        yield base


async def exchange(url: str, data: bytes) -> bytes:
    """Everything keel sends for ``data`` until it closes the connection."""
    port = int(url.rsplit(":", 1)[1])

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.settimeout(10)
            client.sendall(data)
            received = b""
            while chunk := client.recv(65536):
                received += chunk
            return received

    return await asyncio.to_thread(run)


def answers(received: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers (each with a Content-Length) in ``received``."""
    found = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        length = int(headers["content-length"])
        found.append((int(lines[0].split()[1]), headers, rest[:length]))
        received = rest[length:]
    return found


async def refused(url: str, data: bytes, before: int = 0) -> tuple[int, dict[str, str], str]:
    """The refusal that follows ``before`` answers of 200: its status, headers, code."""
    got = answers(await exchange(url, data))
    assert [status for status, _, _ in got[:before]] == [200] * before, got
    assert len(got) == before + 1, got
    status, headers, body = got[-1]
    assert headers["content-type"] == "application/json", headers
    assert headers["cache-control"] == "no-store" and headers["x-request-id"], headers
    assert headers["connection"] == "close"
    return status, headers, json.loads(body)["error"]["code"]


async def test_a_malformed_request_after_a_good_one_is_answered_after_it(url: str) -> None:
    bad = b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n"
    status, _, code = await refused(url, post() + bad, before=1)
    assert (status, code) == (400, "invalid_http")


async def test_a_content_length_shorter_than_the_body_is_said(url: str) -> None:
    status, _, code = await refused(url, post(EMBED + b"0123456789", length=len(EMBED)), before=1)
    assert (status, code) == (400, "invalid_request_line")


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (post(extra="Content-Length: 3\r\n"), 400, "invalid_body_length"),
        (post(extra="Transfer-Encoding: chunked\r\n"), 400, "invalid_body_length"),
        (post(length=-1), 400, "invalid_body_length"),
        (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n" + EMBED + b"\r\n0\r\n\r\n",
            400,
            "invalid_chunked_body",
        ),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", 400, "invalid_http"),
        (b"GET /health HTTP/1.1\nHost: a\n\n", 400, "invalid_http"),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400, "invalid_http"),
        (b"GET /health HTTP/1.2\r\nHost: a\r\n\r\n", 505, "http_version_not_supported"),
        (b"FROB /health HTTP/1.1\r\nHost: a\r\n\r\n", 501, "method_not_implemented"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "http2_not_supported"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "tls_not_supported"),
    ],
    ids=[
        "duplicate-length",
        "length-and-chunked",
        "bad-length",
        "bad-chunk-size",
        "obs-fold",
        "bare-lf",
        "nul",
        "http-1.2",
        "unknown-method",
        "h2c",
        "tls",
    ],
)
async def test_each_malformed_request_is_named(
    url: str, data: bytes, status: int, code: str
) -> None:
    got, _, said = await refused(url, data)
    assert (got, said) == (status, code)


async def test_refusals_are_counted(url: str) -> None:
    before = http_limits.HeadLimitedProtocol.refusals.get((501, "method_not_implemented"), 0)
    await refused(url, b"FROB /health HTTP/1.1\r\nHost: a\r\n\r\n")
    async with httpx.AsyncClient(base_url=url) as http:
        metrics = (await http.get("/metrics", headers=USER)).text
    line = 'keel_http_refusals_total{code="method_not_implemented",status="501"}'
    assert f"{line} {before + 1}.0" in metrics, metrics


async def test_a_refusal_is_logged_by_keel_with_its_client(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="keel.http"):
        await refused(url, b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n")
    lines = [record.getMessage() for record in caplog.records if record.name == "keel.http"]
    assert any("127.0.0.1:" in line and "400 invalid_http" in line for line in lines), lines
    assert not any("Invalid HTTP request" in record.getMessage() for record in caplog.records)


async def test_an_h2c_upgrade_is_served_over_http_1_1_unsaid(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``curl --http2`` asks every request to upgrade to h2c: uvicorn warned each time."""
    upgrade = (
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
    )
    data = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + upgrade + b"Connection: close\r\n\r\n"
    with caplog.at_level("WARNING"):
        received = await exchange(url, data)
    assert received.startswith(b"HTTP/1.1 200 "), received
    assert not [record for record in caplog.records if "upgrade" in record.getMessage()]


async def test_an_http_1_0_client_gets_no_interim_answer(url: str) -> None:
    """A 1.0 client cannot read ``100 Continue`` (RFC 9110 15.2): its expectation is
    ignored, and it is answered when its body is in."""
    port = int(url.rsplit(":", 1)[1])
    head = (
        post()
        .replace(b"HTTP/1.1", b"HTTP/1.0")
        .replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n", 1)
    )
    head, body = head[: -len(EMBED)], EMBED

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.settimeout(1.0)
            client.sendall(head)
            try:
                early = client.recv(65536)
            except TimeoutError:
                early = b""
            client.settimeout(10)
            client.sendall(body)
            return early + client.recv(65536)

    received = await asyncio.to_thread(run)
    assert not received.startswith(b"HTTP/1.1 100"), received
    assert received.startswith(b"HTTP/1.1 200 "), received
