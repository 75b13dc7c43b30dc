"""`keel config check`'s warnings about this machine: what it says of a keys file, and of
local models that would not fit in memory (what `keel serve` would refuse)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import keel_cli

RELATIVE_REMARK = "a relative path is read from the data root"


def _check(tmp_path: Path, config: str) -> tuple[int, str]:
    (tmp_path / "config.toml").write_text(config)
    env = {**os.environ, "KEEL_ROOT": str(tmp_path / "root")}
    done = keel_cli("config", "check", str(tmp_path / "config.toml"), env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr


@pytest.mark.parametrize("relative", [False, True])
def test_a_missing_keys_file_is_said_relative_only_when_it_is(
    tmp_path: Path, relative: bool
) -> None:
    """An absolute keys_file that is missing was said with "(a relative path is read from
    the data root, ...)", which sent its reader looking for a mistake not made."""
    given = "keys.toml" if relative else str(tmp_path / "elsewhere" / "keys.toml")
    code, said = _check(tmp_path, f'[auth]\nkeys_file = "{given}"\n')
    assert code == 0, said
    assert "auth.keys_file" in said and "does not exist" in said, said
    assert (RELATIVE_REMARK in said) is relative, said


def test_local_models_that_do_not_fit_in_memory_are_a_warning_of_config_check(
    tmp_path: Path,
) -> None:
    """`keel config check` said ok for local models `keel serve` refuses before binding
    (exit 69: "the local models do not fit in memory: need ~370805 MiB, ..."). It warns,
    with serve's own estimate (no model loaded), and still exits 0: the file is valid."""
    huge = (
        '[model.completion.local]\nmodel_id = "SmolLM2-135M-Instruct"\n'
        "context_size = 1048576\nparallelism = 16\n"
    )
    code, said = _check(tmp_path, huge)
    assert code == 0, said
    assert "the local models do not fit in memory: need ~" in said, said
    assert "keel serve here would exit 69" in said, said
    small = '[model.completion.local]\nmodel_id = "SmolLM2-135M-Instruct"\ncontext_size = 2048\n'
    code, said = _check(tmp_path, small)
    assert code == 0 and "fit in memory" not in said, said
