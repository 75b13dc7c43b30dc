"""keel's JSON on the request path: orjson, and the standard library for what it refuses."""

from __future__ import annotations

import json

import pytest

from keel import jsoncodec
from keel.serving.lifecycle import JsonResponse


def test_what_orjson_refuses_to_read_is_read_as_pythons_json_reads_it() -> None:
    assert jsoncodec.loads(b'{"a": [1, "\xc3\xa9"]}') == {"a": [1, "é"]}
    infinite = jsoncodec.loads('{"logprob": -Infinity}')["logprob"]
    assert infinite == float("-inf")
    assert jsoncodec.loads("[NaN]")[0] != jsoncodec.loads("[NaN]")[0]  # a NaN


@pytest.mark.parametrize("text", ["", "{", b"\xff", '{"a": 1} x', "[1,]"])
def test_what_is_not_json_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads(text)


@pytest.mark.parametrize(
    "value",
    [
        {"n": 2**70},  # past 64 bits
        {"text": "\ud800"},  # a lone surrogate, as a model's broken UTF-8 may give
        {1: "a"},  # a key that is not a string
    ],
)
def test_what_orjson_refuses_to_write_is_written_as_pythons_json_writes_it(
    value: object,
) -> None:
    written = jsoncodec.dumps(value)
    assert written == json.dumps(value, separators=(",", ":")).encode()
    assert json.loads(written) == json.loads(json.dumps(value))


def test_text_is_written_compact_in_utf8() -> None:
    value = {"choices": [{"delta": {"content": "héllo ✓"}, "finish_reason": None}]}
    written = jsoncodec.dumps(value)
    assert written == '{"choices":[{"delta":{"content":"héllo ✓"},"finish_reason":null}]}'.encode()
    assert json.loads(written) == value


def test_a_nan_is_written_as_null_not_as_what_json_does_not_allow() -> None:
    assert jsoncodec.dumps({"x": float("nan")}) == b'{"x":null}'


def test_a_json_response_is_the_same_document() -> None:
    value = {"object": "list", "data": [{"embedding": [0.1, -2.5e-7, 3.0], "index": 0}]}
    response = JsonResponse(value, headers={"x-keel-provider": "p"})
    assert json.loads(response.body) == value
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-keel-provider"] == "p"
