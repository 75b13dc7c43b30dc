"""Render every failure in the one error shape: ``{"error": {message, type, code, param}}``.

Validation errors name the field (``segments.prefix``) and say what was
wrong; unexpected exceptions are logged with their traceback and answered
with a generic 500 that never includes it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from keel.errors import (
    ClientDisconnected,
    KeelError,
    NotFound,
    Overloaded,
    RequestError,
    UnsupportedEncoding,
    failed,
    internal_error,
)
from keel.ops.logging import request_id
from keel.schemas.admin import UNKNOWN_FIELD
from keel.serving.lifecycle import FAILURE_KEY, PROVIDER_KEY

log = logging.getLogger("keel.api")

ModelT = TypeVar("ModelT", bound=BaseModel)


ERROR_CODE_KEY = "keel_error_code"
"""The request's state key for the ``code`` of the error it was answered (see
:class:`ErrorResponse`)."""


class ErrorResponse(JSONResponse):
    """An error answer that notes its ``code`` in the request's state as it is sent, for
    the request's access-log line: a full queue's 429 and a key's over its limit logged
    alike. Noted by the answer itself, so every error keel renders says it (the
    middleware's own refusals too), and a success does no work for it."""

    def __init__(self, error: KeelError, headers: dict[str, str]) -> None:
        super().__init__(error.to_body(), status_code=error.status_code, headers=headers)
        self.code = error.code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})[ERROR_CODE_KEY] = self.code
        await super().__call__(scope, receive, send)


def error_response(error: KeelError) -> ErrorResponse:
    headers = {}
    if error.retry_after is not None:
        # rounded up: a client that waited 10 s of 10.4 was refused again
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.status_code == 401:  # how to authenticate, as HTTP asks of a 401
        headers["WWW-Authenticate"] = 'Bearer realm="keel"'

    return ErrorResponse(error, headers)


UNION_LABELS = frozenset({"str", "int", "float", "bool", "none"})
"""The labels pydantic puts in an error's ``loc`` for a union's plain-type branches."""


def _field(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if part == "body" and not parts:
            continue
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif isinstance(part, str) and (
            part in UNION_LABELS
            or part.startswith("function-")
            or "[" in part
            or part[:1].isupper()
        ):
            continue  # pydantic's union-branch labels (types, model names) are not fields
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "body"


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    # lax mode (TabbyAPI's management bodies): a value it could not convert
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "bool_parsing": "true or false",
}
"""What a wrong-typed value should have been, by pydantic's error type."""


def _within(field: str, outer: str) -> bool:
    return field == outer or field.startswith((f"{outer}.", f"{outer}["))


def _given(value: Any) -> str:
    """What the client sent, by its JSON type (and value, where that is short)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        shown = repr(value)
        shown = shown if len(shown) <= 24 else shown[:20] + "..."
        return f"{'an integer' if isinstance(value, int) else 'a decimal number'} ({shown})"
    if isinstance(value, str):
        shown = json.dumps(value if len(value) <= 24 else value[:20] + "...", ensure_ascii=False)
        return f"a string ({shown})"
    return "an array" if isinstance(value, list) else "an object"


def _type_message(errors: list[Any], field: str) -> str | None:
    """``expected an integer, got a string ("5")`` for a value of the wrong JSON type,
    every type a union takes named; where the value is of a type the field takes and
    something inside it is not, what and where that is. None for other errors."""
    if errors[0].get("type") not in (*_EXPECTED, "literal_error"):
        return None
    located = [(_field(tuple(error.get("loc", ()))), error) for error in errors]
    typed = [(at, e) for at, e in located if e.get("type") in _EXPECTED and _within(at, field)]
    if not typed:
        return None  # a value outside a literal's choices, of the right type
    deepest = max(len(at) for at, _ in typed)
    at = next(at for at, _ in typed if len(at) == deepest)
    here = [e for where, e in located if where == at]
    wanted: list[str] = []
    for error in here:
        kind, loc = error.get("type"), tuple(error.get("loc", ()))
        if kind == "literal_error":
            wanted.append(f"one of {(error.get('ctx') or {}).get('expected', '')}")
        elif kind == "list_type" and loc[-1:] == ("list[str]",):
            wanted.append("an array of strings")
        elif kind in _EXPECTED:
            wanted.append(_EXPECTED[kind])
    wanted = list(dict.fromkeys(wanted))
    joiner = ", or " if any(" or " in want for want in wanted) else " or "
    expected = joiner.join(wanted)
    given = next(e for where, e in typed if where == at).get("input")
    if wanted == ["a number"] and isinstance(given, int) and not isinstance(given, bool):
        return f"{_given(given)} is out of range for a number"
    inside = f"at '{at}': " if at != field else ""
    return f"{inside}expected {expected}, got {_given(given)}"


def _branch(loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The union branches an error's ``loc`` passes through, by their labels."""
    return tuple(part for part in loc if isinstance(part, str) and _field((part,)) == "body")


