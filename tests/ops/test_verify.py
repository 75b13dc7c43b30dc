"""keel verify against real keels: one that works, one whose chat model cannot load."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading

import pytest

from tests.conftest import KeelProcess, free_port
from tests.forked import run_keel

pytestmark = pytest.mark.integration


def verify(url: str) -> subprocess.CompletedProcess[str]:
    return run_keel(["verify", url], os.environ, timeout=600)


CHECKS = ("health", "ready", "completion", "chat", "embedding", "metrics")


def lines_by_check(output: str) -> dict[str, list[str]]:
    """Check name -> the words of its line."""
    found = {line.split()[0]: line.split() for line in output.splitlines() if line.strip()}
    return {name: words for name, words in found.items() if name in CHECKS}


def test_verify_passes_against_a_working_keel(keel_server: KeelProcess) -> None:
    result = verify(keel_server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines_by_check(result.stdout)
    assert set(checks) == set(CHECKS)
    for name in CHECKS:
        assert checks[name][1] == "ok", result.stdout
        assert checks[name][3] == "ms"
    assert "all 6 checks passed" in result.stdout
    # Each answer says which provider gave it (a fallback's passed as the primary's).
    for name in ("completion", "chat", "embedding"):
        assert "(from local/SmolLM2-135M-Instruct" in " ".join(checks[name]), result.stdout


def test_verify_fails_naming_the_chat_check(broken_chat_keel: KeelProcess) -> None:
    result = verify(broken_chat_keel.url)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines_by_check(result.stdout)
    assert checks["chat"][1] == "FAIL"
    assert "503" in " ".join(checks["chat"])
    assert checks["ready"][1] == "FAIL"
    assert checks["completion"][1] == "ok"
    assert checks["health"][1] == "ok"
    assert "FAILED: ready, chat" in result.stdout


def test_verify_fails_when_nothing_listens() -> None:
    result = verify(f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    checks = lines_by_check(result.stdout)
    assert set(checks) == set(CHECKS)
    assert all(line[1] == "FAIL" for line in checks.values()), result.stdout
    assert "ConnectError" in checks["health"][4]


def test_the_key_can_come_from_the_environment() -> None:
    """``KEEL_API_KEY``: a key on the command line shows in ``ps`` and the shell's history."""
    seen: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run_keel(
            ["verify", f"http://127.0.0.1:{server.server_port}"],
            {**os.environ, "KEEL_API_KEY": "env-key-0123456789"},
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert seen and all(header == "Bearer env-key-0123456789" for header in seen), seen


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://[::1", "Invalid IPv6 URL"),
        ("127.0.0.1:8080", "must start with http:// or https://"),
        ("", "must start with http:// or https://"),
        ("http://:8080", "names no host"),
    ],
)
def test_a_url_that_is_no_address_is_a_usage_error(url: str, says: str) -> None:
    """``http://[::1`` ended in a traceback (exit 1); ``127.0.0.1:8080`` ran six checks
    that each failed with "UnsupportedProtocol"."""
    refused = run_keel(["verify", url], dict(os.environ), timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert says in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
