"""RoleRouter against real fake backends on loopback, with time in the test's hands.

The providers are keel's real HTTP adapters talking to :class:`FakeUpstream`
servers; the clock and ``sleep`` are injected, so breaker cooldowns, backoff
and Retry-After pass instantly. Only the first-token and between-token
timeouts are real (they are asyncio deadlines), and are kept small.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing

import pytest

from keel.config import HttpModelConfig
from keel.errors import (
    ContextLengthExceeded,
    KeelError,
    RateLimited,
    RequestError,
    Unavailable,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from keel.providers.base import (
    CompletionCall,
    CompletionProvider,
    EmbeddingProvider,
    GenerationParams,
    Parts,
    Provider,
    joined,
    parts,
    piece_count,
)
from keel.providers.http import build_http_provider
from keel.router.admission import Admission
from keel.router.attempt import Attempts
from keel.router.breaker import BreakerPolicy, BreakerState
from keel.router.retry import RetryBudget, RetryPolicy
from keel.router.router import (
    UNHEALTHY_AFTER,
    Endpoint,
    NoEvents,
    RoleRouter,
    Timeouts,
    new_breaker,
)
from keel.router.service import _reach as reach
from keel.router.service import probe as service_probe
from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.router.conftest import FakeClock

PARAMS = GenerationParams(max_tokens=16)
ANSWER = "Hello, world"
FAST = Timeouts(first_token=2.0, between_tokens=2.0)


class Events(NoEvents):
    """Records what the router reports (the metrics' side of RouterEvents)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []

    def breaker_changed(self, provider: str, state: str) -> None:
        self.log.append(("breaker", provider, state))

    def provider_health(self, provider: str, healthy: bool) -> None:
        self.log.append(("health", provider, str(healthy)))

    def fallback(self, role: str, from_provider: str, to_provider: str) -> None:
        self.log.append(("fallback", from_provider, to_provider))

    def retry(self, provider: str) -> None:
        self.log.append(("retry", provider))

    def prompt_shrunk(self, provider: str) -> None:
        self.log.append(("shrunk", provider))

    def provider_failed(self, provider: str, kind: str, error: str) -> None:
        self.log.append(("failed", provider, kind, error))

    def fallback_active(self, role: str, active: bool) -> None:
        self.log.append(("fallback_active", role, str(active)))

    def observe_generation(
        self, role: str, provider: str, seconds: float, ttft: float | None, tokens: int
    ) -> None:
        self.log.append(("generated", provider, str(tokens)))


@pytest.fixture
def upstreams() -> Iterator[Callable[..., FakeUpstream]]:
    """Extra fake backends, as many as a test needs."""
    made: list[FakeUpstream] = []

    def make(**kwargs: object) -> FakeUpstream:
        server = FakeUpstream(**kwargs).start()  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
    for server in made:
        assert not server.errors, server.errors


class Build:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.providers: list[Provider] = []
        self.events = Events()

    def endpoint(
        self,
        url: str,
        *,
        name: str,
        kind: str = "openai/completion",
        policy: BreakerPolicy | None = None,
        timeouts: Timeouts = FAST,
        finding_ttl: float = 120.0,
        **fields: object,
    ) -> Endpoint:
        role = "embedding" if kind.endswith("embedding") else "completion"
        config = HttpModelConfig(kind=kind, api_endpoint=f"{url}/v1", **fields)  # type: ignore[arg-type]
        provider = build_http_provider(role, config, name=name, timeout=5.0)
        self.providers.append(provider)
        breaker = new_breaker(name, policy or BreakerPolicy(), self.events, self.clock)
        return Endpoint(provider, breaker, timeouts, finding_ttl=finding_ttl, clock=self.clock)

    def router(
        self,
        groups: Sequence[Sequence[Endpoint]],
        *,
        retry: RetryPolicy | None = None,
        role: str = "completion",
        gate: Admission | None = None,
    ) -> RoleRouter:
        retry = retry or RetryPolicy(attempts_per_provider=2)
        return RoleRouter(
            role,  # type: ignore[arg-type]
            groups,
            budget=RetryBudget(retry, clock=self.clock),
            retry=retry,
            events=self.events,
            clock=self.clock,
            sleep=self.clock.sleep,
            gate=lambda endpoint: gate,
        )


@pytest.fixture
async def build(clock: FakeClock) -> AsyncIterator[Build]:
    builder = Build(clock)
    yield builder
    for provider in builder.providers:
        await provider.aclose()


class Starts:
    """Opens each attempt's stream, recording which provider was asked with which shrink flag."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, provider: Provider, shrink: bool) -> AsyncIterator[str]:
        assert isinstance(provider, CompletionProvider)
        self.calls.append((provider.name, shrink))
        return provider.stream_completion(CompletionCall("def f(", PARAMS))


async def run(
    router: RoleRouter,
    *,
    buffered: bool = False,
    starts: Starts | None = None,
    shrinkable: bool = True,
) -> tuple[list[str], Attempts]:
    """One request through the router's attempts, as a serving object makes it:
    ``buffered`` holds each attempt's pieces until it ends (the client waits for
    the whole answer); otherwise pieces go to the client as they come. ``shrinkable``:
    keel built the request (a code completion), not the client."""
    starts = starts or Starts()
    attempts = router.attempts(streaming=not buffered, shrinkable=shrinkable)
    received: list[str] = []
    try:
        async for attempt in attempts:
            async with attempt:
                held: list[str] = []
                stream = starts(attempt.provider, attempt.shrink)
                async for piece in attempt.pieces(stream):
                    (held if buffered else received).append(piece)
                received.extend(held)
    except KeelError as exc:
        exc.received = received  # type: ignore[attr-defined]
        exc.route = attempts  # type: ignore[attr-defined]
        raise
    return received, attempts


def posts(server: FakeUpstream) -> int:
    return sum(1 for r in server.requests if r.method == "POST")


# --- the happy path and plain fallback ----------------------------------------


async def test_a_healthy_primary_serves_and_the_fallback_sees_nothing(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary, fallback = upstreams(), upstreams()
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    pieces, route = await run(router)
    assert "".join(pieces) == ANSWER
    assert route.provider is not None and route.provider.name == "primary"
    assert (posts(primary), posts(fallback)) == (1, 0)
    assert router.endpoints[0].outstanding == 0


@pytest.mark.parametrize("token_delay", [0.0, 0.2])  # apart: whatever stalls this process
async def test_tokens_count_as_tokens_whether_they_arrive_apart_or_together(
    build: Build, upstreams: Callable[..., FakeUpstream], token_delay: float
) -> None:
    upstream = upstreams(token_delay=token_delay)
    router = build.router([[build.endpoint(upstream.url, name="up")]])
    received, _ = await run(router)
    assert "".join(received) == ANSWER
    if token_delay:
        assert len(received) == 3, "a token sent alone goes up alone"
    assert ("generated", "up", "3") in build.events.log, "three tokens, however they came"


def test_pieces_that_arrived_together_are_one_piece_that_knows_how_many() -> None:
    one, three = joined(["Hello"]), joined(["Hello", ",", " world"])
    assert (one, piece_count(one)) == ("Hello", 1)
    assert (three, piece_count(three)) == ("Hello, world", 3)


def test_tool_call_parts_that_arrived_together_are_one_entry_per_call() -> None:
    """Parts of two calls, interleaved in one read, as four upstream chunks: one entry
    per call index, arguments in order (two entries with index 1 lost a client that
    reads one entry per call the second call's arguments' end)."""
    sent = [
        {"index": 0, "id": "c_a", "type": "function", "function": {"name": "fa", "arguments": ""}},
        {
            "index": 1,
            "id": "c_b",
            "type": "function",
            "function": {"name": "fb", "arguments": '{"y"'},
        },
        {"index": 0, "function": {"arguments": '{"x":1}'}},
        {"index": 1, "function": {"arguments": ":2}"}},
    ]
    piece = joined([parts("", [delta]) for delta in sent])
    assert isinstance(piece, Parts) and piece_count(piece) == 4
    assert list(piece.deltas) == [
        {
            "index": 0,
            "id": "c_a",
            "type": "function",
            "function": {"name": "fa", "arguments": '{"x":1}'},
        },
        {
            "index": 1,
            "id": "c_b",
            "type": "function",
            "function": {"name": "fb", "arguments": '{"y":2}'},
        },
    ]
    assert sent[0]["function"]["arguments"] == "", "the parts sent are left as they came"


@pytest.mark.parametrize(
    "fault",
    [
        Behaviour.error(500),
        Behaviour.error(503, {"error": {"message": "overloaded"}}),
        Behaviour.reset(),
        Behaviour.disconnect(),
        Behaviour.malformed_json(),
        Behaviour.broken_sse(),
        Behaviour.stream_error("engine died", after=0),
        Behaviour.cut(after=0),
    ],
    ids=lambda b: b.mode if b.mode != "status" else f"http{b.status}",
)
async def test_a_failure_before_the_first_token_falls_back_at_once(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock, fault: Behaviour
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(fault)
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]],
        retry=RetryPolicy(attempts_per_provider=2, backoff_initial=0.5),
    )
    pieces, route = await run(router)
    assert "".join(pieces) == ANSWER, "the fallback's whole answer, nothing of the primary's"
    assert route.provider is not None and route.provider.name == "fb"
    assert posts(primary) == 1, "no retry while a fallback is untried"
    assert posts(fallback) == 1
    assert clock.slept == [], "no backoff before falling back"
    assert ("fallback", "primary", "fb") in build.events.log
    assert [f.split(":")[0] for f in route.failures] == ["primary"]


async def test_the_last_provider_left_is_retried_with_backoff(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    alone = upstreams()
    alone.behave(Behaviour.error(500), times=1)
    router = build.router(
        [[build.endpoint(alone.url, name="alone")]],
        retry=RetryPolicy(attempts_per_provider=2, backoff_initial=0.5),
    )
    pieces, route = await run(router)
    assert "".join(pieces) == ANSWER
    assert posts(alone) == 2, "one retry"
    assert router.endpoints[0].retries == 1  # shown in /v1/providers
    assert len(clock.slept) == 1 and 0 <= clock.slept[0] <= 1.0, "jittered backoff, injected"
    assert ("retry", "alone") in build.events.log


async def test_connection_refused_falls_back(
    build: Build, upstreams: Callable[..., FakeUpstream], dead_url: str
) -> None:
    fallback = upstreams()
    router = build.router(
        [[build.endpoint(dead_url, name="dead")], [build.endpoint(fallback.url, name="fb")]]
    )
    pieces, route = await run(router)
    assert "".join(pieces) == ANSWER
    assert route.provider is not None and route.provider.name == "fb"
    assert "cannot connect" in route.failures[0]


async def test_accept_then_hang_times_out_on_the_first_token(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.hang())
    short = Timeouts(first_token=0.2, between_tokens=2.0)
    router = build.router(
        [
            [build.endpoint(primary.url, name="primary", timeouts=short)],
            [build.endpoint(fallback.url, name="fb")],
        ],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    pieces, route = await run(router)
    assert "".join(pieces) == ANSWER
    assert "no first token within" in route.failures[0]


async def test_slow_first_token_falls_back_and_a_patient_one_is_served(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.slow_first_token(0.6))
    short = Timeouts(first_token=0.2, between_tokens=2.0)
    patient = Timeouts(first_token=2.0, between_tokens=2.0)
    impatient = build.router(
        [
            [build.endpoint(primary.url, name="primary", timeouts=short)],
            [build.endpoint(fallback.url, name="fb")],
        ],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    _, route = await run(impatient)
    assert route.provider is not None and route.provider.name == "fb"
    served = build.router([[build.endpoint(primary.url, name="primary2", timeouts=patient)]])
    pieces, route = await run(served)
    assert (
        "".join(pieces) == ANSWER
        and route.provider is not None
        and route.provider.name == "primary2"
    )


# --- streams: never splice ------------------------------------------------------


async def test_a_stream_cut_after_tokens_ends_with_the_error_never_spliced(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.cut(after=1))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    with pytest.raises(UpstreamProtocolError) as caught:
        await run(router)
    assert caught.value.received == ["Hello"]  # type: ignore[attr-defined]
    assert posts(fallback) == 0, "no fallback once tokens were sent"
    assert posts(primary) == 1, "no retry once tokens were sent"
    endpoint = router.endpoints[0]
    assert endpoint.failed_checks == 1 and endpoint.outstanding == 0


async def test_a_stall_between_tokens_ends_the_stream(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary = upstreams(token_delay=0.5)
    stall = Timeouts(first_token=2.0, between_tokens=0.1)
    router = build.router([[build.endpoint(primary.url, name="primary", timeouts=stall)]])
    with pytest.raises(UpstreamTimeout, match="stalled"):
        await run(router)


async def test_a_slow_client_is_not_a_stalled_stream(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """Only the wait for the backend's next piece counts against ``between_tokens``:
    a consumer that spends longer than that on each piece (writing to a slow
    client) is no stall, and the one timer left armed meanwhile cancels nothing."""
    primary = upstreams(token_delay=0.02)
    stall = Timeouts(first_token=2.0, between_tokens=0.3)  # 0.28 s to spare on a busy machine
    router = build.router([[build.endpoint(primary.url, name="primary", timeouts=stall)]])
    received: list[str] = []
    async for attempt in router.attempts(streaming=True, shrinkable=True):
        async with attempt:
            async for piece in attempt.pieces(Starts()(attempt.provider, attempt.shrink)):
                received.append(piece)
                await asyncio.sleep(0.6)
    assert "".join(received) == ANSWER and len(received) > 1


async def test_an_error_event_inside_the_stream_after_tokens_ends_it(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.stream_error("CUDA out of memory", after=2))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    with pytest.raises(KeelError, match="CUDA out of memory") as caught:
        await run(router)
    assert "".join(caught.value.received) == "Hello,"  # type: ignore[attr-defined]
    assert posts(fallback) == 0


async def test_a_provider_that_always_cuts_mid_stream_opens_its_breaker(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """Tokens flowing first must not hide that every stream fails."""
    primary = upstreams()
    primary.behave(Behaviour.cut(after=1))
    policy = BreakerPolicy(consecutive_failures=3, min_volume=100)
    router = build.router([[build.endpoint(primary.url, name="primary", policy=policy)]])
    for _ in range(3):
        with pytest.raises(UpstreamProtocolError):
            await run(router)
    assert router.endpoints[0].breaker.state is BreakerState.OPEN


async def test_the_breaker_opening_says_why(
    build: Build, upstreams: Callable[..., FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    """Its WARNING said ``closed -> open`` alone; the cause was on another line."""
    primary = upstreams()
    primary.behave(Behaviour.error(500, "out of KV cache slots"))
    policy = BreakerPolicy(consecutive_failures=2, min_volume=100)
    router = build.router([[build.endpoint(primary.url, name="primary", policy=policy)]])
    with caplog.at_level(logging.WARNING, logger="keel.router"):
        for _ in range(2):
            with pytest.raises(KeelError):
                await run(router)
    [opened] = [line for line in caplog.messages if "closed -> open" in line]
    assert "the last failure: " in opened and "out of KV cache slots" in opened, opened


@pytest.mark.parametrize(
    "fault",
    [Behaviour.cut(after=1), Behaviour.stream_error("died", after=2)],
    ids=["cut", "stream_error"],
)
async def test_buffered_requests_fall_back_even_after_tokens(
    build: Build, upstreams: Callable[..., FakeUpstream], fault: Behaviour
) -> None:
    """A non-streaming client has seen nothing yet: a mid-way failure can still fall back."""
    primary, fallback = upstreams(), upstreams(tokens=("Bye", "!"))
    primary.behave(fault)
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    pieces, route = await run(router, buffered=True)
    assert "".join(pieces) == "Bye!", "only the fallback's answer, never spliced"
    assert route.provider is not None and route.provider.name == "fb"
    assert router.endpoints[0].failed_checks == 1
    assert router.endpoints[0].breaker._consecutive == 1


async def test_buffered_success_is_the_whole_answer(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary = upstreams()
    router = build.router([[build.endpoint(primary.url, name="primary")]])
    pieces, _ = await run(router, buffered=True)
    assert "".join(pieces) == ANSWER


# --- the breaker in the router ---------------------------------------------------


async def test_breaker_opens_at_the_threshold_and_nothing_reaches_it_while_open(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary = upstreams()
    primary.behave(Behaviour.error(500))
    policy = BreakerPolicy(consecutive_failures=4, min_volume=100, cooldown=30.0)
    router = build.router(
        [[build.endpoint(primary.url, name="primary", policy=policy)]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    breaker = router.endpoints[0].breaker
    for n in range(1, 5):
        with pytest.raises(KeelError):
            await run(router)
        assert posts(primary) == n
        assert breaker.state is (BreakerState.OPEN if n == 4 else BreakerState.CLOSED)

    for _ in range(10):
        clock.advance(2.9)  # 29 s: all inside the cooldown
        with pytest.raises(Unavailable) as caught:
            await run(router)
        assert caught.value.status_code == 503
    assert posts(primary) == 4, "no request reached the open breaker"
    error = caught.value
    assert error.retry_after is not None and 0 < error.retry_after <= 1.0
    assert "primary: breaker open for" in error.message

    primary.reset_behaviour()
    clock.advance(1.0)
    pieces, _ = await run(router)
    assert "".join(pieces) == ANSWER, "the half-open probe went through and closed the breaker"
    assert breaker.state is BreakerState.CLOSED
    assert [e for e in build.events.log if e[0] == "breaker"] == [
        ("breaker", "primary", "open"),
        ("breaker", "primary", "half_open"),
        ("breaker", "primary", "closed"),
    ]


async def test_half_open_lets_exactly_one_probe_through(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary = upstreams()
    primary.behave(Behaviour.error(500))
    policy = BreakerPolicy(consecutive_failures=2, cooldown=10.0)
    router = build.router(
        [[build.endpoint(primary.url, name="primary", policy=policy)]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    for _ in range(2):
        with pytest.raises(KeelError):
            await run(router)
    assert router.endpoints[0].breaker.state is BreakerState.OPEN
    before = posts(primary)

    primary.behave(Behaviour.slow_first_token(0.3))
    clock.advance(10.0)
    results = await asyncio.gather(*(run(router) for _ in range(6)), return_exceptions=True)
    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, Unavailable)]
    assert len(served) == 1 and len(refused) == 5, results
    # said as what it is: it read "unhealthy (HTTP 500 ...)", the error that opened it
    assert all("primary: breaker half-open: one trial" in r.message for r in refused), refused
    assert posts(primary) == before + 1, "exactly one probe"
    assert router.endpoints[0].breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("leaves", ["cancelled", "refused"])
async def test_a_probe_that_leaves_while_waiting_at_a_gate_gives_the_probe_back(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock, leaves: str
) -> None:
    """A half-open breaker's one probe, taken by a request that then waits at its local
    model's gate (every slot busy) and is cancelled (a superseded keystroke, a client
    gone) or refused (the queue's timeout): the probe was never given back, and the
    provider, the embedded last resort by default, was never tried again."""
    primary = upstreams()
    primary.behave(Behaviour.error(500))
    gate = Admission("completion", max_concurrent=1, queue_size=4, queue_timeout=0.2)
    router = build.router(
        [
            [
                build.endpoint(
                    primary.url,
                    name="primary",
                    policy=BreakerPolicy(consecutive_failures=1, cooldown=10.0),
                )
            ]
        ],
        retry=RetryPolicy(attempts_per_provider=1),
        gate=gate,
    )
    with pytest.raises(KeelError):
        await run(router)
    breaker = router.endpoints[0].breaker
    assert breaker.state is BreakerState.OPEN
    primary.reset_behaviour()
    clock.advance(10.0)
    async with gate.slot():  # the engine's slots are busy
        waiting = asyncio.create_task(run(router))
        await asyncio.sleep(0.05)
        assert not breaker.available(), "the waiting request holds the probe"
        if leaves == "cancelled":
            waiting.cancel()
        with pytest.raises((asyncio.CancelledError, RateLimited)):
            await waiting
    assert breaker.available()
    received, _ = await run(router)
    assert "".join(received) == ANSWER
    assert breaker.state is BreakerState.CLOSED


async def test_a_failed_probe_reopens_for_another_cooldown(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(502))
    policy = BreakerPolicy(consecutive_failures=1, cooldown=10.0)
    router = build.router(
        [
            [build.endpoint(primary.url, name="primary", policy=policy)],
            [build.endpoint(fallback.url, name="fb")],
        ],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    await run(router)
    assert router.endpoints[0].breaker.state is BreakerState.OPEN
    clock.advance(10.0)
    await run(router)  # the probe fails, the fallback serves
    assert posts(primary) == 2
    assert router.endpoints[0].breaker.state is BreakerState.OPEN
    clock.advance(9.0)
    await run(router)
    assert posts(primary) == 2


def received(upstream: FakeUpstream, count: int) -> bool:
    return len(upstream.requests) == count


async def test_client_cancellation_never_counts_as_a_failure(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary = upstreams()
    primary.behave(Behaviour.hang())
    policy = BreakerPolicy(consecutive_failures=1)
    router = build.router([[build.endpoint(primary.url, name="primary", policy=policy)]])
    for attempt in range(3):
        task = asyncio.create_task(run(router))
        await primary.wait_for(lambda: router.endpoints[0].outstanding == 1)
        # cancelled while the upstream works on it (not before the request left: a race)
        await primary.wait_for(functools.partial(received, primary, attempt + 1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    endpoint = router.endpoints[0]
    assert endpoint.breaker.state is BreakerState.CLOSED
    assert endpoint.failed_checks == 0 and endpoint.outstanding == 0
    await primary.wait_for(lambda: primary.disconnects + len(primary.requests) >= 3)


# --- failure classes ----------------------------------------------------------------


async def test_401_marks_auth_failed_no_retry_and_falls_back(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(401, {"error": {"message": "invalid api key"}}))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]],
        retry=RetryPolicy(attempts_per_provider=3),
    )
    for _ in range(5):
        pieces, route = await run(router)
        assert "".join(pieces) == ANSWER
    assert posts(primary) == 1, "no retries, and no more requests once marked"
    endpoint = router.endpoints[0]
    assert endpoint.auth_failed and not endpoint.usable()
    assert endpoint.breaker.state is BreakerState.CLOSED, "a key problem is not an outage"
    snapshot = endpoint.snapshot()
    assert snapshot["auth_failed"] is True
    assert "invalid api key" in str(snapshot["last_error"])


@pytest.mark.parametrize("status", [400, 409, 422])
async def test_other_4xx_go_back_to_the_client_as_is(
    build: Build, upstreams: Callable[..., FakeUpstream], status: int
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(status, {"error": {"message": "temperature must be >= 0"}}))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    with pytest.raises(RequestError) as caught:
        await run(router, shrinkable=False)  # the client wrote the request
    assert caught.value.status_code == status
    assert "temperature must be >= 0" in caught.value.message
    assert (posts(primary), posts(fallback)) == (1, 0)
    endpoint = router.endpoints[0]
    assert endpoint.breaker.state is BreakerState.CLOSED and endpoint.failed_checks == 0
    # keel wrote it (a code completion): no client can mend it, the next provider serves
    pieces, _ = await run(router)
    assert "".join(pieces) == ANSWER and (posts(primary), posts(fallback)) == (2, 1)
    assert "refused the request keel built" in str(endpoint.snapshot()["last_error"])


async def test_a_requests_retry_failing_again_counts_once(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """Three requests while the only backend restarts: three breaker failures, not six
    (the default five opened the breaker, and a keel with no fallback answered 503s)."""
    backend = upstreams()
    backend.behave(Behaviour.error(500))
    router = build.router(
        [[build.endpoint(backend.url, name="only", policy=BreakerPolicy(consecutive_failures=5))]],
        retry=RetryPolicy(attempts_per_provider=2, budget_floor=10),
    )
    for _ in range(3):
        with pytest.raises(Unavailable):
            await run(router)
    assert posts(backend) == 6  # every request was retried
    assert router.endpoints[0].breaker.state is BreakerState.CLOSED
    backend.behave(Behaviour.normal())
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "only"


async def test_a_requests_retry_failing_again_is_one_failed_check(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """One request and its retry failing made a role's only provider unhealthy and
    ``/ready`` 503 (two failed checks make a finding): a load balancer pulled the
    replica for one request. Two requests failing do."""
    backend = upstreams()
    backend.behave(Behaviour.error(500))
    router = build.router(
        [[build.endpoint(backend.url, name="only")]],
        retry=RetryPolicy(attempts_per_provider=2, budget_floor=10),
    )
    endpoint = router.endpoints[0]
    with pytest.raises(Unavailable):
        await run(router)
    assert posts(backend) == 2
    assert endpoint.healthy and endpoint.failed_checks == 1 and endpoint.last_error
    with pytest.raises(Unavailable):
        await run(router)
    assert not endpoint.healthy


async def test_a_retry_that_takes_the_half_open_probe_decides_it(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    """The first attempt opens the breaker and its cooldown has passed (none here; a
    first-token timeout as long as the cooldown in life), so the retry is the probe:
    failing, it opens the breaker again (ignored as a retry, it left the breaker half
    open and the next request went straight through)."""
    backend = upstreams()
    backend.behave(Behaviour.error(500))
    policy = BreakerPolicy(consecutive_failures=1, cooldown=0.0)
    router = build.router(
        [[build.endpoint(backend.url, name="only", policy=policy)]],
        retry=RetryPolicy(attempts_per_provider=2, budget_floor=10),
    )
    with pytest.raises(KeelError):
        await run(router)
    assert posts(backend) == 2, "the retry went out, as the probe"
    opened = [e for e in build.events.log if e[0] == "breaker" and e[2] == "open"]
    assert len(opened) == 2, build.events.log  # by the first attempt, then by the probe


async def test_every_provider_rate_limited_is_a_429_with_the_wait(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(429, retry_after="20"))
    fallback.behave(Behaviour.error(429, retry_after="7"))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    for advance in (0.0, 2.0):  # the requests that meet the 429s, then one kept off both
        clock.advance(advance)
        with pytest.raises(RateLimited) as caught:
            await run(router)
        assert caught.value.status_code == 429
        assert caught.value.retry_after == pytest.approx(7.0 - advance, abs=0.5)
        assert "rate limited" in caught.value.message
    assert (posts(primary), posts(fallback)) == (1, 1)
    clock.advance(6.0)
    primary.behave(Behaviour.normal())
    fallback.behave(Behaviour.normal())
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "fb"


@pytest.mark.parametrize("status", [404, 405])
async def test_a_backend_without_the_model_or_route_is_the_providers_failure(
    build: Build, upstreams: Callable[..., FakeUpstream], status: int
) -> None:
    """keel names the backend's model and path (its config), so a 404 or 405 is never the
    client's: the next provider serves, and the failure counts against the provider."""
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(status, {"error": {"message": "model `fake` not found"}}))
    policy = BreakerPolicy(consecutive_failures=1)
    router = build.router(
        [
            [build.endpoint(primary.url, name="primary", policy=policy)],
            [build.endpoint(fallback.url, name="fb")],
        ]
    )
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "fb"
    assert router.endpoints[0].breaker.state is BreakerState.OPEN


