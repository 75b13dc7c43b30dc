"""Every body passes one gate: bad JSON, bad text and bad fields are a 400 naming the field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import ADMIN, USER, Backends
from tests.fakes.upstreams import embedding_usage

VALID_BODIES: dict[str, dict[str, object]] = {
    "/v1/completions": {"language": "python", "segments": {"prefix": "def f():\n    "}},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/embeddings": {"input": ["a", "b"]},
    "/v1/events": {"type": "view", "completion_id": "cmpl-1", "choice_index": 0},
    "/v1/model/load": {"model_name": "no-such-model"},
    "/v1/model/unload": {"role": "chat"},
}
OPENAI_COMPLETION = {"prompt": "def f():", "max_tokens": 5}
OPENAI_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def headers_for(path: str) -> dict[str, str]:
    return {
        **(ADMIN if path.startswith("/v1/model/") else USER),
        "content-type": "application/json",
    }


def assert_names(response: httpx.Response, field: str, code: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error.get("param")) == (code, field), error
    assert f"'{field}'" in error["message"]


def with_text(body: dict[str, object], field: str, placeholder: str) -> bytes:
    """``body`` as JSON with ``placeholder`` as the value of top-level ``field``."""
    return json.dumps({**body, field: placeholder}).encode()


BAD_TEXT = [
    ("/v1/completions", {**OPENAI_COMPLETION}, "model"),
    ("/v1/completions", VALID_BODIES["/v1/completions"], "language"),
    ("/v1/chat/completions", VALID_BODIES["/v1/chat/completions"], "model"),
    ("/v1/embeddings", VALID_BODIES["/v1/embeddings"], "user"),
    ("/v1/events", VALID_BODIES["/v1/events"], "completion_id"),
    ("/v1/model/load", VALID_BODIES["/v1/model/load"], "model_name"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_TEXT)
async def test_a_lone_surrogate_is_a_400_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, object], field: str
) -> None:
    raw = with_text(body, field, "PLACEHOLDER").replace(b"PLACEHOLDER", b"ab\\ud800cd")
    response = await client.post(path, content=raw, headers=headers_for(path))
    assert_names(response, field, "invalid_text")


@pytest.mark.parametrize(("path", "body", "field"), BAD_TEXT)
async def test_invalid_utf8_is_a_400_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict[str, object], field: str
) -> None:
    raw = with_text(body, field, "PLACEHOLDER").replace(b"PLACEHOLDER", b"ab\xff\xfe")
    response = await client.post(path, content=raw, headers=headers_for(path))
    assert_names(response, field, "invalid_text")


async def test_bad_text_deep_inside_names_the_path(client: httpx.AsyncClient) -> None:
    body = {
        "language": "python",
        "segments": {
            "prefix": "x",
            "declarations": [
                {"filepath": "a.py", "body": "ok"},
                {"filepath": "b.py", "body": "PLACEHOLDER"},
            ],
        },
    }
    raw = json.dumps(body).encode().replace(b"PLACEHOLDER", b"\\udfff")
    response = await client.post("/v1/completions", content=raw, headers=USER)
    assert_names(response, "segments.declarations[1].body", "invalid_text")
    # Encoded surrogates (CESU-style bytes) are bad text too, and so is a bad key.
    raw = json.dumps({"prompt": "x", "suffix": "PLACEHOLDER"}).encode()
    response = await client.post(
        "/v1/completions", content=raw.replace(b"PLACEHOLDER", b"\xed\xa0\x80"), headers=USER
    )
    assert_names(response, "suffix", "invalid_text")
    raw = b'{"prompt": "x", "\\ud800": 1}'
    response = await client.post("/v1/completions", content=raw, headers=USER)
    assert_names(response, "\\ud800", "invalid_text")


async def test_valid_astral_text_is_served(client: httpx.AsyncClient, backends: Backends) -> None:
    raw = b'{"prompt": "caf\\u00e9 \\ud83d\\ude00", "model": "\xf0\x9f\x98\x80", "max_tokens": 4}'
    response = await client.post("/v1/completions", content=raw, headers=USER)
    assert response.status_code == 200, response.text
    sent = [
        r.json["prompt"]
        for upstream in (backends.primary, backends.fallback)
        for r in upstream.requests
        if r.path.endswith("/completions") and "caf" in str(r.json.get("prompt"))
    ]
    assert sent == ["caf\u00e9 \U0001f600"], sent


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "empty_body"),
        (b"{", "invalid_json"),
        (b'{"prompt": "x", "temperature": NaN}', "invalid_json"),
        (b'{"prompt": "x", "temperature": -Infinity}', "invalid_json"),
        (b'{"prompt": "x", "temperature": 1e999}', "invalid_json"),
        (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid_json"),
    ],
)
async def test_bodies_that_are_not_json_objects_are_400(
    client: httpx.AsyncClient, raw: bytes, code: str
) -> None:
    for path in VALID_BODIES:
        if not raw and path == "/v1/model/unload":
            continue  # no body is TabbyAPI's unload (the completion model)
        response = await client.post(path, content=raw, headers=headers_for(path))
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == code, (path, response.text)
        if raw.count(b"[") > 1_000:  # said how deep keel reads, and what to send
            assert "send a flatter body" in response.json()["error"]["message"], response.text


async def test_a_compressed_body_is_a_415_that_says_so(client: httpx.AsyncClient) -> None:
    """A gzip body was read as JSON: "not valid JSON: Expecting value", of valid JSON."""
    for path, body in VALID_BODIES.items():
        raw = gzip.compress(json.dumps(body).encode())
        headers = {**headers_for(path), "Content-Encoding": "gzip"}
        response = await client.post(path, content=raw, headers=headers)
        assert response.status_code == 415, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "unsupported_encoding", (path, error)
        assert "gzip" in error["message"] and "uncompressed" in error["message"], error
    headers = {**headers_for("/v1/completions"), "Content-Encoding": "identity"}
    body = VALID_BODIES["/v1/completions"]
    response = await client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text


async def test_a_missing_model_is_a_404_before_any_streaming(client: httpx.AsyncClient) -> None:
    for stream in (True, False):
        body = {"model_name": "no-such-model", "role": "completion", "stream": stream}
        response = await client.post("/v1/model/load", json=body, headers=ADMIN)
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("not_found_error", "not_found")
        assert "no-such-model" in error["message"]
    for name in ("~nosuchuser/model.gguf", "x" * 512, "a\u0000b"):
        body = {"model_name": name}
        response = await client.post("/v1/model/load", json=body, headers=ADMIN)
        assert response.status_code == 404, (name[:20], response.text)


async def test_a_misspelled_model_management_field_is_a_400_naming_it(
    client: httpx.AsyncClient,
) -> None:
    """Ignored, ``{"rol": "chat"}`` unloaded the completion model, ``{"model_name":
    "m"}`` (the chat model's) too, and a load's ``"roel": "chat"`` swapped completion's.
    TabbyAPI's own load settings, which its clients send, are taken (and not used)."""
    for path, body, field in [
        ("/v1/model/unload", {"rol": "chat"}, "rol"),
        ("/v1/model/unload", {"model_name": "SmolLM2-135M-Instruct"}, "model_name"),
        ("/v1/model/load", {"model_name": "no-such-model", "roel": "chat"}, "roel"),
    ]:
        response = await client.post(path, json=body, headers=ADMIN)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith(f"unknown field {field!r}: this takes "), error
        assert error["param"] == field, error  # it was "body"
    providers = (await client.get("/v1/providers", headers=ADMIN)).json()["roles"]
    assert len(providers["completion"]["providers"]) == 3, "nothing was unloaded"
    tabbyapi = {"name": "no-such-model", "cache_mode": "Q4", "gpu_split_auto": True}
    response = await client.post("/v1/model/load", json=tabbyapi, headers=ADMIN)
    assert response.status_code == 404, response.text  # read; the model is what is missing


async def test_a_file_that_is_no_usable_model_is_a_400_before_any_streaming(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Not a GGUF file, or one cut short: the caller's mistake (it was a 500 saying
    "missing dependency"), refused before any event. So is a Tabby model directory whose
    tabby.json is unreadable (a 422 naming a config key never written, or, streamed, an
    error after three progress events)."""
    from keel.models.registry import embedded_model_path

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not a model</html>")
    cut = tmp_path / "cut.gguf"
    with embedded_model_path().open("rb") as whole:
        cut.write_bytes(whole.read(2**20))
    refused = [(junk, "not a GGUF file"), (cut, "truncated")]
    for name, text in (("bad-json", "{bad json"), ("bad-template", '{"prompt_template": "x"}')):
        tabby = tmp_path / name
        (tabby / "ggml").mkdir(parents=True)
        (tabby / "ggml" / "model-00001-of-00001.gguf").symlink_to(embedded_model_path())
        (tabby / "tabby.json").write_text(text)
        refused.append((tabby, "tabby.json"))
    for path, why in refused:
        for stream in (True, False):
            body = {"model_name": str(path), "role": "chat", "stream": stream}
            response = await client.post("/v1/model/load", json=body, headers=ADMIN)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_model", "model_name")
            assert why in error["message"]


async def test_a_stats_window_ending_before_it_starts_says_which_bound_was_a_default(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/stats/completions", params={"until": 0}, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "'until' (0)" in error["message"] and ", the default)" in error["message"]
    assert error["param"] == "until"


async def test_every_model_answer_names_the_provider_that_served_it(
    client: httpx.AsyncClient,
) -> None:
    """``X-Keel-Provider`` (the Tabby route had it; the OpenAI routes did not), streamed
    or not: which backend answered, a fallback included."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    calls = [
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/completions", {"prompt": "x = ", "max_tokens": 4}),
        ("/v1/completions", {"prompt": "x = ", "max_tokens": 4, "stream": True}),
        ("/v1/embeddings", {"input": "def f(): pass"}),
    ]
    providers = (await client.get("/v1/providers", headers=USER)).json()["roles"]
    names = {p["name"] for role in providers.values() for p in role["providers"]}
    for path, body in calls:
        response = await client.post(path, json=body, headers=USER)
        assert response.status_code == 200, response.text
        assert response.headers.get("x-keel-provider") in names, (path, response.headers)


