"""The routing layer as the app sees it: one router per role, their shared
retry budget, admission control, and the background health prober."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from keel.config import (
    ROLES,
    LocalModelConfig,
    Role,
    RoutingConfig,
    Settings,
    local_concurrency,
)
from keel.errors import UpstreamConnectError, UpstreamTimeout
from keel.providers.base import (
    ChatCall,
    ChatMessage,
    ChatProvider,
    CompletionCall,
    CompletionProvider,
    EmbeddingProvider,
    GenerationParams,
    Provider,
    close_stream,
)
from keel.providers.catalog import ProviderEntry, Providers
from keel.providers.local import LocalProvider
from keel.router.admission import Admission, Superseder
from keel.router.breaker import BreakerPolicy
from keel.router.retry import RetryBudget, RetryPolicy
from keel.router.router import (
    DEFAULT_TIMEOUTS,
    Endpoint,
    NoEvents,
    RoleRouter,
    RouterEvents,
    Timeouts,
    new_breaker,
    with_overrides,
)

log = logging.getLogger("keel.router")


LOCAL_TIMEOUTS = Timeouts(first_token=60.0, between_tokens=10.0)
"""A CPU model reads a cold 1,000-token prompt in 10-20 s: its first token is bounded
by the request's total timeout, not by a server-grade first-token limit."""
LOCAL_EMBEDDING_TIMEOUTS = Timeouts(first_token=60.0, between_tokens=60.0)
"""For each part of a batch (~1,000 tokens, ~4 s alone on 2 cores), which waits while a
generation on the same cores has the CPU (the embedding engine yields it): during an
800-token chat answer a 4-chunk batch took 24.7 s, against 5.6 s alone."""


def _timeouts(role: Role, entry: ProviderEntry) -> Timeouts:
    if isinstance(entry.config, LocalModelConfig):
        default = LOCAL_EMBEDDING_TIMEOUTS if role == "embedding" else LOCAL_TIMEOUTS
    else:
        default = DEFAULT_TIMEOUTS[role]
    return with_overrides(entry.config, default)


async def probe(role: Role, provider: Provider, timeout: float) -> None:
    """A deep check: one real token (or one embedding) through ``provider``, its answer
    read to the end (a well-formed end included), within
    ``timeout`` seconds, or the :class:`~keel.errors.KeelError` saying why not
    (:class:`~keel.errors.UpstreamTimeout` when slower). The one probe of the
    background prober, ``/health/deep`` and ``keel doctor --online``."""
    try:
        async with asyncio.timeout(timeout):
            await _one_token(role, provider)
    except TimeoutError:
        raise UpstreamTimeout(
            f"no answer to a one-token probe within {timeout:g}s", provider=provider.name
        ) from None


async def _one_token(role: Role, provider: Provider) -> None:
    params = GenerationParams(max_tokens=1, temperature=0.0)
    if role == "embedding":
        assert isinstance(provider, EmbeddingProvider)
        await provider.embed(["ping"])
        return
    if role == "chat":
        assert isinstance(provider, ChatProvider)
        stream = provider.stream_chat(ChatCall((ChatMessage("user", "ping"),), params))
    else:
        assert isinstance(provider, CompletionProvider)
        stream = provider.stream_completion(CompletionCall("def ", params))
    try:
        async for _ in stream:  # to its end: a stream that breaks after its first token
            pass  # passed, and the breaker closed on a backend failing every request
    finally:
        await close_stream(stream)


def _inherited(
    previous: Routing | None, config: RoutingConfig
) -> tuple[dict[int, Endpoint], list[Routing]]:
    """What a routing takes from the one a reload replaces: that routing's endpoints by
    provider when ``[routing]`` is unchanged (a kept provider keeps its breaker and
    counts), and the routings that still serve what they admitted (see
    :meth:`Routing.in_use`)."""
    if previous is None:
        return {}, []
    same = previous.settings.routing == config
    carried = {id(e.provider): e for e in previous.endpoints()} if same else {}
    return carried, [previous, *previous.replaced()]


