"""Assemble the serving parts from settings, and swap them on a config reload.

A reload (SIGHUP or ``POST /v1/admin/reload``) validates the new file first:
an invalid one changes nothing and every error is reported. A valid one is
applied without a restart: local workers whose spec did not change keep
running (no reload of their model), new ones start before traffic moves,
and providers no longer used stop once their in-flight requests finish.
The bound address and the repository index are fixed for the process's life.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from keel.api.state import AppState
from keel.audit import AuditLog
from keel.auth import KeyLimiter, KeyRateLimiter, KeyStore, open_remote_issue
from keel.background import Background
from keel.config import ROLES, Paths, Settings, local_tables, parse_settings, read_config
from keel.errors import (
    ConfigError,
    ConfigIssue,
    InsufficientMemory,
    KeelError,
    MissingDependency,
)
from keel.events import EventStore
from keel.models.gguf import read_metadata
from keel.models.manager import ModelManager
from keel.models.registry import resolve_model
from keel.ops.doctor import check_fit
from keel.ops.metrics import Metrics
from keel.pipeline.completion import SnippetRetriever, TabbyPrompts
from keel.pipeline.languages import Language, use_additional_languages
from keel.providers.base import Provider
from keel.providers.catalog import Providers, build_providers
from keel.providers.local import LocalProvider
from keel.router.service import Routing
from keel.serving.chat import ChatServing
from keel.serving.completion import CompletionServing
from keel.serving.embedding import EmbeddingServing

if TYPE_CHECKING:  # Redis's client is imported only where [state] redis_url is set
    from keel.state.shared_keys import SharedKeys
    from keel.state.shared_limits import RedisState

log = logging.getLogger("keel.reload")

T = TypeVar("T")


@dataclass(slots=True)
class Parts:
    routing: Routing
    completion: CompletionServing
    chat: ChatServing
    embedding: EmbeddingServing
    keys: KeyStore
    rate_limiter: KeyLimiter | None
    models: ModelManager


def assemble(
    settings: Settings,
    paths: Paths,
    providers: Providers,
    *,
    metrics: Metrics,
    audit: AuditLog,
    events: EventStore,
    retriever: SnippetRetriever | None,
    background: Background,
    redis: RedisState | None = None,
    shared_keys: SharedKeys | None = None,
    previous: AppState | None = None,
    control: asyncio.Lock,
) -> Parts:
    """The serving parts; with ``redis``, per-key limits are shared across replicas, and
    ``shared_keys`` (the keys in Redis) are in force beside the configured ones;
    ``previous``: the serving state a reload replaces (its routing, see
    :class:`Routing`; the keys file's keys while the file cannot be read; the per-key
    budgets, spent as they are); ``control``: the lock that keeps model loads and
    reloads one at a time."""
    use_additional_languages(
        [
            Language(
                extra.languages[0],
                extra.line_comment or "",
                tuple(extra.top_level_keywords),
                aliases=(*extra.languages[1:], *extra.exts),
            )
            for extra in settings.additional_languages
        ]
    )
    routing = Routing(
        settings, providers, events=metrics, previous=previous.routing if previous else None
    )
    metrics.track_providers(providers)
    metrics.track_readiness(
        lambda role: routing.routers[role].any_usable(),
        lambda: {endpoint.name for endpoint in routing.endpoints() if endpoint.usable()},
    )

    def keys_reloaded(ok: bool, detail: str) -> None:
        audit.record("keys_reload", key_id=None, result="ok" if ok else "error", detail=detail)

    per_minute = settings.auth.requests_per_minute
    limiter: KeyLimiter | None = None
    kept = previous.rate_limiter if previous else None
    if per_minute and kept is not None and kept.per_minute == per_minute:
        limiter = kept  # a reload gave every key a whole new minute's budget
    elif per_minute and redis is not None:
        from keel.state.shared_limits import SharedKeyRateLimiter

        limiter = SharedKeyRateLimiter(per_minute, redis)
    elif per_minute:
        limiter = KeyRateLimiter(per_minute)
    return Parts(
        routing=routing,
        completion=CompletionServing(
            routing.routers["completion"],
            routing.admission["completion"],
            routing.superseder,
            TabbyPrompts(
                max_input_length=settings.completion.max_input_length,
                max_decoding_tokens=settings.completion.max_decoding_tokens,
                retriever=retriever,
            ),
            events=events,
            metrics=metrics,
            timeout=settings.server.completion_timeout,
            precompute=settings.completion.precompute,
        ),
        # No limit on a whole chat answer, only the backend's first-token and stall
        # limits: it was cut at 300 s while the backend still sent tokens (a slow model's
        # long answer, a reasoning model's minutes of thought), all of it lost unstreamed.
        chat=ChatServing(routing.routers["chat"], routing.admission["chat"]),
        embedding=EmbeddingServing(routing.routers["embedding"], routing.admission["embedding"]),
        keys=KeyStore(
            settings.auth,
            paths.root,
            on_reload=keys_reloaded,
            shared=shared_keys,
            previous=previous.keys if previous else None,
        ),
        rate_limiter=limiter,
        models=ModelManager(settings, paths, routing, audit, background, lock=control),
    )


async def reload_config(
    state: AppState, config_path: Path | None, *, key_id: str | None
) -> dict[str, object]:
    """:func:`apply_config`, one at a time with model loads and unloads: a load that
    switched the routing a reload had just replaced left the role on a closed provider."""
    async with state.control:
        return await apply_config(state, config_path, key_id=key_id)


async def apply_config(
    state: AppState, config_path: Path | None, *, key_id: str | None
) -> dict[str, object]:
    """Apply a new config file, or raise (ConfigError, MissingDependency) changing nothing.

    A reload never leaves keel open to anyone: settings that ``keel serve`` would refuse
    on the address it listens on (no keys beyond loopback) are refused, and so is a
    config file gone missing (read as all defaults, it dropped every key), unless keel
    started on the defaults alone."""
    try:
        file = config_path or state.paths.config_file
        # Started on defaults alone (no file), none is read as them again: a reload then
        # restores the defaults' models after a load, and drops no key (there were none).
        on_defaults = config_path is None and state.started_with == Settings()
        settings = await _off_the_loop(
            lambda: _read_new_config(file, config_path, state.paths, on_defaults)
        )
        # Judged with the keys that would be in force: Redis's only if keel started with
        # it (redis_url is read at start; a reload adding it brings no key).
        started = state.started_with.state.redis_url
        in_force = settings.model_copy(
            update={"state": settings.state.model_copy(update={"redis_url": started})}
        )
        if (issue := open_remote_issue(in_force, state.paths.root, state.host)) is not None:
            raise ConfigError(str(file), [issue])
        # The address the next start binds, where the config chose it (no --host): taken
        # here, the file made that start exit 78, and a supervisor left keel down.
        if state.host == state.started_with.server.host and (
            issue := open_remote_issue(settings, state.paths.root, settings.server.host)
        ):
            starting = f"{issue.message}; keel would refuse to start with this file"
            raise ConfigError(str(file), [ConfigIssue(issue.key, starting)])
        missing = _missing_models(settings, state.paths)  # each, by its key, as check says
        if missing:
            raise ConfigError(str(file), missing)
        old = state.providers
        try:
            providers = build_providers(settings, state.paths, previous=old)
        except MissingDependency as exc:
            if exc.status_code != 500:
                raise  # a model that does not fit: its own status says so (507)
            # A model file the config names and the disk lacks: the admin's config, a 422
            # like any other (it was a 500 server_error).
            raise ConfigError(str(file), [ConfigIssue("(model)", exc.message)]) from None
    except KeelError as exc:
        state.audit.record("config_reload", key_id=key_id, result="error", detail=exc.message)
        state.metrics.config_reload(False)
        raise
    kept = {id(p) for p in old.unique()}
    fresh = [p for p in providers.unique() if id(p) not in kept]
    try:
        check_fit(fresh, what="the new local models")
        await asyncio.gather(*(provider.start() for provider in fresh))
        await _ready(fresh)
    except KeelError as exc:
        await asyncio.gather(*(provider.aclose() for provider in fresh))
        state.audit.record("config_reload", key_id=key_id, result="error", detail=exc.message)
        state.metrics.config_reload(False)
        if isinstance(exc, InsufficientMemory):
            raise InsufficientMemory(f"{exc.message}; the running config stays") from None
        issue = ConfigIssue("(model)", f"{exc.message}; the running config stays")
        raise ConfigError(str(config_path or state.paths.config_file), [issue]) from None
    parts = assemble(
        settings,
        state.paths,
        providers,
        metrics=state.metrics,
        audit=state.audit,
        events=state.events,
        retriever=state.completion.prompts.retriever,
        background=state.background,
        redis=state.redis,
        shared_keys=state.shared_keys,
        previous=state,
        control=state.control,
    )
    old_routing = state.routing
    waiting = [
        key for key in restart_needed(state.started_with, settings) if key not in state.command_line
    ]
    state.settings = settings
    providers.commit()  # the running workers' new completion settings: taken now
    state.providers = providers
    state.routing = parts.routing
    state.completion = parts.completion
    state.chat = parts.chat
    state.embedding = parts.embedding
    state.keys = parts.keys
    state.rate_limiter = parts.rate_limiter
    state.models.successor = parts.models  # a load or unload waiting behind this reload
    state.models = parts.models
    parts.routing.start_prober()
    now_used = {id(p) for p in providers.unique()}
    stopped = [p for p in old.unique() if id(p) not in now_used]
    detail = f"started {[p.name for p in fresh]}, stopping {[p.name for p in stopped]}"
    if waiting:
        detail += f"; changed, in force at the next restart: {', '.join(waiting)}"
    # Recorded as the new config takes the requests, before the old routing's close
    # yields: a client that saw the new chains read an audit log without the reload.
    state.audit.record("config_reload", key_id=key_id, result="ok", detail=detail)
    state.metrics.config_reload(True)
    (log.warning if waiting else log.info)("config reloaded: %s", detail)
    await old_routing.aclose()
    state.background.spawn(old_routing.close_when_idle(stopped))
    chains = {
        role: [entry.provider.name for group in providers.chains[role] for entry in group]
        for role in ROLES
    }
    return {
        "status": "reloaded",
        "chains": chains,
        "started": [p.name for p in fresh],
        "stopping": [p.name for p in stopped],
        "restart_needed": waiting,
    }


def _read_new_config(
    file: Path, config_path: Path | None, paths: Paths, on_defaults: bool
) -> Settings:
    """The settings of ``file``, or a :class:`ConfigError` where a reload must not apply
    them: a file gone, or one empty (whitespace and comments only), read as all defaults,
    would drop every key, unless keel runs on the defaults already."""
    if not file.exists() and not on_defaults:
        gone = (
            "config file does not exist; the running config stays (keel runs on "
            "defaults only when it starts without one)"
        )
        raise ConfigError(str(file), [ConfigIssue("(file)", gone)])
    raw = read_config(config_path, paths)
    if raw == {} and not on_defaults:
        raise ConfigError(str(file), [ConfigIssue("(file)", EMPTY_FILE)])
    return Settings() if raw is None else parse_settings(raw, str(file), reloading=True)


EMPTY_FILE = (
    "the file is empty (an editor in the middle of saving it, or a pipe read once "
    "already): read as all defaults it would drop every key, so the running config "
    "stays: write the file again and reload, or restart keel to run on the defaults"
)


async def _off_the_loop(work: Callable[[], T]) -> T:
    """``work()`` in a daemon thread of its own, awaited: a config read that blocks (a
    FIFO no one writes, a hung network mount) froze every route while a reload waited on
    it. Not asyncio's executor, whose threads keel's exit waits for: a read that never
    returns would have kept keel from stopping."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as exc:  # raised where it is awaited
            future.set_exception(exc)

    threading.Thread(target=run, name="keel-config-read", daemon=True).start()
    return await asyncio.wrap_future(future)


