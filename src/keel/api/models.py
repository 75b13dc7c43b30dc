"""TabbyAPI-compatible model management: see which model serves, list, load, unload,
download.

``POST /v1/model/load`` and ``POST /v1/model/download`` stream their progress
as server-sent events (load: TabbyAPI's events, ``status`` processing until
finished, with keel's ``step``: queued, checking_memory, starting_worker,
loading, switching, ready; download: resolving, warning, downloading,
verifying, ready; or an error event), or, with ``"stream": false``, answer once with the final
state. What can be refused before any work (a bad spec, a model or file that
does not exist, a hub that refuses us, a full disk) is an HTTP error before
the stream starts. A load in flight when keel is asked to stop (SIGTERM, SIGINT)
stops at once, its worker with it, and ends with an error event (a 503 without
streaming) saying so: it held keel's stop for the whole shutdown grace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from keel.api.access import ADMIN, USER
from keel.api.errors import read_model
from keel.api.state import app_state
from keel.background import Background
from keel.config import Role
from keel.errors import KeelError, Unavailable
from keel.models.manager import Progress
from keel.models.pull import ModelPuller, PullProgress
from keel.ops.server import on_stop
from keel.schemas.admin import (
    DownloadProgress,
    DownloadRequest,
    LoadProgress,
    LoadRequest,
    UnloadRequest,
    UnloadResult,
)
from keel.schemas.openai import ModelCard, ModelList
from keel.schemas.openapi import ERRORS, json_body, streamed
from keel.serving.lifecycle import CancelOnDisconnect
from keel.serving.streaming import STOPPING, EventStream, sse

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


@router.get(
    "/v1/model/draft/list",
    dependencies=[USER],
    response_model=None,
    responses={200: {"model": ModelList}},
)
async def list_draft_models() -> dict[str, object]:
    """TabbyAPI's draft models (speculative decoding): keel loads none. ST-tabbyAPI-loader
    asks for them and gave up its model list on the 404."""
    return {"object": "list", "data": []}


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
    steps = manager.load(body.role, body.model_name, key_id=key_id, context_size=body.max_seq_len)
    return await _progress(
        request,
        body.stream,
        _detached(app_state(request).background, steps, body.role, body.model_name),
        {"status": "error", "role": body.role},
    )


def _detached(
    background: Background,
    steps: AsyncIterator[Progress],
    role: Role,
    model: str,
) -> AsyncGenerator[dict[str, object], None]:
    """A load's steps, run to the end whether or not its client reads them, as without
    streaming: a client that left a streamed load left the new worker running in no
    chain, shown nowhere, until keel exited. Keel asked to stop ends it at once (the
    worker it started is stopped) with :func:`_load_stopped`."""
    queue: asyncio.Queue[dict[str, object] | KeelError | None] = asyncio.Queue()

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            with on_stop(lambda: task.cancel(STOPPING)):
                async for step in steps:
                    queue.put_nowait(step.to_dict(role, model))
        except KeelError as exc:
            queue.put_nowait(exc)
        except asyncio.CancelledError as exc:
            if STOPPING not in exc.args:
                queue.put_nowait(KeelError("the load failed; keel's log says why"))
                raise
            task.uncancel()
            queue.put_nowait(_load_stopped(role, model))
        except BaseException:
            queue.put_nowait(KeelError("the load failed; keel's log says why"))
            raise
        else:
            queue.put_nowait(None)

    background.spawn(run())

    async def read() -> AsyncGenerator[dict[str, object], None]:
        while (step := await queue.get()) is not None:
            if isinstance(step, KeelError):
                raise step
            yield step

    return read()


def _load_stopped(role: Role, model: str) -> Unavailable:
    return Unavailable(
        f"{STOPPING} (it was asked to shut down): the load of {model} for {role} was "
        "stopped before it finished, and the worker it started with it; load the model "
        "again once keel is back"
    )


@router.post(
    "/v1/model/unload",
    dependencies=[ADMIN],
    response_model=None,
    openapi_extra=json_body(UnloadRequest, required=False),
    responses={200: {"model": UnloadResult}},
)
async def unload_model(request: Request) -> dict[str, object]:
    body = await read_model(request, UnloadRequest) if await request.body() else UnloadRequest()
    manager = app_state(request).models
    return await manager.unload(body.role, key_id=getattr(request.state, "key_id", None))


@router.post(
    "/v1/model/download",
    dependencies=[ADMIN],
    response_model=None,
    openapi_extra=json_body(DownloadRequest),
    responses={
        200: streamed(DownloadProgress, "Progress events, or the last step without streaming.")
    },
)
async def download_model(request: Request) -> Response:
    """Pull a model through huggingface_hub into <root>/models (``keel models pull``)."""
    body = await read_model(request, DownloadRequest)
    state = app_state(request)
    puller = ModelPuller(state.paths, local=state.settings.model.role("completion").local)
    key_id = getattr(request.state, "key_id", None)
    target = f"{body.model}" + (f" ({body.quant})" if body.quant else "")

    def audit(result: str, detail: str | None = None) -> None:
        state.audit.record(
            "model_download", key_id=key_id, result=result, target=target, detail=detail
        )

    try:
        await asyncio.to_thread(puller.preflight, body.model, body.quant)
    except KeelError as exc:
        audit("error", exc.message)
        raise
    steps = _audited(puller.stream(body.model, quant=body.quant), audit)
    return await _progress(
        request,
        body.stream,
        (step.to_dict(body.model) async for step in steps),
        {"status": "error", "model": body.model},
    )


async def _progress(
    request: Request,
    stream: bool,
    steps: AsyncGenerator[dict[str, object], None],
    failed: dict[str, object],
) -> Response:
    """A long operation's steps as server-sent events (a failure the last, with
    ``failed``'s fields; no ``[DONE]``, which TabbyAPI does not send and its clients
    read as JSON), or without streaming its last step. A client that leaves stops
    reading either way (a download then stops; a load runs on, detached): without
    streaming, a download whose client had left ran on, and was installed."""
    if not stream:
        last: dict[str, object] = {}
        async with CancelOnDisconnect(request), aclosing(steps):
            async for step in steps:
                last = step
        return JSONResponse(last)

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            async for step in steps:
                yield sse(step)
        except KeelError as exc:
            progress.failed = exc.status_code  # counted as it ended (see streaming.OUTCOME)
            progress.why = f"{type(exc).__name__}: {exc.message}"
            yield sse({**exc.to_body(), **failed})

    progress = EventStream(events(), progress=failed)
    return progress


async def _audited(
    steps: AsyncIterator[PullProgress], audit: Callable[[str, str | None], None]
) -> AsyncGenerator[PullProgress, None]:
    try:
        async for step in steps:
            yield step
    except KeelError as exc:
        stopping = exc.message.startswith(STOPPING)
        audit("stopped" if stopping else "error", exc.message)
        raise
    except asyncio.CancelledError as exc:
        audit("stopped", "keel is stopping" if STOPPING in exc.args else "the client left")
        raise
    except GeneratorExit:
        audit("stopped", "the client left")
        raise
    audit("ok", None)
