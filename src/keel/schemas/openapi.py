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

from pydantic import Discriminator, Tag, TypeAdapter

from keel.schemas.openai import CompletionRequest
from keel.schemas.tabby import TabbyCompletionRequest


def completion_shape(data: Any) -> Literal["openai", "tabby"]:
    """A body with ``prompt`` is OpenAI's completion request; anything else is Tabby's."""
    return "openai" if isinstance(data, dict) and "prompt" in data else "tabby"


CompletionBody = Annotated[
    Annotated[TabbyCompletionRequest, Tag("tabby")] | Annotated[CompletionRequest, Tag("openai")],
    Discriminator(completion_shape),
]
"""The two shapes ``POST /v1/completions`` accepts; documented as a ``oneOf``."""

COMPLETION_BODY = (
    "Tabby's completion request (what Tabby's IDE clients send) or OpenAI's: "
    "a body with `prompt` is OpenAI's, any other is Tabby's."
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
