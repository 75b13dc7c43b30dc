"""A backend's ``api_key`` read from a secret file (``${BACKEND_KEY}``, a Kubernetes
secret made from a file) ends in a newline: it passed ``keel config check``, then every
request to the role was a 500 ("Forbidden control character detected in headers"), with
no fallback. Its outer whitespace is dropped as [auth]'s keys' is; a control character
inside the key is an error of the config naming the field."""

from __future__ import annotations

import os
from pathlib import Path

from tests.api.conftest import ADMIN, USER, Backends, build_app, serving
from tests.conftest import keel_cli

from keel.config import parse_settings
from keel.errors import ConfigError

CHAT = {"kind": "openai/chat", "api_endpoint": "http://127.0.0.1:1/v1", "api_key": "${BK}"}


def test_a_backend_keys_outer_whitespace_is_dropped_and_a_line_break_inside_refused() -> None:
    raw = {"model": {"chat": {"http": CHAT, "fallback": [CHAT]}}}
    settings = parse_settings(raw, "c.toml", environ={"BK": "  sk-abc\r\n"})
    assert settings.model.chat.http is not None
    assert settings.model.chat.http.api_key == "sk-abc"
    fallback = settings.model.chat.fallback[0]
    assert getattr(fallback, "api_key", None) == "sk-abc"
    try:
        parse_settings(raw, "c.toml", environ={"BK": "sk-a\nbc-SECRET"})
    except ConfigError as exc:
        keys = sorted(issue.key for issue in exc.issues)
        assert keys == ["model.chat.fallback[0].api_key", "model.chat.http.api_key"], keys
        assert "control character" in exc.message and "SECRET" not in exc.message
    else:
        raise AssertionError("a key with a line break inside was taken")


async def test_a_key_ending_in_a_newline_reaches_the_backend_without_it(
    backends: Backends, tmp_path: Path
) -> None:
    root = tmp_path / "keel"
    key_line = 'api_key = "sk-abc\\n"\n'
    config = backends.config().replace(
        'model_name = "fallback-chat"\n', 'model_name = "fallback-chat"\n' + key_line
    )
    assert key_line in config
    app = build_app(root, config)
    async with serving(app) as client:
        body = {"model": "fallback-chat", "messages": [{"role": "user", "content": "hi"}]}
        answered = await client.post("/v1/chat/completions", json=body, headers=USER)
        assert answered.status_code == 200, answered.text
        assert backends.fallback.last_request.headers["authorization"] == "Bearer sk-abc"
        # A reload to a key with a line break inside is the admin's 422, naming the field.
        (root / "config.toml").write_text(config.replace("sk-abc\\n", "sk-a\\nbc"))
        refused = await client.post("/v1/admin/reload", headers=ADMIN)
        assert refused.status_code == 422, refused.text
        assert "model.chat.http.api_key" in refused.text


def test_config_check_and_serve_exit_78_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "http://127.0.0.1:1/v1"\n'
        'api_key = "${BACKEND_KEY}"\n'
    )
    env = {**os.environ, "KEEL_ROOT": str(tmp_path), "BACKEND_KEY": "sk-abc\n"}
    ok = keel_cli("config", "check", str(config), env=env)
    assert ok.returncode == 0, ok.stderr
    env["BACKEND_KEY"] = "sk-a\tbc\n"
    for command in (["config", "check", str(config)], ["serve", "--port", "1"]):
        refused = keel_cli(*command, env=env)
        assert refused.returncode == 78, (command, refused.stderr)
        assert "model.chat.http.api_key" in refused.stderr and "Traceback" not in refused.stderr