async def test_429_honours_retry_after_and_falls_back(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(429, retry_after="7"), times=1)
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "fb"
    assert posts(primary) == 1, "a 429 is not retried on the same provider"
    clock.advance(6.0)
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "fb"
    assert posts(primary) == 1, "nothing sent before Retry-After"
    clock.advance(1.5)
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "primary"
    assert router.endpoints[0].breaker.state is BreakerState.CLOSED


async def test_a_rate_limited_provider_is_not_used_as_a_last_resort_before_retry_after(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(429, retry_after="30"))
    fallback.behave(Behaviour.error(500))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    with pytest.raises(Unavailable):
        await run(router)
    for _ in range(3):
        clock.advance(5.0)
        with pytest.raises(Unavailable) as caught:
            await run(router)
    assert posts(primary) == 1
    assert "primary: rate limited" in caught.value.message
    assert caught.value.retry_after is not None and caught.value.retry_after <= 15.0


async def test_context_too_long_retries_once_with_less_then_falls_back(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    primary, fallback = upstreams(), upstreams()
    too_long = {"error": {"message": "This model's maximum context length is 2048 tokens"}}
    primary.behave(Behaviour.error(400, too_long), times=1)
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    starts = Starts()
    pieces, route = await run(router, starts=starts)
    assert (
        "".join(pieces) == ANSWER
        and route.provider is not None
        and route.provider.name == "primary"
    )
    assert starts.calls == [("primary", False), ("primary", True)]
    assert router.endpoints[0].prompts_shrunk == 1  # what keel did, shown

    primary.behave(Behaviour.error(400, too_long))
    starts = Starts()
    _, route = await run(router, starts=starts)
    assert starts.calls == [("primary", False), ("primary", True), ("fb", False)]
    assert router.endpoints[0].breaker.state is BreakerState.CLOSED
    assert router.endpoints[0].prompts_shrunk == 2
    assert build.events.log.count(("shrunk", "primary")) == 2
    # each refusal counted by kind: a full prompt's, then the halved one's, the backend's
    failed = [e[2:] for e in build.events.log if e[:2] == ("failed", "primary")]
    assert failed == [("too_long", "UpstreamStatusError")] * 2 + [
        ("retryable", "UpstreamStatusError")
    ], failed


async def test_a_built_prompt_that_does_not_fit_at_half_is_the_backends_configuration(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """keel built the prompt (a Tabby completion) and halved it, and the backend still
    refuses it: its window is smaller than keel's configured budget (vLLM with
    --max-model-len 1024). That was every completion's 400 ("send a shorter prompt" to a
    client that wrote none), the provider healthy, no alert. It is the provider's
    failure, saying what to change, and the request falls back."""
    primary, fallback = upstreams(), upstreams()
    too_long = {"error": {"message": "This model's maximum context length is 1024 tokens"}}
    primary.behave(Behaviour.error(400, too_long))
    alone = build.router([[build.endpoint(primary.url, name="primary")]])
    with pytest.raises(Unavailable) as caught:
        await run(alone)
    assert caught.value.status_code == 503
    assert "lower [completion] max_input_length" in caught.value.message
    with pytest.raises(Unavailable):
        await run(alone)
    endpoint = alone.endpoints[0]
    assert not endpoint.healthy and "max_input_length" in (endpoint.last_error or "")

    chain = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    _, route = await run(chain)
    assert route.provider is not None and route.provider.name == "fb"


async def test_a_built_prompt_that_fits_with_too_many_tokens_asked_is_not_halved(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """vLLM refuses the tokens keel asks for (``[completion] max_decoding_tokens``) after
    a prompt that fits: keel halved the prompt, which cannot help, then told the operator
    to lower max_input_length, which changes nothing."""
    primary, fallback = upstreams(), upstreams()
    too_many = {
        "error": {
            "message": "'max_tokens' or 'max_completion_tokens' is too large: 5000. This "
            "model's maximum context length is 4096 tokens and your request has 25 input "
            "tokens (5000 > 4096 - 25).",
            "code": 400,
        }
    }
    primary.behave(Behaviour.error(400, too_many))
    chain = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    starts = Starts()
    _, route = await run(chain, starts=starts)
    assert starts.calls == [("primary", False), ("fb", False)], starts.calls
    assert route.provider is not None and route.provider.name == "fb"
    endpoint = chain.endpoints[0]
    assert endpoint.prompts_shrunk == 0
    assert "lower [completion] max_decoding_tokens" in (endpoint.last_error or "")
    assert "max_input_length" not in (endpoint.last_error or "")


async def test_a_callers_prompt_over_the_context_is_its_400_and_blames_no_provider(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """A prompt keel did not build (OpenAI's) is never cut or retried; the next provider
    may have a larger window, and where none takes it, it is the caller's 400."""
    primary, fallback = upstreams(), upstreams()
    too_long = {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 9000,
            "n_ctx": 4096,
        }
    }
    primary.behave(Behaviour.error(400, too_long))
    fallback.behave(Behaviour.error(400, too_long))
    policy = BreakerPolicy(consecutive_failures=1)
    router = build.router(
        [
            [build.endpoint(primary.url, name="primary", policy=policy)],
            [build.endpoint(fallback.url, name="fb", policy=policy)],
        ]
    )

    async def ask() -> Attempts:
        attempts = router.attempts(streaming=False, shrinkable=False)
        async for attempt in attempts:
            async with attempt:
                assert not attempt.shrink
                stream = Starts()(attempt.provider, attempt.shrink)
                [piece async for piece in attempt.pieces(stream)]
        return attempts

    for _ in range(5):
        with pytest.raises(ContextLengthExceeded) as caught:
            await ask()
        assert caught.value.status_code == 400
        assert (caught.value.prompt_tokens, caught.value.context_size) == (9000, 4096)
    assert (posts(primary), posts(fallback)) == (5, 5)  # each once, never cut and again
    for endpoint in router.endpoints:
        assert endpoint.breaker.state is BreakerState.CLOSED
        assert endpoint.failed_checks == 0 and endpoint.healthy and endpoint.outstanding == 0
    fallback.behave(Behaviour.normal())  # a larger window
    served = await ask()
    assert served.provider is not None and served.provider.name == "fb"
    fallback.behave(Behaviour.error(500))  # the other window is down: still the caller's 400
    with pytest.raises(ContextLengthExceeded):
        await ask()


# --- the retry budget ----------------------------------------------------------------


async def test_retries_stay_within_the_budget_when_everything_fails(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary = upstreams()
    primary.behave(Behaviour.error(500))
    retry = RetryPolicy(attempts_per_provider=4, budget_ratio=0.1, budget_floor=2)
    policy = BreakerPolicy(consecutive_failures=10_000, min_volume=10_000)
    router = build.router(
        [[build.endpoint(primary.url, name="primary", policy=policy)]], retry=retry
    )
    requests = 40
    for _ in range(requests):
        with pytest.raises(KeelError):
            await run(router)
        clock.advance(0.01)
    budget = retry.budget_floor + retry.budget_ratio * requests
    assert requests < posts(primary) <= requests + budget


# --- everything down -------------------------------------------------------------------


async def test_everything_down_is_a_503_naming_each_provider(
    build: Build, upstreams: Callable[..., FakeUpstream], dead_url: str, clock: FakeClock
) -> None:
    broken = upstreams()
    broken.behave(Behaviour.error(500))
    policy = BreakerPolicy(consecutive_failures=2, cooldown=20.0)
    router = build.router(
        [
            [build.endpoint(dead_url, name="dead", policy=policy)],
            [build.endpoint(broken.url, name="broken", policy=policy)],
        ],
        retry=RetryPolicy(attempts_per_provider=2),
    )
    with pytest.raises(Unavailable) as caught:
        await run(router)
    first = caught.value
    assert first.status_code == 503
    assert "dead:" in first.message and "broken:" in first.message
    # each one's state, as a word that does not read as a shut provider ("closed")
    assert "broken: usable, but it failed this request (tried:" in first.message, first.message
    assert first.retry_after is not None
    # broken's retry failing was the same request's: one failure each, breakers closed
    assert [e.breaker.state for e in router.endpoints] == [BreakerState.CLOSED] * 2
    with pytest.raises(Unavailable):
        await run(router)  # the second failure of each opens both breakers

    clock.advance(5.0)
    seen = posts(broken)
    with pytest.raises(Unavailable) as caught:
        await run(router)
    assert posts(broken) == seen
    assert caught.value.retry_after == pytest.approx(15.0, abs=1.0)
    assert "dead: breaker open" in caught.value.message
    assert "broken: breaker open" in caught.value.message


# --- replicas --------------------------------------------------------------------------


async def test_replicas_are_balanced_by_least_outstanding(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    a, b = upstreams(token_delay=0.2), upstreams()
    router = build.router(
        [[build.endpoint(a.url, name="a"), build.endpoint(b.url, name="b")]],
    )
    slow = asyncio.create_task(run(router))
    await a.wait_for(lambda: router.endpoints[0].outstanding == 1)
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "b"
    await slow
    assert (posts(a), posts(b)) == (1, 1)


async def test_a_failing_replica_hands_over_to_its_sibling(
    build: Build, upstreams: Callable[..., FakeUpstream], dead_url: str
) -> None:
    b = upstreams()
    router = build.router(
        [[build.endpoint(dead_url, name="a"), build.endpoint(b.url, name="b")]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    for _ in range(3):
        _, route = await run(router)
        assert route.provider is not None and route.provider.name == "b"


# --- health -----------------------------------------------------------------------------


async def probe(provider: Provider) -> None:
    assert isinstance(provider, CompletionProvider)
    async with aclosing(provider.stream_completion(CompletionCall("x", PARAMS))) as pieces:  # type: ignore[type-var]
        async for _ in pieces:
            break


async def test_the_deep_probe_reads_its_answer_to_the_end(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """keel's probe (background checks, ``/health/deep``, the half-open trial) passes
    only an answer that ends as it should. It stopped at the first token: a backend
    whose every stream broke after it passed, its breaker closed, ``/ready`` said 200
    and every completion still failed."""
    upstream = upstreams()
    router = build.router([[build.endpoint(upstream.url, name="a")]])
    provider = router.endpoints[0].provider
    await service_probe("completion", provider, timeout=2.0)  # a whole answer passes
    upstream.behave(Behaviour.cut(after=1))
    with pytest.raises(UpstreamProtocolError, match="mid-response"):
        await service_probe("completion", provider, timeout=2.0)


async def test_unhealthy_after_two_failures_then_back_after_a_good_check(
    build: Build, upstreams: Callable[..., FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(500))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    endpoint = router.endpoints[0]
    for _ in range(UNHEALTHY_AFTER):
        await run(router)
    assert not endpoint.healthy
    await run(router)
    assert posts(primary) == UNHEALTHY_AFTER, "routed around while unhealthy"

    await router.check(endpoint, probe, timeout=1.0)
    assert not endpoint.healthy, "still failing"
    primary.reset_behaviour()
    with caplog.at_level(logging.INFO, logger="keel.router"):
        await router.check(endpoint, probe, timeout=1.0)
    assert endpoint.healthy
    assert "provider primary passed its health check" in caplog.text  # the incident's end
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "primary"
    assert ("health", "primary", "False") in build.events.log
    assert ("health", "primary", "True") in build.events.log


async def test_the_latency_shown_is_of_answers_and_of_checks_only_before_any(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    """A deep check's tiny request (one short text to embed) went into the same window as
    the answers: an embedding model's card said 313 ms while its batches took 10 s."""
    router = build.router([[build.endpoint(upstreams().url, name="primary")]])
    endpoint = router.endpoints[0]

    async def slow_check(provider: Provider) -> None:
        clock.now += 0.4
        await probe(provider)

    await router.check(endpoint, slow_check, timeout=1.0)
    assert endpoint.snapshot()["latency_p50_ms"] == 400.0, "of its checks: no answer yet"
    await run(router)  # its answer's first token comes at once (the clock stands still)
    await router.check(endpoint, slow_check, timeout=1.0)
    assert endpoint.snapshot()["latency_p50_ms"] == 0.0, "of its answers"


async def test_a_health_finding_expires(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(500), times=2)
    router = build.router(
        [
            [build.endpoint(primary.url, name="primary", finding_ttl=60.0)],
            [build.endpoint(fallback.url, name="fb")],
        ],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    await run(router)
    await run(router)
    assert not router.endpoints[0].healthy
    clock.advance(61.0)
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "primary"


async def test_the_prober_never_touches_an_open_breaker_and_takes_the_half_open_probe(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary = upstreams()
    primary.behave(Behaviour.error(500))
    policy = BreakerPolicy(consecutive_failures=1, cooldown=10.0)
    router = build.router(
        [[build.endpoint(primary.url, name="primary", policy=policy)]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    endpoint = router.endpoints[0]
    with pytest.raises(KeelError):
        await run(router)
    await router.check(endpoint, probe, timeout=1.0)
    assert posts(primary) == 1, "no check while open"

    clock.advance(10.0)
    primary.behave(Behaviour.slow_first_token(0.3))
    check = asyncio.create_task(router.check(endpoint, probe, timeout=2.0))
    await primary.wait_for(lambda: posts(primary) == 2)
    with pytest.raises(Unavailable):
        await run(router)  # the probe is out: the live request does not get through
    await check
    assert posts(primary) == 2
    assert endpoint.breaker.state is BreakerState.CLOSED
    await run(router)


async def test_a_probe_that_fails_in_half_open_reopens(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary = upstreams()
    primary.behave(Behaviour.hang())
    policy = BreakerPolicy(consecutive_failures=1, cooldown=10.0)
    short = Timeouts(first_token=0.2, between_tokens=1.0)
    router = build.router(
        [[build.endpoint(primary.url, name="primary", policy=policy, timeouts=short)]],
        retry=RetryPolicy(attempts_per_provider=1),
    )
    endpoint = router.endpoints[0]
    with pytest.raises(KeelError):
        await run(router)
    clock.advance(10.0)
    await router.check(endpoint, probe, timeout=0.2)
    assert endpoint.breaker.state is BreakerState.OPEN


async def test_a_good_check_clears_auth_failed(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """...and says the provider is healthy again (``keel_provider_healthy`` stayed 0
    after the key was mended, while the provider served)."""
    primary = upstreams()
    primary.behave(Behaviour.error(403), times=1)
    router = build.router([[build.endpoint(primary.url, name="primary")]])
    with pytest.raises(KeelError):
        await run(router)
    endpoint = router.endpoints[0]
    assert endpoint.auth_failed
    assert build.events.log[-1] == ("health", "primary", "False")
    with pytest.raises(Unavailable, match="auth failed"):
        await run(router)
    await router.check(endpoint, probe, timeout=1.0)
    assert not endpoint.auth_failed
    assert ("health", "primary", "True") in build.events.log
    pieces, _ = await run(router)
    assert "".join(pieces) == ANSWER


async def test_a_primary_passing_its_check_ends_serving_from_the_fallback(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """The fallback gauge said the role served from its fallback until the next request
    came, however long after the primary's recovery."""
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(500))
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    for _ in range(UNHEALTHY_AFTER):
        await run(router)
    assert build.events.log.count(("fallback_active", "completion", "True")) >= 1
    primary.behave(Behaviour.normal())
    await router.check(router.endpoints[0], probe, timeout=1.0)
    assert build.events.log[-1] == ("fallback_active", "completion", "False")


# --- one-shot calls (embeddings) ---------------------------------------------------------


async def test_embeddings_fall_back(build: Build, upstreams: Callable[..., FakeUpstream]) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(500))
    router = build.router(
        [
            [build.endpoint(primary.url, name="primary", kind="openai/embedding")],
            [build.endpoint(fallback.url, name="fb", kind="openai/embedding")],
        ],
        role="embedding",
    )

    async def embed(provider: Provider) -> list[list[float]]:
        assert isinstance(provider, EmbeddingProvider)
        return await provider.embed(["abc", "de"])

    attempts = router.attempts()
    async for attempt in attempts:
        async with attempt:
            vectors = await attempt.call(embed(attempt.provider))
    assert vectors == [[3.0, 0.0, 0.5], [2.0, 1.0, 0.5]]
    assert attempts.provider is not None and attempts.provider.name == "fb"
    assert posts(primary) == 1


async def test_a_rate_limited_check_is_not_a_health_failure(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    primary, fallback = upstreams(), upstreams()
    primary.behave(Behaviour.error(429, retry_after="5"), times=1)
    router = build.router(
        [[build.endpoint(primary.url, name="primary")], [build.endpoint(fallback.url, name="fb")]]
    )
    endpoint = router.endpoints[0]
    await router.check(endpoint, probe, timeout=1.0)
    assert endpoint.healthy and endpoint.failed_checks == 0
    # Nor is it checked before its Retry-After: the prober sent a request every round
    # into a backend's asked-for pause (one of a day was probed every 2 s).
    for _ in range(3):
        await router.check(endpoint, probe, timeout=1.0)
    assert posts(primary) == 1
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "fb", "Retry-After honoured"
    clock.advance(5.0)
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "primary"


async def test_keels_own_rate_limit_is_no_failure_of_the_provider(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    """keel's configured ``rate_limit`` refusing a request kept the provider off until
    its turn, and was also counted as the provider's failure (``rate_limited``, as a
    backend's 429) and made its ``last_error``: alerts and the status page could not
    tell keel's throttle from the backend's."""
    primary, fallback = upstreams(), upstreams()
    limited = build.endpoint(primary.url, name="primary", rate_limit={"request_per_minute": 1})
    router = build.router([[limited], [build.endpoint(fallback.url, name="fb")]])
    _, route = await run(router)  # the minute's one request
    assert route.provider is not None and route.provider.name == "primary"
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "fb"
    assert limited.provider.status()["rate_limit"]["refused"] == 1  # type: ignore[index]
    assert limited.last_error is None and limited.healthy, limited.last_error
    assert not [e for e in build.events.log if e[:2] == ("failed", "primary")], build.events.log
    assert posts(primary) == 1, "kept off until its turn"
    clock.advance(30.0)
    _, route = await run(router)
    assert route.provider is not None and route.provider.name == "fb"
    # each request its limit turned away counts: kept off by the first refusal, the
    # rest were counted nowhere (one of four 429s)
    assert limited.provider.status()["rate_limit"]["refused"] == 2  # type: ignore[index]
    assert limited.snapshot()["rate_limited_for"] > 0 and limited.trouble() == "rate limited"


async def test_an_endpoint_serving_requests_is_not_probed(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """Requests in flight are the check: a probe would wait behind them on a backend
    that serves one at a time (a local embedding engine reading a long batch), time out,
    and call a working provider unhealthy."""
    primary = upstreams(token_delay=0.2)
    router = build.router([[build.endpoint(primary.url, name="primary")]])
    endpoint = router.endpoints[0]
    serving = asyncio.create_task(run(router))
    await primary.wait_for(lambda: posts(primary) == 1)
    primary.behave(Behaviour.hang())  # what a probe would meet behind the work
    await router.check(endpoint, probe, timeout=0.2)
    assert posts(primary) == 1, "probed while serving"
    assert endpoint.healthy
    pieces, _ = await serving
    assert "".join(pieces) == ANSWER

    await router.check(endpoint, probe, timeout=0.2)
    assert posts(primary) == 2, "idle again: probed"


async def test_a_backend_silent_past_a_first_token_is_probed_while_keystrokes_come(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """An editor's next keystroke cancels the request before it: against a backend that
    hung, each ends as no one's failure, and since requests were always in flight it was
    never probed: healthy, every completion an empty 200, for as long as editors typed.
    Silent past a first token's limit while asked, it is probed (and found out)."""
    hung = upstreams()
    hung.behave(Behaviour.hang())
    endpoint = build.endpoint(hung.url, name="hung", timeouts=Timeouts(0.3, 2.0))
    router = build.router([[endpoint]])
    typing = asyncio.create_task(run(router))
    for _ in range(5):  # a keystroke every 0.1 s, each cancelling the one before
        await hung.wait_for(lambda: endpoint.outstanding == 1)
        await asyncio.sleep(0.1)
        typing.cancel()
        typing = asyncio.create_task(run(router))
    await hung.wait_for(lambda: endpoint.outstanding == 1)
    assert endpoint.silent()
    for _ in range(UNHEALTHY_AFTER):
        await router.check(endpoint, probe, timeout=0.2)
    assert not endpoint.healthy and "health check took over" in str(endpoint.last_error)
    typing.cancel()

    answering = upstreams(token_delay=0.3)
    busy = build.endpoint(answering.url, name="busy", timeouts=Timeouts(0.3, 2.0))
    serving = asyncio.create_task(run(build.router([[busy]])))
    await answering.wait_for(lambda: busy.outstanding == 1 and busy.unanswered_since is None)
    await asyncio.sleep(0.35)  # past the limit since it was asked, but it answers
    assert busy.outstanding == 1
    assert not busy.silent()
    await serving


async def test_a_retry_waiting_out_its_backoff_is_outstanding(
    build: Build, upstreams: Callable[..., FakeUpstream], clock: FakeClock
) -> None:
    """A reload closes a replaced provider once nothing is outstanding on it: a retry
    waiting out its backoff looked idle, and then reopened the closed provider's
    connection pool, which nothing closed (a soak's reloads logged "Unclosed client
    session")."""
    alone = upstreams()
    alone.behave(Behaviour.error(500), times=1)
    outstanding: list[int] = []
    slept = clock.sleep

    async def sleep(seconds: float) -> None:
        outstanding.append(router.endpoints[0].outstanding)
        await slept(seconds)

    clock.sleep = sleep  # type: ignore[method-assign]
    router = build.router(
        [[build.endpoint(alone.url, name="alone")]],
        retry=RetryPolicy(attempts_per_provider=2, backoff_initial=0.5),
    )
    pieces, _ = await run(router)
    assert "".join(pieces) == ANSWER
    assert outstanding == [1] and router.endpoints[0].outstanding == 0


async def test_a_backend_keels_own_busy_loop_kept_waiting_is_not_unreachable(
    build: Build, upstreams: Callable[..., FakeUpstream], dead_url: str
) -> None:
    """keel's start checks that each backend accepts a connection. A loaded machine can
    keep keel's own loop busy past the wait while the connection is made at once: the
    backend was routed around as "cannot connect: no answer" (a chaos test, under load).
    A refused connection is still unreachable at once."""
    live = upstreams()
    endpoint = build.endpoint(live.url, name="live")
    router = build.router([[endpoint]])
    reaching = asyncio.create_task(reach(router, endpoint, "127.0.0.1", live.port, 0.2))
    await asyncio.sleep(0)  # the connection is under way
    time.sleep(0.5)  # noqa: ASYNC251 - keel's loop busy (on purpose), past the wait
    await reaching
    assert endpoint.last_error is None and ("health", "live", "False") not in build.events.log

    dead = build.endpoint(dead_url, name="dead")
    port = int(dead_url.rsplit(":", 1)[1])
    await reach(build.router([[dead]]), dead, "127.0.0.1", port, 0.2)
    assert dead.last_error and "cannot connect" in dead.last_error


async def test_a_provider_two_roles_share_shows_each_roles_own_fallbacks(
    build: Build, upstreams: Callable[..., FakeUpstream]
) -> None:
    """The embedded model is one endpoint of several roles: completions falling back to
    it showed as fallbacks of chat, which had none."""
    primary, shared_backend = upstreams(), upstreams()
    primary.behave(Behaviour.error(500))
    shared = build.endpoint(shared_backend.url, name="shared")
    completion = build.router([[build.endpoint(primary.url, name="primary")], [shared]])
    chat = build.router([[shared]], role="chat")
    for _ in range(2):
        pieces, _ = await run(completion)
        assert "".join(pieces) == ANSWER
    await run(chat)
    assert shared.snapshot("completion")["fallbacks_to"] == 2
    assert shared.snapshot("chat")["fallbacks_to"] == 0
