"""`keel serve` started with a standard stream closed, as some launchers and daemons do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import KeelProcess
from tests.ports import free_port


def test_serve_with_stdout_closed_serves(tmp_path: Path) -> None:
    """uvicorn's log formatter asked the closed stdout whether it was a terminal:
    AttributeError, "Unable to configure formatter 'default'", exit 1."""
    port = free_port()
    log = tmp_path / "keel.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            ["sh", "-c", 'exec "$@" >&- <&-', "sh", sys.executable, "-m", "keel", "serve"]
            + ["--port", str(port)],
            env={**os.environ, "KEEL_ROOT": str(tmp_path / "root")},
            stderr=err,
        )
    server = KeelProcess(process, f"http://127.0.0.1:{port}", tmp_path / "root", log)
    try:
        server.wait_ready(path="/health")
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.stop()
    assert "Traceback" not in log.read_text()
    assert "Application shutdown complete" in log.read_text()
