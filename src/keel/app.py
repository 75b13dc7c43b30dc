"""The ASGI application: everything is built in the lifespan and closed after it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from keel import __version__
from keel.api import openai, ops, tabby
from keel.api.body_limit import BodyLimitMiddleware
from keel.api.errors import install_error_handlers
from keel.api.state import AppState
from keel.config import Paths, Settings
from keel.events import EventStore
from keel.pipeline.completion import CompletionService
from keel.providers.catalog import Providers, build_providers

log = logging.getLogger("keel")


def create_app(settings: Settings, paths: Paths, providers: Providers | None = None) -> FastAPI:
    """The app for ``settings``; ``providers`` may be given (built by the caller) or built here."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = providers or build_providers(settings, paths)
        events = EventStore(paths.events_db)
        unique = built.unique()
        await asyncio.gather(*(provider.start() for provider in unique))
        app.state.keel = AppState(
            settings=settings,
            paths=paths,
            providers=built,
            completion=CompletionService(
                built.completion,
                max_input_length=settings.completion.max_input_length,
                max_decoding_tokens=settings.completion.max_decoding_tokens,
                timeout=settings.server.completion_timeout,
            ),
            events=events,
        )
        try:
            yield
        finally:
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
    app.include_router(ops.router)
    app.include_router(tabby.router)
    app.include_router(openai.router)
    return app
