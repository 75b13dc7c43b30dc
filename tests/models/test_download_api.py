"""POST /v1/model/download in process: admin only, SSE progress, errors before the stream."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi import FastAPI

from tests.api.conftest import ADMIN, ADMIN_KEY, USER, build_app, keel_config
from tests.fakes.upstreams import FakeUpstream
from tests.models.conftest import FILE, REPO
from tests.models.fake_hub import FakeHub, sha256


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
async def client(
    upstream: FakeUpstream, hub: FakeHub, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    # the one fake as both replicas, by two names (one endpoint listed twice is refused)
    other = upstream.url.replace("127.0.0.1", "localhost")
    app: FastAPI = build_app(tmp_path / "keel", keel_config(upstream.url, other))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            yield http


def events(response: httpx.Response) -> list[dict[str, object]]:
    lines = response.text.splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


async def test_download_streams_progress_then_lists_the_model(
    client: httpx.AsyncClient, model_bytes: bytes, tmp_path: Path
) -> None:
    response = await client.post(
        "/v1/model/download", json={"model": f"{REPO}:{FILE}"}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text  # as the load's, which TabbyAPI's clients read
    document = (await client.get("/openapi.json")).json()
    schemathesis.openapi.from_dict(document)["/v1/model/download"]["POST"].validate_response(
        response
    )
    steps = events(response)
    statuses = [step["status"] for step in steps]
    assert statuses[0] == "resolving" and statuses[-1] == "ready", statuses
    assert "downloading" in statuses and "verifying" in statuses
    assert steps[-1]["model_name"] == "tiny-coder-q4_1"
    assert steps[-1]["sha256"] == sha256(model_bytes)
    listing = (await client.get("/v1/model/list", headers=USER)).json()
    card = next(card for card in listing["data"] if card["id"] == "tiny-coder-q4_1")
    facts = card["parameters"]
    assert facts["architecture"] == "llama" and facts["context_length"] == 8192
    assert facts["fim"] is False and facts["size_bytes"] == len(model_bytes)
    audit = (tmp_path / "keel" / "audit.log").read_text()
    assert '"action":"model_download"' in audit and '"result":"ok"' in audit


async def test_download_is_admin_only(client: httpx.AsyncClient, hub: FakeHub) -> None:
    body = {"model": f"{REPO}:{FILE}"}
    assert (await client.post("/v1/model/download", json=body)).status_code == 401
    assert (await client.post("/v1/model/download", json=body, headers=USER)).status_code == 403
    assert hub.seen == []


async def test_refusals_come_before_the_stream(client: httpx.AsyncClient, hub: FakeHub) -> None:
    bad = await client.post("/v1/model/download", json={"model": "no repo"}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    missing = await client.post(
        "/v1/model/download", json={"model": f"{REPO}:other.gguf"}, headers=ADMIN
    )
    assert missing.status_code == 404 and FILE in missing.json()["error"]["message"]
    hub.token = "hf_secret"
    refused = await client.post(
        "/v1/model/download", json={"model": f"{REPO}:{FILE}", "stream": False}, headers=ADMIN
    )
    assert refused.status_code == 502
    error = refused.json()["error"]
    assert error["code"] == "upstream_auth_failed" and "set HF_TOKEN" in error["message"]
    assert ADMIN_KEY not in refused.text and hub.downloads() == []


async def test_a_corrupt_download_ends_the_stream_with_an_error_event(
    client: httpx.AsyncClient, hub: FakeHub, tmp_path: Path
) -> None:
    hub.corrupt = True
    response = await client.post(
        "/v1/model/download", json={"model": f"{REPO}:{FILE}"}, headers=ADMIN
    )
    last = events(response)[-1]
    error = last["error"]
    assert last["status"] == "error" and isinstance(error, dict)
    assert error["code"] == "checksum_mismatch"
    assert not list((tmp_path / "keel" / "models").rglob("*.gguf"))


async def test_spec_refusals_name_the_field_at_fault(
    client: httpx.AsyncClient, hub: FakeHub, model_bytes: bytes
) -> None:
    """Each was a 400 or 404 with param null: a client could not tell which field to fix."""
    hub.repos["keel-test/quants-GGUF"] = {
        "m-Q4_1.gguf": model_bytes,
        "m-Q8_0.gguf": model_bytes,
        "m-Q6_K_L.gguf": model_bytes,
    }
    cases = [
        ({"model": "keel-test/quants-GGUF"}, 400, "quant"),
        ({"model": f"{REPO}:x.bin"}, 400, "model"),
        ({"model": f"{REPO}:{FILE}", "quant": "Q8_0"}, 400, "quant"),
        ({"model": "TabbyML/StarCoder-1B", "quant": "Q8_0"}, 400, "quant"),
        ({"model": "keel-test/quants-GGUF", "quant": "q6_k"}, 404, "quant"),
        ({"model": f"{REPO}:other.gguf"}, 404, "model"),
    ]
    for body, status, param in cases:
        response = await client.post("/v1/model/download", json=body, headers=ADMIN)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.text)
    assert hub.downloads() == []


async def test_a_models_directory_keel_cannot_use_is_said_not_an_internal_error(
    client: httpx.AsyncClient, hub: FakeHub, tmp_path: Path
) -> None:
    """A file in its place (as a read-only one) was the stream's internal_error, or a
    500 internal_error, with no audit entry."""
    models = tmp_path / "keel" / "models"
    shutil.rmtree(models, ignore_errors=True)
    models.write_text("not a directory")
    for stream in (True, False):
        response = await client.post(
            "/v1/model/download",
            json={"model": f"{REPO}:{FILE}", "stream": stream},
            headers=ADMIN,
        )
        error = response.json()["error"]
        assert error["code"] == "data_root_unusable", response.text
        assert f"the models directory {models} is not a directory" in error["message"]
        assert "move it away" in error["message"]
    assert hub.downloads() == []
    audit = (tmp_path / "keel" / "audit.log").read_text()
    assert '"action":"model_download"' in audit and "is not a directory" in audit
