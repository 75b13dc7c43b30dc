"""`keel keys` against a redis_url where another service answers. Loopback only."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import keel_cli


@pytest.fixture
def http_port() -> Iterator[int]:
    """What an HTTP server answers to Redis's bytes: a 400, then the connection closed."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            with client:
                client.recv(65536)
                client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_keys_list_says_what_answers_is_not_redis(tmp_path: Path, http_port: int) -> None:
    """It said Redis "did not answer (Protocol Error: b'HTTP/1.1 400 Bad Request')"."""
    (tmp_path / "config.toml").write_text(
        f'[state]\nredis_url = "redis://127.0.0.1:{http_port}/0"\n'
    )
    done = keel_cli("keys", "list", env={**os.environ, "KEEL_ROOT": str(tmp_path)})
    assert done.returncode == 1, done.stdout
    assert f"what answers at redis://127.0.0.1:{http_port}/0 ([state] redis_url) is not " in (
        done.stderr
    )
    assert "Redis (it answered Protocol Error: b'HTTP/1.1 400 Bad Request')" in done.stderr
    assert "points at another service" in done.stderr and "did not answer" not in done.stderr
