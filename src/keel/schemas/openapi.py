"""How routes that read their own bodies document them in ``/openapi.json``.

Every request body goes through one gate (``api/errors.py``: ``decode_body``
then ``parse_model``) so that any bad body is the same 400 naming the field,
and ``POST /v1/completions`` picks its model by the body's shape. FastAPI
therefore never sees the request models, and the routes document them with
``openapi_extra=json_body(Model)``. The schema is inlined, its ``$defs``
resolved in place: FastAPI adds to ``components`` only the models it
validates itself, and a ``$ref`` to ``#/$defs/...`` would point nowhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Tag, TypeAdapter

from keel.schemas.openai import CompletionRequest, CompletionResponse
from keel.schemas.tabby import TabbyCompletionRequest, TabbyCompletionResponse


def completion_shape(data: Any) -> Literal["openai", "tabby"]:
    """A body with ``prompt`` is OpenAI's completion request, unless it has Tabby's
    ``segments`` too (Tabby ignores ``prompt`` then); anything else is Tabby's."""
    openai = isinstance(data, dict) and "prompt" in data and "segments" not in data
    return "openai" if openai else "tabby"


CompletionBody = Annotated[
    Annotated[TabbyCompletionRequest, Tag("tabby")] | Annotated[CompletionRequest, Tag("openai")],
    Discriminator(completion_shape),
]
"""The two shapes ``POST /v1/completions`` accepts; documented as a ``oneOf``."""

COMPLETION_BODY = (
    "Tabby's completion request (what Tabby's IDE clients send) or OpenAI's: "
    "a body with `prompt` (and no `segments`) is OpenAI's, any other is Tabby's."
)


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in seen:
            raise ValueError(f"{name} is recursive: it cannot be inlined")
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return {**_inline(defs[name], defs, (*seen, name)), **_inline(rest, defs, seen)}
    return {key: _inline(value, defs, seen) for key, value in node.items()}


def json_schema(model: Any) -> dict[str, Any]:
    """The JSON schema of ``model`` (a pydantic model or type), with no references left."""
    schema = TypeAdapter(model).json_schema()
    defs = schema.pop("$defs", {})
    inlined: dict[str, Any] = _inline(schema, defs)
    return inlined


def json_body(
    model: Any, *, required: bool = True, description: str | None = None
) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    body: dict[str, Any] = {
        "required": required,
        "content": {"application/json": {"schema": json_schema(model)}},
    }
    if description is not None:
        body["description"] = description
    return {"requestBody": body}


class ConfigIssueOut(BaseModel):
    key: str
    message: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None
    issues: list[ConfigIssueOut] | None = None


class ErrorResponse(BaseModel):
    """keel's one error shape, for every 4xx and 5xx."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Refused; the message says what to fix."},
    "5XX": {"model": ErrorResponse, "description": "keel or a model backend failed."},
}
"""Every router's error responses. Documenting ``4XX`` also drops FastAPI's default
422 entry: keel answers a bad parameter with a 400 in the one error shape."""

EVENT_STREAM = {
    "text/event-stream": {
        "schema": {
            "description": "Each server-sent event: `data` is one JSON chunk; the last is [DONE].",
            "type": "object",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
            "required": ["data"],
        }
    }
}
"""An event stream, described one event at a time (as schemathesis reads it)."""


def streamed(model: Any, description: str) -> dict[str, Any]:
    """A 200 that is ``model`` as JSON, or server-sent events when the body asks to stream
    (each event's data one chunk, the last ``[DONE]``)."""
    return {
        "description": description,
        "content": {"application/json": {"schema": json_schema(model)}, **EVENT_STREAM},
    }


COMPLETION_RESPONSE = streamed(
    TabbyCompletionResponse | CompletionResponse,
    "Tabby's completion for a Tabby body, OpenAI's for an OpenAI body; "
    "an event stream with OpenAI's `stream: true`.",
)
