"""A reload never opens keel to anyone: on an address beyond loopback, a config without
keys is refused as `keel serve` refuses it, and so is a config file gone missing (read as
all defaults, it dropped every key). The running keys stay in force."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.api.conftest import ADMIN, USER, Backends, build_app, serving

from keel.config import EMBEDDED_MODEL_ID


@pytest.mark.parametrize("change", ["keys dropped", "file removed", "keys moved to redis"])
async def test_a_reload_that_would_open_a_remote_keel_is_refused(
    backends: Backends, tmp_path: Path, change: str
) -> None:
    root = tmp_path / "keel"
    app = build_app(root, backends.config(), host="0.0.0.0")
    async with serving(app) as client:
        assert (await client.get("/v1/models")).status_code == 401
        keyless = backends.config(keys=False)
        if change == "keys dropped":
            (root / "config.toml").write_text(keyless)
            expected = "would serve anyone"
        elif change == "keys moved to redis":  # read at start only: no key from it now
            redis = '[state]\nredis_url = "redis://127.0.0.1:1/0"\n'
            (root / "config.toml").write_text(keyless + redis)
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
    async with serving(app) as client:
        (root / "config.toml").write_text(backends.config(keys=False))
        applied = await client.post("/v1/admin/reload", headers=ADMIN)
        assert applied.status_code == 200, applied.text
        assert (await client.get("/v1/models")).status_code == 200


@pytest.mark.parametrize("content", ["", "\n  \n# the keys, back in a moment\n"])
async def test_a_reload_of_an_empty_file_is_refused(
    backends: Backends, tmp_path: Path, content: str
) -> None:
    """An editor's in-place save empties the file for a moment (and a pipe, `--config
    <(...)`, reads empty the second time): read as all defaults, on loopback the reload
    applied, every key was gone, and the log said only "config reloaded"."""
    root = tmp_path / "keel"
    app = build_app(root, backends.config(), host="127.0.0.1")
    async with serving(app) as client:
        (root / "config.toml").write_text(content)
        refused = await client.post("/v1/admin/reload", headers=ADMIN)
        assert refused.status_code == 422, refused.text
        [issue] = refused.json()["error"]["issues"]
        assert issue["key"] == "(file)", issue
        for said in ("the file is empty", "write the file again and reload", "restart keel"):
            assert said in issue["message"], issue
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.post("/v1/admin/reload")).status_code == 401
        assert (await client.get("/v1/models", headers=USER)).status_code == 200


async def test_a_variable_a_reload_finds_unset_is_said_to_need_a_restart(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable exported after keel started (systemd's EnvironmentFile edited, then
    `systemctl reload`) read as "not set", which the user had just done: keel reads the
    environment it started with."""
    root = tmp_path / "keel"
    app = build_app(root, backends.config())
    monkeypatch.delenv("KEEL_NEW_VARIABLE", raising=False)
    async with serving(app) as client:
        fallback = (
            '[[model.chat.fallback]]\nkind = "openai/chat"\n'
            f'api_endpoint = "{backends.primary.url}/v1"\nmodel_name = "m"\n'
            'api_key = "${KEEL_NEW_VARIABLE}"\n'
        )
        (root / "config.toml").write_text(backends.config() + fallback)
        refused = await client.post("/v1/admin/reload", headers=ADMIN)
        assert refused.status_code == 422, refused.text
        [issue] = refused.json()["error"]["issues"]
        assert issue["key"].startswith("model.chat.fallback["), issue
        message = issue["message"]
        assert message.startswith("environment variable KEEL_NEW_VARIABLE is not set"), issue
        assert "the environment it was started with" in message, issue
        assert "restart (systemctl restart keel)" in message, issue


async def test_a_reload_naming_a_missing_model_file_is_the_admins_422(
    backends: Backends, tmp_path: Path
) -> None:
    root = tmp_path / "keel"
    app = build_app(root, backends.config())
    async with serving(app) as client:
        missing = (
            '\n[[model.chat.fallback]]\nmodel_id = "no-such-model"\n'
            '\n[[model.embedding.fallback]]\nmodel_id = "nor-this-one"\n'
        )
        (root / "config.toml").write_text(backends.config() + missing)
        refused = await client.post("/v1/admin/reload", headers=ADMIN)
        assert refused.status_code == 422, refused.text
        issues = {i["key"]: i["message"] for i in refused.json()["error"]["issues"]}
        # each by its key, as `keel config check` names them (the first alone, "(model)")
        assert "no-such-model" in issues["model.chat.fallback[0].model_id"], issues
        assert "nor-this-one" in issues["model.embedding.fallback[0].model_id"], issues


async def test_a_reload_waits_for_a_model_load_in_progress(
    backends: Backends, tmp_path: Path
) -> None:
    """One at a time: a load finishing on the routing a reload had just replaced left the
    role on a provider the reload had closed (and the loaded worker in no routing)."""
    app = build_app(tmp_path / "keel", backends.config())
    async with serving(app) as client:
        body = {"model_name": EMBEDDED_MODEL_ID, "role": "chat"}
        load = asyncio.create_task(
            client.post("/v1/model/load", json=body, headers=ADMIN, timeout=60)
        )
        state = app.state.keel
        for _ in range(1000):  # until the load has begun
            if state.control.locked():
                break
            await asyncio.sleep(0.01)
        reload = asyncio.create_task(client.post("/v1/admin/reload", headers=ADMIN))
        await asyncio.sleep(0.2)
        assert not reload.done() or load.done(), "the reload waited for the load"
        assert (await load).status_code == 200
        assert (await reload).status_code == 200
        chat = (await client.get("/v1/providers", headers=USER)).json()["roles"]["chat"]
        assert chat["providers"][0]["name"] == "chat/openai/chat"  # the config's again
        answer = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers=USER,
        )
        assert answer.status_code == 200, answer.text  # on an open provider


async def test_an_unload_waiting_behind_a_reload_acts_on_the_reloaded_routing(
    backends: Backends, tmp_path: Path
) -> None:
    """A load or unload that arrived during a reload waited for it, then acted on the
    routing the reload had replaced: it stopped workers the new routing served a role
    with (503 until a restart), or judged by chains no longer in force. Here the reload
    gives chat a fallback; the unload, sent while the reload starts its worker, was
    refused as chat's only provider by the replaced routing."""
    root = tmp_path / "keel"
    app = build_app(root, backends.config())
    async with serving(app) as client:
        fallback = f'\n[[model.chat.fallback]]\nmodel_id = "{EMBEDDED_MODEL_ID}"\n'
        (root / "config.toml").write_text(backends.config() + fallback)
        state = app.state.keel
        reload = asyncio.create_task(client.post("/v1/admin/reload", headers=ADMIN, timeout=60))
        for _ in range(1000):  # until the reload holds the lock (it starts a worker)
            if state.control.locked():
                break
            await asyncio.sleep(0.005)
        unload = await client.post(
            "/v1/model/unload", json={"role": "chat"}, headers=ADMIN, timeout=60
        )
        assert (await reload).status_code == 200
        assert unload.status_code == 200, unload.text
        assert unload.json()["unloaded"] == ["chat/openai/chat"], unload.json()
        chat = (await client.get("/v1/providers", headers=USER)).json()["roles"]["chat"]
        assert chat["providers"][0]["name"].startswith("local/"), chat
        answer = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers=USER,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text


async def test_a_keel_started_on_defaults_alone_reloads_them(tmp_path: Path) -> None:
    """Without a config file, a reload was a 422 ("config file does not exist") where the
    README has it restore the config's models after a load; reading no file as the
    defaults again drops nothing (a keel without a file has no keys to drop)."""
    from keel.app import create_app
    from keel.config import Paths, Settings

    root = tmp_path / "keel"
    root.mkdir()
    app = create_app(Settings(), Paths(root), config_path=None, host="127.0.0.1")
    async with serving(app) as client:
        applied = await client.post("/v1/admin/reload")
        assert applied.status_code == 200, applied.text
        (root / "config.toml").write_text("")  # no key to drop: the defaults again
        applied = await client.post("/v1/admin/reload")
        assert applied.status_code == 200, applied.text


async def test_a_refused_reload_changes_nothing_of_a_running_model(tmp_path: Path) -> None:
    """A reload refused (a model missing) still gave the running completion model the
    refused file's prompt template and stop words: every completion changed, and the
    operator had been told nothing had."""
    root = tmp_path / "keel"
    local = f'[model.completion.local]\nmodel_id = "{EMBEDDED_MODEL_ID}"\n'
    template = 'prompt_template = "<PRE>{prefix}<SUF>{suffix}<MID>"\n'
    body = {
        "language": "python",
        "segments": {"prefix": "def fib(n):\n    ", "suffix": "\n"},
        "max_tokens": 2,
        "debug_options": {"return_prompt": True},
    }

    async def prompt() -> str:
        answer = await client.post("/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["debug_data"]["prompt"])

    app = build_app(root, local)
    async with serving(app) as client:
        assert "<PRE>" not in await prompt()
        missing = '[model.chat.local]\nmodel_id = "/nonexistent/model.gguf"\n'
        (root / "config.toml").write_text(local + template + missing)
        refused = await client.post("/v1/admin/reload")
        assert refused.status_code == 422, refused.text
        assert "<PRE>" not in await prompt()
        (root / "config.toml").write_text(local + template)
        applied = await client.post("/v1/admin/reload")
        assert applied.status_code == 200, applied.text
        assert (await prompt()).startswith("<PRE>")  # taken when the reload is


@pytest.mark.parametrize("flag", [None, "127.0.0.2"])
async def test_a_reload_the_next_start_would_refuse_is_refused(
    backends: Backends, tmp_path: Path, flag: str | None
) -> None:
    """A file moving the config's own address beyond loopback with no keys was taken
    ("restart_needed: server.host"); the next start exited 78 and a supervisor left keel
    down. With the address given by --host, the next start binds that: taken."""
    root = tmp_path / "keel"
    app = build_app(root, backends.config(keys=False), host=flag)
    async with serving(app) as client:
        moved = backends.config(keys=False).replace("[server]\n", '[server]\nhost = "0.0.0.0"\n')
        (root / "config.toml").write_text(moved)
        answer = await client.post("/v1/admin/reload")
        if flag is None:
            assert answer.status_code == 422, answer.text
            assert "would refuse to start" in answer.text and "server.host" in answer.text
        else:
            assert answer.status_code == 200, answer.text


async def test_a_reload_whose_new_workers_do_not_fit_is_refused_at_once(tmp_path: Path) -> None:
    """keel serve and a model load check memory first; a reload started the workers, and
    refused after seconds with the engine's "check the input params"."""
    root = tmp_path / "keel"
    local = f'[model.completion.local]\nmodel_id = "{EMBEDDED_MODEL_ID}"\n'
    app = build_app(root, local)
    async with serving(app) as client:
        huge = "context_size = 1048576\nparallelism = 16\n"
        (root / "config.toml").write_text(local + huge)
        refused = await client.post("/v1/admin/reload", timeout=60)
        assert refused.status_code == 507, refused.text
        assert "do not fit in memory" in refused.text and "running config stays" in refused.text
        providers = (await client.get("/v1/providers")).json()["roles"]["completion"]
        assert len(providers["providers"]) == 1, "nothing new started, the old one serves"


async def test_an_unload_leaves_its_requests_to_end_and_holds_up_no_reload(
    backends: Backends, tmp_path: Path
) -> None:
    """An unload held the lock that reloads take until the requests on the model it
    unloaded had ended (an answer streaming, for up to 30 minutes): a reload revoking
    a key waited as long, and the key still worked meanwhile."""
    before = len(backends.primary.requests)
    app = build_app(tmp_path / "keel", backends.config())
    async with serving(app) as client:
        backends.primary.hold()
        try:
            body = {"prompt": "def f(", "max_tokens": 4}
            answer = asyncio.create_task(
                client.post("/v1/completions", json=body, headers=USER, timeout=60)
            )
            for _ in range(1000):  # until the primary holds it
                if len(backends.primary.requests) > before:
                    break
                await asyncio.sleep(0.01)
            unload = await asyncio.wait_for(
                client.post("/v1/model/unload", json={"role": "completion"}, headers=ADMIN), 10
            )
            assert unload.status_code == 200, unload.text
            assert backends.primary.url in unload.json()["unloaded"][0], unload.json()
            reload = await asyncio.wait_for(client.post("/v1/admin/reload", headers=ADMIN), 10)
            assert reload.status_code == 200, reload.text
            assert not answer.done()
        finally:
            backends.primary.release()
        assert (await answer).status_code == 200, "the request on the unloaded model ended"
