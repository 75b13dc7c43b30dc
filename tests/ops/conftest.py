from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import KeelProcess, start_keel


@pytest.fixture(scope="session")
def broken_chat_keel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    """A keel whose chat model is a garbage GGUF: it serves, and reports chat as failed."""
    root = tmp_path_factory.mktemp("broken-chat")
    bad = root / "models" / "broken.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    server = start_keel(root, '[model.chat.local]\nmodel_id = "broken"\n')
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"keel exited: {server.log.read_text()[-3000:]}")
            try:
                roles = httpx.get(f"{server.url}/ready", timeout=5).json()["roles"]
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if roles["chat"]["state"] == "failed" and roles["completion"]["state"] == "ready":
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"broken keel did not settle: {server.log.read_text()[-3000:]}")
        yield server
    finally:
        server.stop()
