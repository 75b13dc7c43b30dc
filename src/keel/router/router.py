"""Route each role's requests over its chain of providers.

A role has an ordered chain of groups (the primary, then each
``[[model.<role>.fallback]]``); a group holds the endpoints of one provider
(replicas), balanced by least outstanding requests. For every request the
router offers the chain as attempts (:meth:`RoleRouter.attempts`, see
:mod:`keel.router.attempt`): usable endpoints first (healthy, breaker closed
or offering its half-open probe, not rate-limited, key accepted), then, if
none of those answered, the ones merely marked unhealthy. A retryable
failure moves on to the next endpoint at once; only the last one left is
retried, with jittered backoff, while the retry budget allows
(:mod:`keel.router.policy`).

An attempt's outcome is recorded once, when it ends: a stream that fails
after its first tokens is a failure, not a success and then a failure. What
the caller got wrong (a 4xx, a prompt over the context) never counts against
a provider.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from keel.config import ProviderConfig, Role
from keel.errors import KeelError, RateLimited, Unavailable, UpstreamTimeout, WorkerCrashed
from keel.providers.base import Provider
from keel.rate_limit import REFUSED
from keel.router.admission import Admission
from keel.router.attempt import Attempts
from keel.router.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from keel.router.classify import Failure, classify, without_name
from keel.router.retry import RetryBudget, RetryPolicy

log = logging.getLogger("keel.router")


class RouterEvents(Protocol):
    """What the router reports; the metrics implement it."""

    def breaker_changed(self, provider: str, state: str) -> None: ...
    def provider_health(self, provider: str, healthy: bool) -> None: ...
    def fallback(self, role: str, from_provider: str, to_provider: str) -> None: ...
    def retry(self, provider: str) -> None: ...
    def prompt_shrunk(self, provider: str) -> None: ...
    def provider_failed(self, provider: str, kind: str, error: str) -> None: ...
    def fallback_active(self, role: str, active: bool) -> None: ...
    def provider_auth_failed(self, provider: str, failed: bool) -> None: ...
    def health_check(self, provider: str, seconds: float | None, ok: bool) -> None: ...
    def observe_generation(
        self, role: str, provider: str, seconds: float, ttft: float | None, tokens: int
    ) -> None: ...
    def generation_cut(self, role: str, provider: str, ttft: float | None, tokens: int) -> None: ...
    def rejected(self, role: str, reason: str) -> None: ...
    def queue_depth(self, role: str, n: int) -> None: ...
    def queue_wait(self, role: str, seconds: float) -> None: ...
    def degraded(self, role: str) -> None: ...
    def queue_capacity(self, role: str, n: int) -> None: ...
    def providers_in_use(self, endpoints: Sequence[Endpoint]) -> None: ...


class NoEvents:
    def breaker_changed(self, provider: str, state: str) -> None:
        pass

    def provider_health(self, provider: str, healthy: bool) -> None:
        pass

    def fallback(self, role: str, from_provider: str, to_provider: str) -> None:
        pass

    def retry(self, provider: str) -> None:
        pass

    def prompt_shrunk(self, provider: str) -> None:
        pass

    def provider_failed(self, provider: str, kind: str, error: str) -> None:
        pass

    def fallback_active(self, role: str, active: bool) -> None:
        pass

    def provider_auth_failed(self, provider: str, failed: bool) -> None:
        pass

    def health_check(self, provider: str, seconds: float | None, ok: bool) -> None:
        pass

    def observe_generation(
        self, role: str, provider: str, seconds: float, ttft: float | None, tokens: int
    ) -> None:
        pass

    def generation_cut(self, role: str, provider: str, ttft: float | None, tokens: int) -> None:
        pass

    def rejected(self, role: str, reason: str) -> None:
        pass

    def queue_depth(self, role: str, n: int) -> None:
        pass

    def queue_wait(self, role: str, seconds: float) -> None:
        pass

    def degraded(self, role: str) -> None:
        pass

    def queue_capacity(self, role: str, n: int) -> None:
        pass

    def providers_in_use(self, endpoints: Sequence[Endpoint]) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; ``first_token`` covers connecting and reading the prompt."""

    first_token: float
    between_tokens: float


