"""A Redis that answers but refuses part of what keel does there (full under
``noeviction``, an ACL without scripts or without the keys' channel): keel reports it
steadily, per use, with the error, and once more when it is over; it does not take the
keys' reads as proof that the limits are shared."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from keel.ops.metrics import Metrics
from keel.state.shared_keys import SharedKeys
from keel.state.shared_limits import RedisState, SharedKeyRateLimiter
from tests.state.servers import RedisServer


@dataclass
class Replica:
    state: RedisState
    limiter: SharedKeyRateLimiter
    keys: SharedKeys
    metrics: Metrics

    def store_up(self) -> float | None:
        return self.metrics.registry.get_sample_value("keel_state_store_up", {"store": "redis"})


@contextlib.asynccontextmanager
async def replica(url: str) -> AsyncIterator[Replica]:
    """A replica's Redis parts as the app wires them, its keys' follower running (each
    0.1 s here, for a short test; once a second in keel). Patient (5 s, keel's is 1 s):
    on a loaded CI machine an answer took over 1 s, and the refusals tested here were
    joined by an "unreachable" they are not about."""
    metrics = Metrics()
    state = RedisState(url, timeout=5.0, metrics=metrics)
    await state.ping()
    keys = SharedKeys(state, metrics=metrics, interval=0.1)
    await keys.refresh()
    follower = asyncio.create_task(keys.run())
    try:
        yield Replica(state, SharedKeyRateLimiter(60, state), keys, metrics)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await state.aclose()


async def admin(url: str, *command: str) -> None:
    redis = Redis.from_url(url)
    try:
        await redis.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await redis.aclose()


async def watch(r: Replica, seconds: float, request: bool = True) -> list[float | None]:
    """The gauge as a scrape would read it every 0.1 s for ``seconds``, a completion
    taking its limit at each (unless ``request`` is False)."""
    seen: list[float | None] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if request:
            await r.limiter.acquire("key-a")
        await asyncio.sleep(0.05)  # a scrape comes at any time, not just after a request
        seen.append(r.store_up())
        await asyncio.sleep(0.05)
    return seen


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("refuse", "allow", "error"),
    [
        (
            [
                ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
                ("CONFIG", "SET", "maxmemory", "1"),
            ],
            [("CONFIG", "SET", "maxmemory", "0")],
            "command not allowed when used memory > 'maxmemory'",
        ),
        (
            [("ACL", "SETUSER", "default", "-@scripting")],
            [("ACL", "SETUSER", "default", "+@all")],
            "no permissions to run the 'evalsha' command",
        ),
    ],
    ids=["full", "acl_without_scripts"],
)
async def test_a_redis_refusing_the_limit_script_is_down_for_the_limits_steadily(
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    refuse: list[tuple[str, ...]],
    allow: list[tuple[str, ...]],
    error: str,
) -> None:
    caplog.set_level(logging.WARNING, "keel.state")
    async with replica(redis_server.url) as r:
        assert await r.limiter.acquire("key-a") == 0 and r.store_up() == 1
        for command in refuse:
            await admin(redis_server.url, *command)

        seen = await watch(r, 2.5)
        assert seen[1:] == [0] * (len(seen) - 1), f"the gauge flapped: {seen}"
        assert lines(caplog, "answers again") == 0, caplog.text
        assert "Redis unreachable" not in caplog.text
        assert lines(caplog, "Redis refuses the rate-limit script") == 1, caplog.text
        limits, keys = r.state.status(), r.keys.status()
        assert limits["up"] is False and limits["rate_limits"] == "per_replica"
        assert error in str(limits["last_error"]), limits
        assert keys["up"] is True and keys["keys"] == "current", "the keys are read as ever"
        assert r.state.up is False

        for command in allow:
            await admin(redis_server.url, *command)
        # No completion comes: the keys' follower finds out that the script runs again.
        await eventually(lambda: r.store_up() == 1)
        assert r.state.status()["rate_limits"] == "shared"
        assert r.state.status()["last_error"] is None
        assert lines(caplog, "Redis answers again") == 1, caplog.text
        assert set(await watch(r, 0.5)) == {1}


async def test_a_redis_refusing_the_keys_channel_says_so_for_the_keys_alone(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "keel.state")
    async with replica(redis_server.url) as r:
        await admin(redis_server.url, "ACL", "SETUSER", "default", "resetchannels")
        # The follower subscribes again once its connection is cut.
        await admin(redis_server.url, "CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(lambda: r.store_up() == 0)
        seen = await watch(r, 1.5)
        assert seen == [0] * len(seen), f"the gauge flapped: {seen}"
        assert lines(caplog, "answers again") == 0, caplog.text
        assert lines(caplog, "Redis refuses to give the keys") == 1, caplog.text
        keys, limits = r.keys.status(), r.state.status()
        assert keys["up"] is False and keys["keys"] == "last_read"
        assert "no permissions" in str(keys["last_error"]), keys
        assert limits["up"] is True and limits["rate_limits"] == "shared"

        await admin(redis_server.url, "ACL", "SETUSER", "default", "allchannels")
        await eventually(lambda: r.store_up() == 1)
        assert r.keys.status()["keys"] == "current"
        assert lines(caplog, "Redis answers again") == 1, caplog.text
