"""A web page may call keel from a browser when its origin is allowed: the preflight is
answered, and the answer carries the grant (and keel's own headers, readable)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import USER, Backends, build_app

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def keel_with(
    backends: Backends, root: Path, origins: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    config = backends.config()
    if origins is not None:
        config = config.replace("[server]\n", f"[server]\ncors_allowed_origins = {origins}\n")
    app = build_app(root, config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel") as http:
            yield http


@pytest.fixture
async def default(backends: Backends, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for client in keel_with(backends, tmp_path / "keel", None):
        yield client


async def test_a_page_on_this_machine_may_call_keel_by_default(
    default: httpx.AsyncClient,
) -> None:
    origin = "http://localhost:3000"  # a chat UI served here, any port
    asked = await default.options("/v1/chat/completions", headers=preflight(origin))
    assert asked.status_code == 204, asked.text
    assert asked.headers["access-control-allow-origin"] == origin
    assert "POST" in asked.headers["access-control-allow-methods"]
    assert asked.headers["access-control-allow-headers"] == "authorization, content-type"
    answer = await default.post(
        "/v1/chat/completions", json=CHAT, headers={**USER, "Origin": "http://127.0.0.1:8000"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == "http://127.0.0.1:8000"
    assert "X-Keel-Provider" in answer.headers["access-control-expose-headers"]
    assert "Origin" in answer.headers["vary"]


async def test_another_sites_page_gets_no_grant(default: httpx.AsyncClient) -> None:
    """A site the user visits must not read keel's answers: no grant, and its preflight
    is a 403 naming the setting (the browser then blocks the call)."""
    origin = "https://evil.example"
    asked = await default.options("/v1/chat/completions", headers=preflight(origin))
    assert asked.status_code == 403, asked.text
    assert "server.cors_allowed_origins" in asked.json()["error"]["message"]
    assert "access-control-allow-origin" not in asked.headers
    answer = await default.post(
        "/v1/chat/completions", json=CHAT, headers={**USER, "Origin": origin}
    )
    assert answer.status_code == 200  # served (a browser would not let the page read it)
    assert "access-control-allow-origin" not in answer.headers
    plain = await default.post("/v1/chat/completions", json=CHAT, headers=USER)
    assert "access-control-allow-origin" not in plain.headers  # no Origin: no CORS


@pytest.mark.parametrize(
    ("origins", "origin", "granted"),
    [
        ('["*"]', "https://anywhere.example", True),
        ('["https://chat.example.com"]', "https://chat.example.com", True),
        ('["https://chat.example.com"]', "https://chat.example.com:8443", True),
        ('["https://chat.example.com:8443"]', "https://chat.example.com", False),
        ('["https://chat.example.com"]', "http://chat.example.com", False),
        ("[]", "http://localhost:3000", False),
    ],
)
async def test_the_allowed_origins_are_configured(
    backends: Backends, tmp_path: Path, origins: str, origin: str, granted: bool
) -> None:
    async for client in keel_with(backends, tmp_path / "keel", origins):
        asked = await client.options("/v1/embeddings", headers=preflight(origin))
        assert asked.status_code == (204 if granted else 403), asked.text
        assert (asked.headers.get("access-control-allow-origin") == origin) is granted
