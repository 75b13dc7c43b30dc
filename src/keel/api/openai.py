"""OpenAI-compatible routes: completions, chat completions, embeddings, models.

``POST /v1/completions`` is shared with Tabby's API: a body with ``prompt``
is OpenAI's, anything else goes to the Tabby handler.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from keel.api.access import USER
from keel.api.errors import parse_model, read_json, read_model
from keel.api.state import AppState, app_state
from keel.api.streaming import collect, stream_response, with_timeout
from keel.api.tabby import tabby_completion
from keel.config import Role
from keel.pipeline.prompt import render_template
from keel.providers.base import (
    ChatCall,
    ChatProvider,
    CompletionCall,
    CompletionProvider,
    EmbeddingProvider,
    Provider,
)
from keel.schemas.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from keel.schemas.openapi import COMPLETION_BODY, CompletionBody, json_body

router = APIRouter()


def _finish_reason(count: int, max_tokens: int) -> str:
    """Providers stream text only; a stream that used the whole budget was cut for length."""
    return "length" if count >= max_tokens else "stop"


async def routed(
    state: AppState,
    role: Role,
    open_stream: Callable[[Provider], AsyncIterator[str]],
    timeout: float,
    *,
    buffered: bool,
) -> AsyncIterator[str]:
    """A role's stream through admission and its router, bounded by ``timeout`` in all.

    ``buffered`` when the client waits for the whole answer: then a provider
    failing mid-answer still falls back, as the client has seen nothing.
    """
    async with state.routing.admission[role].slot():
        router = state.routing.routers[role]
        async for attempt in router.attempts(streaming=not buffered):
            async with attempt:
                held: list[str] = []
                pieces = with_timeout(attempt.pieces(open_stream(attempt.provider)), timeout, role)
                async for piece in pieces:
                    if buffered:
                        held.append(piece)
                    else:
                        yield piece
                for piece in held:
                    yield piece


@router.post(
    "/v1/completions",
    response_model=None,
    dependencies=[USER],
    openapi_extra=json_body(CompletionBody, description=COMPLETION_BODY),
)
async def completions(request: Request) -> Response:
    data = await read_json(request)
    if not (isinstance(data, dict) and "prompt" in data):
        return await tabby_completion(request, data)
    body = parse_model(CompletionRequest, data)
    state = app_state(request)
    primary = state.providers.for_role("completion")
    assert isinstance(primary, CompletionProvider)
    params = body.to_params(
        state.settings.completion.max_decoding_tokens or primary.default_max_tokens
    )

    def start(provider: Provider) -> AsyncIterator[str]:
        assert isinstance(provider, CompletionProvider)
        prompt, suffix = body.prompt_text(), body.suffix
        if suffix and not provider.supports_suffix:
            if provider.prompt_template is not None:
                prompt = render_template(provider.prompt_template, prompt, suffix)
            suffix = None
        return provider.stream_completion(CompletionCall(prompt, params, suffix or None))

    model = body.model or primary.info.model
    created = int(time.time())
    completion_id = f"cmpl-{uuid.uuid4()}"
    timeout = state.settings.server.completion_timeout
    pieces = routed(state, "completion", start, timeout, buffered=not body.stream)

    def envelope(text: str, finish_reason: str | None) -> dict[str, object]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    if body.stream:
        return await stream_response(
            pieces,
            head=[],
            chunk=lambda text: envelope(text, None),
            tail=lambda count: envelope("", _finish_reason(count, params.max_tokens)),
        )
    text, count = await collect(pieces)
    result = envelope(text, _finish_reason(count, params.max_tokens))
    result["usage"] = {"prompt_tokens": 0, "completion_tokens": count, "total_tokens": count}
    return JSONResponse(result)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    dependencies=[USER],
    openapi_extra=json_body(ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response:
    body = await read_model(request, ChatCompletionRequest)
    state: AppState = app_state(request)
    params = body.to_params(512)
    call = ChatCall(body.to_messages(), params)

    def start(provider: Provider) -> AsyncIterator[str]:
        assert isinstance(provider, ChatProvider)
        return provider.stream_chat(call)

    model = body.model or state.providers.for_role("chat").info.model
    created = int(time.time())
    completion_id = f"chatcmpl-{uuid.uuid4()}"
    timeout = max(state.settings.server.completion_timeout, 300.0)
    pieces = routed(state, "chat", start, timeout, buffered=not body.stream)

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, object]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    if body.stream:
        return await stream_response(
            pieces,
            head=[chunk({"role": "assistant", "content": ""}, None)],
            chunk=lambda text: chunk({"content": text}, None),
            tail=lambda count: chunk({}, _finish_reason(count, params.max_tokens)),
        )
    text, count = await collect(pieces)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": _finish_reason(count, params.max_tokens),
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": count, "total_tokens": count},
        }
    )


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/v1/embeddings", dependencies=[USER], openapi_extra=json_body(EmbeddingRequest))
async def embeddings(request: Request) -> JSONResponse:
    body = await read_model(request, EmbeddingRequest)
    state = app_state(request)
    texts = body.texts()

    async with state.routing.admission["embedding"].slot():
        async for attempt in state.routing.routers["embedding"].attempts():
            async with attempt:
                provider = attempt.provider
                assert isinstance(provider, EmbeddingProvider)
                vectors = await attempt.call(provider.embed(texts))
    tokens = sum(len(text) // 4 + 1 for text in texts)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": body.model or state.providers.for_role("embedding").info.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@router.get("/v1/models", dependencies=[USER])
async def models(request: Request) -> dict[str, object]:
    state = app_state(request)
    seen: dict[str, dict[str, object]] = {}
    for provider in state.providers.unique():
        seen.setdefault(
            provider.info.model,
            {
                "id": provider.info.model,
                "object": "model",
                "created": int(state.started_at),
                "owned_by": "keel",
            },
        )
    return {"object": "list", "data": list(seen.values())}
