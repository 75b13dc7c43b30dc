"""A real keel, a fake hub on loopback: what a pull must not do to the models keel has."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.models.registry import embedded_model_path
from tests.conftest import PRECOMPUTE_OFF, KeelProcess, start_keel
from tests.models.fake_hub import FakeHub

pytestmark = pytest.mark.integration

FIRST = "keel-test/first-GGUF"
OTHER = "keel-test/other-GGUF"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    data = embedded_model_path().read_bytes()
    repos = {
        FIRST: {"tiny-q8_0.gguf": data, "slow.gguf": data},
        OTHER: {"tiny-q8_0.gguf": data + b"\0" * 64},  # another model, the same file name
    }
    with FakeHub(repos) as fake:
        yield fake


def keel_with_hub(root: Path, hub: FakeHub, config: str = PRECOMPUTE_OFF) -> KeelProcess:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", hub.url)  # no test reaches huggingface.co
        env.setenv("HF_HOME", str(root / "hf-home"))
        env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        env.delenv("HF_TOKEN", raising=False)
        env.delenv("HF_HUB_OFFLINE", raising=False)
        keel = start_keel(root, config)
    keel.wait_ready()
    return keel


def events(text: str) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_a_pull_from_another_repo_never_replaces_a_serving_model(
    hub: FakeHub, tmp_path: Path
) -> None:
    keel = keel_with_hub(tmp_path, hub)
    try:
        with keel.client() as client:
            pulled = client.post("/v1/model/download", json={"model": f"{FIRST}:tiny-q8_0.gguf"})
            assert events(pulled.text)[-1]["status"] == "ready", pulled.text
            load = {"model_name": "tiny-q8_0", "role": "chat", "stream": False}
            assert client.post("/v1/model/load", json=load).status_code == 200
            path = tmp_path / "models" / "tiny-q8_0.gguf"
            before = path.read_bytes()
            refused = client.post("/v1/model/download", json={"model": f"{OTHER}:tiny-q8_0.gguf"})
            assert refused.status_code == 409, refused.text  # before any event is streamed
            error = refused.json()["error"]
            assert error["code"] == "model_exists", error
            assert str(path) in error["message"] and FIRST in error["message"], error
            assert path.read_bytes() == before
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            answer = client.post("/v1/chat/completions", json=chat)
            assert answer.status_code == 200 and answer.headers["x-keel-provider"] == (
                "local/tiny-q8_0"
            )
    finally:
        keel.stop()
