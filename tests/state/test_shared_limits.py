"""Per-key limits in a real Redis: one bucket for every replica, per replica while it is down."""

from __future__ import annotations

from keel.ops.metrics import Metrics
from keel.state.shared_limits import RedisState, SharedKeyRateLimiter
from tests.state.servers import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_two_replicas_draw_from_one_bucket(redis_server: RedisServer) -> None:
    replicas = [RedisState(redis_server.url, timeout=1.0) for _ in range(2)]
    limiters = [SharedKeyRateLimiter(60, state) for state in replicas]
    waits = [await limiters[i % 2].acquire("key-shared") for i in range(120)]
    allowed = sum(wait == 0 for wait in waits)
    # A minute's worth (60) at once, plus what refilled while the loop ran (1 a second).
    assert 60 <= allowed <= 62, allowed
    refused = [wait for wait in waits if wait > 0]
    assert all(0 < wait <= 1.0 for wait in refused)
    assert await limiters[0].acquire("key-other") == 0, "each key has its own bucket"
    for state in replicas:
        assert state.up is True
        await state.aclose()


async def test_a_request_keel_refused_is_given_back_to_the_shared_bucket(
    redis_server: RedisServer,
) -> None:
    """keel's own refusals (a full queue) are not the key's requests: the token goes back,
    to the bucket every replica draws from, never past a minute's worth."""
    replicas = [RedisState(redis_server.url, timeout=1.0) for _ in range(2)]
    limiters = [SharedKeyRateLimiter(2, state) for state in replicas]
    assert [await limiters[0].acquire("key-refunded") for _ in range(2)] == [0, 0]
    assert await limiters[1].acquire("key-refunded") > 0
    await limiters[0].refund("key-refunded")
    assert await limiters[1].acquire("key-refunded") == 0
    for _ in range(5):
        await limiters[1].refund("key-never-charged")
    waits = [await limiters[0].acquire("key-never-charged") for _ in range(3)]
    assert waits[:2] == [0, 0] and waits[2] > 0, waits
    for state in replicas:
        await state.aclose()


async def test_a_dead_redis_means_per_replica_limits_then_shared_again(
    redis_server: RedisServer,
) -> None:
    clock, metrics = Clock(), Metrics()
    state = RedisState(redis_server.url, timeout=0.5, metrics=metrics, clock=clock)
    limiter = SharedKeyRateLimiter(2, state)
    await state.ping()
    assert sample(metrics, "keel_state_store_up", store="redis") == 1
    assert [await limiter.acquire("key-a") for _ in range(2)] == [0, 0]
    assert await limiter.acquire("key-a") > 0  # the shared bucket is empty

    redis_server.kill()
    # This replica's own bucket is full: the limit now holds per replica.
    assert [await limiter.acquire("key-a") for _ in range(2)] == [0, 0]
    assert await limiter.acquire("key-a") > 0
    assert state.status()["rate_limits"] == "per_replica"
    assert sample(metrics, "keel_state_store_up", store="redis") == 0
    assert sample(metrics, "keel_rate_limit_local_decisions_total") == 3

    redis_server.start()  # same port, empty: a fresh bucket
    assert await limiter.acquire("key-a") > 0, "Redis is tried again only after a second"
    clock.now += 1.0
    assert await limiter.acquire("key-a") == 0
    assert state.status()["rate_limits"] == "shared"
    assert sample(metrics, "keel_state_store_up", store="redis") == 1
    assert sample(metrics, "keel_rate_limit_local_decisions_total") == 4
    await state.aclose()


async def test_redis_down_from_the_start_is_reported_not_fatal(redis_server: RedisServer) -> None:
    redis_server.kill()
    metrics = Metrics()
    state = RedisState(redis_server.url, timeout=0.5, metrics=metrics)
    await state.ping()
    assert state.up is False
    assert sample(metrics, "keel_state_store_up", store="redis") == 0
    assert await SharedKeyRateLimiter(5, state).acquire("key-a") == 0
    await state.aclose()
