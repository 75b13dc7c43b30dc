"""TabbyAPI's clients against a real keel: the loads they send, as they send them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from keel.models.registry import embedded_model_path
from tests.conftest import PRECOMPUTE_OFF, KeelProcess, running_keel

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    root = tmp_path_factory.mktemp("loader")
    (root / "models").mkdir()
    (root / "models" / "tiny-q4_1.gguf").symlink_to(embedded_model_path())
    with running_keel(root, PRECOMPUTE_OFF) as keel:
        yield keel


def test_the_tabbyapi_loaders_own_request_loads_the_model(server: KeelProcess) -> None:
    """What theroyallab/ST-tabbyAPI-loader sends: the model as ``name``, the numbers as
    strings, TabbyAPI's exllama settings. It was a 400: "'model_name' is required (and 1
    more: max_seq_len)"."""
    body = {
        "name": "tiny-q4_1",
        "max_seq_len": "4096",
        "rope_scale": "1",
        "cache_mode": "FP16",
        "gpu_split_auto": True,
    }
    with server.client() as client:
        response = client.post("/v1/model/load", json=body)
        assert response.status_code == 200, response.text
        lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(lines[-1])["status"] == "finished", lines
        current = client.get("/v1/model").json()
        assert current["id"] == "tiny-q4_1"
        assert current["parameters"]["max_seq_len"] == 4096
        once = client.post("/v1/model/load", json={**body, "stream": "false"})
        assert once.status_code == 200 and once.json()["status"] == "finished", once.text
        wrong = client.post("/v1/model/load", json={"name": "tiny-q4_1", "max_seq_len": "lots"})
        assert wrong.status_code == 400
        assert wrong.json()["error"]["param"] == "max_seq_len", wrong.text


def test_the_embedded_model_loaded_by_its_path_is_in_the_chain_once(
    server: KeelProcess,
) -> None:
    """Loaded by its file's path, the embedded model was in completion's chain twice,
    the same worker (one pid) as the model and as the last resort."""
    path = str(embedded_model_path())
    with server.client() as client:
        loaded = client.post("/v1/model/load", json={"model_name": path, "stream": False})
        assert loaded.status_code == 200, loaded.text
        chain = client.get("/v1/providers").json()["roles"]["completion"]["providers"]
    # one entry: the worker already running the embedded model serves, under its name
    assert [provider["name"] for provider in chain] == ["local/SmolLM2-135M-Instruct"], chain