async def test_embeddings_name_the_model_that_made_them_not_the_one_asked_for(
    client: httpx.AsyncClient,
) -> None:
    """The answer echoed the client's ``model``, whatever made the vectors."""
    body = {"input": "def f(): pass", "model": "text-embedding-3-small"}
    response = await client.post("/v1/embeddings", json=body, headers=USER)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "fallback-embed"


async def test_the_sampling_fields_a_client_sends_reach_the_backend(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """OpenAI chat and completion bodies: temperature, top_p, the penalties, seed, stop
    and max_tokens go to the backend as sent (top_p was checked, then dropped; the
    penalties were dropped)."""
    sampling = {
        "temperature": 0.3,
        "top_p": 0.8,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "seed": 11,
        "stop": ["\n\n"],
        "max_tokens": 7,
    }
    for path, body in (
        ("/v1/chat/completions", VALID_BODIES["/v1/chat/completions"]),
        ("/v1/completions", OPENAI_COMPLETION),
    ):
        upstreams = (backends.primary, backends.fallback)
        before = [len(upstream.requests) for upstream in upstreams]
        response = await client.post(path, json={**body, **sampling}, headers=USER)
        assert response.status_code == 200, response.text
        (sent,) = [
            request.json
            for upstream, seen in zip(upstreams, before, strict=True)
            for request in upstream.requests[seen:]
            if request.path == path
        ]
        assert {field: sent.get(field) for field in sampling} == sampling, sent


async def test_a_response_format_reaches_the_backend_and_a_bad_one_is_a_400(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    chat = VALID_BODIES["/v1/chat/completions"]
    schema = {"name": "answer", "schema": {"type": "object"}, "strict": True}
    for wanted, sent_on in (
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "json_schema": schema},
            {"type": "json_schema", "json_schema": schema},
        ),
        ({"type": "text"}, None),
    ):
        seen = len(backends.fallback.requests)
        response = await client.post(
            "/v1/chat/completions", json={**chat, "response_format": wanted}, headers=USER
        )
        assert response.status_code == 200, response.text
        (request,) = backends.fallback.requests[seen:]
        assert request.json.get("response_format") == sent_on
    for bad, field in (
        ({"type": "json_schema"}, "response_format"),
        ({"type": "yaml"}, "response_format.type"),
    ):
        response = await client.post(
            "/v1/chat/completions", json={**chat, "response_format": bad}, headers=USER
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field


def nested(levels: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        (
            {"type": "array", "items": {"type": "string"}, "minItems": 5, "maxItems": 2},
            "schema: minItems 5 is over maxItems 2",
        ),
        (
            {
                "type": "object",
                "properties": {"id": {"type": "string", "minLength": 5, "maxLength": 2}},
            },
            "schema.properties.id: minLength 5 is over maxLength 2",
        ),
        ({"type": "integer", "minimum": 3, "maximum": 1.5}, "minimum 3 is over maximum 1.5"),
        (
            {"type": "string", "pattern": "^[a-z]{5,2}$"},
            "schema.pattern: {5,2} asks for at least 5 and at most 2 repeats",
        ),
        (
            {"type": "string", "pattern": "^((a{0,30}){0,30}){0,30}$"},
            "schema.pattern: (a{0,30}){0,30} repeats what can match nothing",
        ),
        (
            {"type": "string", "pattern": "^[z-a]$"},
            "schema.pattern: [z-a] is a range from 'z' down to 'a'",
        ),
        (nested(300), "nested deeper than 64 levels"),
        (
            {"type": "object", "properties": {f"p{n}": {"type": "string"} for n in range(1001)}},
            "schema.properties: over 1000 entries",
        ),
    ],
    ids=[
        "items",
        "length",
        "number",
        "pattern",
        "repeated-empty",
        "reversed-range",
        "depth",
        "width",
    ],
)
async def test_a_response_schema_no_value_can_follow_is_the_callers_400(
    client: httpx.AsyncClient, backends: Backends, schema: dict[str, object], said: str
) -> None:
    """Bounds no value can meet grew the local engine's worker past 17 GB while every
    editor's completion waited; 300 levels of nesting failed inside the engine as the
    provider's fault and opened the worker's breaker (completions 503 for 60 s); a
    pattern repeating what can match nothing held the worker at full CPU for minutes.
    All are refused before any backend sees them, naming what is wrong."""
    seen = len(backends.fallback.requests)
    body = {
        **VALID_BODIES["/v1/chat/completions"],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema", error
    assert said in error["message"], error
    assert len(backends.fallback.requests) == seen
    fine = {**body["response_format"]["json_schema"], "schema": nested(30)}  # type: ignore[index]
    body["response_format"] = {"type": "json_schema", "json_schema": fine}
    assert (await client.post("/v1/chat/completions", json=body, headers=USER)).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field", "says"),
    [
        ("/v1/embeddings", {"input": [1, 2, 3]}, "input", "check_embedding_ctx_length=False"),
        ("/v1/embeddings", {"input": [[1, 2], [3]]}, "input", "token IDs are not taken"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt", "token IDs are not taken"),
        ("/v1/completions", {"prompt": ""}, "prompt", "the prompt is empty"),
        ("/v1/completions", {"prompt": [""]}, "prompt", "the prompt is empty"),
        ("/v1/completions", {"max_tokens": 5}, "segments", "'prompt' (an OpenAI completion)"),
    ],
)
async def test_token_ids_and_empty_prompts_are_a_400_saying_what_to_send(
    client: httpx.AsyncClient, backends: Backends, path: str, body: dict, field: str, says: str
) -> None:
    """Token IDs belong to one vocabulary (LangChain sends tiktoken's); an empty prompt
    gave an empty answer "cut for length"."""
    sent_before = len(backends.primary.requests) + len(backends.fallback.requests)
    response = await client.post(path, json=body, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (field, "invalid_request_error")
    assert says in error["message"]
    assert len(backends.primary.requests) + len(backends.fallback.requests) == sent_before


async def test_an_empty_prompt_with_a_suffix_is_served(client: httpx.AsyncClient) -> None:
    """The cursor at the top of a file: nothing before it, code after it."""
    body = {"prompt": "", "suffix": "print(x)\n", "max_tokens": 5}
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text


async def test_embedding_usage_is_the_backends_own_count(client: httpx.AsyncClient) -> None:
    """An OpenAI-compatible backend's ``usage`` is in the very answer keel reads: it was
    thrown away for keel's estimate (2 tokens for "hello" that the backend counted 5)."""
    texts = ["hello", "def add(a, b):\n    return a + b\n"]
    response = await client.post("/v1/embeddings", json={"input": texts}, headers=USER)
    assert response.status_code == 200, response.text
    read = embedding_usage(texts)
    assert response.json()["usage"] == {"prompt_tokens": read, "total_tokens": read}


async def test_an_embedding_batch_takes_as_many_inputs_as_openai(
    client: httpx.AsyncClient,
) -> None:
    """LangChain's OpenAIEmbeddings sends 1,000 inputs a request (keel refused over 256)."""
    thousand = await client.post(
        "/v1/embeddings", json={"input": [f"chunk {i}" for i in range(1000)]}, headers=USER
    )
    assert thousand.status_code == 200, thousand.text
    assert [item["index"] for item in thousand.json()["data"]] == list(range(1000))
    too_many = await client.post("/v1/embeddings", json={"input": ["x"] * 2049}, headers=USER)
    assert_names(too_many, "input", "invalid_field")
    assert "at most 2048 inputs" in too_many.json()["error"]["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_a_models_whole_output_budget_may_be_asked_for(
    client: httpx.AsyncClient, backends: Backends, field: str
) -> None:
    """Clients ask for a model's whole output budget (16,384 for OpenAI's; keel refused
    over 8,192); the backend gets it, under the name the client gave it (OpenAI's
    reasoning models refuse ``max_tokens``), and a model stops at its own context first."""
    body = {"messages": [{"role": "user", "content": "hi"}], field: 16_384}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    sent = backends.fallback.last_request.json
    assert {name: sent.get(name) for name in ("max_tokens", "max_completion_tokens")} == {
        "max_tokens": None,
        "max_completion_tokens": None,
        field: 16_384,
    }


async def test_a_chat_without_a_limit_runs_as_long_as_the_backend_lets_it(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """OpenAI, vLLM and llama.cpp answer a chat that names no limit to the end of the
    context; keel capped it at 512 tokens, cutting long answers (Open WebUI, LangChain
    and aider send no limit)."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    sent = backends.fallback.last_request.json
    assert "max_tokens" not in sent and "max_completion_tokens" not in sent, sent
    assert response.json()["choices"][0]["finish_reason"] == "stop"


async def test_text_parts_reach_the_backend_a_line_apart(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """Cline and Continue send a message as text parts; glued together, "Fix this" and
    the code after it read "Fix thisdef f()". They go on a line apart, as vLLM joins
    them."""
    parts = [{"type": "text", "text": "Fix this:"}, {"type": "text", "text": "def f(:"}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 8}
    response = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    (message,) = backends.fallback.last_request.json["messages"]
    assert message == {"role": "user", "content": "Fix this:\ndef f(:"}


async def test_the_openai_routes_answer_without_v1_and_models_one_by_one(
    client: httpx.AsyncClient,
) -> None:
    """A client given a base URL without ``/v1`` asks there (llama.cpp's server answers
    both); the openai SDK's ``models.retrieve`` asks for one model; tabby-agent asks
    Tabby's ``/v1beta`` chat when ``/v1``'s is not found (it was a 404)."""
    listed = (await client.get("/v1/models", headers=USER)).json()
    assert (await client.get("/models", headers=USER)).json() == listed
    for path, body in (
        ("/chat/completions", VALID_BODIES["/v1/chat/completions"]),
        ("/v1beta/chat/completions", VALID_BODIES["/v1/chat/completions"]),
        ("/completions", OPENAI_COMPLETION),
        ("/embeddings", VALID_BODIES["/v1/embeddings"]),
    ):
        response = await client.post(path, json=body, headers=USER)
        assert response.status_code == 200, (path, response.text)
    metrics = (await client.get("/metrics", headers=USER)).text.splitlines()
    counted = [
        line
        for line in metrics
        if line.startswith("keel_requests_total{") and 'route="/chat/completions"' in line
    ]
    assert counted and all('role="chat"' in line for line in counted), counted
    assert 'route="/v1beta/chat/completions",status="200"' in "\n".join(metrics)
    assert (await client.get("/models")).status_code == 401  # the same access as /v1
    card = listed["data"][0]
    one = await client.get(f"/v1/models/{card['id']}", headers=USER)
    assert one.json() == card
    assert (await client.get(f"/models/{card['id']}", headers=USER)).json() == card
    missing = await client.get("/v1/models/no-such-model", headers=USER)
    assert missing.status_code == 404
    assert "GET /v1/models" in missing.json()["error"]["message"]


@pytest.mark.parametrize(
    ("prompt", "stop", "sent"),
    [
        ("x = ", None, "x ="),  # the model writes the space itself
        ("def f():\n    ", None, "def f():"),  # and a blank line's newline and indentation
        ("def f():\n    ", ["\n"], "def f():\n    "),  # unless a stop word is in them
        ("x = 1", None, "x = 1"),
    ],
)
async def test_an_openai_prompt_ends_at_its_code(
    client: httpx.AsyncClient, backends: Backends, prompt: str, stop: list[str] | None, sent: str
) -> None:
    """A prompt ending in whitespace is a split the model never saw (Continue's
    autocomplete sends one after every space): it goes to the backend without it, and
    the answer is the text after it."""
    upstreams = (backends.primary, backends.fallback)
    before = [len(upstream.requests) for upstream in upstreams]
    body: dict[str, object] = {"prompt": prompt, "max_tokens": 5, "stop": stop}
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    (sent_on,) = [
        request.json
        for upstream, seen in zip(upstreams, before, strict=True)
        for request in upstream.requests[seen:]
        if request.path == "/v1/completions"
    ]
    assert sent_on["prompt"] == sent


async def test_null_optional_fields_are_unset_as_openai_takes_them(
    client: httpx.AsyncClient,
) -> None:
    """Clients send ``"n": null`` or ``"stream": null`` (they were 400s); a null where a
    value is required is still a 400 naming the field."""
    nulls = {"n": None, "stream": None, "stream_options": {"include_usage": None}}
    ask = [{"role": "user", "content": "hi"}]
    chat = await client.post("/v1/chat/completions", json={"messages": ask, **nulls}, headers=USER)
    assert chat.status_code == 200, chat.text
    assert chat.json()["object"] == "chat.completion"  # null stream: not streamed
    completion = await client.post(
        "/v1/completions", json={"prompt": "def f(", **nulls}, headers=USER
    )
    assert completion.status_code == 200, completion.text
    refused = await client.post("/v1/chat/completions", json={"messages": None}, headers=USER)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"


async def test_a_message_without_content_is_a_400_unless_an_assistants(
    client: httpx.AsyncClient,
) -> None:
    empty = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user"}]}, headers=USER
    )
    assert empty.status_code == 400, empty.text
    error = empty.json()["error"]
    assert error["param"] == "messages[0]" and "user message needs its content" in error["message"]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    served = await client.post("/v1/chat/completions", json={"messages": turns}, headers=USER)
    assert served.status_code == 200, served.text


@pytest.mark.parametrize(
    ("legacy", "instead"), [("functions", "tools"), ("function_call", "tool_choice")]
)
async def test_the_legacy_functions_fields_are_a_400_naming_their_replacement(
    client: httpx.AsyncClient, legacy: str, instead: str
) -> None:
    """Ignored as unknown fields are, they left the model answering in text: the
    client waited for a call that was never going to come."""
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    value = [function] if legacy == "functions" else {"name": "get_weather"}
    body = {"messages": [{"role": "user", "content": "weather?"}], legacy: value}
    refused = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert_names(refused, legacy, "invalid_field")
    assert f"send '{instead}' instead" in refused.json()["error"]["message"]
    body[legacy] = None  # null: unset, as every optional field
    assert (await client.post("/v1/chat/completions", json=body, headers=USER)).status_code == 200


async def test_a_next_edit_suggestion_is_refused_not_answered_as_a_completion(
    client: httpx.AsyncClient,
) -> None:
    body = {**VALID_BODIES["/v1/completions"], "mode": "next_edit_suggestion"}
    refused = await client.post("/v1/completions", json=body, headers=USER)
    assert_names(refused, "mode", "invalid_field")
    said = refused.json()["error"]["message"]  # it was pydantic's "Input should be ..."
    assert "no next-edit suggestions" in said and "leave mode out" in said, said
    served = await client.post("/v1/completions", json={**body, "mode": "standard"}, headers=USER)
    assert served.status_code == 200 and served.json()["mode"] == "standard", served.text


async def test_an_events_select_kind_is_tabbys_line_or_none(client: httpx.AsyncClient) -> None:
    """Any text was stored: 60 kB a call filled the disk at ~14 MB/s from one user key.
    Then any kind but ``line`` was a 400, where Tabby takes it as none (200)."""
    event = {"type": "select", "completion_id": "cmpl-1", "choice_index": 0}
    for kind in ("A" * 60_000, "block", "", "line"):
        taken = await client.post(
            "/v1/events", params={"select_kind": kind}, json=event, headers=USER
        )
        assert taken.status_code == 200, taken.text


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "echo", True),
        ("/v1/completions", "logprobs", 2),
        ("/v1/completions", "best_of", 2),
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "top_logprobs", 3),
    ],
)
async def test_what_keel_cannot_return_is_refused_when_asked_for(
    client: httpx.AsyncClient, path: str, field: str, value: object
) -> None:
    """``echo``, ``logprobs`` and ``best_of`` on OpenAI's completions, ``logprobs`` and
    ``top_logprobs`` on its chat, were ignored: the client read an answer without the
    prompt or the probabilities (``logprobs: null``), or one sample, as if it had them.
    Left at their defaults (false, 0, 1, null) they are taken."""
    body = OPENAI_COMPLETION if path == "/v1/completions" else OPENAI_CHAT
    refused = await client.post(path, json={**body, field: value}, headers=USER)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == field and f"leave '{field}' out" in error["message"], error
    for default in (1,) if field == "best_of" else (False, 0, None):
        taken = await client.post(path, json={**body, field: default}, headers=USER)
        assert taken.status_code == 200, (default, taken.text)


async def test_a_wrong_method_is_a_405_that_says_which_are_allowed(
    client: httpx.AsyncClient,
) -> None:
    """In the one error shape, with the ``Allow`` header HTTP asks of a 405 (it was
    dropped with the rest of the exception's headers), and a message that says what to
    send (it said "Method Not Allowed" alone)."""
    answer = await client.get("/v1/completions", headers=USER)
    assert answer.status_code == 405, answer.text
    assert answer.headers["allow"] == "POST"
    error = answer.json()["error"]
    assert error["code"] == "http_405"
    assert error["message"] == "GET is not served at /v1/completions; send POST", error


TOOL_STRICT_3 = {"name": "f", "strict": 3}
TEXT_PART_5 = {"type": "text", "text": 5}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {**OPENAI_COMPLETION, "stream": [1]}, "stream"),
        ("/v1/completions", {**OPENAI_COMPLETION, "stream_options": 5}, "stream_options"),
        ("/v1/completions", {**OPENAI_COMPLETION, "stop": [5]}, "stop"),
        (
            "/v1/chat/completions",
            {**OPENAI_CHAT, "tools": [{"type": "function", "function": TOOL_STRICT_3}]},
            "tools[0].function.strict",
        ),
        (
            "/v1/chat/completions",
            {**OPENAI_CHAT, "messages": [{"role": "user", "content": [TEXT_PART_5]}]},
            "messages[0].content",
        ),
    ],
)
async def test_a_bad_field_is_named_even_when_it_begins_like_a_type(
    client: httpx.AsyncClient, path: str, body: dict, field: str
) -> None:
    """pydantic puts a union's branch labels (``str``, ``ContentPart``) in an error's
    path; keel skipped every part beginning with "str", so ``stream``, ``stream_options``
    and ``strict`` were named ``body``, and a model's class name leaked into the text."""
    response = await client.post(path, json=body, headers=USER)
    assert_names(response, field, "invalid_field")
    error = response.json()["error"]
    assert "StreamOptions" not in error["message"] and "ContentPart" not in error["message"]


@pytest.mark.parametrize("prompt", ["hello", ""])
async def test_a_body_with_segments_is_tabbys_even_with_a_prompt(
    client: httpx.AsyncClient, backends: Backends, prompt: str
) -> None:
    """Tabby ignores ``prompt`` when ``segments`` is set; keel answered such a body as an
    OpenAI completion of the prompt (and an empty one was a 400)."""
    body = {**VALID_BODIES["/v1/completions"], "prompt": prompt}
    before = len(backends.primary.requests), len(backends.fallback.requests)
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "object" not in answer and answer["choices"][0]["index"] == 0, answer
    sent = [r.json for r in backends.primary.requests[before[0] :]]
    sent += [r.json for r in backends.fallback.requests[before[1] :]]
    assert "def f():" in json.dumps(sent) and "hello" not in json.dumps(sent), sent


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_u64_seed_is_taken_and_sent_as_the_int64_with_its_bits(
    client: httpx.AsyncClient, backends: Backends, path: str
) -> None:
    """Tabby's seed is a u64: 2**63 and above were a 400. An OpenAI-style backend takes
    an i64, so it gets the same 64 bits signed."""
    body = {**VALID_BODIES[path], "seed": 2**64 - 1}
    before = len(backends.primary.requests), len(backends.fallback.requests)
    response = await client.post(path, json=body, headers=USER)
    assert response.status_code == 200, response.text
    new = backends.primary.requests[before[0] :] + backends.fallback.requests[before[1] :]
    assert [request.json["seed"] for request in new] == [-1], new


TEXT_PART = {"type": "text", "text": "x"}
SNIPPET = {"filepath": "a.py", "body": "x = 1"}


@pytest.mark.parametrize(
    ("path", "body", "param", "said"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 257]},
            "stop",
            "at most 256 characters",
        ),
        ("/v1/completions", {"prompt": "x", "stop": "y" * 257}, "stop", "at most 256"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}] * 2049},
            "messages",
            "at most 2048 items",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [TEXT_PART] * 1025}]},
            "messages[0].content",
            "at most 1024 items",
        ),
        (
            "/v1/completions",
            {"segments": {"prefix": "x", "relevant_snippets_from_changed_files": [SNIPPET] * 513}},
            "segments.relevant_snippets_from_changed_files",
            "at most 512 items",
        ),
    ],
    ids=["chat-stop", "completion-stop", "messages", "parts", "snippets"],
)
async def test_inputs_that_held_an_engine_for_everyone_are_a_400_naming_the_limit(
    client: httpx.AsyncClient, path: str, body: dict[str, object], param: str, said: str
) -> None:
    """Each was a valid request that took the local engine from every other user: 16
    stop strings of 100,000 characters (2.4 s a token), 40,000 tiny messages or 138,000
    content parts (minutes of tokenizing, then the shared breaker open), 15,000 client
    snippets (each counted by the tokenizer, past the worker's liveness limit: killed as
    frozen, again and again)."""
    response = await client.post(path, json=body, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and said in error["message"], error


async def test_a_declarations_debug_snippet_has_tabbys_score(client: httpx.AsyncClient) -> None:
    """Tabby's debug snippet has a score, 1.0 for a declaration; keel left it out."""
    segments = {
        "prefix": "def f(a):\n    return ",
        "declarations": [{"filepath": "util.py", "body": "def helper(x):\n    return x"}],
        "relevant_snippets_from_changed_files": [
            {"filepath": "a.py", "body": "def other(y):\n    return y", "score": 0.0}
        ],
    }
    body = {"language": "python", "segments": segments, "debug_options": {"return_snippets": True}}
    response = await client.post("/v1/completions", json=body, headers=USER)
    assert response.status_code == 200, response.text
    snippets = response.json()["debug_data"]["snippets"]
    assert [(s["filepath"], s["score"]) for s in snippets] == [("util.py", 1.0), ("a.py", 0.0)]


async def test_retrieval_off_leaves_the_clients_snippets_out_too(
    client: httpx.AsyncClient,
) -> None:
    """Tabby's ``disable_retrieval_augmented_code_completion`` builds the prompt from the
    prefix and suffix alone (its evaluation's switch): keel still put the client's
    declarations and snippets in."""
    segments = {
        "prefix": "x = foo(",
        "suffix": ")\n",
        "declarations": [{"filepath": "a/c.py", "body": "def foo(y):\n    return y"}],
    }
    debug = {"return_prompt": True, "return_snippets": True}
    body = {"language": "python", "segments": segments, "debug_options": debug}
    off = {**body, "debug_options": {**debug, "disable_retrieval_augmented_code_completion": True}}
    on = await client.post("/v1/completions", json=body, headers=USER)
    assert "def foo(y)" in on.json()["debug_data"]["prompt"], on.text
    response = await client.post("/v1/completions", json=off, headers=USER)
    assert response.status_code == 200, response.text
    data = response.json()["debug_data"]
    assert "def foo" not in data["prompt"] and not data.get("snippets"), data


async def test_a_model_routes_refusal_before_routing_is_counted_as_its_route(
    client: httpx.AsyncClient,
) -> None:
    """A body over the limit is refused before routing: it was counted as route
    "other", role "", which the status page's figures skip."""
    raw = b'{"prompt": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    response = await client.post("/v1/completions", content=raw, headers=USER)
    assert response.status_code == 413, response.text
    metrics = (await client.get("/metrics", headers=USER)).text
    assert (
        'keel_requests_total{method="POST",provider="",role="completion",'
        'route="/v1/completions",status="413"} 1.0'
    ) in metrics, [line for line in metrics.splitlines() if 'status="413"' in line]


async def test_a_context_past_the_configs_bound_is_a_400_before_any_load(
    client: httpx.AsyncClient,
) -> None:
    """A ``max_seq_len`` of 10^22 was a 507 saying the load needed 4.4 * 10^21 MiB."""
    body = {"model_name": "SmolLM2-135M-Instruct", "max_seq_len": 10**22, "stream": False}
    refused = await client.post("/v1/model/load", json=body, headers=ADMIN)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "max_seq_len" and "1048576" in error["message"], error


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/completions", OPENAI_COMPLETION), ("/v1/chat/completions", OPENAI_CHAT)],
)
async def test_stream_options_without_a_stream_is_a_400_naming_it(
    client: httpx.AsyncClient, path: str, body: dict[str, object]
) -> None:
    """OpenAI's API and vLLM refuse it; accepted, the client waiting for a usage chunk got
    one JSON body."""
    asked = {**body, "stream_options": {"include_usage": True}}
    response = await client.post(path, json=asked, headers=USER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "stream_options", error
    assert "'stream': true" in error["message"]
