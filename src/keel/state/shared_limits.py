"""Per-key rate limits shared by every replica, in Redis; per replica while it is down.

``RedisState`` is also where the keys kept in Redis (``keel.state.shared_keys``)
report whether Redis answers: one truth about one store.

With ``[state] redis_url`` set, a key's ``requests_per_minute`` is one token
bucket in Redis that every replica draws from, so N replicas allow the limit
once, not N times. The bucket is updated by one Lua script (atomic in Redis:
no two replicas read the same level), on Redis's own clock (``TIME``), so the
replicas' clocks need not agree. It refills continuously and holds a
minute's worth, as the in-process bucket does (``keel.rate_limit``).

Redis is a help, never a dependency of a completion. A decision waits at
most ``timeout_seconds`` for it, all tries included. A pooled connection that
Redis closed (a restart or failover, ``CLIENT KILL``, its ``timeout`` for
idle clients, a proxy's idle cut) is opened again and the call tried once more
at once, within that bound: only a Redis that does not answer a fresh
connection counts as down. (A script whose connection broke after Redis ran it
runs twice: the key pays one token too many, never one too few.) When Redis
does not answer, the replica
decides alone with its in-process bucket, says so once in the log, in
``/v1/providers`` (``shared_state``) and in metrics
(``keel_state_store_up{store="redis"} 0``,
``keel_rate_limit_local_decisions_total``), and tries Redis again at most
once a second, so a dead Redis costs one short wait a second, not one per
request. The first answer from Redis puts the limits back in common.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keel.auth import KeyRateLimiter

if TYPE_CHECKING:
    from keel.ops.metrics import Metrics

log = logging.getLogger("keel.state")

TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(saved[1]) or capacity
local at = tonumber(saved[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate)
local wait = 0
if level >= 1 then
    level = level - 1
else
    wait = (1 - level) / rate
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return tostring(wait)
"""
"""Take one token from the bucket at KEYS[1] (ARGV: capacity, tokens per second).
Returns the wait in seconds as a string (Lua numbers become integers on the way out):
"0" when taken, else the time until one would be, with nothing taken."""

KEY_PREFIX = "keel:ratelimit:"
RETRY_SECONDS = 1.0
T = TypeVar("T")


class RedisState:
    """One Redis connection pool and whether Redis answers, for the process's life."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        # One more try, at once and on a fresh connection, when the pooled one turns out
        # closed (ConnectionError); never after a timeout, which is what a frozen Redis
        # gives and would double the wait. No health-check PING: the retry finds a
        # closed connection at no cost while connections are fine.
        self.redis: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        self.script = self.redis.register_script(TOKEN_BUCKET)
        self.metrics = metrics
        self.clock = clock
        self.up: bool | None = None
        """None before the first call; then whether the last one got an answer."""
        self.last_error: str | None = None
        self.down_since: float | None = None
        self._next_try = 0.0
        if metrics is not None:
            metrics.state_store("redis", True)

    async def bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` given at most ``timeout`` seconds in all (a retry included); past
        that, a redis TimeoutError saying so."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except TimeoutError:  # asyncio's (a redis TimeoutError is no builtin one)
            raise RedisTimeoutError(f"no answer within {self.timeout:g} s") from None

    async def ping(self) -> None:
        """Find out at startup whether Redis answers (and say so), before any request."""
        try:
            await self.bounded(self.redis.ping)
        except (RedisError, OSError) as exc:
            self.failed(exc)
        else:
            self.answered()

    def worth_trying(self) -> bool:
        """While Redis is down, one call a second tries it; the others do not wait."""
        if self.up is not False:
            return True
        now = self.clock()
        if now < self._next_try:
            return False
        self._next_try = now + RETRY_SECONDS
        return True

    def failed(self, exc: Exception) -> None:
        message = str(exc) or type(exc).__name__
        if self.up is not False:
            log.warning(
                "Redis unreachable (%s): until it answers again per-key rate limits hold per "
                "replica and the keys last read from Redis stay in force; completions are "
                "not affected",
                message,
            )
            self.down_since = time.time()
            if self.metrics is not None:
                self.metrics.state_store("redis", False)
        self.up = False
        self.last_error = message
        self._next_try = self.clock() + RETRY_SECONDS

    def answered(self) -> None:
        if self.up is False:
            log.warning("Redis answers again: per-key rate limits are shared and its keys current")
            if self.metrics is not None:
                self.metrics.state_store("redis", True)
        self.up = True
        self.last_error = None
        self.down_since = None

    def status(self) -> dict[str, object]:
        return {
            "store": "redis",
            "up": self.up is not False,
            "rate_limits": "per_replica" if self.up is False else "shared",
            "last_error": self.last_error,
            "down_since": self.down_since,
        }

    async def aclose(self) -> None:
        await self.redis.aclose()


class SharedKeyRateLimiter:
    """``per_minute`` requests a minute per key across every replica on ``state``'s Redis,
    falling back to ``local`` (this replica's buckets) while Redis does not answer."""

    def __init__(self, per_minute: int, state: RedisState) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1 (got {per_minute})")
        self.per_minute = per_minute
        self.state = state
        self.local = KeyRateLimiter(per_minute)

    async def acquire(self, who: str) -> float:
        """0 if allowed now, else the seconds until a request would be (nothing taken)."""
        if self.state.worth_trying():
            try:
                answer = await self.state.bounded(
                    lambda: self.state.script(
                        keys=[KEY_PREFIX + who], args=[self.per_minute, self.per_minute / 60.0]
                    )
                )
            except (RedisError, OSError) as exc:
                self.state.failed(exc)
            else:
                self.state.answered()
                return float(answer)
        if self.state.metrics is not None:
            self.state.metrics.rate_limited_locally()
        return self.local.take(who)