def _as_matched(errors: list[Any]) -> list[Any]:
    """A union's errors as the branch the value matched saw them. A value of a type one
    branch takes (an array of content parts) failing inside it was told the first
    branch's type error ("'messages[0].content': expected a string, got an array" for a
    part with no text): the errors within the field are now those of a branch that got
    past its type, and past a choice of ``type`` (a part of type "text" is no image part)."""
    first = errors[0]
    if first.get("type") not in (*_EXPECTED, "literal_error"):
        return errors
    field = _field(tuple(first.get("loc", ())))
    inside = [e for e in errors if _within(_field(tuple(e.get("loc", ()))), field)]
    deeper = [e for e in inside if _field(tuple(e.get("loc", ()))) != field]
    if any(e.get("type") in _EXPECTED for e in deeper):
        return errors  # a value of the wrong type inside: :func:`_type_message` says where
    branches: dict[tuple[str, ...], list[Any]] = {}
    for error in deeper:
        branches.setdefault(_branch(tuple(error.get("loc", ()))), []).append(error)
    matched = [b for b in branches.values() if all(e.get("type") != "literal_error" for e in b)]
    if not matched:
        return errors
    return matched[0] + [e for e in errors if e not in inside]


def validation_error(errors: list[Any]) -> RequestError:
    errors = _as_matched(errors)
    first = errors[0]
    field = _field(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    message = re.sub(r"a valid dictionary or instance of \w+", "a JSON object", message)
    message = _type_message(errors, field) or message
    missing = first.get("type") == "missing"
    text = f"'{field}' is required" if missing else f"'{field}': {message}"
    if first.get("type") == UNKNOWN_FIELD:  # the message names it, and the param is it
        field, text = str(first["ctx"]["field"]), message
    # the same fault as a union's other branches saw it is not another one
    others = [
        at for at in (_field(tuple(e.get("loc", ()))) for e in errors[1:]) if not _within(at, field)
    ]
    if others:
        text += f" (and {len(others)} more: {', '.join(sorted(set(others)))})"
    return RequestError(text, param=field, code="invalid_field")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def _bad_text(value: Any, path: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """Where in ``value`` a string is not valid Unicode (holds a lone surrogate), if anywhere.

    Both kinds of bad text arrive here as lone surrogates: ``"\\ud800"`` escapes
    decode to one, and ``decode_body`` turns each invalid UTF-8 byte into one.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _bad_text(key, (*path, key)) or _bad_text(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _bad_text(item, (*path, index))
            if found is not None:
                return found
    return None


def decode_body(body: bytes) -> Any:
    """The JSON document in ``body``, or a 400 saying what is wrong with it.

    The one gate every request body passes: invalid JSON, NaN/Infinity and
    text that is not valid Unicode (invalid UTF-8, or a lone surrogate such as
    ``"\\ud800"``, which no response could encode) are the caller's 400 naming
    the field, never a 500 later on.
    """
    if not body.strip():
        raise RequestError("the request body is empty; send a JSON object", code="empty_body")
    try:
        text = body.decode(json.detect_encoding(body), "surrogateescape")
        data = json.loads(text, parse_constant=_not_json, parse_float=_finite)
        where = _bad_text(data)
    except ValueError as exc:  # JSONDecodeError, a bad number, an over-long integer
        raise RequestError(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    except RecursionError:
        raise RequestError(
            "the request body is nested too deeply: hundreds of arrays and objects inside "
            "each other, past what keel reads (its fields nest a few levels, a response "
            "schema at most 64); send a flatter body",
            code="invalid_json",
        ) from None
    if where is not None:
        field = _field(where).encode("utf-8", "backslashreplace").decode()
        raise RequestError(
            f"'{field}': the text is not valid Unicode (invalid UTF-8 or a lone surrogate); "
            "send UTF-8",
            param=field,
            code="invalid_text",
        )
    return data


async def read_json(request: Request) -> Any:
    """The request's JSON body (see :func:`decode_body`). A compressed one is a 415 that
    says so: read as JSON, a gzip body was "not valid JSON: Expecting value"."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncoding(
            f"the request body is compressed (Content-Encoding: {encoding[:40]}), which keel "
            "does not read; send it uncompressed, without a Content-Encoding header"
        )
    return decode_body(await request.body())


def parse_model(model: type[ModelT], data: Any) -> ModelT:
    """``data`` as ``model``, validated as the model says: the OpenAI, Tabby and
    llama.cpp bodies strictly (a value of the wrong JSON type is the client's 400 naming
    the field, ``"max_tokens": "5"``, ``"stream": "yes"``, never converted, as OpenAI and
    Tabby refuse it), TabbyAPI's management bodies in pydantic's lax mode, as TabbyAPI
    reads them (its own loader sends ``"max_seq_len": "4096"``)."""
    if not isinstance(data, dict):
        raise RequestError(
            f"the request body must be a JSON object, not {type(data).__name__}",
            code="invalid_json",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


async def read_model(request: Request, model: type[ModelT]) -> ModelT:
    return parse_model(model, await read_json(request))


def no_route(path: str) -> str:
    """A 404's message: where the client meant to go, where keel can tell from the path
    (a real client's mistake or an API keel does not serve), else the API's document."""
    if path.startswith("//"):
        return (
            f"no such route: the path {path[:200]} has a doubled slash, as when a base URL "
            "that ends in a slash gets the client's own path after it; drop the trailing "
            "slash of the client's base URL"
        )
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == parts[1]:
        base = f"/{parts[0]}"
        return (
            f"no such route: the path begins {base}{base}, as when a base URL that ends in"
            f" {base} gets the client's own {base} too; drop one {base} from the client's"
            f" base URL (the route is {path.split(base, 1)[1]})"
        )
    if "responses" in parts[:2]:
        return (
            "keel does not serve OpenAI's Responses API: send the conversation to POST"
            " /v1/chat/completions (the openai SDK's chat.completions.create)"
        )
    if parts[-2:] == ["fim", "completions"]:
        return (
            "keel serves fill-in-the-middle at POST /v1/completions, the text before the"
            " cursor as prompt and after it as suffix (as this route's body has them);"
            " or at llama.cpp's POST /infill"
        )
    return "no such route; see GET /docs for the API"


def install_error_handlers(app: FastAPI) -> None:
    async def keel_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, KeelError)
        if exc.provider and not getattr(request.state, PROVIDER_KEY, None):
            # The failure's provider labels the request's metrics, as a success's does:
            # a non-streamed completion that failed was counted under provider "".
            setattr(request.state, PROVIDER_KEY, exc.provider)
        if failed(exc.status_code):  # said once, on the request's access-log line
            setattr(request.state, FAILURE_KEY, f"{type(exc).__name__}: {exc.message}")
        key = getattr(request.state, "key_id", None)
        limiter = getattr(getattr(request.app.state, "keel", None), "rate_limiter", None)
        if isinstance(exc, Overloaded) and key is not None and limiter is not None:
            # keel's own refusal is not the key's request: an SDK retrying overloads used
            # up its key's requests_per_minute on them, and met its own limit next
            await limiter.refund(key)
        return error_response(exc)

    async def fastapi_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(list(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(NotFound(no_route(request.url.path)))
        allowed = allowed_methods(request) if exc.status_code == 405 else []
        message = str(exc.detail)
        if allowed:  # it said "Method Not Allowed" alone
            message = (
                f"{request.method} is not served at {request.url.path}; send {' or '.join(allowed)}"
            )
        error = KeelError(message, code=f"http_{exc.status_code}")
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = error_response(error)
        response.headers.update(exc.headers or {})  # a 405's Allow: the methods there are
        if allowed:  # of every route of the path: the first's alone said POST
            response.headers["Allow"] = ", ".join(allowed)
        return response

    async def client_left(_: Request, exc: Exception) -> JSONResponse:
        # Gone before its body was read: a 499 nobody reads, no server error.
        return error_response(ClientDisconnected("the client left before sending its body"))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # This layer is outside the middleware that set the request's id: set again, the
        # traceback is logged under it (it was under none)
        token = request_id.set(getattr(request.state, "request_id", None))
        try:
            log.exception("unexpected error", exc_info=exc)
        finally:
            request_id.reset(token)
        return error_response(internal_error())

    app.add_exception_handler(KeelError, keel_error)
    app.add_exception_handler(RequestValidationError, fastapi_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_left)
    app.add_exception_handler(Exception, unexpected)


class LoggedOnce:
    """The app as the server runs it: an exception the server-error layer has answered
    (a 500) and logged is not raised on to the server, which logged it again, a second
    traceback, under no request id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            if scope["type"] != "http":
                raise


def allowed_methods(request: Request) -> list[str]:
    """The methods the routes of ``request``'s path answer (``/v1/health``: GET and POST,
    two routes)."""
    matching = (
        route for route in request.app.routes if route.matches(request.scope)[0] is not Match.NONE
    )
    methods = {method for route in matching for method in getattr(route, "methods", ()) or ()}
    if "GET" in methods:  # keel serves HEAD wherever it serves GET (keel.api.middleware)
        methods.add("HEAD")
    return sorted(methods)
