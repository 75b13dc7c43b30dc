"""Which config file a command reads: never one the user did not mean, in silence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import keel_cli


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KEEL_ROOT": str(tmp_path / "root")}


def test_config_check_refuses_a_path_and_another_config(tmp_path: Path) -> None:
    """`keel config check a.toml --config b.toml` read a.toml, b.toml ignored unsaid."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[server]\nport = 8081\n")
    b.write_text("[server]\nport = 8082\n")
    done = keel_cli("config", "check", str(a), "--config", str(b), env=_env(tmp_path))
    assert done.returncode == 2, done.stdout
    assert f"two config files given, PATH {a} and --config {b}: give one" in done.stderr
    assert "ok:" not in done.stdout and "Traceback" not in done.stderr


def test_config_check_takes_the_same_file_given_twice(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[server]\nport = 8081\n")
    env = _env(tmp_path)
    same = str(tmp_path / "." / "a.toml")
    done = keel_cli("config", "check", str(tmp_path / "a.toml"), "--config", same, env=env)
    assert done.returncode == 0, done.stderr
    assert f"ok: {tmp_path / 'a.toml'}" in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        # an address this machine lacks: the old code's serve ends at its bind (78)
        ["serve", "--config", "", "--host", "203.0.113.7"],
        ["config", "check", ""],
        ["config", "check", "--config", ""],
        ["models", "list", "--config", ""],
        ["keys", "--config", "", "list"],
        ["wait", "--config", "", "--timeout", "0.1"],
        ["doctor", "--config", ""],
    ],
)
def test_an_empty_config_path_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    """An unset shell variable (`--config "$CONF"`) read the default config in silence:
    `keel serve --config ''` served it."""
    done = keel_cli(*args, env=_env(tmp_path))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "the path is empty (an unset shell variable?)" in done.stderr