DEFAULT_TIMEOUTS: dict[Role, Timeouts] = {
    "completion": Timeouts(first_token=15.0, between_tokens=5.0),
    "chat": Timeouts(first_token=60.0, between_tokens=15.0),
    "embedding": Timeouts(first_token=30.0, between_tokens=30.0),
}


def with_overrides(config: ProviderConfig, default: Timeouts) -> Timeouts:
    """``default`` with a provider table's ``first_token_timeout`` and
    ``between_tokens_timeout`` where it sets them."""
    return Timeouts(
        first_token=config.first_token_timeout or default.first_token,
        between_tokens=config.between_tokens_timeout or default.between_tokens,
    )


UNHEALTHY_AFTER = 2
"""Consecutive failed checks (probe or live) before an endpoint is routed around."""
HEALTH_CHECK = "health_check"
"""The kind ``keel_provider_failures_total`` counts a failed health check as, whatever
failed (its ``error`` says what): apart from requests' failures, which a check's do not
share (no retry, no fallback), yet counted, as the gauges went 0 while the counter said
nothing and a dead fallback had no series until traffic reached it."""


@dataclass(slots=True)
class Endpoint:
    """One provider endpoint with its breaker and health, as the router sees it."""

    provider: Provider
    breaker: CircuitBreaker
    timeouts: Timeouts
    finding_ttl: float = 120.0
    clock: Callable[[], float] = time.monotonic
    outstanding: int = 0
    failed_checks: int = 0
    last_failure_at: float | None = None
    last_error: str | None = None
    last_crash: int | None = None
    """The pid of the last worker death counted (local providers)."""
    failed_in: object = None
    """The worker process (its pid) the last failure was in (local providers)."""
    auth_failed: bool = False
    blocked_until: float = 0.0
    """Until when its backend asked for nothing (a 429's, a 503's ``Retry-After``)."""
    limited_until: float = 0.0
    """Until when keel's own ``rate_limit`` for it has no turn: tried all the same, as its
    limiter refuses at once and counts each refusal (kept off, the requests it refused
    were counted in no metric: one of four 429s)."""
    prompts_shrunk: int = 0
    """Prompts keel built that the backend found over its context, sent again at half."""
    retries: int = 0
    """Failed calls to it keel made again (``keel_retries_total``)."""
    fallbacks_to: dict[str, int] = field(default_factory=dict)
    """Requests moved to it from the provider before it in the chain, by role
    (``keel_fallbacks_total``): the embedded model serves several roles, and one role's
    fallbacks showed under another that had none."""
    latencies: list[float] = field(default_factory=list)
    """Its last answers' times to their first token."""
    check_latencies: list[float] = field(default_factory=list)
    """Its last deep health checks' times to their first token."""

    @property
    def held_until(self) -> float:
        """Until when it is held back: its backend's Retry-After or keel's own limit."""
        return max(self.blocked_until, self.limited_until)

    replaced: bool = False
    """A reload put another endpoint in its place, perhaps under its name: the requests
    it still serves change its own state, but say nothing of health in the log or the
    metrics (the old one's recovery was logged "healthy again" under the new one's name,
    which was down)."""
    unanswered_since: float | None = None
    """The event loop's time of the first attempt sent to it since it last sent anything
    back (None: it has since): attempts an editor's next keystroke cancels end as no one's
    failure, so a backend that hangs while keystrokes keep coming is found by this."""

    @property
    def name(self) -> str:
        return self.provider.name

    def silent(self) -> bool:
        """Whether it has sent nothing back for longer than a first token may take,
        while asked: its requests in flight say nothing of its health then."""
        since = self.unanswered_since
        limit = self.timeouts.first_token
        return since is not None and asyncio.get_running_loop().time() - since > limit

    @property
    def healthy(self) -> bool:
        if self.failed_checks < UNHEALTHY_AFTER:
            return True
        if self.failed_in is not None and self.provider.status().get("pid") != self.failed_in:
            # Found in a worker since replaced (killed for not answering, crashed): the
            # new one was unhealthy in /ready until the next probe, up to 30 s.
            return True
        # A finding expires: an endpoint nobody has checked for a while gets another chance.
        return self.last_failure_at is not None and (
            self.clock() - self.last_failure_at > self.finding_ttl
        )

    def running(self) -> bool:
        return self.provider.status().get("state") in {"ok", "ready"}

    def may_retry(self) -> bool:
        """Whether a failed request may be sent to it again: its breaker lets it, and its
        worker is not one keel gave up on or stopped (a retry of one failed at once
        again: the error logged twice, a retry and a second failure counted)."""
        state = self.provider.status().get("state")
        return self.breaker.available() and state not in {"failed", "stopped"}

    def usable(self) -> bool:
        return (
            not self.auth_failed
            and self.healthy
            and self.clock() >= self.blocked_until
            and self.running()
            and self.breaker.available()
        )

    def trouble(self) -> str | None:
        """Why requests cannot count on this endpoint now, in a word or two (None: they
        can): what ``/ready``'s ``why``, a 503's message and the status page show."""
        if self.auth_failed:
            return "auth failed"
        if self.breaker.state is BreakerState.OPEN:
            return "breaker open"
        if self.clock() < self.held_until:
            return "rate limited"
        if not self.running():
            return f"worker {self.provider.status().get('state')}"
        if not self.healthy:
            return "unhealthy"
        return None

    def record_ok(self, seconds: float | None, *, check: bool = False) -> bool:
        """Returns True when this makes the endpoint healthy again: its checks pass, or
        its backend takes keel's key again (``keel_provider_healthy`` stayed 0 after a
        refused key was mended, while the provider served). ``seconds``: to its first
        token, a latency (None: a ping, whose time is no token's); ``check``: a health
        check's, kept apart from its answers'."""
        recovered = not self.healthy or self.auth_failed
        self.failed_checks = 0
        self.auth_failed = False
        if seconds is not None and check:
            self.check_latencies = [*self.check_latencies[-99:], seconds]
        elif seconds is not None:
            self.latencies = [*self.latencies[-99:], seconds]
        return recovered

    def record_failed(self, error: KeelError) -> bool:
        """Returns True when this flips the endpoint to unhealthy."""
        was_healthy = self.healthy
        self.failed_checks += 1
        self.failed_in = self.provider.status().get("pid")
        self.last_failure_at = self.clock()
        self.last_error = error.message
        return was_healthy and not self.healthy

    def new_crash(self, error: KeelError) -> bool:
        """False for a worker death already counted: the other requests it failed."""
        worker = error.worker if isinstance(error, WorkerCrashed) else None
        if worker is not None and worker == self.last_crash:
            return False
        self.last_crash = worker
        return True

    def snapshot(self, role: str | None = None) -> dict[str, object]:
        """Its state, with the fallbacks of ``role`` (of every role where None)."""
        # of its answers; of its checks only where it has served none: a check's tiny
        # request (one short text to embed) made an embedding model's figure 313 ms
        # while its batches took 10 s
        ordered = sorted(self.latencies or self.check_latencies)
        p50 = ordered[len(ordered) // 2] if ordered else None
        return {
            "name": self.name,
            "kind": self.provider.info.kind,
            "model": self.provider.info.model,
            "endpoint": self.provider.info.endpoint,
            "breaker": str(self.breaker.state),
            "healthy": self.healthy,
            "usable": self.usable(),
            "auth_failed": self.auth_failed,
            "outstanding": self.outstanding,
            "last_error": self.last_error,
            "latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "rate_limited_for": max(0.0, round(self.held_until - self.clock(), 1)),
            "prompts_shrunk": self.prompts_shrunk,
            "retries": self.retries,
            "fallbacks_to": (
                self.fallbacks_to.get(role, 0) if role else sum(self.fallbacks_to.values())
            ),
            "timeouts": asdict(self.timeouts),
            "worker": self.provider.status(),
        }


class RoleRouter:
    def __init__(
        self,
        role: Role,
        groups: Sequence[Sequence[Endpoint]],
        *,
        budget: RetryBudget,
        retry: RetryPolicy | None = None,
        events: RouterEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        gate: Callable[[Endpoint], Admission | None] = lambda endpoint: None,
    ) -> None:
        """``gate``: the narrower admission an endpoint's attempts pass, if any."""
        self.role = role
        self.gate = gate
        self.groups = [list(group) for group in groups]
        self.serving_fallback = False
        """Whether the last request was served by a provider other than a primary."""
        self.budget = budget
        self.retry = retry or RetryPolicy()
        self.events: RouterEvents = events or NoEvents()
        self.clock = clock
        self.sleep = sleep

    @property
    def endpoints(self) -> list[Endpoint]:
        return [endpoint for group in self.groups for endpoint in group]

    @property
    def primary(self) -> Provider:
        return self.groups[0][0].provider

    def candidates(self) -> list[Endpoint]:
        """Usable endpoints in chain order (least outstanding first within a group),
        then the unhealthy ones as a last resort. An endpoint whose key was
        refused, whose breaker is open or whose ``Retry-After`` has not passed
        is never tried, not even as a last resort."""
        usable: list[Endpoint] = []
        doubtful: list[Endpoint] = []
        now = self.clock()
        for group in self.groups:
            for endpoint in sorted(group, key=lambda e: e.outstanding):
                if endpoint.usable():
                    usable.append(endpoint)
                elif (
                    not endpoint.auth_failed
                    and now >= endpoint.blocked_until
                    and endpoint.breaker.available()
                ):
                    doubtful.append(endpoint)
        return usable + doubtful

    def any_usable(self) -> bool:
        return any(endpoint.usable() for endpoint in self.endpoints)

    def attempts(
        self, *, streaming: bool = False, shrinkable: bool = False, limit_name: str = "max_tokens"
    ) -> Attempts:
        """One request's tries over the chain; see :mod:`keel.router.attempt`.
        ``limit_name``: what the client called its cap on new tokens (a refusal of it
        as over the context names it)."""
        return Attempts(self, streaming=streaming, shrinkable=shrinkable, limit_name=limit_name)

    # outcomes --------------------------------------------------------------

    def succeeded(self, endpoint: Endpoint, latency: float) -> None:
        """``latency``: seconds to the first piece."""
        endpoint.breaker.record_success()
        endpoint.limited_until = 0.0  # its limiter had a turn: the wait it said is over
        if endpoint.record_ok(latency) and not endpoint.replaced:
            log.info("provider %s is healthy again", endpoint.name)
            self.events.provider_health(endpoint.name, True)

    def failed(
        self,
        endpoint: Endpoint,
        error: KeelError,
        kind: Failure,
        *,
        retry: bool = False,
        check: bool = False,
    ) -> None:
        """Only what the provider did wrong counts against it: a request the backend
        refused (a 4xx, a prompt over its context) is no breaker failure, no finding.
        A request counts once: its ``retry`` on the same endpoint failing is no second
        breaker failure (counted per attempt, three requests during a backend's restart
        made six, opened the breaker at its default of five, and a keel with no
        fallback answered 503 for the next 60 s), nor a second failed check (one
        request and its retry made a role's only provider unhealthy, and ``/ready``
        503: a load balancer pulled the replica). Every failure is counted, by kind;
        keel's own rate limit refusing a request is none (``keel_rate_limit_refusals``
        counts it): the provider is only kept off until its turn. A failed health
        ``check`` is counted as one (:data:`HEALTH_CHECK`), whatever its kind."""
        if error.code == REFUSED:
            endpoint.breaker.record_ignored()
            endpoint.limited_until = self.clock() + (error.retry_after or 1.0)
            return
        counted = HEALTH_CHECK if check else kind
        self.events.provider_failed(endpoint.name, counted, type(error).__name__)
        if kind is Failure.CRASHED and not endpoint.new_crash(error):
            # One worker death fails every request in flight; it is one failure. Counted
            # per request, three in flight opened the breaker and two made the endpoint
            # unhealthy, routed around for minutes after a restart that took a second.
            endpoint.breaker.record_ignored()
            endpoint.last_error = error.message
            return
        if kind in (Failure.RETRYABLE, Failure.CRASHED):
            if retry and endpoint.breaker.state is BreakerState.CLOSED:
                endpoint.breaker.record_ignored()
                endpoint.last_error = error.message
                return
            endpoint.breaker.record_failure(error.message)  # a retry: the half-open probe too
            if endpoint.record_failed(error) and not endpoint.replaced:
                log.warning("provider %s routed around: %s", endpoint.name, error.message)
                self.events.provider_health(endpoint.name, False)
            return
        endpoint.breaker.record_ignored()
        if kind is Failure.AUTH:
            if not endpoint.auth_failed:
                log.error("provider %s refuses keel's requests: %s", endpoint.name, error.message)
                self.events.provider_health(endpoint.name, False)
            endpoint.auth_failed = True
            endpoint.last_error = error.message
            self.events.provider_auth_failed(endpoint.name, True)
        elif kind is Failure.RATE_LIMITED:
            endpoint.blocked_until = self.clock() + (error.retry_after or 1.0)
            endpoint.last_error = error.message

    def served_by(self, endpoint: Endpoint) -> None:
        """``endpoint`` served the role's last request (or its primary is back)."""
        self.serving_fallback = endpoint not in self.groups[0]
        self.events.fallback_active(self.role, self.serving_fallback)

    def exhausted(self, failures: list[str], last: KeelError | None) -> KeelError:
        """The error for a request no endpoint served: a 429 when every endpoint is
        keeping to its backend's Retry-After (the client should wait, not call keel
        broken), else the one provider's own error, else each endpoint's state."""
        now = self.clock()
        waits = [e.held_until - now for e in self.endpoints]
        if waits and all(wait > 0 for wait in waits):
            wait = min(waits)
            return RateLimited(
                f"every {self.role} provider is rate limited (by its backend, or by its "
                f"rate_limit in keel's config) or asked for a pause; retry in "
                # as the Retry-After header says it: rounded up (the message said 6 s
                # where the header said 7)
                f"{max(1, math.ceil(wait))}s "
                f"({'; '.join(failures) or 'waiting out its Retry-After'})",
                code="upstream_rate_limited",
                retry_after=wait,
            )
        if last is not None and len(failures) == 1 and len(self.endpoints) == 1:
            return last  # one provider, one failure: its own error says the most
        retry_after = [
            e.breaker.retry_after() for e in self.endpoints if e.breaker.retry_after() > 0
        ] + [e.blocked_until - self.clock() for e in self.endpoints if e.blocked_until > 0]
        wait = min((r for r in retry_after if r > 0), default=1.0)
        states = "; ".join(f"{e.name}: " + self._describe(e) for e in self.endpoints)
        tried = f" (tried: {'; '.join(failures)})" if failures else ""
        return Unavailable(
            f"no {self.role} provider could serve the request; {states}{tried}",
            code="no_provider",
            retry_after=wait,
        )

    def why_unusable(self) -> str | None:
        """Why no endpoint of the role can serve now (each one's state), or None."""
        if self.any_usable():
            return None
        return "; ".join(f"{e.name}: " + self._describe(e) for e in self.endpoints)

    def _describe(self, endpoint: Endpoint) -> str:
        trouble = endpoint.trouble()
        if trouble == "auth failed":
            return "auth failed (check its api_key)"
        if trouble == "breaker open":
            return f"breaker open for {endpoint.breaker.retry_after():.0f}s more"
        if endpoint.breaker.state is BreakerState.HALF_OPEN:
            # it read "unhealthy (<the error that opened it>)" while its trial was under way
            return "breaker half-open: one trial request is under way, others wait for it"
        if trouble == "unhealthy":
            return f"unhealthy ({without_name(endpoint.last_error or '', endpoint.name)})"
        # it read "closed", as if the provider were shut
        return trouble or "usable, but it failed this request"

    # health ------------------------------------------------------------------

    async def check(
        self, endpoint: Endpoint, probe: Callable[[Provider], Awaitable[None]], timeout: float
    ) -> None:
        """One deep check of one endpoint; feeds the same state as live traffic. An
        endpoint with requests in flight gets no deep check: their outcomes are the
        check, and a probe would wait behind them on a backend that serves one at a time
        (a local embedding engine reading a batch), time out and call it unhealthy;
        unless it has sent nothing back for longer than a first token may take
        (:meth:`Endpoint.silent`): keystrokes cancelled before that limit end as no
        one's failure, and a hung backend stayed healthy, with every completion an
        empty 200, for as long as editors typed. A provider that answers a ping while
        busy (a local worker) is pinged instead: a frozen worker's requests end in the
        request's own timeout, which is no provider's failure, so without it the worker
        looked healthy for as long as editors kept sending it keystrokes. The ping's
        time is no generated token's: the check's duration and the latency keep theirs.
        An endpoint waiting out its backend's Retry-After is not checked either: the
        backend asked for nothing until then."""
        if (
            endpoint.breaker.state is BreakerState.OPEN
            or not endpoint.running()
            or self.clock() < endpoint.blocked_until
        ):
            return
        if endpoint.outstanding and endpoint.breaker.state is BreakerState.CLOSED:
            if endpoint.provider.answers_while_busy:
                probe = _ping
            elif not endpoint.silent():
                return
        pinged = probe is _ping
        took_probe = endpoint.breaker.state is BreakerState.HALF_OPEN
        if took_probe and not endpoint.breaker.allow():
            return
        started = self.clock()
        try:
            async with asyncio.timeout(timeout):
                await probe(endpoint.provider)
        except TimeoutError:
            error: KeelError = UpstreamTimeout(
                f"health check took over {timeout:.0f}s", provider=endpoint.name
            )
        except KeelError as exc:
            error = exc
        else:
            if took_probe:
                endpoint.breaker.record_success()
            self._passed(endpoint, None if pinged else self.clock() - started)
            return
        self.events.health_check(endpoint.name, None if pinged else self.clock() - started, False)
        kind = classify(error)
        # A busy backend (429) is not a sick one: honour its Retry-After, keep it healthy.
        if took_probe or kind in (Failure.AUTH, Failure.RATE_LIMITED):
            self.failed(endpoint, error, kind, check=True)
            return
        self._check_failed(endpoint, error, "failed its health check")

    def _passed(self, endpoint: Endpoint, took: float | None) -> None:
        """A check ``endpoint`` passed (``took``: a deep one's time; None: a ping)."""
        was_auth_failed = endpoint.auth_failed
        self.events.health_check(endpoint.name, took, True)
        if endpoint.record_ok(took, check=True):
            # Logged as its failure was: an incident's end belongs in the log too.
            log.info("provider %s passed its health check: routed to again", endpoint.name)
            self.events.provider_health(endpoint.name, True)
            if endpoint in self.groups[0]:
                # The next request goes to it: the role no longer serves from a
                # fallback (the gauge said so until a request came, and its alert
                # fired all night after an outage that ended in a quiet hour).
                self.served_by(endpoint)
        if was_auth_failed:
            self.events.provider_auth_failed(endpoint.name, False)

    def unreachable(self, endpoint: Endpoint, error: KeelError) -> None:
        """A backend that did not accept a connection at keel's start: down, not flaky,
        so one such check counts as the failed checks that route it around."""
        self.events.health_check(endpoint.name, 0.0, False)
        endpoint.failed_checks = UNHEALTHY_AFTER - 1
        self._check_failed(endpoint, error, "is unreachable")

    def _check_failed(self, endpoint: Endpoint, error: KeelError, said: str) -> None:
        """A failed check counted as the provider's failure; the one that makes it
        unhealthy logged (``said``: how) and reported."""
        self.events.provider_failed(endpoint.name, HEALTH_CHECK, type(error).__name__)
        if endpoint.record_failed(error):
            log.warning("provider %s %s: %s", endpoint.name, said, error.message)
            self.events.provider_health(endpoint.name, False)


async def _ping(provider: Provider) -> None:
    await provider.ping()


def new_breaker(
    name: str,
    policy: BreakerPolicy,
    events: RouterEvents,
    clock: Callable[[], float] = time.monotonic,
) -> CircuitBreaker:
    return CircuitBreaker(
        name,
        policy,
        clock=clock,
        on_change=lambda provider, _old, new: events.breaker_changed(provider, str(new)),
    )
