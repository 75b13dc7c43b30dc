"""Tabby-compatible routes, as Tabby's IDE clients (``tabby-agent``) call them."""

from __future__ import annotations

import asyncio
import os
import platform
import time
from functools import cache

from fastapi import APIRouter, Query, Request, Response

from keel import __version__, build_info
from keel.api.access import USER
from keel.api.errors import parse_model, read_json
from keel.api.state import AppState, app_state
from keel.config import EMBEDDED_MODEL_ID, Role, Settings
from keel.errors import RequestError
from keel.providers.base import Provider
from keel.schemas.openapi import ERRORS, json_body
from keel.schemas.tabby import (
    BetaModels,
    CompletionStats,
    HealthModels,
    HealthState,
    LocalModelHealth,
    LogEventRequest,
    ModelHealth,
    RemoteModelHealth,
    ServerSetting,
    Version,
)

router = APIRouter(responses=ERRORS)

TABBY_API_VERSION = "0.27.0"
"""The Tabby server version whose API keel serves; Tabby's clients gate features on it
(tabby-agent skips /v1beta/server_setting below 0.9.0)."""


@router.post(
    "/v1/events",
    dependencies=[USER],
    response_class=Response,
    openapi_extra=json_body(LogEventRequest),
)
async def log_event(request: Request, select_kind: str | None = None) -> Response:
    """``select_kind`` is Tabby's: ``line``, and any other value is none, as Tabby
    reads it (any text was stored: 60 kB a call filled the disk at ~14 MB/s from one
    key; then any but ``line`` was a 400, which Tabby answers 200)."""
    event = parse_model(LogEventRequest, await read_json(request))
    state = app_state(request)
    await state.events.record(
        event.type,
        completion_id=event.completion_id,
        choice_index=event.choice_index,
        view_id=event.view_id,
        elapsed=event.elapsed,
        select_kind="line" if select_kind == "line" else None,
    )
    counting = _count_event(state, event.type, event.completion_id)
    if not state.settings.events.is_postgres:
        await counting  # this machine's file, read at once
    else:
        # a completion another replica served: a database read, and a slow or locked
        # database held the editor's request for its 10 s; past a moment it is counted
        # beside the answer
        await asyncio.wait({state.background.spawn(counting)}, timeout=EVENT_COUNT_WAIT)
    return Response(status_code=200)


EVENT_COUNT_WAIT = 0.25
"""Seconds an editor's event waits for its count (the language of its completion) from a
shared events database."""


async def _count_event(state: AppState, kind: str, completion_id: str) -> None:
    language = await state.events.language_of(completion_id)
    state.metrics.editor_event(kind, completion_id, language)


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


def chat_offered(settings: Settings, chat: Provider) -> bool:
    """Whether ``/v1/health`` names a chat model, which is what makes Tabby's clients
    offer chat (inline edits, commit messages). A config that sets other roles and
    leaves ``[model.chat]`` out means no chat, as in Tabby: editors were offered the
    embedded 135M model as the team's chat model (``/v1/chat/completions`` still
    answers from it). With no ``[model]`` at all, keel is the embedded model in every
    role, chat included; and a chat model an admin loaded is offered."""
    configured = settings.model.model_fields_set
    return "chat" in configured or not configured or chat.info.model != EMBEDDED_MODEL_ID


def health_state(request: Request) -> HealthState:
    state = app_state(request)
    providers = state.providers
    info = build_info()
    chat: Provider | None = providers.for_role("chat")
    if chat is not None and not chat_offered(state.settings, chat):
        chat = None
    return HealthState(
        model=providers.for_role("completion").info.model,
        chat_model=chat.info.model if chat is not None else None,
        chat_device="cpu" if chat is not None and chat.info.kind == "local" else None,
        device="cpu",
        arch=platform.machine(),
        cpu_info=_cpu_info(),
        cpu_count=os.cpu_count() or 1,
        cuda_devices=[],
        version=Version(
            build_date=info["build_date"],
            build_timestamp=info["build_timestamp"],
            git_sha=info["git_sha"],
            git_describe=f"v{TABBY_API_VERSION}-keel.{__version__}",
        ),
        models=HealthModels(
            completion=_model_health(providers.for_role("completion")),
            chat=_model_health(providers.for_role("chat")),
            embedding=_model_health(providers.for_role("embedding")),
        ),
        # Left out, as Tabby leaves it without its web server: IntelliJ's and Eclipse's
        # plugins test it for null and, given false, loaded keel's /chat, a 404, as their
        # chat panel; left out, they say the server has no chat panel.
        webserver=None,
    )


def _model_health(provider: Provider) -> ModelHealth:
    """A role's model as Tabby's ``/v1/health`` shows it (it was the model's name alone,
    which a script written against Tabby's ``models.<role>.local.model_id`` broke on)."""
    info = provider.info
    if info.kind == "local":
        return ModelHealth(local=LocalModelHealth(model_id=info.model, device="cpu"))
    name = None if info.model == info.kind else info.model
    remote = RemoteModelHealth(kind=info.kind, model_name=name, api_endpoint=info.endpoint or "")
    return ModelHealth(remote=remote)


def _when(value: float, given: float | None) -> str:
    return f"{value:.0f}" if given is not None else f"{value:.0f}, the default"


@router.get(
    "/v1/stats/completions",
    dependencies=[USER],
    response_model=None,
    responses={200: {"model": CompletionStats}},
)
async def completion_stats(
    request: Request,
    since: float | None = Query(None, allow_inf_nan=False),
    until: float | None = Query(None, allow_inf_nan=False),
) -> dict[str, object]:
    """Acceptance by language and provider; ``since``/``until`` are Unix times
    (default: the last 24 hours)."""
    now = time.time()
    start = since if since is not None else now - 86400
    end = until if until is not None else now
    if end < start:
        raise RequestError(
            f"'until' ({_when(end, until)}) must not be before 'since' ({_when(start, since)});"
            " both are Unix times, by default the last 24 hours",
            param="until" if until is not None else "since",
        )
    rows = await asyncio.to_thread(app_state(request).events.acceptance, start, end)
    return {"since": start, "until": end, "data": rows}


@router.get(
    "/v1/health", dependencies=[USER], response_model=None, responses={200: {"model": HealthState}}
)
@router.post(
    "/v1/health", dependencies=[USER], response_model=None, responses={200: {"model": HealthState}}
)
async def health(request: Request) -> dict[str, object]:
    return health_state(request).model_dump(exclude_none=True)


@router.get(
    "/v1beta/server_setting",
    dependencies=[USER],
    response_model=None,
    responses={200: {"model": ServerSetting}},
)
async def server_setting() -> dict[str, object]:
    return ServerSetting().model_dump()


@router.get(
    "/v1beta/models",
    dependencies=[USER],
    response_model=None,
    responses={200: {"model": BetaModels}},
)
async def beta_models(request: Request) -> dict[str, object]:
    """The models a client may ask for by name: the primary's ``supported_models``
    (Tabby's chat panel offers them), else the model it serves."""
    providers = app_state(request).providers

    def listed(role: Role) -> list[str]:
        entry = providers.chains[role][0][0]
        supported = getattr(entry.config, "supported_models", None)
        return list(supported) if supported else [entry.provider.info.model]

    return {"completion": listed("completion"), "chat": listed("chat")}
