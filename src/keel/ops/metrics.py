"""Prometheus metrics: one :class:`Metrics` per app, owning its own registry.

Built in the app's lifespan and kept on ``AppState``; nothing here is global,
so two apps in one process (tests) never share a counter. Code that sees an
event calls a plain method (``metrics.retry(provider)``); state that already
lives elsewhere (worker processes, which provider serves a role) is read at
scrape time by :class:`_ProviderCollector`, so it can never be stale.

Every name the shipped alert rules use is exported here; a test scrapes a
real keel and checks each name the rules reference, so the two cannot drift.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from keel import build_info
from keel.config import ROLES, Role
from keel.pipeline.languages import find_language
from keel.rate_limit import WAIT_BUCKETS

if TYPE_CHECKING:
    from keel.providers.base import Provider
    from keel.providers.catalog import Providers
    from keel.router.router import Endpoint

_Labelled = TypeVar("_Labelled", Counter, Gauge, Histogram)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
"""Completions: a cached keystroke answers in milliseconds, a cold CPU prefill in tens
of seconds; past 60 s the request has timed out anyway."""

RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 200.0, 500.0, 1000.0)

BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
"""``keel_breaker_state`` values; the names are :class:`keel.router.breaker.BreakerState`'s."""

WORKER_STATES = ("starting", "loading", "ready", "restarting", "failed", "stopped")
USABLE_STATES = frozenset({"ok", "ready"})
PROVIDER_GAUGES = (
    "breaker_state",
    "provider_healthy",
    "auth_failed",
    "health_check_seconds",
    "health_check_ok",
)
"""The gauges labelled by provider alone: a provider no longer in use leaves them."""
EVENT_TYPES = frozenset({"served", "view", "select", "dismiss"})


COMPLETION_SOURCES = ("model", "cache", "inflight")
"""Where a completion came from; cache and inflight took no model work."""

EVENTS_REMEMBERED = 20_000
"""The (completion, type) pairs :meth:`Metrics.editor_event` remembers (~4 MiB; 19 MiB
for 100,000): an editor sends its events within seconds of the completion, and twenty
typists' completions of an hour or more fit."""


def _supervisor_restarts(environ: Mapping[str, str]) -> int:
    try:
        return max(0, int(environ.get("KEEL_SUPERVISOR_RESTARTS", "0")))
    except ValueError:
        return 0


def _worker_restarts(provider: Provider) -> int:
    restarts = provider.status().get("restarts")
    return restarts if isinstance(restarts, int) else 0


def _language_label(language: str | None) -> str:
    """The language's canonical name: a bounded label set, whatever the client sends."""
    found = find_language(language) if language else None
    return found.name if found is not None else "unknown"


