"""Shutdown stops every worker keel started, including one a reload has just retired
(its close waits for the requests in flight; shutdown cuts the wait, not the close)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.api.conftest import ADMIN, USER, Backends, build_app, serving

from keel.config import EMBEDDED_MODEL_ID


async def test_a_loaded_model_retired_by_a_reload_is_stopped_at_shutdown(
    backends: Backends, tmp_path: Path
) -> None:
    app = build_app(tmp_path / "keel", backends.config())
    async with serving(app) as client:
        body = {"model_name": EMBEDDED_MODEL_ID, "role": "chat"}
        loaded = await client.post("/v1/model/load", json=body, headers=ADMIN, timeout=60)
        assert loaded.status_code == 200, loaded.text
        pid = (await client.get("/ready", headers=USER)).json()["roles"]["chat"]["pid"]
        os.kill(pid, 0)  # the loaded model's worker runs
        reloaded = await client.post("/v1/admin/reload", headers=ADMIN)
        assert reloaded.status_code == 200, reloaded.text  # the config has no such model
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped, not left running
