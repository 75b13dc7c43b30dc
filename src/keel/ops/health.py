"""Deep health: each role's provider generates one token (or one embedding) in time.

``/health`` says the process answers and ``/ready`` says each role has a
provider in a usable state; neither notices a worker that is "ready" while
its generation is deadlocked. The deep check does, at the price of real work,
so its findings are cached for ``ttl`` seconds: a load balancer polling every
second costs one generation per role per ``ttl``. Findings expire; a stale
"ok" is never reported. Concurrent checks of one role share one probe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from keel.config import ROLES, Role
from keel.errors import KeelError
from keel.ops.metrics import Metrics
from keel.providers.base import Provider
from keel.providers.catalog import Providers
from keel.router.service import probe


@dataclass(frozen=True, slots=True)
class Finding:
    role: Role
    provider: str
    ok: bool
    seconds: float
    checked_at: float
    error: str | None = None

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "provider": self.provider,
            "ok": self.ok,
            "seconds": round(self.seconds, 4),
            "age_seconds": round(max(0.0, now - self.checked_at), 3),
            "error": self.error,
        }


class DeepHealth:
    def __init__(
        self,
        *,
        ttl: float = 15.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self._clock = clock
        self._findings: dict[tuple[Role, str], Finding] = {}
        self._locks: dict[tuple[Role, str], asyncio.Lock] = {}

    def now(self) -> float:
        return self._clock()

    async def check(
        self,
        providers: Providers,
        metrics: Metrics | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Finding]:
        """A fresh-enough finding for every role, probing those whose finding expired
        (each probe bounded by ``timeout``, default the constructor's). A ``timeout``
        shorter than that is the caller's own question: probed afresh, neither kept nor
        counted in the metrics (a caller's 0.0001 s made every role "failing" for
        everyone for the ttl)."""
        limit = self.timeout if timeout is None else timeout
        if limit < self.timeout:
            probes = (self._chain(role, providers, limit, None) for role in ROLES)
            return list(await asyncio.gather(*probes))
        roles = (self._role(role, providers, metrics, limit) for role in ROLES)
        return list(await asyncio.gather(*roles))

    async def _role(
        self, role: Role, providers: Providers, metrics: Metrics | None, timeout: float
    ) -> Finding:
        key = (role, providers.for_role(role).name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._findings.get(key)
            if cached is not None and self._clock() - cached.checked_at < self.ttl:
                return cached
            finding = await self._chain(role, providers, timeout, metrics)
            self._findings[key] = finding
        return finding

    async def _chain(
        self, role: Role, providers: Providers, timeout: float, metrics: Metrics | None
    ) -> Finding:
        """The role's providers in its chain's order until one generates: the role is
        ok if any does, as it is served then (a role served by its fallback was
        "failing", a 503 that took a serving keel out of a load balancer). Its finding
        names the provider that answered, else the primary's failure."""
        chain = [entry.provider for group in providers.chains[role] for entry in group]
        first: Finding | None = None
        for provider in dict.fromkeys(chain):  # the embedded model listed twice: once
            finding = await self._probe(role, provider, timeout)
            if metrics is not None:
                metrics.health_check(provider.name, finding.seconds, finding.ok)
            if finding.ok:
                return finding
            first = first or finding
        assert first is not None  # a role's chain is never empty
        return first

    async def _probe(self, role: Role, provider: Provider, timeout: float) -> Finding:
        start = self._clock()
        error: str | None = None
        try:
            await probe(role, provider, timeout)
        except KeelError as exc:
            error = exc.message
        end = self._clock()
        return Finding(role, provider.name, error is None, end - start, end, error)
