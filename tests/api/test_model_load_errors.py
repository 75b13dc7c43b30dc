"""``POST /v1/model/load`` of a model that is not there, or not a model: the error names
``model_name`` whatever its status (a 404 had ``param: null``, its 400 ``model_name``), and
says what was given and what is expected. No model is loaded here."""

from __future__ import annotations

from pathlib import Path

import httpx
from tests.api.conftest import ADMIN, Backends, build_app, serving


async def load(http: httpx.AsyncClient, model_name: str) -> httpx.Response:
    body = {"model_name": model_name, "role": "completion", "stream": False}
    return await http.post("/v1/model/load", json=body, headers=ADMIN)


async def test_a_model_not_found_or_not_a_model_names_model_name(
    backends: Backends, tmp_path: Path
) -> None:
    root = tmp_path / "keel"
    app = build_app(root, backends.config())
    (root / "models").mkdir()
    text = root / "models" / "notes.gguf"
    text.write_text("not a model\n")
    async with serving(app) as http:
        missing = await load(http, "no-such-model")
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["param"] == "model_name", missing.json()

        directory = await load(http, str(root / "models"))
        assert directory.status_code == 404, directory.text
        error = directory.json()["error"]
        assert error["param"] == "model_name"
        assert "is a directory" in error["message"] and "a .gguf file" in error["message"]
        assert "keel models pull" not in error["message"], error

        unusable = await load(http, "notes")
        assert unusable.status_code == 400, unusable.text
        assert unusable.json()["error"]["param"] == "model_name"
