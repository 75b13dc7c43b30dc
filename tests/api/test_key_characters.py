"""A key with a character outside printable ASCII was taken and could never let anyone
in: Starlette reads a header as latin-1, keel compared the key as UTF-8. The config, a
reload and a keys file refuse it, naming its position, never the key."""

from __future__ import annotations

import os
from pathlib import Path

from tests.api.conftest import ADMIN, USER, USER_KEY, Backends, build_app, serving
from tests.conftest import keel_cli

from keel.auth import parse_keys_file

ACCENTED = "caf\u00e9-secret-key"
QUOTED = "\u201cadmin-secret-key\u201d"


def test_config_check_and_serve_refuse_it_naming_its_position(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        f'[auth]\napi_keys = ["good-key-0123", "{ACCENTED}"]\nadmin_key = "{QUOTED}"\n'
    )
    env = {**os.environ, "KEEL_ROOT": str(tmp_path)}
    for command in (["config", "check"], ["serve", "--port", "1"]):
        refused = keel_cli(*command, env=env)
        assert refused.returncode == 78, (command, refused.stderr)
        assert "auth.api_keys: the key at api_keys[1] holds a character outside" in refused.stderr
        assert "auth.admin_key: it holds a character outside" in refused.stderr
        assert "secret-key" not in refused.stderr


async def test_a_reload_refuses_it_and_keeps_the_keys(backends: Backends, tmp_path: Path) -> None:
    root = tmp_path / "keel"
    config = backends.config()
    app = build_app(root, config)
    async with serving(app) as client:
        (root / "config.toml").write_text(config.replace(USER_KEY, ACCENTED))
        refused = await client.post("/v1/admin/reload", headers=ADMIN)
        assert refused.status_code == 422, refused.text
        assert "api_keys[0]" in refused.text and "secret-key" not in refused.text
        assert (await client.get("/v1/models", headers=USER)).status_code == 200


def test_a_keys_file_holding_one_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'api_keys = ["good-key-0123", "{ACCENTED}"]\n')
    try:
        parse_keys_file(keys)
    except ValueError as exc:
        assert "api_keys[1]" in str(exc) and "secret-key" not in str(exc)
    else:
        raise AssertionError("a key no client can send was taken")
    (tmp_path / "config.toml").write_text('[auth]\nkeys_file = "keys.toml"\n')
    checked = keel_cli("config", "check", env={**os.environ, "KEEL_ROOT": str(tmp_path)})
    assert checked.returncode == 0, checked.stderr  # a keys file is this machine's: a warning
    assert "api_keys[1] holds a character outside printable ASCII" in checked.stderr
