"""OpenAI-compatible routes: completions, chat completions, embeddings, models.

``POST /v1/completions`` is shared with Tabby's API: a body with ``prompt``
is OpenAI's, anything else Tabby's; one serving object serves both
(:mod:`keel.serving`). The routes only parse and hand over.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from keel.api.access import USER, GuardedRoute
from keel.api.errors import parse_model, read_json, read_model
from keel.api.state import app_state
from keel.errors import NotFound
from keel.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from keel.schemas.openapi import (
    COMPLETION_BODY,
    COMPLETION_RESPONSE,
    ERRORS,
    CompletionBody,
    completion_shape,
    json_body,
    streamed,
)
from keel.schemas.tabby import TabbyCompletionRequest

router = APIRouter(responses=ERRORS, route_class=GuardedRoute)


@router.post(
    "/v1/completions",
    response_model=None,
    dependencies=[USER],
    openapi_extra=json_body(CompletionBody, description=COMPLETION_BODY),
    responses={200: COMPLETION_RESPONSE},
)
async def completions(request: Request) -> Response:
    serving = app_state(request).completion
    data = await read_json(request)
    if completion_shape(data) == "openai":
        return await serving.serve_openai(request, parse_model(CompletionRequest, data))
    return await serving.serve_tabby(request, parse_model(TabbyCompletionRequest, data))


@router.post(
    "/v1/chat/completions",
    response_model=None,
    dependencies=[USER],
    openapi_extra=json_body(ChatCompletionRequest),
    responses={200: streamed(ChatCompletionResponse, "The answer, or its chunks as events.")},
)
async def chat_completions(request: Request) -> Response:
    body = await read_model(request, ChatCompletionRequest)
    return await app_state(request).chat.serve(request, body)


@router.post(
    "/v1/embeddings",
    dependencies=[USER],
    response_model=None,
    openapi_extra=json_body(EmbeddingRequest),
    responses={200: {"model": EmbeddingResponse}},
)
async def embeddings(request: Request) -> JSONResponse:
    body = await read_model(request, EmbeddingRequest)
    return await app_state(request).embedding.serve(request, body)


@router.get(
    "/v1/models", dependencies=[USER], response_model=None, responses={200: {"model": ModelList}}
)
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": list(served_models(request).values())})


@router.get(
    "/v1/models/{model_id:path}",
    dependencies=[USER],
    response_model=None,
    responses={200: {"model": ModelCard}},
    openapi_extra={
        "parameters": [
            {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    },
)
async def model(request: Request) -> JSONResponse:
    """One model, as the openai SDK's ``models.retrieve`` reads it."""
    model_id = request.path_params["model_id"]
    card = served_models(request).get(model_id)
    if card is None:
        raise NotFound(f"no model {model_id!r} is served here; GET /v1/models lists them")
    return JSONResponse(card)


def served_models(request: Request) -> dict[str, dict[str, object]]:
    """The models keel serves, by id, as OpenAI's model objects; a local model's with its
    context (the largest a role runs it with: an embedding's is smaller)."""
    state = app_state(request)
    seen: dict[str, dict[str, object]] = {}
    contexts: dict[str, int] = {}

    created = int(state.started_at)

    def card(model: str) -> dict[str, object]:
        return {"id": model, "object": "model", "created": created, "owned_by": "keel"}

    for provider in state.providers.unique():
        seen.setdefault(provider.info.model, card(provider.info.model))
        context = provider.info.details.get("context_size")
        if isinstance(context, int):
            contexts[provider.info.model] = max(context, contexts.get(provider.info.model, 0))
    for model, context in contexts.items():
        seen[model]["context_length"] = seen[model]["max_model_len"] = context
    # A chat table's supported_models are served by name too (a client's model picker,
    # filled from here, never offered them, and models.retrieve said 404)
    for group in state.providers.chains["chat"]:
        for entry in group:
            for model in getattr(entry.config, "supported_models", None) or ():
                seen.setdefault(model, card(model))
    return seen


# The same routes without ``/v1``: clients given a base URL without it ask there (llama.cpp's
# server answers both); and Tabby's ``/v1beta`` chat, which tabby-agent asks when ``/v1``'s
# is not found.
for _path, _endpoint, _method in (
    ("/completions", completions, "POST"),
    ("/chat/completions", chat_completions, "POST"),
    ("/v1beta/chat/completions", chat_completions, "POST"),
    ("/embeddings", embeddings, "POST"),
    ("/models", models, "GET"),
    ("/models/{model_id:path}", model, "GET"),
):
    router.add_api_route(
        _path,
        _endpoint,
        methods=[_method],
        dependencies=[USER],
        response_model=None,
        include_in_schema=False,
    )