class _ProviderCollector(Collector):
    """Worker and readiness facts, read from the providers when Prometheus scrapes."""

    def __init__(self) -> None:
        self.providers: Providers | None = None
        self.role_usable: Callable[[Role], bool] | None = None
        self.serving: Callable[[], set[str]] | None = None
        """The providers the router may send requests to now (by name)."""
        self._restarts: dict[str, tuple[Provider, int]] = {}
        """By provider name: the provider last seen, and the restarts of those it
        replaced (see :meth:`restarts`)."""

    def restarts(self, provider: Provider) -> int:
        """``keel_worker_restarts_total`` of ``provider``'s name: its worker's restarts,
        and those of the providers it replaced under the name. A worker keel gave up on,
        replaced by a reload, started afresh at 0: the counter fell from 4 to 0, and the
        crash history with it on a graph. The one replaced is read when it is found
        replaced, not as last seen: its restarts between that scrape and the reload were
        lost."""
        before = 0
        if (known := self._restarts.get(provider.name)) is not None:
            seen, before = known
            if seen is not provider:
                before += _worker_restarts(seen)
        self._restarts[provider.name] = (provider, before)
        return before + _worker_restarts(provider)

    def collect(self) -> Iterator[Metric]:
        from keel.ops.http_limits import HeadLimitedProtocol

        http_refusals = CounterMetricFamily(
            "keel_http_refusals",
            "Answers of keel's HTTP layer, before or instead of a route's: a head too "
            "large (431) or too slow (408), a malformed request (400, 501, 505), too many "
            "connections (503). A request whose body was refused is in "
            "keel_requests_total too, with this status.",
            labels=["status", "code"],
        )
        for (answered, code), times in sorted(HeadLimitedProtocol.refusals.items()):
            http_refusals.add_metric([str(answered), code], times)
        yield http_refusals
        restarts = CounterMetricFamily(
            "keel_worker_restarts",
            "Times a local model worker process was restarted after it died.",
            labels=["provider"],
        )
        state = GaugeMetricFamily(
            "keel_worker_state",
            "Local worker state: 1 for the state it is in, 0 for the others.",
            labels=["provider", "state"],
        )
        loaded = GaugeMetricFamily(
            "keel_model_loaded",
            "1 when the provider's model is loaded and serving.",
            labels=["provider", "model", "kind"],
        )
        role_ready = GaugeMetricFamily(
            "keel_role_ready",
            "1 when some provider of the role can serve now (what /ready reports); "
            "provider is the role's primary.",
            labels=["role", "provider"],
        )
        count = GaugeMetricFamily("keel_models_loaded", "Models loaded and serving.")
        slot_waits = CounterMetricFamily(
            "keel_worker_slot_waits",
            "Generations that waited in a local worker for an engine slot: every slot busy, "
            "or the slot holding their prompt finishing the request they superseded.",
            labels=["provider"],
        )
        slot_wait = CounterMetricFamily(
            "keel_worker_slot_wait_seconds",
            "Time generations waited in a local worker for an engine slot.",
            labels=["provider"],
        )
        held = CounterMetricFamily(
            "keel_worker_chats_held",
            "Chats that waited in a local worker because the engine's free slot was kept "
            "for completions (it serves them; every other slot was answering a chat).",
            labels=["provider"],
        )
        tools = CounterMetricFamily(
            "keel_tools_answered_in_text",
            "Chat requests that came with tools, answered in text by a local model (keel "
            "does not ask it to call tools).",
            labels=["provider"],
        )
        truncated = CounterMetricFamily(
            "keel_embedding_inputs_truncated",
            "Embedding inputs over a local model's context, embedded from their first "
            "context's worth of tokens.",
            labels=["provider"],
        )
        providers = self.providers
        total = 0
        if providers is not None:
            # Loaded and serving: running, and routed to (an HTTP backend that is down,
            # always "ok" as a process of nobody's, counted as serving)
            serving = self.serving() if self.serving is not None else None
            for provider in providers.unique():
                status = provider.status()
                current = str(status.get("state", "ok"))
                usable = current in USABLE_STATES and (serving is None or provider.name in serving)
                total += usable
                loaded.add_metric(
                    [provider.name, provider.info.model, provider.info.kind], float(usable)
                )
                if "restarts" not in status:
                    continue  # not a worker: HTTP backends have no process of ours
                restarts.add_metric([provider.name], float(self.restarts(provider)))
                tools.add_metric(
                    [provider.name], float(str(status.get("tools_answered_in_text", 0)))
                )
                truncated.add_metric(
                    [provider.name], float(str(status.get("embedding_inputs_truncated", 0)))
                )
                generation = status.get("generation")
                if isinstance(generation, dict):
                    slot_waits.add_metric([provider.name], float(generation["slot_waits"]))
                    slot_wait.add_metric([provider.name], float(generation["slot_wait_seconds"]))
                    held.add_metric([provider.name], float(generation["chats_held"]))
                for name in WORKER_STATES:
                    state.add_metric([provider.name, name], float(name == current))
            for role in ROLES:
                provider = providers.for_role(role)
                if self.role_usable is not None:
                    usable = self.role_usable(role)
                else:
                    usable = str(provider.status().get("state", "ok")) in USABLE_STATES
                role_ready.add_metric([role, provider.name], float(usable))
        count.add_metric([], float(total))
        yield from (restarts, state, loaded, role_ready, count, slot_waits, slot_wait, held)
        yield tools
        yield truncated
        yield from _rate_limit_families(providers.unique() if providers is not None else [])


