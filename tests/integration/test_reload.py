"""Config hot reload through a real keel process: API and SIGHUP."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_keel
from tests.fakes.upstreams import Behaviour, FakeUpstream, unused_port

pytestmark = pytest.mark.integration

BASE = "[model.chat]\nmax_concurrent = 4\n"
WITH_FALLBACK = BASE + (
    '[[model.chat.fallback]]\nkind = "openai/chat"\napi_endpoint = "http://127.0.0.1:9/v1"\n'
)


def chat_chain(url: str) -> list[str]:
    roles = httpx.get(f"{url}/v1/providers", timeout=10).json()["roles"]
    return [p["name"] for p in roles["chat"]["providers"]]


def test_reload_applies_a_valid_config_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    server = start_keel(tmp_path, BASE)
    config = tmp_path / "config.toml"
    try:
        server.wait_ready()
        pid = server.worker_pid("chat")
        assert chat_chain(server.url) == ["local/SmolLM2-135M-Instruct"]

        config.write_text(
            WITH_FALLBACK
            + '[server]\ncors_allowed_origins = ["https://a.example"]\n'
            # --port (as start_keel starts keel) wins over the file's port, now and at a
            # restart with the same options: it said "restart needed: server.port"
            + "port = 1\n"
            + "[events]\nretention_days = 7\nmax_buffered = 50\n"
        )
        applied = httpx.post(f"{server.url}/v1/admin/reload", timeout=60)
        assert applied.status_code == 200, applied.text
        # Read at start only: applied at the next restart, and said so (the events store's
        # settings were changed by a reload in no way, and said nothing).
        assert applied.json()["restart_needed"] == [
            "server.cors_allowed_origins",
            "events.max_buffered",
            "events.retention_days",
        ]
        assert "next restart: server.cors_allowed_origins" in server.log.read_text()
        assert chat_chain(server.url) == ["local/SmolLM2-135M-Instruct", "chat/openai/chat#1"]
        assert server.worker_pid("chat") == pid  # unchanged worker kept, model not reloaded

        config.write_text('[model.chat]\nmax_concurrent = "many"\n[server]\nprot = 1\n')
        refused = httpx.post(f"{server.url}/v1/admin/reload", timeout=60)
        assert refused.status_code == 422, refused.text
        keys = {issue["key"] for issue in refused.json()["error"]["issues"]}
        assert keys == {"model.chat.max_concurrent", "server.prot"}
        assert len(chat_chain(server.url)) == 2  # still the last good config
        served = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "x = ", "max_tokens": 2}, timeout=60
        )
        assert served.status_code == 200
        # the file on disk is not what runs, and a restart would exit 78 on it: said
        assert "keel_config_refused 1.0" in httpx.get(f"{server.url}/metrics").text

        config.write_text(BASE)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while len(chat_chain(server.url)) != 1:
            assert time.monotonic() < deadline, "SIGHUP did not reload the config"
            time.sleep(0.2)
        assert "keel_config_refused 0.0" in httpx.get(f"{server.url}/metrics").text
        audit = (tmp_path / "audit.log").read_text()
        assert audit.count('"action":"config_reload"') == 3
        assert audit.count("next restart") == 1  # back to the start's origins: nothing waits
        assert '"result":"error"' in audit
    finally:
        server.stop()


def test_a_reload_moves_traffic_to_a_new_local_worker_once_it_is_ready(tmp_path: Path) -> None:
    """A reload that changes a local model's settings started the new worker and moved
    traffic to it at once: the next completion waited for the load (8 s here), and one
    the engine refused left every completion a 503 while the old worker ran on. The
    reload answers when the new worker is ready; one that cannot start keeps the old."""
    server = start_keel(tmp_path, None)
    config = tmp_path / "config.toml"
    body = {"language": "python", "segments": {"prefix": "def add(a, b):\n    ", "suffix": ""}}
    try:
        server.wait_ready()
        old = server.worker_pid("completion")
        bad = tmp_path / "models" / "broken.gguf"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"GGUF" + b"\0" * 64)
        config.write_text('[model.completion.local]\nmodel_id = "broken"\n')
        refused = httpx.post(f"{server.url}/v1/admin/reload", timeout=120)
        assert refused.status_code == 422, refused.text
        # by its key, before a worker is started for it (it was "(model)", after one)
        issues = {i["key"]: i["message"] for i in refused.json()["error"]["issues"]}
        said = issues["model.completion.local.model_id"]
        assert "broken.gguf" in said and "unsupported GGUF version 0" in said, issues
        assert server.worker_pid("completion") == old
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200

        config.write_text("[model.completion.local]\ncontext_size = 1024\n")
        applied = httpx.post(f"{server.url}/v1/admin/reload", timeout=120)
        assert applied.status_code == 200, applied.text
        roles = httpx.get(f"{server.url}/v1/providers", timeout=10).json()["roles"]
        worker = roles["completion"]["providers"][0]["worker"]
        assert worker["state"] == "ready" and worker["pid"] != old, worker
        assert worker["engine"]["n_ctx"] == 1024, worker
    finally:
        server.stop()


def test_a_replaced_providers_last_answers_say_nothing_of_its_successor(tmp_path: Path) -> None:
    """A reload put a chat backend that is down in place of one that was streaming, under
    the same name: the old answer's end was logged "provider chat/openai/chat is healthy
    again", the new one being down."""
    with FakeUpstream() as live:
        live.token_delay = 0.25
        table = '[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "{}/v1"\n'
        server = start_keel(tmp_path, table.format(live.url))
        try:
            server.wait_ready()
            live.behave(Behaviour.error(500), times=4)  # down a moment: marked unhealthy
            for _ in range(2):
                chat = {"messages": [{"role": "user", "content": "hi"}]}
                httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30)
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            streamed: list[str] = []
            with httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=body, timeout=30
            ) as response:
                lines = response.iter_lines()
                streamed.append(next(lines))
                (tmp_path / "config.toml").write_text(
                    table.format(f"http://127.0.0.1:{unused_port()}")
                )
                applied = httpx.post(f"{server.url}/v1/admin/reload", timeout=60)
                assert applied.status_code == 200, applied.text
                streamed.extend(lines)
            assert "data: [DONE]" in streamed, streamed
            deadline = time.monotonic() + 10
            while "unreachable" not in server.log.read_text():
                assert time.monotonic() < deadline, server.log.read_text()
                time.sleep(0.1)
            assert "healthy again" not in server.log.read_text(), server.log.read_text()
        finally:
            server.stop()
