"""Embeddings and chat requests a review found mishandled: a backend's vectors out of
order or of unequal length, misleading refusals, and limits a completion ignored."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.api.conftest import USER, build_app, keel_config, serving
from tests.api.test_limit_names import REFUSAL
from tests.fakes.upstreams import Behaviour, FakeUpstream


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """A primary embedding backend that answers as each test scripts it, and its fallback."""
    with FakeUpstream() as primary, FakeUpstream(embedding_dim=4) as fallback:
        yield primary, fallback


def _config(primary: FakeUpstream, fallback: FakeUpstream) -> str:
    return keel_config(primary.url, fallback.url).replace(
        f'[model.embedding.http]\nkind = "openai/embedding"\napi_endpoint = "{fallback.url}/v1"'
        '\nmodel_name = "fallback-embed"\n',
        f'[model.embedding.http]\nkind = "openai/embedding"\napi_endpoint = "{primary.url}/v1"'
        '\nmodel_name = "primary-embed"\n\n[[model.embedding.fallback]]\n'
        f'kind = "openai/embedding"\napi_endpoint = "{fallback.url}/v1"\n'
        'model_name = "fallback-embed"\n',
    )


@pytest.fixture
async def client(
    upstreams: tuple[FakeUpstream, FakeUpstream], tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    primary, fallback = upstreams
    config = _config(primary, fallback)
    assert "primary-embed" in config
    try:
        async with serving(build_app(tmp_path / "keel", config)) as http:
            yield http
    finally:
        primary.reset_behaviour()


def _answer(data: list[dict[str, Any]]) -> Behaviour:
    return Behaviour.respond(200, {"object": "list", "data": data, "model": "primary-embed"})


async def _embed(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/v1/embeddings", json=body, headers=USER)


@pytest.mark.parametrize(
    "indices",
    [
        ["0", "1", "2"],  # strings: they were sorted lexically
        [0, 0, 1],  # one twice: arrival order, renumbered
        [0, 2, 3],  # not 0..n-1
        [True, 0, 2],  # a boolean is not an index
        [0, None, 2],  # one missing among indexed items
    ],
)
async def test_indices_other_than_0_to_n_minus_1_are_the_backends_failure(
    client: httpx.AsyncClient, upstreams: tuple[FakeUpstream, FakeUpstream], indices: list[Any]
) -> None:
    primary, _ = upstreams
    data = []
    for at, index in enumerate(indices):
        item: dict[str, Any] = {"object": "embedding", "embedding": [float(at), 1.0, 1.0, 1.0]}
        if index is not None:
            item["index"] = index
        data.append(item)
    primary.behave(_answer(data))
    response = await _embed(client, {"input": ["a", "bb", "ccc"]})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "fallback-embed", answer  # the fallback's vectors, in order
    assert [item["embedding"][0] for item in answer["data"]] == [1.0, 2.0, 3.0]
    assert [item["index"] for item in answer["data"]] == [0, 1, 2]


async def test_a_shuffled_set_of_indices_is_put_in_order(
    client: httpx.AsyncClient, upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    primary, _ = upstreams
    shuffled = [{"index": i, "embedding": [float(i), 0.0]} for i in (2, 0, 10, 1, 3, 4, 5)]
    shuffled += [{"index": i, "embedding": [float(i), 0.0]} for i in (6, 7, 8, 9)]
    primary.behave(_answer(shuffled))
    response = await _embed(client, {"input": [f"t{i}" for i in range(11)]})
    answer = response.json()
    assert answer["model"] == "primary-embed", answer
    assert [item["embedding"][0] for item in answer["data"]] == [float(i) for i in range(11)]
    # none indexed: in the order sent
    primary.behave(_answer([{"embedding": [float(i), 0.0]} for i in (5, 6)]))
    answer = (await _embed(client, {"input": ["a", "b"]})).json()
    assert answer["model"] == "primary-embed", answer
    assert [item["embedding"][0] for item in answer["data"]] == [5.0, 6.0]


@pytest.mark.parametrize("dimensions", [None, 4])
async def test_vectors_of_unequal_lengths_are_the_backends_failure(
    client: httpx.AsyncClient,
    upstreams: tuple[FakeUpstream, FakeUpstream],
    dimensions: int | None,
) -> None:
    """``[4, 4, 3]`` went to the client, and passed a ``dimensions: 4`` check of the first."""
    primary, _ = upstreams
    sizes = (4, 4, 3)
    primary.behave(_answer([{"index": i, "embedding": [1.0] * n} for i, n in enumerate(sizes)]))
    body: dict[str, Any] = {"input": ["a", "bb", "ccc"]}
    if dimensions is not None:
        body["dimensions"] = dimensions
    response = await _embed(client, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "fallback-embed", answer
    assert [len(item["embedding"]) for item in answer["data"]] == [4, 4, 4]


@pytest.mark.parametrize(("item", "given"), [(5, "an integer (5)"), (True, "a boolean (true)")])
async def test_a_list_mixing_text_and_numbers_names_the_item(
    client: httpx.AsyncClient, item: object, given: str
) -> None:
    """Not token IDs (they were said to be, with LangChain's setting as the fix)."""
    response = await _embed(client, {"input": ["a", item]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "input", error
    assert "input[1]" in error["message"] and given in error["message"], error
    assert "token IDs" not in error["message"] and "LangChain" not in error["message"]
    # token IDs alone are still named as such
    for ids in ([1, 2], [[1, 2], [3]]):
        error = (await _embed(client, {"input": ids})).json()["error"]
        assert "token IDs are not taken" in error["message"], error


async def test_a_backend_that_ignored_the_size_it_was_sent_is_said_to(
    client: httpx.AsyncClient, upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    primary, _ = upstreams
    primary.behave(_answer([{"index": 0, "embedding": [0.5] * 8}]))
    response = await _embed(client, {"input": "a", "dimensions": 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "dimensions", error
    assert primary.last_request.json["dimensions"] == 4
    message = error["message"]
    assert "was sent the size asked for (dimensions 4) and ignored it" in message, message
    assert "made 8-dimension vectors" in message and "send 8" in message, message
    assert "only an" not in message, message


def _sent(upstreams: tuple[FakeUpstream, FakeUpstream], path: str) -> list[dict[str, Any]]:
    return [
        request.json
        for upstream in upstreams
        for request in upstream.requests
        if request.path == path
    ]


def _completions_sent(upstreams: tuple[FakeUpstream, FakeUpstream]) -> list[dict[str, Any]]:
    return _sent(upstreams, "/v1/completions")


@pytest.mark.parametrize("field", ["max_completion_tokens", "n_predict"])
async def test_a_completion_honours_its_limit_under_each_name(
    client: httpx.AsyncClient, upstreams: tuple[FakeUpstream, FakeUpstream], field: str
) -> None:
    """llama.cpp's server reads ``n_predict`` on its completions, OpenAI's newer clients
    send ``max_completion_tokens``: both were ignored, and 3 tokens asked were 32 made."""
    before = len(_completions_sent(upstreams))
    body = {"prompt": "def add(a, b):", field: 3}
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    sent = _completions_sent(upstreams)[before:]
    assert [request["max_tokens"] for request in sent] == [3], sent
    assert field not in sent[0], sent  # a completions backend's name is max_tokens
    same = await client.post(
        "/v1/completions", json={**body, "max_tokens": 3}, headers=USER
    )  # given twice, the same: one limit
    assert same.status_code == 200, same.text


@pytest.mark.parametrize(
    ("limits", "param"),
    [
        ({"max_tokens": 5, "max_completion_tokens": 3}, "max_completion_tokens"),
        ({"max_tokens": 5, "n_predict": 3}, "n_predict"),
        ({"max_completion_tokens": 5, "n_predict": 3}, "n_predict"),
    ],
)
async def test_a_completion_given_two_different_limits_is_a_400_naming_them(
    client: httpx.AsyncClient, limits: dict[str, int], param: str
) -> None:
    response = await client.post(
        "/v1/completions", json={"prompt": "def add(a, b):", **limits}, headers=USER
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert all(f"{name} {value}" in error["message"] for name, value in limits.items()), error
    assert "send one of them" in error["message"], error


async def test_n_predict_0_on_a_completion_says_what_to_send(client: httpx.AsyncClient) -> None:
    body = {"prompt": "def add(a, b):", "n_predict": 0}
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "n_predict" and "send 1 or more" in error["message"], error


@pytest.mark.parametrize("field", ["max_completion_tokens", "n_predict"])
async def test_a_refused_completion_limit_is_named_as_the_client_sent_it(
    client: httpx.AsyncClient, upstreams: tuple[FakeUpstream, FakeUpstream], field: str
) -> None:
    for upstream in upstreams:
        upstream.behave(Behaviour.error(400, {"error": REFUSAL}))
    try:
        response = await client.post(
            "/v1/completions", json={"prompt": "def add(a, b):", field: 4000}, headers=USER
        )
    finally:
        for upstream in upstreams:
            upstream.reset_behaviour()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", field), error
    assert f"ask for fewer tokens ({field})" in error["message"], error


def _chats_sent(upstreams: tuple[FakeUpstream, FakeUpstream]) -> list[dict[str, Any]]:
    return _sent(upstreams, "/v1/chat/completions")


async def test_an_assistants_refusal_part_is_its_text(
    client: httpx.AsyncClient, upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """OpenAI's API and SDK replay a refusal in history as a part of type "refusal"
    (it was a 400, and the conversation could not go on)."""
    refused = {"type": "refusal", "refusal": "I can't help with that."}
    messages = [
        {"role": "user", "content": "Write malware."},
        {"role": "assistant", "content": [refused]},
        {"role": "user", "content": "Then write a sort."},
    ]
    response = await client.post("/v1/chat/completions", json={"messages": messages}, headers=USER)
    assert response.status_code == 200, response.text
    sent = _chats_sent(upstreams)[-1]["messages"]
    assert sent[1] == {"role": "assistant", "content": "I can't help with that."}, sent
    # only an assistant refuses
    messages[2] = {"role": "user", "content": [refused]}
    response = await client.post("/v1/chat/completions", json={"messages": messages}, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[2]" and "content[0] is a refusal part" in error["message"]