def _rate_limit_families(providers: Iterable[Provider]) -> Iterator[Metric]:
    """``keel_rate_limit_wait_seconds`` and ``keel_rate_limit_refusals`` of every
    provider with a configured rate limit (by default none has one)."""
    waits = HistogramMetricFamily(
        "keel_rate_limit_wait_seconds",
        "Time a request waited for its turn under the provider's configured rate_limit "
        "(0 for most; none without a limit).",
        labels=["provider"],
    )
    refusals = CounterMetricFamily(
        "keel_rate_limit_refusals",
        "Requests refused by keel's own rate limit for the provider (a fallback served them, "
        "or the client got 429).",
        labels=["provider"],
    )
    for provider in providers:
        limiter = provider.rate_limiter
        if limiter is None:
            continue
        cumulative, buckets = 0, []
        for bound, count in zip((*WAIT_BUCKETS, float("inf")), limiter.bucket_counts, strict=True):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", float(cumulative)))
        waits.add_metric([provider.info.name], buckets, limiter.wait_sum)
        refusals.add_metric([provider.info.name], float(limiter.refused))
    yield from (waits, refusals)


class Metrics:
    """keel's metrics and the methods that feed them.

    Method arguments are label values; keep them bounded (provider names from
    the config, route templates, roles), never user input.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}
        self._in_use: set[str] = set()
        """The providers routed to now (:meth:`providers_in_use`)."""
        self._events_seen: dict[tuple[str, str], None] = {}
        """The editor events counted (:meth:`editor_event`), oldest first."""
        self._endpoints: dict[str, Endpoint] = {}
        """Their breakers and health, read at each scrape (:meth:`_endpoints_now`)."""
        registry = self.registry
        ProcessCollector(registry=registry)
        self._providers = _ProviderCollector()
        registry.register(self._providers)

        info = build_info()
        self.build_info = Gauge(
            "keel_build_info",
            "Always 1; the labels say which keel this is.",
            ["version", "git_sha"],
            registry=registry,
        )
        self.build_info.labels(info["version"], info["git_sha"]).set(1)
        self.start_time = Gauge(
            "keel_start_time_seconds",
            "When this keel process started (Unix time); changes() counts restarts.",
            registry=registry,
        )
        self.start_time.set(time.time())
        self.supervisor_restarts = Gauge(
            "keel_supervisor_restarts",
            "Restarts of keel by `keel serve --supervise` before this process.",
            registry=registry,
        )
        self.supervisor_restarts.set(_supervisor_restarts(env))

        self.requests = Counter(
            "keel_requests",
            "HTTP requests answered, by route template, role, provider and status.",
            ["route", "method", "role", "provider", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "keel_request_duration_seconds",
            "Time from request to the last byte of the response (whole stream).",
            ["route", "role", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generation_duration = Histogram(
            "keel_generation_duration_seconds",
            "Time a provider took for a whole generation, one that ended as it should: one "
            "cut, stalled or cancelled mid-way (a superseded completion) is not here (its "
            "time says how it ended, not how fast the provider is), though its tokens and "
            "time to first token are counted.",
            ["role", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "keel_time_to_first_token_seconds",
            "Time until a provider produced its first piece of text (of every attempt that "
            "produced one, a stream cut later included).",
            ["role", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "keel_generated_tokens",
            "Tokens generated by providers (a stream cut or cancelled mid-way: those it produced).",
            ["role", "provider"],
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "keel_generation_tokens_per_second",
            "Decoding speed of one whole generation (tokens after the first / time after it).",
            ["role", "provider"],
            buckets=RATE_BUCKETS,
            registry=registry,
        )

        self.breaker_state = Gauge(
            "keel_breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "keel_breaker_transitions",
            "Circuit breaker state changes, by the state entered.",
            ["provider", "state"],
            registry=registry,
        )
        self.provider_healthy = Gauge(
            "keel_provider_healthy",
            "1 when the provider's health check and live traffic say it works.",
            ["provider"],
            registry=registry,
        )
        self.auth_failed = Gauge(
            "keel_provider_auth_failed",
            "1 when the provider rejected keel's key (401/403); needs a person.",
            ["provider"],
            registry=registry,
        )
        self.health_check_seconds = Gauge(
            "keel_health_check_duration_seconds",
            "How long the last deep health check of the provider took.",
            ["provider"],
            registry=registry,
        )
        self.health_check_ok = Gauge(
            "keel_health_check_ok",
            "1 when the last deep health check of the provider generated a token in time.",
            ["provider"],
            registry=registry,
        )

        self.queue_depth_gauge = Gauge(
            "keel_queue_depth",
            "Requests waiting for a slot, per role.",
            ["role"],
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "keel_queue_wait_seconds",
            "Time a request waited for a slot in its role's queue (only those that waited).",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests_degraded = Counter(
            "keel_requests_degraded",
            "Completions served smaller because others were queueing: no client snippets, "
            "half the prompt budget, half the tokens.",
            ["role"],
            registry=registry,
        )
        self.queue_capacity_gauge = Gauge(
            "keel_queue_capacity",
            "Most requests that may wait per role before new ones are rejected.",
            ["role"],
            registry=registry,
        )
        self.rejections = Counter(
            "keel_rejections",
            "Requests refused by admission control (429/503), by their key's "
            "[auth] requests_per_minute (reason key_rate_limited) or because every slot of "
            "a local engine stayed busy for its first-token limit (engine_busy), by reason.",
            ["role", "reason"],
            registry=registry,
        )
        self.superseded_total = Counter(
            "keel_superseded",
            "Completions ended early, answered with no text (x-keel-superseded), because "
            "the same editor's next keystroke asked for the same file.",
            ["role"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "keel_fallbacks",
            "Requests moved from one provider to the next in the role's fallback chain.",
            ["role", "from_provider", "to_provider"],
            registry=registry,
        )
        self.serving_fallback = Gauge(
            "keel_serving_fallback",
            "1 while the role is served by a provider other than its primary.",
            ["role"],
            registry=registry,
        )
        self.retries = Counter(
            "keel_retries",
            "Retries of a failed call to a provider.",
            ["provider"],
            registry=registry,
        )
        self.provider_failures = Counter(
            "keel_provider_failures",
            "Failed calls to a provider, by kind: a request's attempt as the router classed "
            "it (retryable, crashed, rate_limited, too_long, auth, client), or health_check "
            "(every failed health check, a routed-around or idle fallback's too); and the "
            "error (UpstreamTimeout, UpstreamStatusError, ...).",
            ["provider", "kind", "error"],
            registry=registry,
        )
        self.index_chunks = Gauge(
            "keel_index_chunks",
            "Chunks in a repository's index after its last refresh.",
            ["repository"],
            registry=registry,
        )
        self.index_up = Gauge(
            "keel_index_up",
            "1 if a repository's snippets can be served: its last index refresh worked and "
            "its checkout and index are there; 0 if not (failed, missing or unavailable in "
            "/v1/providers: its completions get no snippets from it, or old ones).",
            ["repository"],
            registry=registry,
        )
        self.prompts_shrunk = Counter(
            "keel_prompts_shrunk",
            "Prompts keel built (Tabby completions) that a backend found over its context, "
            "sent again with half the prompt budget.",
            ["provider"],
            registry=registry,
        )
        self.completion_events = Counter(
            "keel_completion_events",
            "Completions served, and those the editor first viewed, selected or dismissed "
            "(each served completion counts once a type, as the status page counts).",
            ["type", "language"],
            registry=registry,
        )
        self.completions_served = Counter(
            "keel_completions_served",
            "Tabby completions answered, by source: model (a generation for the request), "
            "cache (typed through an earlier suggestion) or inflight (a running generation "
            "it joined).",
            ["source"],
            registry=registry,
        )
        self.unknown_languages = Counter(
            "keel_completions_unknown_language",
            "Tabby completions whose language id keel has no rules for, completed without "
            "language rules (no comment-framed snippets, no keyword stop words); each id is "
            "logged the first time.",
            registry=registry,
        )
        self.config_reloads = Counter(
            "keel_config_reloads",
            "Config reloads, by result (ok or error).",
            ["result"],
            registry=registry,
        )
        self.config_refused = Gauge(
            "keel_config_refused",
            "1 from a config reload keel refused until one is applied: the file on disk is "
            "not what runs, and a restart would exit 78 on it.",
            registry=registry,
        )
        self.state_store_up = Gauge(
            "keel_state_store_up",
            "1 while keel can do all it uses the shared store for (redis: it answers and runs "
            "the limit script and the keys' reads; postgres: events), 0 while this replica "
            "works without it; absent when none is configured.",
            ["store"],
            registry=registry,
        )
        self.rate_limit_local = Counter(
            "keel_rate_limit_local_decisions",
            "Per-key rate-limit decisions this replica took alone because Redis was "
            "unreachable (the limit then holds per replica, not across them).",
            registry=registry,
        )
        self.events_dropped_total = Counter(
            "keel_events_dropped",
            "Completion events not stored: buffer_full (the database was down too long), "
            "rejected (the database refused the batch), shutdown (unwritten at exit), "
            "write_failed (the SQLite file could not take it: a full disk, say).",
            ["reason"],
            registry=registry,
        )
        self.redis_keys_gauge = Gauge(
            "keel_redis_keys",
            "Keys read from Redis ([state] redis_url, `keel keys`) in force on this replica; "
            "while Redis is down, those read last.",
            registry=registry,
        )
        self.events_pruned_total = Counter(
            "keel_events_pruned",
            "Completion events deleted for being older than [events] retention_days.",
            registry=registry,
        )
        self.events_buffered_gauge = Gauge(
            "keel_events_buffered",
            "Completion events waiting in memory to be written to the events database.",
            registry=registry,
        )
        for reason in ("buffer_full", "rejected", "shutdown", "write_failed"):
            self.events_dropped_total.labels(reason)
        for role in ROLES:
            self.serving_fallback.labels(role).set(0)
            self.queue_depth_gauge.labels(role).set(0)
        for kind in sorted(EVENT_TYPES):
            self.completion_events.labels(kind, "unknown")
        for result in ("ok", "error"):
            self.config_reloads.labels(result)
        for source in COMPLETION_SOURCES:
            self.completions_served.labels(source)

    # wiring -----------------------------------------------------------------

    def track_providers(self, providers: Providers) -> None:
        """Read worker state and role readiness from ``providers`` at each scrape."""
        self._providers.providers = providers

    def worker_restarts(self, provider: Provider) -> int:
        """``keel_worker_restarts_total`` of ``provider``'s name, for the status page (its
        tile summed the workers running now: 4 restarts read 0 after a reload)."""
        return self._providers.restarts(provider)

    def track_readiness(
        self, role_usable: Callable[[Role], bool], serving: Callable[[], set[str]]
    ) -> None:
        """Judge ``keel_role_ready`` with ``role_usable`` (the router's view, as /ready does),
        and ``keel_model_loaded`` with ``serving`` (the providers it routes to now)."""
        self._providers.role_usable = role_usable
        self._providers.serving = serving

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        self._endpoints_now()
        return generate_latest(self.registry)

    def names(self) -> Iterable[str]:
        """Every sample name exported now (for tests and doctor)."""
        for family in self.registry.collect():
            for sample in family.samples:
                yield sample.name

    # requests ---------------------------------------------------------------

    def _child(self, metric: _Labelled, *values: str) -> _Labelled:
        """``metric.labels(*values)``, kept: prometheus_client validates the values and
        takes a lock on every ``labels`` call, a few microseconds each, several times
        per request."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def request(
        self,
        *,
        route: str,
        method: str,
        status: int,
        seconds: float,
        role: str = "",
        provider: str = "",
    ) -> None:
        self._child(self.requests, route, method, role, provider, str(status)).inc()
        self._child(self.request_duration, route, role, provider).observe(seconds)

    def observe_generation(
        self,
        role: str,
        provider: str,
        seconds: float,
        ttft: float | None,
        tokens: int,
    ) -> None:
        """One finished generation: total time, time to first token, tokens produced."""
        self._child(self.generation_duration, role, provider).observe(seconds)
        self.generation_cut(role, provider, ttft, tokens)
        decoding = seconds - (ttft or 0.0)
        if tokens > 1 and decoding > 0:
            self._child(self.tokens_per_second, role, provider).observe((tokens - 1) / decoding)

    def generation_cut(self, role: str, provider: str, ttft: float | None, tokens: int) -> None:
        """A generation that produced ``tokens`` and ended before its end (its stream cut
        or stalled, its request cancelled): its tokens and first token, not its time."""
        if ttft is not None:
            self._child(self.time_to_first_token, role, provider).observe(ttft)
        if tokens > 0:
            self._child(self.tokens, role, provider).inc(tokens)

    # router -----------------------------------------------------------------

    def breaker_changed(self, provider: str, state: str) -> None:
        """``state`` is 'closed', 'half_open' (or 'half-open') or 'open'."""
        value = BREAKER_STATES.get(str(state))
        if value is None:
            raise ValueError(f"unknown breaker state {state!r}")
        if self._in_use_now(provider):
            self._child(self.breaker_state, provider).set(value)
        self._child(self.breaker_transitions, provider, str(state).replace("-", "_")).inc()

    def providers_in_use(self, endpoints: Sequence[Endpoint]) -> None:
        """The providers keel routes to now, each as its router sees it: set at start,
        reload and swap, where the gauges were set only on a change (no sample for a
        provider that never changed; a reload's fresh provider kept the old one's value),
        and removed for a provider no longer in use (an open breaker of a fallback the
        admin had removed kept KeelBreakerOpen firing)."""
        names = {endpoint.name for endpoint in endpoints}
        for gone in self._in_use - names:
            for gauge in PROVIDER_GAUGES:
                metric = getattr(self, gauge)
                with contextlib.suppress(KeyError):
                    metric.remove(gone)
                self._children.pop((metric, (gone,)), None)
        self._in_use = names
        self._endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self._endpoints_now()
        for endpoint in endpoints:
            self.provider_auth_failed(endpoint.name, endpoint.auth_failed)

    def _endpoints_now(self) -> None:
        """``keel_breaker_state`` and ``keel_provider_healthy`` of the providers in use,
        as the router judges them now. Set only as they changed, the breaker read "open"
        long after the cooldown (an open breaker turns half-open when a request reads
        it), and health read 1 for a worker keel had given up on, or 0 after a finding
        expired or its worker was replaced. The breaker is read without acting on it
        (:meth:`~keel.router.breaker.CircuitBreaker.state_now`)."""
        for name, endpoint in self._endpoints.items():
            state = BREAKER_STATES[str(endpoint.breaker.state_now())]
            self._child(self.breaker_state, name).set(state)
            # a refused key, or a worker that is not running, is not a working provider
            healthy = endpoint.healthy and not endpoint.auth_failed and endpoint.running()
            self._child(self.provider_healthy, name).set(1 if healthy else 0)

    def _in_use_now(self, provider: str) -> bool:
        """Whether ``provider``'s gauges are kept: a provider a reload retired still
        finishes its requests, and their outcomes must not bring its gauges back."""
        return not self._in_use or provider in self._in_use

    def provider_health(self, provider: str, healthy: bool) -> None:
        if self._in_use_now(provider):
            self._child(self.provider_healthy, provider).set(1 if healthy else 0)

    def provider_auth_failed(self, provider: str, failed: bool) -> None:
        if self._in_use_now(provider):
            self._child(self.auth_failed, provider).set(1 if failed else 0)

    def health_check(self, provider: str, seconds: float | None, ok: bool) -> None:
        """A health check of ``provider`` finished: a deep one (one generated token) took
        ``seconds``; a ping (None) tells only whether it answers."""
        if self._in_use_now(provider):
            if seconds is not None:
                self._child(self.health_check_seconds, provider).set(seconds)
            self._child(self.health_check_ok, provider).set(1 if ok else 0)

    def fallback(self, role: str, from_provider: str, to_provider: str) -> None:
        self._child(self.fallbacks, role, from_provider, to_provider).inc()

    def fallback_active(self, role: str, active: bool) -> None:
        """Whether ``role`` is now served by a provider other than its primary."""
        self._child(self.serving_fallback, role).set(1 if active else 0)

    def retry(self, provider: str) -> None:
        self._child(self.retries, provider).inc()

    def index_state(self, repository: str, ok: bool, chunks: int | None) -> None:
        self._child(self.index_up, repository).set(1 if ok else 0)
        if chunks is not None:
            self._child(self.index_chunks, repository).set(chunks)

    def provider_failed(self, provider: str, kind: str, error: str) -> None:
        self._child(self.provider_failures, provider, kind, error).inc()

    def prompt_shrunk(self, provider: str) -> None:
        self._child(self.prompts_shrunk, provider).inc()

    def rejected(self, role: str, reason: str) -> None:
        self._child(self.rejections, role, reason).inc()

    def superseded(self, role: str) -> None:
        self._child(self.superseded_total, role).inc()

    def queue_depth(self, role: str, n: int) -> None:
        self._child(self.queue_depth_gauge, role).set(n)

    def queue_capacity(self, role: str, n: int) -> None:
        self._child(self.queue_capacity_gauge, role).set(n)

    def queue_wait(self, role: str, seconds: float) -> None:
        self._child(self.queue_wait_seconds, role).observe(seconds)

    def degraded(self, role: str) -> None:
        self._child(self.requests_degraded, role).inc()

    # events and config ------------------------------------------------------

    def completion_event(self, kind: str, language: str | None) -> None:
        """``kind``: 'served' (keel answered) or the editor's 'view'/'select'/'dismiss'."""
        if kind not in EVENT_TYPES:
            kind = "other"
        self._child(self.completion_events, kind, _language_label(language)).inc()

    def editor_event(self, kind: str, completion_id: str | None, language: str | None) -> None:
        """The editor's event for a completion: counted only for one keel served
        (``language`` known) and only the first of its type, as the status page's
        acceptance counts distinct completions. Counting every event let repeated views
        pull acceptance down, and a client re-sending ``select`` (or selecting made-up
        ids) push it to 300% and silence the low-acceptance alert."""
        if language is None or not completion_id:
            return
        seen = (completion_id, kind)
        if seen in self._events_seen:
            return
        self._events_seen[seen] = None
        if len(self._events_seen) > EVENTS_REMEMBERED:
            self._events_seen.pop(next(iter(self._events_seen)))
        self.completion_event(kind, language)

    def completion_served(self, source: str) -> None:
        """A Tabby completion answered from ``source`` (see :data:`COMPLETION_SOURCES`)."""
        self._child(self.completions_served, source).inc()

    def config_reload(self, ok: bool) -> None:
        self._child(self.config_reloads, "ok" if ok else "error").inc()
        self.config_refused.set(0 if ok else 1)

    # shared state -----------------------------------------------------------

    def state_store(self, store: str, up: bool) -> None:
        """Whether the shared ``store`` ('redis' or 'postgres') answers now."""
        self._child(self.state_store_up, store).set(1 if up else 0)

    def rate_limited_locally(self) -> None:
        self.rate_limit_local.inc()

    def events_dropped(self, reason: str, n: int = 1) -> None:
        self._child(self.events_dropped_total, reason).inc(n)

    def redis_keys(self, n: int) -> None:
        self.redis_keys_gauge.set(n)

    def events_pruned(self, n: int) -> None:
        self.events_pruned_total.inc(n)

    def events_buffered(self, n: int) -> None:
        self.events_buffered_gauge.set(n)
