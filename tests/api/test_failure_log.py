"""What keel's log says of a request it failed: one line, with why; and a readiness
probe told "not ready" is an answer, not a failure."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from tests.api.conftest import USER, Backends, build_app, serving
from tests.api.test_public_routes import leaky_root  # noqa: F401 - a fixture
from tests.fakes.upstreams import Behaviour

from keel.api.errors import LoggedOnce
from keel.ops.logging import TextFormatter

ASK = {"messages": [{"role": "user", "content": "Hi"}]}


def said(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


async def test_a_failed_request_is_one_warning_that_says_why(
    client: httpx.AsyncClient, backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    """Each failed request wrote two WARNINGs, the error (keel.api) and the access line
    (keel.access): through an outage, the cause on one line and the request on the next."""
    backends.fallback.behave(Behaviour.error(500, "out of KV cache slots"))  # chat's backend
    try:
        with caplog.at_level(logging.INFO, logger="keel"):
            response = await client.post("/v1/chat/completions", json=ASK, headers=USER)
    finally:
        backends.fallback.reset_behaviour()
    assert response.status_code >= 500, response.text
    [line] = [line for line in said(caplog, logging.WARNING) if "routed around" not in line]
    assert line.startswith("POST /v1/chat/completions -> "), line
    assert response.json()["error"]["message"] in line, line
    assert "out of KV cache slots" in line, line


async def test_a_readiness_probe_told_not_ready_is_no_warning(
    backends: Backends,
    leaky_root: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A probe every few seconds wrote a WARNING each for as long as a role was down."""
    app = build_app(leaky_root, backends.config(local_embedding="broken"))
    async with serving(app) as client:
        for _ in range(200):  # the broken model's worker starts, fails and is given up
            ready = await client.get("/ready", headers=USER)
            if ready.json()["roles"]["embedding"]["state"] == "failed":
                break
            await asyncio.sleep(0.05)
        with caplog.at_level(logging.INFO, logger="keel.access"):
            assert (await client.get("/ready")).status_code == 503
    assert any("GET /ready -> 503" in line for line in said(caplog, logging.INFO))
    assert not [line for line in said(caplog, logging.WARNING) if "/ready" in line]


async def test_an_unexpected_error_is_logged_once_under_its_request_id(app: FastAPI) -> None:
    """keel's last resort logged the traceback under no request id (it runs outside the
    middleware that sets it), and the server logged it again, a second traceback."""

    async def broken() -> None:
        raise RuntimeError("a bug")

    class Lines(logging.Handler):
        """Each record as the text log writes it, when it is written."""

        def __init__(self) -> None:
            super().__init__()
            self.setFormatter(TextFormatter("%(levelname)s %(message)s"))
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info:
                self.lines.append(self.format(record))

    lines = Lines()
    app.add_api_route("/broken", broken)
    logging.getLogger().addHandler(lines)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=LoggedOnce(app))  # as keel serve runs it
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
                response = await http.get("/broken", headers={"X-Request-Id": "req-42"})
    finally:
        logging.getLogger().removeHandler(lines)
    assert response.status_code == 500
    assert response.json()["error"]["message"].startswith("internal error"), response.text
    [line] = lines.lines
    assert line.startswith("ERROR [request req-42] unexpected error"), line
