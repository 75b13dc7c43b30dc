"""A real keel, a fake hub on loopback: what a pull must not do to the models keel has."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.models.registry import embedded_model_path
from tests.conftest import PRECOMPUTE_OFF
from tests.models.fake_hub import FakeHub, keel_with_hub

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


def events(text: str) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_a_pull_from_another_repo_never_replaces_a_serving_model(
    hub: FakeHub, tmp_path: Path
) -> None:
    keel = keel_with_hub(tmp_path, hub, PRECOMPUTE_OFF)
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


def test_keel_stopping_mid_download_keeps_nothing_and_ends_the_stream_in_its_shape(
    hub: FakeHub, tmp_path: Path
) -> None:
    """SIGTERM mid-download left the partial file in ``models/.downloads`` (the pull's
    thread never reached its cleanup: the process ended by the signal first), and the
    stream ended with an error event without the progress fields, then ``[DONE]``."""
    config = PRECOMPUTE_OFF + "[server]\nshutdown_grace_seconds = 2\n"
    keel = keel_with_hub(tmp_path, hub, config)
    spec = f"{FIRST}:slow.gguf"
    hub.pause = 0.2  # ~5 MiB/s: the 94 MiB take ~19 s
    try:
        with keel.client() as client:
            body = {"model": spec}
            with client.stream("POST", "/v1/model/download", json=body) as response:
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: {") and "downloaded_bytes" in line:
                        break  # bytes are coming in
                keel.process.send_signal(signal.SIGTERM)
                rest = "\n".join(lines)
        assert keel.process.wait(60) is not None
    finally:
        hub.pause = 0.0
        keel.stop()
    last = events(rest)[-1]
    assert "[DONE]" not in rest, rest
    assert last["status"] == "error" and last["model"] == spec, last
    assert str(last["error"]["message"]).startswith("keel is stopping"), last  # type: ignore[index]
    staging = tmp_path / "models" / ".downloads"
    assert not [p for p in staging.rglob("*") if p.is_file()], list(staging.rglob("*"))
    assert not (tmp_path / "models" / "slow.gguf").exists()
    # Audited as keel's stop, not as a client that left
    entry = [line for line in (tmp_path / "audit.log").read_text().splitlines() if spec in line]
    assert entry and '"result":"stopped"' in entry[-1] and "keel is stopping" in entry[-1], entry
