"""``keel models pull`` with an ``HF_ENDPOINT`` that is no URL: a config error saying how
to write it, before any request (it was "broke off ... (Request URL is missing an
'http://' or 'https://' protocol.), again after each resume"). Loopback only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import keel_cli


@pytest.mark.parametrize(
    ("endpoint", "example"),
    [
        ("127.0.0.1:9", "HF_ENDPOINT=http://127.0.0.1:9,"),
        ("not a url", "HF_ENDPOINT=http://HOST:PORT,"),
        ("ftp://127.0.0.1:9", "HF_ENDPOINT=http://HOST:PORT,"),
        ("http://[::1", "HF_ENDPOINT=http://HOST:PORT,"),
    ],
)
def test_an_hf_endpoint_that_is_no_url_is_a_config_error(
    tmp_path: Path, endpoint: str, example: str
) -> None:
    env = {**os.environ, "KEEL_ROOT": str(tmp_path), "HF_ENDPOINT": endpoint}
    env.pop("HF_HUB_OFFLINE", None)
    done = keel_cli("models", "pull", "org/repo:x.gguf", env=env)
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # said at once: nothing looked up, tried or resumed
    assert lines[0].startswith(f"keel: HF_ENDPOINT is not a URL ({endpoint!r}"), lines
    assert example in lines[0] and "broke off" not in lines[0]
    assert not (tmp_path / "models" / "x.gguf").exists()


def test_an_hf_endpoint_with_its_scheme_in_capitals_is_a_url(tmp_path: Path) -> None:
    """httpx takes HTTP:// as http://: the check refuses no endpoint that worked."""
    env = {**os.environ, "KEEL_ROOT": str(tmp_path), "HF_ENDPOINT": "HTTP://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    done = keel_cli("models", "pull", "org/repo:x.gguf", env=env)
    assert done.returncode == 1, done.stderr
    assert "cannot reach HTTP://127.0.0.1:9" in done.stderr
