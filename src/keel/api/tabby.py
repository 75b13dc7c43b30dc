"""Tabby-compatible routes, as Tabby's IDE clients (``tabby-agent``) call them."""

from __future__ import annotations

import os
import platform
from functools import cache
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from keel import __version__, build_info
from keel.api.errors import parse_model, read_json
from keel.api.state import app_state
from keel.schemas.tabby import (
    HealthModels,
    HealthState,
    LogEventRequest,
    ServerSetting,
    TabbyCompletionRequest,
    Version,
)

router = APIRouter()


async def tabby_completion(request: Request, data: Any) -> Response:
    body = parse_model(TabbyCompletionRequest, data)
    state = app_state(request)
    response = await state.completion.complete(body)
    await state.events.record(
        "completion",
        completion_id=response.id,
        language=body.language,
        data={"provider": state.providers.completion.name, "chars": len(response.choices[0].text)},
    )
    return JSONResponse(response.model_dump(exclude_none=True))


@router.post("/v1/events")
async def log_event(request: Request, select_kind: str | None = None) -> Response:
    event = parse_model(LogEventRequest, await read_json(request))
    await app_state(request).events.record(
        event.type,
        completion_id=event.completion_id,
        choice_index=event.choice_index,
        view_id=event.view_id,
        elapsed=event.elapsed,
        select_kind=select_kind,
    )
    return Response(status_code=200)


@cache
def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def health_state(request: Request) -> HealthState:
    state = app_state(request)
    providers = state.providers
    info = build_info()
    return HealthState(
        model=providers.completion.info.model,
        chat_model=providers.chat.info.model,
        chat_device="cpu",
        device="cpu",
        arch=platform.machine(),
        cpu_info=_cpu_info(),
        cpu_count=os.cpu_count() or 1,
        cuda_devices=[],
        version=Version(
            build_date=info["build_date"],
            build_timestamp=info["build_timestamp"],
            git_sha=info["git_sha"],
            git_describe=f"v{__version__}",
        ),
        models=HealthModels(
            completion=providers.completion.info.model,
            chat=providers.chat.info.model,
            embedding=providers.embedding.info.model,
        ),
        webserver=False,
    )


@router.api_route("/v1/health", methods=["GET", "POST"])
async def health(request: Request) -> dict[str, object]:
    return health_state(request).model_dump(exclude_none=True)


@router.get("/v1beta/server_setting")
async def server_setting() -> dict[str, object]:
    return ServerSetting().model_dump()


@router.get("/v1beta/models")
async def beta_models(request: Request) -> dict[str, object]:
    providers = app_state(request).providers
    return {"completion": [providers.completion.info.model], "chat": [providers.chat.info.model]}
