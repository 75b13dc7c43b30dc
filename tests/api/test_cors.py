"""A web page may call keel from a browser when its origin is allowed: the preflight is
answered, and the answer carries the grant (and keel's own headers, readable)."""

from __future__ import annotations

import json
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
    exposed = answer.headers["access-control-expose-headers"]
    # Retry-After is not one a browser shows a page unless exposed: a chat UI talking to
    # keel directly never saw when to retry after a 429 or 503
    assert "X-Keel-Provider" in exposed and "Retry-After" in exposed, exposed
    assert "Origin" in answer.headers["vary"]
    # a local dev server over TLS, and one at 0.0.0.0 (a local Host to keel): refused
    for local in ("https://localhost:3000", "http://0.0.0.0:3000", "https://[::1]:5173"):
        asked = await default.options("/v1/chat/completions", headers=preflight(local))
        assert asked.status_code == 204, (local, asked.text)


async def test_another_sites_page_gets_no_grant(default: httpx.AsyncClient) -> None:
    """A site the user visits must not read keel's answers: no grant, and its preflight
    is a 403 naming the setting (the browser then blocks the call)."""
    origin = "https://evil.example"
    asked = await default.options("/v1/chat/completions", headers=preflight(origin))
    assert asked.status_code == 403, asked.text
    assert "server.cors_allowed_origins" in asked.json()["error"]["message"]
    assert "access-control-allow-origin" not in asked.headers
    # A request browsers send without a preflight (text/plain) is refused all the same:
    # it was served (unread by the page), so any site drove a keel with no keys (CSRF).
    sent = {**USER, "Origin": origin, "content-type": "text/plain;charset=UTF-8"}
    answer = await default.post("/v1/chat/completions", content=json.dumps(CHAT), headers=sent)
    assert answer.status_code == 403, answer.text
    assert "server.cors_allowed_origins" in answer.json()["error"]["message"]
    assert "access-control-allow-origin" not in answer.headers
    plain = await default.post("/v1/chat/completions", json=CHAT, headers=USER)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    # keel's own pages (the status page's playground) send its own origin
    own = await default.post(
        "/v1/chat/completions", json=CHAT, headers={**USER, "Origin": "http://keel"}
    )
    assert own.status_code == 200, own.text


async def test_with_no_keys_only_requests_addressed_to_loopback_are_served(
    backends: Backends, tmp_path: Path
) -> None:
    """DNS rebinding: a page that points its own name at 127.0.0.1 is same-origin with
    keel to its browser, and read and drove a keel with no keys. Names no page can be
    served from pass: 0.0.0.0 (Twinny's default host got 403 on every request)."""
    config = backends.config()
    auth = config.index("[auth]")
    config = config[:auth] + config[config.index("[model.completion]") :]  # no keys
    app = build_app(tmp_path / "keel", config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        for host, status in (
            ("rebind.attacker.example:8080", 403),
            ("127.attacker.example:8080", 403),  # a name, not a loopback address
            ("[::1", 403),
            ("localhost:8080", 200),
            ("127.0.0.1:8080", 200),
            ("[::1]:8080", 200),
            ("0.0.0.0:8080", 200),  # Twinny's default host
            ("localhost.:8080", 200),
            ("0.0.0.0.attacker.example:8080", 403),
        ):
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
                answer = await http.get("/v1/providers", headers={"host": host})
                assert answer.status_code == status, (host, answer.text)
                if status == 403:
                    assert "configure [auth] api_keys" in answer.json()["error"]["message"]
                # the public routes' details too (worker PIDs, model paths, errors), and
                # the deep check's timeout: a rebound page read and chose them
                ready = (await http.get("/ready", headers={"host": host})).json()
                assert ("provider" in json.dumps(ready)) is (status == 200), (host, ready)
                deep = await http.get("/health/deep?timeout=0.5", headers={"host": host})
                assert ("provider" in deep.text) is (status == 200), (host, deep.text)


@pytest.mark.parametrize(
    ("forwarded", "served"),
    [
        ({"x-forwarded-for": "203.0.113.5"}, False),
        ({"x-forwarded-for": "127.0.0.1, 203.0.113.5"}, False),
        ({"x-real-ip": "203.0.113.5"}, False),
        ({"forwarded": 'for="[2001:db8:cafe::17]:4711";proto=https'}, False),
        ({"forwarded": "for=unknown"}, False),  # a proxy hiding who: not this machine
        ({"x-forwarded-for": "127.0.0.1"}, True),  # for a client on this machine
        ({"forwarded": "for=127.0.0.1:5000;by=203.0.113.1"}, True),
        ({"x-forwarded-for": "[::1]:8080"}, True),
        ({"x-forwarded-for": "::ffff:127.0.0.1"}, True),  # a dual-stack proxy's local client
        ({"x-forwarded-for": "::ffff:203.0.113.5"}, False),
    ],
)
async def test_with_no_keys_a_request_a_proxy_forwarded_for_another_is_refused(
    backends: Backends, tmp_path: Path, forwarded: dict[str, str], served: bool
) -> None:
    """A keyless keel behind nginx on the same machine (``proxy_pass`` to 127.0.0.1, the
    Host rewritten to it) answered anyone the proxy let through, admin routes included
    (a reload, 200). The proxy's forwarding headers say for whom it asked."""
    config = backends.config()
    config = config[: config.index("[auth]")] + config[config.index("[model.completion]") :]
    app = build_app(tmp_path / "keel", config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            answer = await http.get("/v1/providers", headers=forwarded)
            assert answer.status_code == (200 if served else 403), answer.text
            if not served:
                message = answer.json()["error"]["message"]
                assert "forwarded" in message and "configure [auth] api_keys" in message
            ready = (await http.get("/ready", headers=forwarded)).json()
            assert ("provider" in json.dumps(ready)) is served, ready
    if served:
        return
    allowed = config + "\n[auth]\nallow_unauthenticated_remote = true\n"
    app = build_app(tmp_path / "allowed", allowed)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            assert (await http.get("/v1/providers", headers=forwarded)).status_code == 200


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
