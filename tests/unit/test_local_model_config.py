"""A local model's settings as ``keel config check`` reads them: ``parallelism`` up to
what keel's engine takes, its bound said with its reason, and a suggested value that
the setting takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import (
    ENGINE_MAX_SLOTS,
    LOCAL_CONCURRENCY,
    LocalModelConfig,
    RoleConfig,
    parse_settings,
)
from keel.errors import ConfigError
from keel.workers.worker import PREFILL_BATCH
from tests.conftest import keel_cli


def issues(raw: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, "config.toml", {})
    return {issue.key: issue.message for issue in caught.value.issues}


def local(**table: object) -> dict[str, object]:
    return {"model": {"completion": {"local": table}}}


def test_parallelism_goes_up_to_what_the_engine_takes_and_says_why_not_beyond() -> None:
    # llama.cpp aborts with more slots than tokens in its batch (a worker crash loop)
    assert ENGINE_MAX_SLOTS == PREFILL_BATCH
    settings = parse_settings(local(parallelism=ENGINE_MAX_SLOTS), "config.toml", {})
    assert settings.model.completion.local == LocalModelConfig(parallelism=ENGINE_MAX_SLOTS)
    said = issues(local(parallelism=ENGINE_MAX_SLOTS + 1))["model.completion.local.parallelism"]
    assert said.startswith(f"at most {ENGINE_MAX_SLOTS}: keel's engine reads prompts"), said
    assert "Tabby takes up to 255" in said


def test_a_suggested_value_is_one_the_setting_takes() -> None:
    """``parallelism = 1e3`` said "write parallelism = 1000", itself refused."""
    said = issues(local(parallelism=1e3))["model.completion.local.parallelism"]
    assert "write parallelism" not in said, said
    assert said.startswith("expected an integer, not a decimal number; 1000 itself is refused: ")
    assert f"at most {ENGINE_MAX_SLOTS}" in said
    port = issues({"server": {"port": 1e6}})["server.port"]
    assert "write port" not in port and "1000000 itself is refused" in port, port
    fine = issues(local(parallelism=4.0))["model.completion.local.parallelism"]
    assert fine == "expected an integer, not a decimal number: write parallelism = 4"


def test_a_local_role_admits_as_many_as_its_slots_by_default() -> None:
    assert RoleConfig(local=LocalModelConfig(parallelism=12)).concurrency() == 12
    assert RoleConfig(local=LocalModelConfig(parallelism=2)).concurrency() == LOCAL_CONCURRENCY


def test_config_check_warns_of_a_fallback_model_that_is_no_gguf_file(tmp_path: Path) -> None:
    """It warned of a missing fallback model, and not of one that is no model at all:
    a load short of memory passes over both."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models/notes.gguf").write_text("not a model\n")
    config = tmp_path / "config.toml"
    config.write_text('[model.completion.local]\nfallback_models = ["notes", "gone"]\n')
    env = {"KEEL_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    checked = keel_cli("config", "check", str(config), env=env)
    assert checked.returncode == 0, checked.stderr
    key = "model.completion.local.fallback_models"
    assert f"warning: {key}[0]: {tmp_path / 'models/notes.gguf'}: not a GGUF file" in (
        checked.stderr
    )
    assert f"warning: {key}[1]: model 'gone' not found" in checked.stderr
