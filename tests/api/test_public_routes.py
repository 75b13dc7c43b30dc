"""Public routes leak nothing: with keys configured, a caller without one learns the status
and a one-word state per role, never a filesystem path, a PID or an upstream URL."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route
from tests.api.conftest import USER, Backends, build_app

from keel.api.access import DOCS_PATHS, declared_access
from keel.auth import Access

DETAIL_KEYS = {"pid", "model", "last_error", "error", "provider", "generation", "restarts"}


def json_keys_and_ints(value: Any) -> tuple[set[str], set[int]]:
    keys: set[str] = set()
    ints: set[int] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(key)
            more_keys, more_ints = json_keys_and_ints(item)
            keys |= more_keys
            ints |= more_ints
    elif isinstance(value, list):
        for item in value:
            more_keys, more_ints = json_keys_and_ints(item)
            keys |= more_keys
            ints |= more_ints
    elif isinstance(value, int) and not isinstance(value, bool):
        ints.add(value)
    return keys, ints


@pytest.fixture
def leaky_root(tmp_path: Path) -> Path:
    """A data root whose embedding model is a broken GGUF file: its worker starts (a PID),
    fails (an error text naming the file) and reports the model's path."""
    root = tmp_path / "keel"
    model = root / "models" / "broken.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"GGUF" + b"\0" * 64)
    return root


async def test_public_routes_show_no_path_pid_or_upstream_url(
    backends: Backends, leaky_root: Path
) -> None:
    app = build_app(leaky_root, backends.config(local_embedding="broken"))
    public = [
        (route.path, method)
        for route in app.routes
        if declared_access(route) is Access.PUBLIC and isinstance(route, Route)
        for method in sorted(route.methods or ())
        if method != "HEAD"
    ]
    assert {("/health", "GET"), ("/ready", "GET"), ("/health/deep", "GET")} <= set(public)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            # Wait until the broken worker has started and given up: a PID and an error exist.
            for _ in range(200):
                embedding = (await client.get("/ready", headers=USER)).json()["roles"]["embedding"]
                if embedding["state"] == "failed" and embedding["last_error"]:
                    break
                await asyncio.sleep(0.05)
            # No worker runs once given up (its pid is gone): keel's own is the one not to show
            assert embedding["pid"] is None and str(leaky_root) in embedding["model"]
            pid = os.getpid()
            deep = (await client.get("/health/deep", headers=USER)).json()
            assert str(leaky_root) in deep["roles"]["embedding"]["error"]

            urls = [backends.primary.url, backends.fallback.url]
            secrets = [str(leaky_root), *urls, *(url.removeprefix("http://") for url in urls)]
            for path, method in public:
                for headers in ({}, {"Authorization": "Bearer not-a-key"}):
                    response = await client.request(method, path, headers=headers)
                    assert response.status_code < 500 or path in ("/ready", "/health/deep")
                    for secret in secrets:
                        assert secret not in response.text, (path, secret)
                    if path in DOCS_PATHS:  # the API's own description: no state in it
                        continue
                    if response.headers.get("content-type", "").startswith("application/json"):
                        keys, ints = json_keys_and_ints(response.json())
                        assert not keys & DETAIL_KEYS, (path, keys & DETAIL_KEYS)
                        assert pid not in ints, path
                    else:
                        assert not re.search(rf"\b{pid}\b", response.text), path

            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["roles"]["embedding"] == {"usable": False, "state": "failed"}
            assert ready.json()["roles"]["chat"] == {"usable": True, "state": "ok"}
            deep = await client.get("/health/deep")
            assert deep.status_code == 503
            assert deep.json()["roles"]["embedding"]["ok"] is False


async def test_a_path_cannot_write_a_line_of_its_own_into_the_log(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The access log wrote the decoded path: "%0a" in a URL forged a log line."""
    forged = "/x%0a2026-12-02%2009:00:00,000%20WARNING%20keel.auth:%20admin%20key%20accepted"
    with caplog.at_level(logging.INFO, logger="keel.access"):
        assert (await client.get(forged)).status_code in (401, 404)
    lines = [r.getMessage() for r in caplog.records if r.name == "keel.access"]
    assert lines and all("\n" not in line for line in lines), lines
    assert any("/x%0a2026" in line for line in lines), lines


async def test_a_short_deep_health_timeout_is_the_callers_alone(
    client: httpx.AsyncClient,
) -> None:
    """Anyone could ask ``/health/deep?timeout=0.0001``: every role failed, the finding was
    kept for the ttl, shown to every caller and set ``keel_health_check_ok`` to 0, again
    every 15 s. A caller without a key gets the default; a key's holder gets a fresh answer
    to the shorter question, kept by no one."""
    anonymous = await client.get("/health/deep", params={"timeout": 0.0001})
    assert anonymous.status_code == 200, anonymous.text
    mine = await client.get("/health/deep", params={"timeout": 0.0001}, headers=USER)
    assert mine.status_code == 503
    assert all(not finding["ok"] for finding in mine.json()["roles"].values())
    assert (await client.get("/health/deep")).status_code == 200
    metrics = (await client.get("/metrics", headers=USER)).text
    assert re.findall(r"^keel_health_check_ok\{.*\} (\S+)$", metrics, re.M)
    assert set(re.findall(r"^keel_health_check_ok\{.*\} (\S+)$", metrics, re.M)) == {"1.0"}
