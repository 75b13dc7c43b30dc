"""What a generation that ended before its end leaves in the metrics: the tokens it
produced and its first token's time, not its time as a whole generation's. A stream cut
mid-way lost the tokens the client already had from ``keel_generated_tokens_total`` and
its first token from ``keel_time_to_first_token_seconds``, and a superseded request
cancelled after one token counted as a whole successful generation.

keel's real HTTP adapter talks to a :class:`FakeUpstream`; the metrics are keel's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.config import HttpModelConfig
from keel.errors import UpstreamTimeout
from keel.ops.metrics import Metrics
from keel.providers.base import CompletionCall, CompletionProvider, GenerationParams
from keel.providers.http import build_http_provider
from keel.router.breaker import BreakerPolicy
from keel.router.retry import RetryBudget, RetryPolicy
from keel.router.router import Endpoint, RoleRouter, Timeouts, new_breaker
from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.router.conftest import FakeClock

NAME = "completion/up"
LABELS = {"role": "completion", "provider": NAME}


class Served:
    """A role of one provider on ``upstream``, its outcomes in keel's metrics."""

    def __init__(self, upstream: FakeUpstream, clock: FakeClock) -> None:
        self.metrics = Metrics(environ={})
        config = HttpModelConfig(kind="openai/completion", api_endpoint=f"{upstream.url}/v1")
        self.provider = build_http_provider("completion", config, name=NAME, timeout=5.0)
        breaker = new_breaker(NAME, BreakerPolicy(), self.metrics, clock)
        timeouts = Timeouts(first_token=2.0, between_tokens=0.3)
        endpoint = Endpoint(self.provider, breaker, timeouts, clock=clock)
        retry = RetryPolicy(attempts_per_provider=1)
        self.router = RoleRouter(
            "completion",
            [[endpoint]],
            budget=RetryBudget(retry, clock=clock),
            retry=retry,
            events=self.metrics,
            clock=clock,
            sleep=clock.sleep,
        )
        self.received: list[str] = []
        self.first = asyncio.Event()

    async def stream(self) -> None:
        """One streamed request, its pieces to the client as they come."""
        async for attempt in self.router.attempts(streaming=True, shrinkable=True):
            async with attempt:
                assert isinstance(attempt.provider, CompletionProvider)
                call = CompletionCall("def f(", GenerationParams(max_tokens=16))
                async for piece in attempt.pieces(attempt.provider.stream_completion(call)):
                    self.received.append(piece)
                    self.first.set()

    def value(self, name: str) -> float:
        text = self.metrics.render().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == LABELS:
                    return sample.value
        return 0.0


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
async def served(upstream: FakeUpstream, clock: FakeClock) -> AsyncIterator[Served]:
    serving = Served(upstream, clock)
    yield serving
    await serving.provider.aclose()


async def test_a_stream_stalled_after_two_pieces_counts_them_and_its_first_token(
    upstream: FakeUpstream, served: Served
) -> None:
    upstream.behave(Behaviour.stall(after=2, delay=30.0))
    with pytest.raises(UpstreamTimeout, match="stalled"):
        await served.stream()
    assert "".join(served.received) == "Hello,"  # two pieces (they may arrive as one)
    assert served.value("keel_generated_tokens_total") == 2
    assert served.value("keel_time_to_first_token_seconds_count") == 1
    # not a whole generation: its time is the stall's
    assert served.value("keel_generation_duration_seconds_count") == 0


async def test_a_request_cancelled_after_one_token_is_no_whole_generation(
    upstream: FakeUpstream, served: Served
) -> None:
    """A superseded completion: the editor's next keystroke cancels it."""
    upstream.behave(Behaviour.stall(after=1, delay=30.0))
    request = asyncio.create_task(served.stream())
    await served.first.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert served.value("keel_generated_tokens_total") == 1
    assert served.value("keel_time_to_first_token_seconds_count") == 1
    assert served.value("keel_generation_duration_seconds_count") == 0
    assert served.value("keel_generation_tokens_per_second_count") == 0


async def test_a_whole_generation_counts_as_one(upstream: FakeUpstream, served: Served) -> None:
    upstream.reset_behaviour()
    await served.stream()
    assert "".join(served.received) == "Hello, world"
    assert served.value("keel_generated_tokens_total") == 3
    assert served.value("keel_time_to_first_token_seconds_count") == 1
    assert served.value("keel_generation_duration_seconds_count") == 1
