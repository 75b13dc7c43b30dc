"""The ASGI application: everything is built in the lifespan and closed after it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from keel import __version__
from keel.api import metrics, models, openai, ops, tabby
from keel.api.body_limit import BodyLimitMiddleware
from keel.api.errors import install_error_handlers
from keel.api.metrics_middleware import MetricsMiddleware
from keel.api.request_id import RequestIdMiddleware
from keel.api.state import AppState
from keel.audit import AuditLog
from keel.auth import KeyStore, RateLimiter
from keel.config import Paths, Settings
from keel.events import EventStore
from keel.index.retrieve import RepositoryRetriever
from keel.models.manager import ModelManager
from keel.ops.metrics import Metrics
from keel.pipeline.completion import CompletionService
from keel.providers.catalog import Providers, build_providers
from keel.router.service import Routing

log = logging.getLogger("keel")


def create_app(settings: Settings, paths: Paths, providers: Providers | None = None) -> FastAPI:
    """The app for ``settings``; ``providers`` may be given (built by the caller) or built here."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = providers or build_providers(settings, paths)
        events = EventStore(paths.events_db)
        unique = built.unique()
        app_metrics = Metrics()
        app_metrics.track_providers(built)
        await asyncio.gather(*(provider.start() for provider in unique))
        routing = Routing(settings, built, events=app_metrics)
        app_metrics.track_readiness(lambda role: routing.routers[role].any_usable())
        retriever = RepositoryRetriever.from_settings(settings.repositories, settings.index, paths)
        refresh = asyncio.create_task(retriever.refresh_forever(), name="index-refresh")
        audit = AuditLog(paths.root / "audit.log")

        def keys_reloaded(ok: bool, detail: str) -> None:
            audit.record("keys_reload", key_id=None, result="ok" if ok else "error", detail=detail)

        keys = KeyStore(settings.auth, paths.root, on_reload=keys_reloaded)
        app.state.keel = AppState(
            settings=settings,
            paths=paths,
            providers=built,
            routing=routing,
            completion=CompletionService(
                routing.routers["completion"],
                routing.admission["completion"],
                max_input_length=settings.completion.max_input_length,
                max_decoding_tokens=settings.completion.max_decoding_tokens,
                timeout=settings.server.completion_timeout,
                retriever=retriever,
            ),
            events=events,
            metrics=app_metrics,
            keys=keys,
            rate_limiter=(
                RateLimiter(settings.auth.requests_per_minute)
                if settings.auth.requests_per_minute
                else None
            ),
            audit=audit,
            models=ModelManager(settings, paths, routing, audit),
        )
        routing.start_prober()
        try:
            yield
        finally:
            retriever.stop()
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh
            await routing.aclose()
            await asyncio.gather(*(provider.aclose() for provider in unique))
            events.close()

    app = FastAPI(
        title="keel",
        version=__version__,
        summary="Tabby- and OpenAI-compatible code completion, chat and embeddings.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: every log line of a request has it
    app.include_router(ops.router)
    app.include_router(metrics.router)
    app.include_router(tabby.router)
    app.include_router(openai.router)
    app.include_router(models.router)
    return app
