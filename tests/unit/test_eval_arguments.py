"""``keel eval``'s ordinary bad arguments are usage errors naming the option, said
before a model loads (each ended in a traceback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import keel_cli


def _eval(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "KEEL_ROOT": str(tmp_path / "root")}
    done = keel_cli("eval", "--samples", "2", *args, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr


@pytest.mark.parametrize("threads", ["0", "-3"])
def test_threads_below_one_is_a_usage_error(tmp_path: Path, threads: str) -> None:
    """pydantic's ValidationError of LocalModelConfig, as the model was about to load."""
    output = tmp_path / "out"
    code, err = _eval(tmp_path, "--threads", threads, "--output", str(output))
    assert code == 2, err
    assert f"--threads must be 1 or more (got {threads})" in err
    assert not output.exists()  # checked before anything was made


@pytest.mark.parametrize("repo", ["=/tmp", ""])
def test_a_repo_without_a_name_is_a_usage_error(tmp_path: Path, repo: str) -> None:
    code, err = _eval(tmp_path, "--repo", repo, "--output", str(tmp_path / "out"))
    assert code == 2, err
    assert f"--repo {repo!r}: an empty name: write NAME=PATH" in err


def test_a_dotted_name_of_no_package_is_a_usage_error(tmp_path: Path) -> None:
    """find_spec("foo.bar") raises ModuleNotFoundError where there is no foo."""
    code, err = _eval(tmp_path, "--repo", "nosuchpkg.sub", "--output", str(tmp_path / "o"))
    assert code == 2, err
    assert "--repo nosuchpkg.sub: no package 'nosuchpkg.sub' is installed here" in err


def test_an_output_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    """FileExistsError's traceback from mkdir."""
    afile = tmp_path / "afile"
    afile.write_text("")
    code, err = _eval(tmp_path, "--output", str(afile))
    assert code == 2, err
    assert f"--output {afile}: {afile} is a file, not a directory" in err


def test_a_context_larger_than_a_local_model_takes_is_a_usage_error(tmp_path: Path) -> None:
    code, err = _eval(tmp_path, "--max-input-length", "2000000", "--output", str(tmp_path / "o"))
    assert code == 2, err
    assert "--max-input-length 2000000 and --max-decoding-tokens 48 need a context" in err


def test_help_says_where_results_go(tmp_path: Path) -> None:
    done = keel_cli("eval", "--help", env={**os.environ, "KEEL_ROOT": str(tmp_path)})
    assert "bench/results under the current directory" in " ".join(done.stdout.split())
