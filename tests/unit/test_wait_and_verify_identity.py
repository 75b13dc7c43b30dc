"""`keel wait` and `keel verify` against what is not keel: an HTTP server answering 200
to every path, and a listener that takes connections and never answers. Loopback only."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import keel_cli


class _Impostor(http.server.BaseHTTPRequestHandler):
    """200 ``{"status": "ok"}`` to every GET: keel's /health answer, from no keel."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def impostor() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KEEL_ROOT": str(tmp_path)}


def test_wait_does_not_take_another_server_for_keel(tmp_path: Path, impostor: int) -> None:
    """It printed "keel answers at ..." and exited 0."""
    # 3 s: the impostor's first answer must come within it on a loaded machine (at 1 s,
    # a CI run's probe timed out before it answered)
    done = keel_cli("wait", "--port", str(impostor), "--timeout", "3", env=_env(tmp_path))
    assert done.returncode == 1, done.stdout
    assert "keel answers" not in done.stdout
    assert f"no keel answered http://127.0.0.1:{impostor}/health within 3 s" in done.stderr
    assert "something that is not keel answers there (HTTP 200" in done.stderr
    assert "another service holds the port" in done.stderr


def test_verify_does_not_take_another_server_for_keel(tmp_path: Path, impostor: int) -> None:
    """Its health line said "ok alive; model None, None"."""
    url = f"http://127.0.0.1:{impostor}"
    done = keel_cli("verify", url, "--timeout", "5", env=_env(tmp_path))
    assert done.returncode == 1, done.stdout
    health = next(line for line in done.stdout.splitlines() if line.startswith("health"))
    assert health.split()[1] == "FAIL", health
    assert "something that is not keel answers: /v1/health names no keel version" in health


def test_wait_ends_by_its_deadline_against_a_listener_that_never_answers(
    tmp_path: Path,
) -> None:
    """Each probe waited its own 2 s whatever was left: --timeout 3 returned after 4.5 s."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepted by the kernel, unread
        port = silent.getsockname()[1]
        started = time.monotonic()
        done = keel_cli("wait", "--port", str(port), "--timeout", "3", env=_env(tmp_path))
        took = time.monotonic() - started
    assert done.returncode == 1, done.stdout
    assert "within 3 s (ReadTimeout" in done.stderr, done.stderr
    assert took < 3.6, took
