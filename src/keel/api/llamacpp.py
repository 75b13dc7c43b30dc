"""``POST /completion`` in llama.cpp server's native shape, for the editors' "llama.cpp"
providers (Continue's ``llama.cpp``, Twinny's ``llamacpp``), which post there.

The body is read as llama.cpp's (:class:`LlamaCppCompletionRequest`), turned into
the OpenAI completion request ``POST /v1/completions`` takes, and served by that
same serving (the completion role's chain: admission, fallbacks, cancellation when
the client leaves, usage, metrics). Its answer is then reshaped as llama.cpp's:
the whole object, or events ``{"content", "stop": false}`` then a final object
with ``stop: true``, and no ``[DONE]`` (llama.cpp sends that only on its OpenAI
routes). A failure before the first event is an HTTP error in keel's one shape;
one after it is an event ``{"error": {...}}`` that ends the stream, as llama.cpp's
server sends it.

llama.cpp's ``/completions`` (no ``/v1``) is the same route there; in keel that path
is OpenAI's (:mod:`keel.api.openai`), which clients given a base URL without ``/v1``
use, so only ``/completion`` is llama.cpp's here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response

from keel import jsoncodec
from keel.api.access import USER, GuardedRoute
from keel.api.errors import parse_model, read_model
from keel.api.infill import in_cache, picked
from keel.api.state import app_state
from keel.pipeline.completion import AnswerEnds
from keel.schemas.llamacpp import (
    LlamaCppChunk,
    LlamaCppCompletionRequest,
    LlamaCppCompletionResponse,
    LlamaCppTimings,
    StopType,
)
from keel.schemas.openai import CompletionRequest
from keel.schemas.openapi import ERRORS, json_body, json_schema
from keel.serving.lifecycle import JsonResponse
from keel.serving.streaming import EventStream, sse

PATH = "/completion"  # a completion route in keel.api.middleware.ROLE_BY_ROUTE

router = APIRouter(responses=ERRORS, route_class=GuardedRoute)

RESPONSE: dict[str, Any] = {
    "description": "llama.cpp's answer; with `stream: true`, its events: "
    "`{content, stop: false}` per piece, then the final object (`stop: true`, `content` "
    'empty), or `{"error": {...}}` if the generation failed after the stream began. '
    "No `[DONE]`.",
    "content": {
        # With response_fields, only those (a nested one by its path): an object of them.
        "application/json": {"schema": json_schema(LlamaCppCompletionResponse | dict[str, Any])},
        "text/event-stream": {
            "schema": {
                "description": "Each server-sent event: `data` is one JSON object, "
                "`{content, stop: false}`, then the final answer.",
                "type": "object",
                "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                "required": ["data"],
            }
        },
    },
}


def stop_type(finish: str | None, stop_words: bool) -> StopType | None:
    """Why the answer ended, in llama.cpp's words, where keel knows it: the budget, or
    the model's end when nothing else could have ended it (``stop_words``: stop strings,
    ``n_indent`` or ``t_max_predict_ms`` were set, and the backend's "stop" is either)."""
    if finish == "length":
        return "limit"
    if finish == "stop" and not stop_words:
        return "eos"
    return None


def final(
    content: str, model: str, usage: dict[str, Any], finish: str | None, stop_words: bool
) -> dict[str, Any]:
    """llama.cpp's final object from an OpenAI answer's parts."""
    ended = stop_type(finish, stop_words)
    predicted = int(usage.get("completion_tokens") or 0)
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    answer = LlamaCppCompletionResponse(
        content=content,
        model=model,
        tokens_predicted=predicted,
        tokens_evaluated=prompt,
        tokens_cached=in_cache(prompt, predicted) if cached is not None else None,
        stop_type=ended,
        stopping_word="" if ended is not None else None,
        timings=LlamaCppTimings(
            predicted_n=predicted,
            prompt_n=None if cached is None else prompt - cached,
            cache_n=cached,
        ),
    )
    return answer.model_dump(exclude_none=True)


@router.post(
    PATH,
    dependencies=[USER],
    response_model=None,
    openapi_extra=json_body(LlamaCppCompletionRequest),
    responses={200: RESPONSE},
)
async def completion(request: Request) -> Response:
    body = await read_model(request, LlamaCppCompletionRequest)
    state = app_state(request)
    # stop goes as OpenAI's; n_indent and t_max_predict_ms end it as on /infill
    ends = AnswerEnds.of((), body.n_indent, body.t_max_predict_ms)
    stop_words = bool(body.stop) or ends is not None
    if body.limit() == 0:  # nothing to generate: no upstream request
        model = state.providers.for_role("completion").info.model
        nothing = final("", model, {}, "length", stop_words)
        if body.stream:
            return EventStream(_once(sse(nothing)))
        return JsonResponse(picked(nothing, body.response_fields))
    openai = parse_model(CompletionRequest, body.to_openai())
    # llama-server ends an answer where the context does, whatever n_predict asked for
    answer = await state.completion.serve_openai(request, openai, must_fit=False, ends=ends)
    if isinstance(answer, EventStream):
        return _reshaped(answer, stop_words)
    if answer.status_code != 200:
        return answer
    data = jsoncodec.loads(bytes(answer.body))
    choice = data["choices"][0]
    whole = final(choice["text"], data["model"], data["usage"], choice["finish_reason"], stop_words)
    return JsonResponse(picked(whole, body.response_fields))


async def _once(event: bytes) -> AsyncGenerator[bytes, None]:
    yield event


def _events(chunk: bytes) -> Iterator[Any]:
    """The JSON events of keel's own OpenAI stream in ``chunk`` (whole events, one
    ``data:`` line each), ``[DONE]`` left out."""
    for event in chunk.split(b"\n\n"):
        data = event.removeprefix(b"data: ")
        if data and data != b"[DONE]":
            yield jsoncodec.loads(data)


def _reshaped(openai: EventStream, stop_words: bool) -> EventStream:
    """``openai``'s events as llama.cpp's. Closing this stream (the client left) closes
    ``openai``'s, which cancels the generation."""
    finish: str | None = None

    def translate(event: dict[str, Any]) -> bytes:
        nonlocal finish
        if "error" in event:  # the stream failed after it began: llama.cpp's error event
            return sse({"error": event["error"]})
        choices = event.get("choices") or []
        if choices:
            finish = choices[0].get("finish_reason") or finish
            text = choices[0].get("text") or ""
            return sse(LlamaCppChunk(content=text).model_dump()) if text else b""
        if "usage" in event:  # the last event (include_usage): the final object
            return sse(final("", event["model"], event["usage"], finish, stop_words))
        return b""

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in openai.chunks:
                if openai.failed is not None:  # counted as the status it ended with
                    stream.failed, stream.why = openai.failed, openai.why
                out = b"".join(translate(event) for event in _events(chunk))
                if out:
                    yield out
        finally:
            await openai.close()

    stream = EventStream(events(), release=openai.close)
    return stream
