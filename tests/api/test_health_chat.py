"""Which chat model ``/v1/health`` names: what Tabby's clients offer chat features on."""

from __future__ import annotations

from pathlib import Path

import httpx
from tests.api.conftest import USER, Backends, build_app, model_file, serving


async def test_a_remote_chat_model_is_named_without_a_device(client: httpx.AsyncClient) -> None:
    health = (await client.get("/v1/health", headers=USER)).json()
    assert health["chat_model"] == "fallback-chat"
    assert health["models"]["chat"]["remote"]["model_name"] == "fallback-chat"  # Tabby's shape
    assert "chat_device" not in health, "a remote model runs on no device of keel's"
    # IntelliJ's and Eclipse's plugins load <endpoint>/chat as their chat panel unless
    # it is null; keel has no such page (it answered them a 404 as the panel).
    assert "webserver" not in health


async def test_a_config_that_leaves_chat_out_offers_no_chat(
    backends: Backends, tmp_path: Path
) -> None:
    """As in Tabby: tabby-agent offered inline edits and commit messages backed by the
    embedded 135M model, which answered them with nonsense."""
    config = (
        "[model.completion]\nembedded_last_resort = false\n"
        f'[model.completion.http]\nkind = "openai/completion"\n'
        f'api_endpoint = "{backends.primary.url}/v1"\n'
        f'[model.embedding.http]\nkind = "openai/embedding"\n'
        f'api_endpoint = "{backends.fallback.url}/v1"\n'
    )
    model_file(tmp_path / "keel", "team-chat")
    async with serving(build_app(tmp_path / "keel", config)) as client:
        health = (await client.get("/v1/health")).json()
        assert "chat_model" not in health and "chat_device" not in health, health
        # it still answers; shown as Tabby shows a model (it was the name alone)
        local = {"local": {"model_id": "SmolLM2-135M-Instruct", "device": "cpu"}}
        assert health["models"]["chat"] == local
        remote = {"kind": "openai/completion", "api_endpoint": f"{backends.primary.url}/v1"}
        assert health["models"]["completion"] == {"remote": remote}
        # A chat model an admin loads is offered.
        body = {"model_name": "team-chat", "role": "chat", "stream": False}
        loaded = await client.post("/v1/model/load", json=body, timeout=120)
        assert loaded.status_code == 200, loaded.text
        health = (await client.get("/v1/health")).json()
        assert (health["chat_model"], health["chat_device"]) == ("team-chat", "cpu")
