"""Pull, then load, then complete: a real keel process, a fake hub on loopback."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import httpx
import pytest

from keel.models.registry import embedded_model_path
from tests.conftest import KeelProcess
from tests.forked import run_keel
from tests.models.fake_hub import FakeHub, keel_with_hub

pytestmark = pytest.mark.integration

REPO = "keel-test/tiny-coder-GGUF"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    data = embedded_model_path().read_bytes()
    files = ("tiny-coder-q4_1.gguf", "tiny-coder-q8_0.gguf", "tiny-coder-q5_0.gguf")
    repos = {REPO: dict.fromkeys(files, data)}
    with FakeHub(repos) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    keel = keel_with_hub(tmp_path_factory.mktemp("pull"), hub)
    yield keel
    keel.stop()


def events(response: httpx.Response) -> list[dict[str, object]]:
    lines = response.text.splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def load_and_complete(client: httpx.Client, model: str) -> None:
    loaded = events(client.post("/v1/model/load", json={"model_name": model}))
    assert loaded[-1]["status"] == "finished", loaded
    current = client.get("/v1/model").json()
    assert current["id"] == model
    assert str(current["parameters"]["path"]).endswith(f"models/{model}.gguf")
    completion = client.post(
        "/v1/completions", json={"prompt": "def add(a, b):\n", "max_tokens": 8}
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"]


def test_download_then_load_serves_completions(server: KeelProcess) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/model/download", json={"model": REPO, "quant": "Q4_1"}, timeout=120
        )
        steps = events(response)
        assert steps[-1]["status"] == "ready", steps
        assert steps[-1]["model_name"] == "tiny-coder-q4_1"
        load_and_complete(client, "tiny-coder-q4_1")


def test_cli_pull_then_load_serves_completions(server: KeelProcess, hub: FakeHub) -> None:
    pulled = run_keel(
        ["models", "pull", f"{REPO}:tiny-coder-q8_0.gguf"],
        {
            **os.environ,
            "KEEL_ROOT": str(server.root),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(server.root / "hf-home"),
        },
        timeout=120,
    )
    assert pulled.returncode == 0, pulled.stderr
    with server.client() as client:
        load_and_complete(client, "tiny-coder-q8_0")


def test_a_download_whose_client_left_stops_and_keeps_nothing(
    server: KeelProcess, hub: FakeHub
) -> None:
    """Without streaming too: a client that gave up on ``"stream": false`` left the
    download running, and the file was installed and audited "ok" seconds later."""
    hub.pause = 0.05  # ~20 MiB/s: the 94 MiB take seconds
    try:
        with server.client() as client, pytest.raises(httpx.ReadTimeout):
            client.post(
                "/v1/model/download",
                json={"model": f"{REPO}:tiny-coder-q5_0.gguf", "stream": False},
                timeout=1.0,
            )
        staging = server.root / "models" / ".downloads"
        deadline = time.monotonic() + 10
        while any(staging.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(staging.iterdir()), list(staging.iterdir())
        time.sleep(1.0)
        assert not (server.root / "models" / "tiny-coder-q5_0.gguf").exists()
        audit = (server.root / "audit.log").read_text()
        assert '"result":"stopped"' in audit and "tiny-coder-q5_0" in audit, audit
    finally:
        hub.pause = 0.0
