"""Requests and responses validate: an example of every route, checked against /openapi.json.

Each example request body is validated against the operation's documented
request schema, sent to a real app (fake backends on loopback), and its
response validated against the documented response for its status code
(schemathesis' response conformance, events of a stream included). A route
added without an example fails the coverage check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import jsonschema_rs
import schemathesis
from tests.api.conftest import ADMIN, USER

from keel.config import EMBEDDED_MODEL_ID

TABBY = {
    "language": "python",
    "segments": {
        "prefix": "def fib(n):\n    ",
        "suffix": "\n",
        "filepath": "fib.py",
        "declarations": [{"filepath": "util.py", "body": "def memo(f): ..."}],
        "relevant_snippets_from_changed_files": [
            {"filepath": "a.py", "body": "x = 1", "score": 0.5}
        ],
    },
    "debug_options": {"return_snippets": True, "return_prompt": True},
}


@dataclass
class Example:
    method: str
    path: str
    status: int
    body: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=lambda: dict(USER))
    path_params: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.path.format(**self.path_params)


# In order: the model-management examples change what serves, so they come last.
EXAMPLES = [
    Example("GET", "/health", 200, headers={}),
    Example("GET", "/ready", 200, headers={}),
    Example("GET", "/ready", 200),
    Example("GET", "/health/deep", 200, params={"timeout": 5}, headers={}),
    Example("GET", "/health/deep", 200, params={"timeout": 5}),
    Example("GET", "/health/deep", 400, params={"timeout": 0}),
    Example("GET", "/v1/providers", 200),
    Example("GET", "/v1/providers", 401, headers={}),
    Example("POST", "/v1/completions", 200, TABBY),
    Example(
        "POST", "/v1/completions", 200, {"prompt": "def f():", "suffix": "\n", "max_tokens": 8}
    ),
    Example("POST", "/v1/completions", 200, {"prompt": ["x = "], "stream": True, "stop": ["\n"]}),
    Example(
        "POST",
        "/v1/completions",
        200,
        {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}},
    ),
    Example("POST", "/v1/completions", 400, {"prompt": "x", "max_tokens": 0}),
    Example("POST", "/v1/completions", 400, {"segments": {"suffix": "no prefix"}}),
    Example(
        "POST",
        "/infill",
        200,
        {
            "id_slot": 0,
            "input_prefix": "import os\n",
            "prompt": "x = ",
            "input_suffix": "\n",
            "input_extra": [{"filename": "a.py", "text": "y = 1\n", "time": 1}],
            "n_predict": 128,
            "n_indent": 0,
            "cache_prompt": True,
            "t_max_predict_ms": 1000,
        },
    ),
    Example("POST", "/infill", 400, {"input_prefix": "x", "stream": True}),
    Example(
        "POST",
        "/completion",
        200,
        {"prompt": "def f():", "n_predict": 8, "stop": ["\n\n"], "top_k": 40, "cache_prompt": True},
    ),
    Example("POST", "/completion", 200, {"prompt": "x = ", "stream": True, "n_predict": 16}),
    Example("POST", "/completion", 400, {"prompt": [1, 2, 3]}),
    Example(
        "POST",
        "/v1/chat/completions",
        200,
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
            ]
        },
    ),
    Example(
        "POST",
        "/v1/chat/completions",
        200,
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "stream": True,
        },
    ),
    Example("POST", "/v1/chat/completions", 400, {"messages": []}),
    Example("POST", "/v1/embeddings", 200, {"input": "one"}),
    Example("POST", "/v1/embeddings", 200, {"input": ["a", "b"], "encoding_format": "base64"}),
    Example("POST", "/v1/embeddings", 400, {"input": []}),
    Example("GET", "/v1/models", 200),
    Example("GET", "/v1/models/{model_id}", 200, path_params={"model_id": "primary-coder"}),
    Example("GET", "/v1/models/{model_id}", 404, path_params={"model_id": "gpt-5"}),
    Example(
        "POST", "/v1/events", 200, {"type": "view", "completion_id": "cmpl-1", "choice_index": 0}
    ),
    Example(
        "POST",
        "/v1/events",
        200,
        {"type": "select", "completion_id": "cmpl-1", "choice_index": 0, "elapsed": 900},
        params={"select_kind": "line"},
    ),
    Example("POST", "/v1/events", 400, {"type": "stare", "completion_id": "c", "choice_index": 0}),
    Example("GET", "/v1/stats/completions", 200),
    Example("GET", "/v1/stats/completions", 400, params={"since": 10, "until": 5}),
    Example("GET", "/v1/stats", 200),
    Example("GET", "/v1/health", 200),
    Example("POST", "/v1/health", 200),
    Example("GET", "/v1beta/server_setting", 200),
    Example("GET", "/v1beta/models", 200),
    Example("GET", "/v1/model", 200),
    Example("GET", "/v1/model", 200, params={"role": "embedding"}),
    Example("GET", "/v1/model", 400, params={"role": "painting"}),
    Example("GET", "/v1/model/list", 200),
    Example("GET", "/v1/model/draft/list", 200),
    Example("POST", "/v1/model/load", 404, {"model_name": "no-such-model"}, headers=ADMIN),
    Example("POST", "/v1/model/load", 403, {"model_name": "no-such-model"}),
    Example(
        "POST",
        "/v1/model/load",
        200,
        {"model_name": EMBEDDED_MODEL_ID, "role": "chat", "stream": True},
        headers=ADMIN,
    ),
    # A valid spec would reach the hub: tests/models/test_download_api.py pulls from a fake one.
    Example("POST", "/v1/model/download", 400, {"model": "not a repo"}, headers=ADMIN),
    Example("POST", "/v1/model/download", 403, {"model": "org/repo:model.gguf"}),
    Example("POST", "/v1/model/unload", 200, {"role": "completion"}, headers=ADMIN),
    Example("POST", "/v1/model/unload", 409, {"role": "chat"}, headers=ADMIN),
    Example("POST", "/v1/admin/reload", 200, headers=ADMIN),
    Example("POST", "/v1/admin/reload", 200, {}, headers=ADMIN),
]


def request_schema(document: dict[str, Any], example: Example) -> dict[str, Any] | None:
    operation = document["paths"][example.path][example.method.lower()]
    body = operation.get("requestBody")
    if body is None:
        return None
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    return {**schema, "components": document["components"]}  # for any #/components/ $ref


async def test_every_route_has_an_example_that_validates(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    documented = {
        (path, method.upper()) for path, item in document["paths"].items() for method in item
    }
    assert documented == {(example.path, example.method) for example in EXAMPLES}
    api = schemathesis.openapi.from_dict(document)

    for example in EXAMPLES:
        schema = request_schema(document, example)
        if example.body is not None and example.status < 400:
            assert schema is not None, example.path
            jsonschema_rs.Draft202012Validator(schema).validate(example.body)
        response = await client.request(
            example.method,
            example.url,
            params=example.params,
            json=example.body,
            headers=example.headers,
            timeout=60,
        )
        assert response.status_code == example.status, (example, response.text)
        api[example.path][example.method].validate_response(response)
        if example.status == 200 and example.body and example.body.get("stream"):
            # llama.cpp's native stream has no [DONE], nor have TabbyAPI's load progress
            done = example.path not in ("/completion", "/v1/model/load", "/v1/model/download")
            assert response.text.endswith("data: [DONE]\n\n") == done, response.text
            assert '"error"' not in response.text


async def test_invalid_examples_do_not_validate(client: httpx.AsyncClient) -> None:
    """The checks above can fail: bodies and answers that break the documented shapes."""
    document = (await client.get("/openapi.json")).json()
    completion = Example("POST", "/v1/completions", 200)
    validator = jsonschema_rs.Draft202012Validator(request_schema(document, completion))
    assert validator.is_valid(TABBY) and validator.is_valid({"prompt": "x"})
    assert not validator.is_valid({"prompt": 3})
    assert not validator.is_valid({"prompt": "x", "max_tokens": 0})
    assert not validator.is_valid({"segments": {"suffix": "no prefix"}})
    api = schemathesis.openapi.from_dict(document)
    unshaped = httpx.Response(
        400, json={"detail": "bad"}, request=httpx.Request("POST", "http://keel/v1/embeddings")
    )
    wrong = httpx.Response(
        200,
        json={"id": "cmpl-1", "choices": [{"index": "zero", "text": 1}]},
        request=httpx.Request("POST", "http://keel/v1/completions"),
    )
    wrong.elapsed = unshaped.elapsed = timedelta(0)  # as if received
    assert not api["/v1/completions"]["POST"].is_valid_response(wrong)
    assert not api["/v1/embeddings"]["POST"].is_valid_response(unshaped)


async def test_docs_page_shows_the_documented_bodies(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert 'href="openapi.json"' in docs.text  # relative: keel under a proxy's path too
    # one page, nothing loaded from elsewhere (FastAPI's came from a CDN: blank offline)
    assert "<script" not in docs.text and "src=" not in docs.text and 'href="http' not in docs.text
    assert (
        "<code>/v1/chat/completions</code>" in docs.text and "TabbyCompletionRequest" in docs.text
    )
    document = (await client.get("/openapi.json")).json()
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]
    shapes = body["content"]["application/json"]["schema"]["oneOf"]
    assert [shape["title"] for shape in shapes] == ["TabbyCompletionRequest", "CompletionRequest"]
    for path in (
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/events",
        "/v1/model/load",
        "/v1/model/unload",
        "/v1/admin/reload",
    ):
        assert "requestBody" in document["paths"][path]["post"], path


async def test_the_document_says_which_key_each_route_needs(client: httpx.AsyncClient) -> None:
    """It said nothing of keys: a client generated from it sent none and met 401s."""
    document = (await client.get("/openapi.json")).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert {schemes[name]["name"] for name in schemes if name != "bearer"} == {
        "x-api-key",
        "api-key",
        "x-admin-key",
    }
    needs = {
        (path, method): {
            role for option in operation["security"] for roles in option.values() for role in roles
        }
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert needs[("/v1/completions", "post")] == {"user"}
    assert needs[("/v1/stats", "get")] == {"user"}
    assert needs[("/v1/admin/reload", "post")] == {"admin"}
    assert needs[("/health", "get")] == set()
    user = document["paths"]["/v1/chat/completions"]["post"]["security"]
    assert user == [{name: ["user"]} for name in schemes]


async def test_bodies_keel_refuses_are_refused_by_the_document_too(
    client: httpx.AsyncClient,
) -> None:
    """Bodies the schema allowed met a 400 (an empty embedding input, a language id with
    markup, a user message without content, an empty prompt): the document now says
    what keel's parsers check."""
    document = (await client.get("/openapi.json")).json()

    def valid(method: str, path: str, body: dict[str, Any]) -> bool:
        schema = request_schema(document, Example(method, path, 400))
        assert schema is not None, path
        return bool(jsonschema_rs.Draft202012Validator(schema).is_valid(body))

    refused = [
        ("/v1/embeddings", {"input": ""}),
        ("/v1/embeddings", {"input": ["a", ""]}),
        ("/v1/embeddings", {"input": []}),
        ("/v1/completions", {"language": "<img>", "segments": {"prefix": "x"}}),
        ("/v1/chat/completions", {"messages": [{"role": "tool"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}),
        ("/v1/completions", {"prompt": ""}),
        ("/completion", {"prompt": ""}),
    ]
    for path, body in refused:
        answer = await client.post(path, json=body, headers=USER)
        assert answer.status_code == 400, (path, body, answer.text)
        assert not valid("POST", path, body), (path, body)
    allowed = [
        ("/v1/embeddings", {"input": ["a", "b"]}),
        ("/v1/completions", {"language": "objective-c++", "segments": {"prefix": "x"}}),
        ("/v1/completions", {"prompt": "", "suffix": "y"}),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": []}]}),
    ]
    for path, body in allowed:
        assert valid("POST", path, body), (path, body)


async def test_a_method_a_path_lacks_is_told_every_method_it_has(
    client: httpx.AsyncClient,
) -> None:
    """``/v1/health`` answers GET and POST (two routes); its 405 said ``Allow: POST``."""
    answer = await client.request("OPTIONS", "/v1/health", headers=USER)
    assert answer.status_code == 405
    assert answer.json()["error"]["code"] == "http_405"
    allowed = set(answer.headers["allow"].replace(" ", "").split(","))
    assert {"GET", "POST"} <= allowed, allowed
    for method in ("GET", "POST"):
        assert (await client.request(method, "/v1/health", headers=USER)).status_code == 200
    only_post = await client.get("/v1/chat/completions", headers=USER)
    assert (only_post.status_code, only_post.headers["allow"]) == (405, "POST")