def breaker_policy(config: RoutingConfig) -> BreakerPolicy:
    return BreakerPolicy(
        consecutive_failures=config.breaker_consecutive_failures,
        failure_rate=config.breaker_failure_rate,
        min_volume=config.breaker_min_volume,
        window=config.breaker_window_seconds,
        cooldown=config.breaker_cooldown_seconds,
    )


DRAIN_LIMIT = 1800.0
"""Seconds a replaced provider (a model swap, a reload, an unload) may go on serving
what it started. It was 60 s, and a chat answer longer than that, ordinary on a CPU,
was cut at a swap or reload and reported as a crash or a stall. Every request has its
own limits (a completion's budget, the stall timeouts), so this only bounds what those
do not (a long chat on a slow model)."""


class Routing:
    def __init__(
        self,
        settings: Settings,
        providers: Providers,
        *,
        events: RouterEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        previous: Routing | None = None,
    ) -> None:
        """``previous``: the routing a reload replaces. A provider it kept keeps its
        endpoint (breaker, health, latency) where ``[routing]`` is unchanged: a reload
        made a failing backend healthy and usable again, and forgot open breakers."""
        config = settings.routing
        self.settings = settings
        self.providers = providers
        self.events: RouterEvents = events or NoEvents()
        policy = breaker_policy(config)
        retry = RetryPolicy(
            attempts_per_provider=config.retry_attempts_per_provider,
            budget_ratio=config.retry_budget_ratio,
        )
        self.budget = RetryBudget(retry, clock=clock)
        # An editor's requests from before a reload are superseded by its next keystroke,
        # and the count of superseded requests goes on.
        self.superseder: Superseder = previous.superseder if previous else Superseder()
        self.routers: dict[Role, RoleRouter] = {}
        self.admission: dict[Role, Admission] = {}
        self._policy = policy
        self._clock = clock
        endpoints: dict[int, Endpoint] = {}
        self._carried, self._replaced = _inherited(previous, config)
        self._retired: list[Endpoint] = []  # a swap took them out; attempts run on them
        for role in ROLES:
            groups = [
                [self._endpoint(role, entry, endpoints) for entry in group]
                for group in providers.chains[role]
            ]
            self.routers[role] = RoleRouter(
                role,
                groups,
                budget=self.budget,
                retry=retry,
                events=self.events,
                clock=clock,
                sleep=sleep,
                gate=functools.partial(self._gate, role),
            )
            role_config = settings.model.role(role)
            self.admission[role] = Admission(
                role,
                max_concurrent=role_config.concurrency(),
                queue_size=role_config.queue_size,
                queue_timeout=role_config.queue_timeout,
                events=self.events,
            )
            self.events.queue_capacity(role, role_config.queue_size)
        self._prober: asyncio.Task[None] | None = None
        self.events.providers_in_use(self.endpoints())
        self._replacing(previous)

    def _replacing(self, previous: Routing | None) -> None:
        """Marks the endpoints of ``previous`` this routing has none of: what the requests
        they still serve do is no health news of the endpoints here, which may have their
        names."""
        if previous is None:
            return
        kept = {id(endpoint) for endpoint in self.endpoints()}
        for endpoint in previous.endpoints():
            endpoint.replaced = id(endpoint) not in kept
        for role, admission in self.admission.items():  # its counts go on, as the metrics
            admission.carry_counts(previous.admission[role])

    def _gate(self, role: Role, endpoint: Endpoint) -> Admission | None:
        """A local model in a role admitting more at once than a local engine should take
        (a model server's role falling back to it, or a model loaded in its place) is
        held to a local role's limit there: :func:`local_concurrency` of its slots (held
        to 8, an engine of 12 slots ran 8 requests and queued 4)."""
        admission = self.admission[role]
        if not isinstance(endpoint.provider, LocalProvider):
            return None
        limit = local_concurrency(endpoint.provider.supervisor.spec.slots)
        if admission.max_concurrent <= limit:
            return None
        return admission.gate(endpoint.name, limit)

    def endpoints(self) -> list[Endpoint]:
        """Every endpoint of every role, once (the embedded model serves several)."""
        unique = {id(e): e for router in self.routers.values() for e in router.endpoints}
        return list(unique.values())

    def _endpoint(self, role: Role, entry: ProviderEntry, known: dict[int, Endpoint]) -> Endpoint:
        """An endpoint serving several roles (the embedded model) has one breaker. A kept
        provider keeps its endpoint, unless its timeouts changed (a local model's worker
        is kept whatever its first_token_timeout): then it starts afresh."""
        key = id(entry.provider)
        carried = self._carried.pop(key, None)
        if carried is not None and carried.timeouts == _timeouts(role, entry):
            known[key] = carried
        if key not in known:
            known[key] = Endpoint(
                entry.provider,
                new_breaker(entry.provider.name, self._policy, self.events, self._clock),
                timeouts=_timeouts(role, entry),
                clock=self._clock,
            )
        return known[key]

    def set_chain(self, role: Role, chain: list[list[ProviderEntry]]) -> list[Provider]:
        """Switch a role's chain (a model swap or unload).

        Requests already running keep their endpoint; new ones see the new chain at
        once. A provider that serves already (another role, or this one) keeps its
        endpoint. Returns the providers the role no longer uses, so the caller can drain
        and stop those no role uses.
        """
        router = self.routers[role]
        known = {id(e.provider): e for e in self.endpoints()}
        old = router.endpoints
        router.groups = [[self._endpoint(role, entry, known) for entry in group] for group in chain]
        self.providers.chains[role] = chain
        self.events.providers_in_use(self.endpoints())
        kept = {id(e.provider) for e in router.endpoints}
        retired = [e for e in old if id(e.provider) not in kept]
        self._retired += retired
        return [e.provider for e in retired]

    def busy(self) -> bool:
        """Whether a request admitted here is running, waiting for a slot or on its way to
        one, or an attempt (a precompute's takes no slot) is in flight."""
        return any(a.busy for a in self.admission.values()) or any(
            e.outstanding for e in (*self.endpoints(), *self._retired)
        )

    def sends_to(self, provider: Provider) -> bool:
        """Whether a request this routing admitted may still go to ``provider``: an
        attempt in flight on it, or a request running, waiting for a slot or on its way
        to one in a role whose chain has it (one waiting has nothing outstanding yet: it
        picks its provider once it has the slot). An endpoint a swap took out of its
        chain counts until its attempts end: a swapped-out model finishes what it
        streams."""
        self._retired = [e for e in self._retired if e.outstanding]
        if any(e.provider is provider for e in self._retired):
            return True
        for role, router in self.routers.items():
            endpoints = [e for e in router.endpoints if e.provider is provider]
            if any(e.outstanding for e in endpoints):
                return True
            if endpoints and self.admission[role].busy:
                return True
        return False

    def replaced(self) -> list[Routing]:
        """The routings reloads replaced before this one that still serve what they
        admitted: those requests may yet go to a provider this one shares with them."""
        self._replaced = [r for r in self._replaced if r.busy()]
        return self._replaced

    def in_use(self, provider: Provider) -> bool:
        """:meth:`sends_to`, here or in a routing a reload replaced that still serves
        what it admitted."""
        return any(r.sends_to(provider) for r in (self, *self.replaced()))

    async def close_when_idle(self, providers: list[Provider], grace: float = DRAIN_LIMIT) -> None:
        """Close providers once no request admitted here, or by a routing this one
        replaced, may still go to them (or after ``grace`` seconds): a swapped-out model
        or a reload's replaced provider finishes what it started and what waits for a
        slot. Counted by this routing's outstanding attempts alone, two reloads in a row
        (the first changing ``[routing]``, so that the provider it kept had an endpoint
        afresh) closed the provider under the requests admitted before the first: those
        running got a 502, those queued reopened its connection pool, which nothing
        closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # The counts are plain integers the routers and admissions keep; polling is enough.
        while any(self.in_use(p) for p in providers) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await asyncio.gather(*(provider.aclose() for provider in providers))
        for provider in providers:
            log.info("stopped %s", provider.name)

    def start_prober(self) -> None:
        if self._prober is None:
            # a context of its own, not that of a request whose reload started it
            self._prober = asyncio.create_task(
                self._probe_forever(), name="health-prober", context=contextvars.Context()
            )

    async def aclose(self) -> None:
        task, self._prober = self._prober, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def probe_all(self) -> None:
        timeout = self.settings.routing.probe_timeout_seconds
        checks = []
        seen: set[int] = set()
        for role, router in self.routers.items():
            for endpoint in router.endpoints:
                if id(endpoint) in seen:
                    continue
                seen.add(id(endpoint))
                bounded = functools.partial(probe, role, timeout=timeout)
                checks.append(router.check(endpoint, bounded, timeout))
        await asyncio.gather(*checks)

    async def reach_all(self) -> None:
        """At start, whether each HTTP backend accepts a connection at all: one that
        does not (down, a wrong port) is routed around and named by ``/ready`` at once,
        not after the two failed probes (a minute) it took. No request is sent: what a
        backend answers is the probes' business."""
        timeout = self.settings.routing.probe_timeout_seconds
        seen: set[int] = set()
        checks = []
        for router in self.routers.values():
            for endpoint in router.endpoints:
                url = urlsplit(endpoint.provider.info.endpoint or "")
                if id(endpoint) in seen or url.scheme not in ("http", "https"):
                    continue
                seen.add(id(endpoint))
                port = url.port or (443 if url.scheme == "https" else 80)
                checks.append(_reach(router, endpoint, url.hostname or "", port, timeout))
        await asyncio.gather(*checks)

    async def _probe_forever(self) -> None:
        interval = self.settings.routing.probe_interval_seconds
        try:
            await self.reach_all()
        except Exception:
            log.exception("reaching the backends failed")
        while True:
            await asyncio.sleep(interval)
            try:
                await self.probe_all()
            except Exception:  # the prober must outlive any one bad check
                log.exception("health probe round failed")

    def snapshot(self) -> dict[str, object]:
        roles: dict[str, object] = {}
        for role, router in self.routers.items():
            chain = []
            for index, group in enumerate(router.groups):
                for endpoint in group:
                    chain.append({"position": index, **endpoint.snapshot(role)})
            roles[role] = {
                "providers": chain,
                "serving_fallback": router.serving_fallback,
                "admission": self.admission[role].snapshot(),
            }
        return {"roles": roles, "superseded": self.superseder.superseded}


async def _reach(router: RoleRouter, endpoint: Endpoint, host: str, port: int, wait: float) -> None:
    """Whether ``host:port`` accepts a connection within ``wait`` seconds, twice over
    before it is called unreachable for a wait that ran out: keel's own loop, busy with
    its start (a loaded machine), can hold a connection made at once past the wait, and
    a loopback backend was routed around as "no answer" (found by a chaos test under
    load). A refusal is at once."""
    for attempt in (1, 2):
        try:
            async with asyncio.timeout(wait):
                _, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            if attempt == 1:
                continue
            reason = "no answer"
        except OSError as exc:
            reason = _os_reason(exc)
        else:
            writer.close()
            return
        error = UpstreamConnectError(
            f"cannot connect to {host}:{port}: {reason}", provider=endpoint.name
        )
        router.unreachable(endpoint, error)
        return


def _os_reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)
