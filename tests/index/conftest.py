from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CLIENT_PY = '''\
"""A tiny HTTP client, enough to be indexed."""

import json


class WeatherClient:
    def __init__(self, base_url, api_token):
        self.base_url = base_url
        self.api_token = api_token

    def fetch_forecast(self, city_name, days=3):
        url = f"{self.base_url}/forecast/{city_name}?days={days}"
        return self._request_json(url)

    def _request_json(self, url):
        headers = {"Authorization": f"Bearer {self.api_token}"}
        return json.loads(open_url(url, headers))
'''

UNITS_PY = """\
def celsius_to_fahrenheit(celsius_degrees):
    return celsius_degrees * 9 / 5 + 32


def fahrenheit_to_celsius(fahrenheit_degrees):
    return (fahrenheit_degrees - 32) * 5 / 9
"""

SCRIPT_SH = "#!/bin/sh\n" + "".join(f"echo forecast line {i}\n" for i in range(80))


def write_repo(root: Path) -> Path:
    """A small repository with code to index and files that must be skipped."""
    (root / "weather").mkdir(parents=True)
    (root / "weather" / "client.py").write_text(CLIENT_PY)
    (root / "weather" / "units.py").write_text(UNITS_PY)
    (root / "tools").mkdir()
    (root / "tools" / "run.sh").write_text(SCRIPT_SH)
    (root / ".gitignore").write_text("secret_*.py\nout/\n")
    (root / "secret_forecast.py").write_text("def fetch_forecast_secret():\n    return 1\n")
    (root / "out").mkdir()
    (root / "out" / "fetch_forecast_copy.py").write_text(CLIENT_PY)
    (root / "blob.py").write_bytes(b"fetch_forecast\0\x01\x02" * 100)
    (root / "node_modules" / "lib").mkdir(parents=True)
    (root / "node_modules" / "lib" / "index.js").write_text("function fetch_forecast() {}\n")
    (root / "weather" / "messages_pb2.py").write_text("fetch_forecast = 1\n" * 5)
    (root / "README.md").write_text("# weather\nfetch_forecast docs\n")
    return root


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(root), *args],
        check=True,
        capture_output=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "HOME": str(root),
        },
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return write_repo(tmp_path / "repo")
