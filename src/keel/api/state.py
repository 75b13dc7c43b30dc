"""What the routes need, built once in the app's lifespan and kept on ``app.state``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from keel.audit import AuditLog
from keel.auth import KeyLimiter, KeyStore
from keel.background import Background
from keel.config import Paths, Settings
from keel.events import EventStore
from keel.models.manager import ModelManager
from keel.ops.health import DeepHealth
from keel.ops.metrics import Metrics
from keel.ops.stats import RequestStats, Throttled
from keel.providers.catalog import Providers
from keel.router.service import Routing
from keel.serving.chat import ChatServing
from keel.serving.completion import CompletionServing
from keel.serving.embedding import EmbeddingServing

if TYPE_CHECKING:  # Redis's client is imported only where [state] redis_url is set
    from keel.state.shared_keys import SharedKeys
    from keel.state.shared_limits import RedisState


@dataclass(slots=True)
class AppState:
    settings: Settings
    started_with: Settings
    """The settings the process started with (some are read only then; see keel.reload)."""
    host: str
    """The address keel listens on, fixed for the process's life (``--host`` or config)."""
    command_line: frozenset[str]
    """Settings `keel serve`'s options gave (``server.host``, ``server.port``): a reload
    changing them in the file changes nothing, now or at a restart with the same options."""
    paths: Paths
    providers: Providers
    routing: Routing
    completion: CompletionServing
    chat: ChatServing
    embedding: EmbeddingServing
    events: EventStore
    metrics: Metrics
    keys: KeyStore
    rate_limiter: KeyLimiter | None
    audit: AuditLog
    models: ModelManager
    background: Background
    """Side work (a reload, closing retired providers), finished at shutdown."""
    control: asyncio.Lock
    """Held by a reload and by a model load or unload: one at a time."""
    config_path: Path | None = None
    redis: RedisState | None = None
    """Shared per-key limits (``[state] redis_url``), fixed for the process's life."""
    shared_keys: SharedKeys | None = None
    """The keys kept in Redis (with ``redis``), followed for the process's life."""
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    """For the uptime: a wall clock stepped back an hour made it -3,590 s."""

    deep_health: DeepHealth = field(default_factory=DeepHealth)
    stats: RequestStats = field(default_factory=RequestStats)
    """Recent per-minute request figures for the status page."""
    acceptance: Throttled[list[dict[str, object]] | None] = field(
        default_factory=lambda: Throttled(ttl=30.0)
    )
    """The status page's acceptance figures: a scan of the events table, so not every 2 s
    (None: the events database did not answer)."""

    def shared_by_several(self) -> bool:
        """Whether several people may use this keel: more than one user key (or keys kept
        in Redis), or none asked for on an address beyond loopback."""
        if not self.keys.enabled:
            return self.settings.auth.allow_unauthenticated_remote
        return self.shared_keys is not None or len(self.keys.keys.users) > 1

    def shared_state(self) -> dict[str, object]:
        """Where the per-key limits, the keys and the events are kept, and whether each
        store answers (``/v1/providers`` and the status page)."""
        limits = self.redis.status() if self.redis else {"store": "process", "up": True}
        keys = self.shared_keys.status() if self.shared_keys else {"store": "config", "up": True}
        return {"rate_limits": limits, "keys": keys, "events": self.events.status()}


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.keel
    return state
