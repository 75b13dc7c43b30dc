"""The ASGI application: everything is built in the lifespan and closed after it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from keel import __version__
from keel.api import admin, docs, infill, llamacpp, metrics, models, openai, ops, tabby, ui
from keel.api.access import GuardedRoute, document_access
from keel.api.errors import install_error_handlers
from keel.api.middleware import CorsPolicy, DirectRoutes, KeelMiddleware
from keel.api.state import AppState
from keel.audit import AuditLog
from keel.background import Background
from keel.config import Paths, Settings
from keel.errors import KeelError
from keel.events import EventRetention, EventStore, open_event_store
from keel.index.retrieve import RepositoryRetriever
from keel.ops.metrics import Metrics
from keel.ops.stats import RequestStats
from keel.providers.catalog import Providers, build_providers
from keel.reload import assemble, reload_config

if TYPE_CHECKING:
    from keel.state.shared_keys import SharedKeys

log = logging.getLogger("keel")


def _start_followers(
    settings: Settings, events: EventStore, metrics: Metrics, shared_keys: SharedKeys | None
) -> list[asyncio.Task[None]]:
    """The background loops of the shared state: following the keys in Redis, and
    deleting events past ``[events] retention_days``."""
    tasks = []
    if shared_keys is not None:
        tasks.append(asyncio.create_task(shared_keys.run(), name="keys-follow"))
    days = settings.events.retention_days
    if days:
        retention = EventRetention(events, days, metrics)
        tasks.append(asyncio.create_task(retention.run(), name="events-retention"))
    return tasks


def create_app(
    settings: Settings,
    paths: Paths,
    providers: Providers | None = None,
    config_path: Path | None = None,
    host: str | None = None,
    command_line: frozenset[str] = frozenset(),
    reload_asked: threading.Event | None = None,
) -> FastAPI:
    """The app for ``settings``; ``providers`` may be given (built by the caller) or built
    here. ``config_path`` is the file a reload re-reads (None: the data root's); ``host``
    the address keel listens on (None: ``[server] host``); ``command_line``: the settings
    `keel serve`'s options gave (``server.host``, ``server.port``), which the file's do not
    change; ``reload_asked``: set by a SIGHUP that came while keel started, before the
    app's own handler: the config is read again once the app is up (the file may have
    changed after it was read)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = providers or build_providers(settings, paths)
        app_metrics = Metrics()
        events = open_event_store(settings.events, paths, app_metrics)
        redis = None
        if settings.state.redis_url is not None:
            from keel.state.shared_limits import RedisState  # Redis's client, only if used

            redis = RedisState(
                settings.state.redis_url,
                timeout=settings.state.timeout_seconds,
                metrics=app_metrics,
            )
            await redis.ping()
        await asyncio.gather(*(provider.start() for provider in built.unique()))
        retriever = RepositoryRetriever.from_settings(settings.repositories, settings.index, paths)
        retriever.on_state = app_metrics.index_state
        refresh = asyncio.create_task(retriever.refresh_forever(), name="index-refresh")
        audit = AuditLog(paths.root / "audit.log")
        shared_keys = None
        if redis is not None:
            from keel.state.shared_keys import SharedKeys

            shared_keys = SharedKeys(
                redis,
                metrics=app_metrics,
                on_change=lambda detail: audit.record(
                    "keys_reload", key_id=None, result="ok", detail=detail
                ),
            )
            await shared_keys.refresh()  # the keys in Redis are in force before any request
        followers = _start_followers(settings, events, app_metrics, shared_keys)
        background = Background()
        control = asyncio.Lock()
        parts = assemble(
            settings,
            paths,
            built,
            metrics=app_metrics,
            audit=audit,
            events=events,
            retriever=retriever,
            background=background,
            redis=redis,
            shared_keys=shared_keys,
            control=control,
        )
        state = AppState(
            settings=settings,
            paths=paths,
            providers=built,
            routing=parts.routing,
            completion=parts.completion,
            chat=parts.chat,
            embedding=parts.embedding,
            events=events,
            metrics=app_metrics,
            keys=parts.keys,
            rate_limiter=parts.rate_limiter,
            audit=audit,
            models=parts.models,
            config_path=config_path,
            redis=redis,
            shared_keys=shared_keys,
            stats=RequestStats(),
            background=background,
            started_with=settings,
            host=host or settings.server.host,
            command_line=command_line,
            control=control,
        )
        app.state.keel = state

        def on_sighup() -> None:
            async def reload() -> None:
                try:
                    await reload_config(state, config_path, key_id="SIGHUP")
                except KeelError as exc:
                    log.error("config reload refused, the running config stays: %s", exc.message)

            state.background.spawn(reload())

        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        if reload_asked is not None and reload_asked.is_set():  # after the handler: none lost
            log.info("SIGHUP came while keel was starting: reloading the config now")
            on_sighup()
        parts.routing.start_prober()
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            retriever.stop()
            for task in [refresh, *followers]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.completion.aclose()
            await state.routing.aclose()
            # Retired providers (a reload's, a swap's) are closed by their background task.
            await state.background.stop()
            await asyncio.gather(*(provider.aclose() for provider in state.providers.unique()))
            await asyncio.to_thread(events.close)
            if redis is not None:
                await redis.aclose()

    app = FastAPI(
        title="keel",
        version=__version__,
        summary="Tabby- and OpenAI-compatible code completion, chat and embeddings.",
        lifespan=lifespan,
        docs_url=None,  # keel's own page (keel.api.docs): FastAPI's load from a CDN
        redoc_url=None,
    )
    install_error_handlers(app)
    docs.install(app)
    # Routes are matched in order: the model routes, which every keystroke takes, first.
    # The routers' own routes, not include_router's: FastAPI (0.165) builds an included
    # router's routes again for each app on its first request (~20 ms of CPU, for every
    # keel the tests start) and walks its routers on every request it routes.
    for router in (openai, tabby, infill, llamacpp, ops, metrics, models, admin, ui):
        app.router.routes.extend(router.router.routes)
    document_access(app)
    guarded = (route for route in app.routes if isinstance(route, GuardedRoute))
    app.add_middleware(
        KeelMiddleware,
        max_body_bytes=settings.server.max_body_bytes,
        cors=CorsPolicy(settings.server.cors_allowed_origins),
        direct=DirectRoutes(guarded, app.exception_handlers),
    )
    return app
