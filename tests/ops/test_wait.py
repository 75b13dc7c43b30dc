"""`keel wait`: a service manager's start check that follows the configured port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.cli import local_url
from tests.conftest import free_port
from tests.forked import fork_keel, run_keel

DEAD = "http://127.0.0.1:9/v1"
NO_WORKERS = "".join(
    f"[model.{role}]\nembedded_last_resort = false\n[model.{role}.http]\n"
    f'kind = "openai/{role}"\napi_endpoint = "{DEAD}"\nmodel_name = "m"\n'
    for role in ("completion", "chat", "embedding")
)


def test_a_wildcard_bind_is_reached_over_loopback() -> None:
    assert local_url("0.0.0.0", 9000) == "http://127.0.0.1:9000"
    assert local_url("::", 9000) == "http://[::1]:9000"
    assert local_url("10.1.2.3", 8080) == "http://10.1.2.3:8080"
    assert local_url("::1", 8080) == "http://[::1]:8080"


@pytest.mark.integration
def test_wait_returns_once_the_configured_port_answers_and_fails_naming_it(
    tmp_path: Path,
) -> None:
    """The systemd unit's start check asked 127.0.0.1:8080 whatever the config said: a
    keel on another port failed every start after two minutes, then restarted."""
    port = free_port()
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.toml").write_text(f"[server]\nport = {port}\n{NO_WORKERS}")
    env = {**os.environ, "KEEL_ROOT": str(root)}
    # A proxy set for pulls (in the unit's environment file) must not carry loopback.
    proxied = {**env, "HTTP_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9"}
    out, err = tmp_path / "wait.out", tmp_path / "wait.err"
    waiting = fork_keel(["wait", "--timeout", "60"], proxied, out, err)
    time.sleep(0.5)  # it is waiting before keel starts
    assert waiting.poll() is None
    server = fork_keel(["serve"], env, root / "keel.log")  # the config's port: no --port
    try:
        assert waiting.wait(60) == 0, err.read_text()
        assert out.read_text().strip() == f"keel answers at http://127.0.0.1:{port}"
    finally:
        waiting.kill()
        server.terminate()
        server.wait(30)
    # The entry point's test: `python -m keel` itself, a fresh interpreter (the other
    # runs here are forked from one that has imported keel: tests/forked.py).
    gone = subprocess.run(
        [sys.executable, "-m", "keel", "wait", "--timeout", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1
    assert f"no keel answered http://127.0.0.1:{port}/health within 0.5 s" in gone.stderr


@pytest.mark.parametrize("command", ["wait", "verify"])
@pytest.mark.parametrize("timeout", ["nan", "-1", "inf", "0"])
def test_a_timeout_that_is_no_time_is_a_usage_error(command: str, timeout: str) -> None:
    """nan ended `keel verify` in a traceback (exit 1) and `keel wait` waited for ever;
    -1 was "within -1 s"."""
    url = [f"http://127.0.0.1:{free_port()}"] if command == "verify" else []
    done = run_keel([command, *url, "--timeout", timeout], os.environ, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "a finite number of seconds above 0" in done.stderr and "Traceback" not in done.stderr
