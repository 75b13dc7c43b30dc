"""``dimensions`` on ``/v1/embeddings``: a backend that makes vectors of a chosen size
(OpenAI's text-embedding-3, Voyage's ``output_dimension``) is sent the size asked for;
any other backend makes its model's own size, and another size is the client's 400
(keel does not shorten vectors)."""

from __future__ import annotations

from pathlib import Path

import httpx
from tests.api.conftest import USER, Backends, build_app, serving


async def test_an_openai_backend_is_sent_the_size_asked_for(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    response = await client.post(
        "/v1/embeddings", json={"input": ["a", "bcd"], "dimensions": 2}, headers=USER
    )
    assert response.status_code == 200, response.text
    assert [len(item["embedding"]) for item in response.json()["data"]] == [2, 2]
    assert backends.fallback.last_request.json["dimensions"] == 2
    # Not asked, not sent: the backend's model makes its own size.
    response = await client.post("/v1/embeddings", json={"input": "a"}, headers=USER)
    assert len(response.json()["data"][0]["embedding"]) == 4
    assert "dimensions" not in backends.fallback.last_request.json


async def test_voyage_is_sent_its_own_name_for_the_size(backends: Backends, tmp_path: Path) -> None:
    config = backends.config().replace('kind = "openai/embedding"', 'kind = "voyage/embedding"')
    async with serving(build_app(tmp_path / "keel", config)) as client:
        response = await client.post(
            "/v1/embeddings", json={"input": "a", "dimensions": 3}, headers=USER
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 3
    sent = backends.fallback.last_request.json
    assert sent["output_dimension"] == 3 and "dimensions" not in sent


async def test_a_backend_of_fixed_size_refuses_another(backends: Backends, tmp_path: Path) -> None:
    config = backends.config().replace('kind = "openai/embedding"', 'kind = "llama.cpp/embedding"')
    async with serving(build_app(tmp_path / "keel", config)) as client:
        response = await client.post(
            "/v1/embeddings", json={"input": "a", "dimensions": 2}, headers=USER
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "dimensions" and "send 4" in error["message"]
        assert "dimensions" not in backends.fallback.last_request.json
        response = await client.post(
            "/v1/embeddings", json={"input": "a", "dimensions": 4}, headers=USER
        )
        assert response.status_code == 200, response.text