def _missing_models(settings: Settings, paths: Paths) -> list[ConfigIssue]:
    """The local models the file names that are not on this machine, or whose file no
    worker can load (no GGUF, cut short), each by its key (the reload named the first
    alone, under "(model)"; a damaged file only after starting its worker)."""
    missing = []
    for where, table in local_tables(settings):
        try:
            read_metadata(resolve_model(table.model_id, paths))
        except MissingDependency as exc:
            missing.append(ConfigIssue(f"{where}.model_id", exc.message))
        except OSError as exc:
            missing.append(ConfigIssue(f"{where}.model_id", f"unreadable: {exc}"))
    return missing


RELOAD_LOAD_SECONDS = 300.0
"""How long a reload waits for a new local model to load before it keeps the old config."""


async def _ready(fresh: list[Provider]) -> None:
    """Wait for each new local worker to be ready before traffic moves to it, as the
    README promises (a changed context_size moved completions to a worker still loading:
    8 s for the next one, and a size the engine refused left every completion a 503)."""
    workers = [p for p in fresh if isinstance(p, LocalProvider)]
    await asyncio.gather(*(p.supervisor.wait_ready(RELOAD_LOAD_SECONDS) for p in workers))


START_ONLY = (
    "server.host",
    "server.port",
    "server.max_body_bytes",
    "server.cors_allowed_origins",
    "server.shutdown_grace_seconds",
    "state.redis_url",
    "state.timeout_seconds",
    "events.database_url",
    "events.max_buffered",
    "events.retention_days",
    "repositories",
    "index",
)
"""Settings read once, at start: a reload that changes them says they wait for a restart."""


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The :data:`START_ONLY` settings whose values differ between ``old`` and ``new``."""

    def value(settings: Settings, dotted: str) -> object:
        found: object = settings
        for part in dotted.split("."):
            found = getattr(found, part)
        return found

    return [key for key in START_ONLY if value(old, key) != value(new, key)]
