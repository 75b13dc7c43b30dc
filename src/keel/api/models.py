"""TabbyAPI-compatible model management: see which model serves, list, load, unload.

``POST /v1/model/load`` streams its progress as server-sent events (queued,
checking_memory, starting_worker, loading, ready, or an error event), or,
with ``"stream": false``, answers once with the final state.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from keel.api.access import ADMIN, USER
from keel.api.errors import read_model
from keel.api.state import app_state
from keel.config import Role
from keel.errors import KeelError
from keel.schemas.admin import LoadProgress, LoadRequest, UnloadRequest, UnloadResult
from keel.schemas.openai import ModelCard, ModelList
from keel.schemas.openapi import ERRORS, json_body, streamed

router = APIRouter(responses=ERRORS)


@router.get(
    "/v1/model", dependencies=[USER], response_model=None, responses={200: {"model": ModelCard}}
)
async def current_model(request: Request, role: Role = "completion") -> dict[str, object]:
    return app_state(request).models.current(role)


@router.get(
    "/v1/model/list",
    dependencies=[USER],
    response_model=None,
    responses={200: {"model": ModelList}},
)
async def list_models(request: Request) -> dict[str, object]:
    return {"object": "list", "data": app_state(request).models.available_models()}


@router.post(
    "/v1/model/load",
    dependencies=[ADMIN],
    response_model=None,
    openapi_extra=json_body(LoadRequest),
    responses={200: streamed(LoadProgress, "Progress events, or the last step without streaming.")},
)
async def load_model(request: Request) -> Response:
    """A model that does not exist is a 404 before any progress is streamed."""
    body = await read_model(request, LoadRequest)
    manager = app_state(request).models
    manager.require_model(body.model_name)
    key_id = getattr(request.state, "key_id", None)
    steps = manager.load(body.role, body.model_name, key_id=key_id)
    if not body.stream:
        last: dict[str, object] = {}
        async for step in steps:
            last = step.to_dict(body.role, body.model_name)
        return JSONResponse(last)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for step in steps:
                data = step.to_dict(body.role, body.model_name)
                yield f"data: {json.dumps(data)}\n\n".encode()
        except KeelError as exc:
            error = {**exc.to_body(), "status": "error", "role": body.role}
            yield f"data: {json.dumps(error)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post(
    "/v1/model/unload",
    dependencies=[ADMIN],
    response_model=None,
    openapi_extra=json_body(UnloadRequest),
    responses={200: {"model": UnloadResult}},
)
async def unload_model(request: Request) -> dict[str, object]:
    body = await read_model(request, UnloadRequest)
    manager = app_state(request).models
    return await manager.unload(body.role, key_id=getattr(request.state, "key_id", None))
