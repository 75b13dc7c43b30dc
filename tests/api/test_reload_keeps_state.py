"""A reload keeps what keel knows of a provider whose table did not change: its health,
breaker and rate limit (every reload rebuilt every HTTP provider, so a backend failing
at the time came back "healthy" and usable, and Tabby's request_per_minute started over);
a provider whose table changed starts afresh."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from tests.api.conftest import USER, USER_KEY, build_app, serving
from tests.fakes.upstreams import FakeUpstream
from tests.serving.conftest import llamacpp_config


def config(live: str, dead: str, model: str = "x") -> str:
    chat = f'api_endpoint = "{live}/v1"\nmodel_name = "fake-chat"'
    keyed = f'[auth]\napi_keys = ["{USER_KEY}"]\nadmin_key = "admin-key-0123456789"\n'
    keyed += llamacpp_config(live)
    return keyed.replace(chat, f'api_endpoint = "{dead}/v1"\nmodel_name = "{model}"')


async def chat_state(client: httpx.AsyncClient) -> dict[str, object]:
    roles = (await client.get("/v1/providers", headers=USER)).json()["roles"]
    state: dict[str, object] = roles["chat"]["providers"][0]
    return state


async def test_an_unchanged_provider_keeps_its_state(tmp_path: Path) -> None:
    admin = {"x-admin-key": "admin-key-0123456789"}
    root = tmp_path / "keel"
    with FakeUpstream() as live:
        app = build_app(root, config(live.url, "http://127.0.0.1:1"))
        async with serving(app) as client:
            for _ in range(100):  # the dead backend is found at start
                if (await chat_state(client))["healthy"] is False:
                    break
                await asyncio.sleep(0.02)
            assert (await chat_state(client))["healthy"] is False
            reloaded = await client.post("/v1/admin/reload", headers=admin)
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json()["started"] == [] and reloaded.json()["stopping"] == []
            assert (await chat_state(client))["healthy"] is False, "still the dead backend"

            (root / "config.toml").write_text(config(live.url, "http://127.0.0.1:1", "y"))
            reloaded = await client.post("/v1/admin/reload", headers=admin)
            assert reloaded.json()["started"] == ["chat/openai/chat"], reloaded.text
            assert (await chat_state(client))["healthy"] is True  # a new table: afresh
