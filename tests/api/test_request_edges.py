"""Requests keel served wrongly or said too little of: a browser editor's origins, Host
headers missing or doubled, a compressed chunked body, a 405's Allow, a doubled slash."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import Backends, build_app, listening
from tests.api.test_cors import keel_with, preflight
from tests.api.test_malformed_requests import exchange

from keel.errors import ConfigError


@pytest.fixture
async def editors(backends: Backends, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    origins = '["https://*.vscode-cdn.net", "https://vscode.dev:443"]'
    async for client in keel_with(backends, tmp_path / "keel", origins):
        yield client


@pytest.mark.parametrize(
    "origin", ["https://vscode.dev", "https://abc123.vscode-cdn.net", "https://a.b.vscode-cdn.net"]
)
async def test_a_browser_editors_origins_are_allowed(
    editors: httpx.AsyncClient, origin: str
) -> None:
    asked = await editors.options("/v1/chat/completions", headers=preflight(origin))
    assert asked.status_code == 204, asked.text
    assert asked.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("origin", ["https://vscode-cdn.net.evil.com", "http://a.vscode-cdn.net"])
async def test_a_wildcard_allows_only_its_subdomains(
    editors: httpx.AsyncClient, origin: str
) -> None:
    asked = await editors.options("/v1/chat/completions", headers=preflight(origin))
    assert asked.status_code == 403, asked.text


def test_a_wildcard_elsewhere_is_refused(backends: Backends, tmp_path: Path) -> None:
    config = backends.config().replace(
        "[server]\n", '[server]\ncors_allowed_origins = ["https://chat.*.com"]\n'
    )
    with pytest.raises(ConfigError, match=r"scheme://host\[:port\]"):
        build_app(tmp_path / "keel", config)


def error_of(received: bytes) -> tuple[int, str, str]:
    head, _, body = received.partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    return int(head.split()[1]), error["code"], error["message"]


@pytest.fixture
async def url(backends: Backends, tmp_path: Path) -> AsyncIterator[str]:
    async with listening(build_app(tmp_path / "keel", backends.config(keys=False))) as base:
        yield base


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_request_without_host_is_told_to_send_one(url: str, version: str) -> None:
    received = await exchange(
        url, f"GET /v1/models HTTP/{version}\r\nConnection: close\r\n\r\n".encode()
    )
    status, code, message = error_of(received)
    assert (status, code) == (400, "missing_host"), received
    assert "Host" in message


async def test_two_hosts_are_refused(url: str) -> None:
    data = (
        b"GET /v1/models HTTP/1.1\r\nHost: evil.com\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    status, code, _ = error_of(await exchange(url, data))
    assert (status, code) == (400, "invalid_host")


async def test_a_compressed_chunked_body_is_a_415(url: str) -> None:
    body = b'{"messages":[{"role":"user","content":"hi"}]}'
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    status, code, message = error_of(await exchange(url, data))
    assert (status, code) == (415, "unsupported_encoding")
    assert "compressed" in message


async def test_a_405_allows_head_where_get_is_served(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.patch("/health")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert "GET or HEAD" in answer.json()["error"]["message"]


async def test_a_doubled_slash_is_said(url: str) -> None:
    body = b'{"prompt": "x"}'
    data = (
        b"POST //v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status, code, message = error_of(await exchange(url, data))
    assert (status, code) == (404, "not_found")
    assert "doubled slash" in message and "trailing slash" in message
