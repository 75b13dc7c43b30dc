"""``[auth] public_metrics``: a scrape without a key (Kubernetes' annotation-based
scraping cannot send one), and nothing else opened; off by default."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from tests.api.conftest import USER, Backends, build_app


@pytest.mark.parametrize("public", [False, True])
async def test_metrics_without_a_key_only_when_asked(
    backends: Backends, tmp_path: Path, public: bool
) -> None:
    config = backends.config().replace(
        "[auth]\n", f"[auth]\npublic_metrics = {str(public).lower()}\n"
    )
    app = build_app(tmp_path / "keel", config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel") as client:
            scrape = await client.get("/metrics")
            assert scrape.status_code == (200 if public else 401), scrape.text
            assert (await client.get("/metrics", headers=USER)).status_code == 200
            for path in ("/v1/models", "/v1/providers", "/v1/stats"):
                assert (await client.get(path)).status_code == 401, path
