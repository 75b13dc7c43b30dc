"""A reload never opens keel to anyone: on an address beyond loopback, a config without
keys is refused as `keel serve` refuses it, and so is a config file gone missing (read as
all defaults, it dropped every key). The running keys stay in force."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from tests.api.conftest import ADMIN, USER, Backends, build_app

KEYLESS = """
[model.completion]
embedded_last_resort = false
"""


@pytest.mark.parametrize("change", ["keys dropped", "file removed"])
async def test_a_reload_that_would_open_a_remote_keel_is_refused(
    backends: Backends, tmp_path: Path, change: str
) -> None:
    root = tmp_path / "keel"
    app = build_app(root, backends.config(), host="0.0.0.0")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel") as client:
            assert (await client.get("/v1/models")).status_code == 401
            if change == "keys dropped":
                (root / "config.toml").write_text(backends.config().split("[auth]")[0] + KEYLESS)
                expected = "would serve anyone"
            else:
                (root / "config.toml").unlink()
                expected = "does not exist"
            refused = await client.post("/v1/admin/reload", headers=ADMIN)
            assert refused.status_code == 422, refused.text
            assert expected in refused.text
            assert (await client.get("/v1/models")).status_code == 401
            assert (await client.get("/v1/models", headers=USER)).status_code == 200


async def test_on_loopback_a_keyless_reload_applies(backends: Backends, tmp_path: Path) -> None:
    root = tmp_path / "keel"
    app = build_app(root, backends.config(), host="127.0.0.1")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel") as client:
            (root / "config.toml").write_text(backends.config().split("[auth]")[0] + KEYLESS)
            applied = await client.post("/v1/admin/reload", headers=ADMIN)
            assert applied.status_code == 200, applied.text
            assert (await client.get("/v1/models")).status_code == 200


async def test_a_reload_naming_a_missing_model_file_is_the_admins_422(
    backends: Backends, tmp_path: Path
) -> None:
    root = tmp_path / "keel"
    app = build_app(root, backends.config())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel") as client:
            missing = '\n[[model.chat.fallback]]\nmodel_id = "no-such-model"\n'
            (root / "config.toml").write_text(backends.config() + missing)
            refused = await client.post("/v1/admin/reload", headers=ADMIN)
            assert refused.status_code == 422, refused.text
            assert "no-such-model" in refused.text
