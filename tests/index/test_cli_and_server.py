"""`keel index` as a command, and retrieval through a real `keel serve` process."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests import forked
from tests.conftest import start_keel
from tests.index.test_retrieve import PREFIX

DISABLED = {"disable_retrieval_augmented_code_completion": True}
REFUSED = "/tmp/" + "x" * 300 + "/repo"
"""A path whose every look raises (ENAMETOOLONG) as a dead mount's does (ENOTCONN)."""


def config_for(repo: Path) -> str:
    return (
        f'[[repositories]]\nname = "weather"\npath = "{repo}"\n'
        'git_url = "https://github.com/example/weather"\n\n'
        "[index]\nrefresh_seconds = 0\nmin_score = 0.0\n\n"
        "[completion]\nmax_decoding_tokens = 4\nmax_input_length = 640\n\n"
        "[server]\ncompletion_timeout = 120\n"
    )


def run_keel(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return forked.run_keel(args, {**os.environ, "KEEL_ROOT": str(root)}, timeout=120)


def test_keel_index_builds_then_updates_incrementally(repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "keel"
    root.mkdir()
    (root / "config.toml").write_text(config_for(repo))

    first = run_keel(root, "index")
    assert first.returncode == 0, first.stderr
    assert "weather: 4 files" in first.stdout and "4 re-indexed" in first.stdout
    assert "index weather: 4/4 files (100%)" in first.stderr  # plain lines: not a TTY
    assert (root / "index" / "weather" / "files.json").is_file()

    second = run_keel(root, "index", "weather")
    assert second.returncode == 0, second.stderr
    assert "0 re-indexed, 0 removed" in second.stdout

    unknown = run_keel(root, "index", "nope")
    assert unknown.returncode == 2
    assert "no repository named 'nope'" in unknown.stderr and "weather" in unknown.stderr


def test_keel_index_goes_on_past_a_repository_it_cannot_read(repo: Path, tmp_path: Path) -> None:
    """A repository whose path is gone, listed first, stopped `keel index` before the
    others (exit 1, nothing indexed); each is tried, each failure said, then exit 1."""
    root = tmp_path / "keel"
    root.mkdir()
    gone = f'[[repositories]]\nname = "gone"\npath = "{tmp_path / "nowhere"}"\n\n'
    # one the system refuses to look at (a dead mount, a parent keel may not enter): a
    # traceback, and the others not indexed
    refused = f'[[repositories]]\nname = "refused"\npath = "{REFUSED}"\n\n'
    # a remote with no checkout here: passed over in silence, exit 0
    remote = '[[repositories]]\nname = "remote"\ngit_url = "https://10.255.255.1/a/b.git"\n\n'
    (root / "config.toml").write_text(gone + refused + remote + config_for(repo))
    done = run_keel(root, "index")
    assert done.returncode == 1, done.stderr
    assert "repository 'gone'" in done.stderr and "is not a directory" in done.stderr
    assert "repository 'refused'" in done.stderr and "Traceback" not in done.stderr
    assert "remote: nothing to index: keel does not clone" in done.stderr
    alone = run_keel(root, "index", "remote")
    assert alone.returncode == 1 and "remote: nothing to index" in alone.stderr, alone
    assert "weather: 4 files" in done.stdout
    checked = run_keel(root, "config", "check")  # the file is fine; this machine lacks one
    assert checked.returncode == 0, checked.stderr
    assert "repositories[0].path" in checked.stderr and "'gone'" in checked.stderr
    assert "repositories[1].path" in checked.stderr and "'refused'" in checked.stderr


@pytest.mark.integration
def test_tabby_completion_shows_retrieved_snippets(repo: Path, tmp_path: Path) -> None:
    # with a checkout the system refuses to look at: keel did not start
    refused = f'[[repositories]]\nname = "refused"\npath = "{REFUSED}"\n\n'
    server = start_keel(tmp_path / "keel", refused + config_for(repo))
    try:
        server.wait_ready()
        body: dict[str, object] = {
            "language": "python",
            "segments": {
                "prefix": PREFIX,
                "suffix": "\n",
                "filepath": "reports/weekly.py",
                "git_url": "git@github.com:example/weather.git",
            },
            "temperature": 0,
            "debug_options": {"return_snippets": True, "return_prompt": True},
        }
        snippets: list[dict[str, object]] = []
        deadline = time.monotonic() + 90
        with server.client() as client:
            off = {**body, "debug_options": {"return_snippets": True, **DISABLED}}
            disabled = client.post("/v1/completions", json=off)
            assert disabled.status_code == 200, disabled.text
            assert disabled.json()["debug_data"]["snippets"] == []

            while not snippets and time.monotonic() < deadline:  # the index builds in background
                response = client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                data = response.json()
                snippets = data["debug_data"]["snippets"]
                if not snippets:
                    time.sleep(0.5)
            assert snippets, server.log.read_text()[-3000:]
            assert "weather/client.py" in {s["filepath"] for s in snippets}
            # the index's state is shown: it was in one log line, after a whole build
            shown = client.get("/v1/providers").json()["repositories"]["weather"]
            assert shown["state"] == "ready" and shown["chunks"] > 0, shown
            assert 'keel_index_up{repository="weather"} 1.0' in client.get("/metrics").text
            prompt = data["debug_data"]["prompt"]
            assert "# Path: weather/client.py" in prompt
            assert "#     def fetch_forecast(self, city_name, days=3):" in prompt
            assert prompt.endswith(PREFIX)

            # The file goes, and `keel index` (another process) takes it out of the index:
            # the same line's next request no longer shows its code.
            (repo / "weather" / "client.py").unlink()
            indexed = run_keel(tmp_path / "keel", "index", "weather")
            assert indexed.returncode == 0, indexed.stderr
            again = client.post("/v1/completions", json=body).json()["debug_data"]["snippets"]
            assert "weather/client.py" not in {s["filepath"] for s in again}, again
    finally:
        server.stop()
