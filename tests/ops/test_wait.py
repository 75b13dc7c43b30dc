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
    wait = [sys.executable, "-m", "keel", "wait"]
    # A proxy set for pulls (in the unit's environment file) must not carry loopback.
    proxied = {**env, "HTTP_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9"}
    waiting = subprocess.Popen(
        [*wait, "--timeout", "60"],
        env=proxied,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # it is waiting before keel starts
    assert waiting.poll() is None
    with (root / "keel.log").open("wb") as log:  # the config's port: no --port
        server = subprocess.Popen(
            [sys.executable, "-m", "keel", "serve"], stdout=log, stderr=log, env=env
        )
    try:
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert out.strip() == f"keel answers at http://127.0.0.1:{port}"
    finally:
        if waiting.poll() is None:
            waiting.kill()
        server.terminate()
        server.wait(30)
    gone = subprocess.run(
        [*wait, "--timeout", "0.5"], env=env, capture_output=True, text=True, timeout=60
    )
    assert gone.returncode == 1
    assert f"no keel answered http://127.0.0.1:{port}/health within 0.5 s" in gone.stderr


@pytest.mark.parametrize("command", ["wait", "verify"])
@pytest.mark.parametrize("timeout", ["nan", "-1", "inf", "0"])
def test_a_timeout_that_is_no_time_is_a_usage_error(command: str, timeout: str) -> None:
    """nan ended `keel verify` in a traceback (exit 1) and `keel wait` waited for ever;
    -1 was "within -1 s"."""
    url = [f"http://127.0.0.1:{free_port()}"] if command == "verify" else []
    done = subprocess.run(
        [sys.executable, "-m", "keel", command, *url, "--timeout", timeout],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "a finite number of seconds above 0" in done.stderr and "Traceback" not in done.stderr
