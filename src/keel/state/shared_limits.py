"""Per-key rate limits shared by every replica, in Redis; per replica while it is down.

``RedisState`` is also where the keys kept in Redis (``keel.state.shared_keys``)
report how Redis serves them: one truth about one store, told per use.

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
runs twice: the key pays one token too many, never one too few.)

When Redis does not answer, or answers but refuses the limit script (a full
Redis under ``noeviction`` refuses a script that writes; an ACL may refuse
scripts), the replica decides alone with its in-process bucket, says so once
in the log (with the error, and once more when it is over), in
``/v1/providers`` (``shared_state``, with ``last_error``) and in metrics
(``keel_state_store_up{store="redis"} 0``,
``keel_rate_limit_local_decisions_total``), and tries Redis again at most
once a second, so a dead Redis costs one short wait a second, not one per
request. What Redis does for one use never vouches for another: a Redis that
answers the keys' reads but refuses the script is still down for the limits,
and the store is up (``keel_state_store_up`` 1) only while keel can do all it
uses it for. Any answer ends "unreachable"; a refusal ends when that use's own
command succeeds (the keys' follower re-runs the script once a second on a
bucket of its own, so a replica without traffic learns it too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keel.auth import KeyRateLimiter
from keel.config import masked_url

if TYPE_CHECKING:
    from keel.ops.metrics import Metrics

log = logging.getLogger("keel.state")

TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local refund = ARGV[3] == 'refund'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(saved[1]) or capacity
local at = tonumber(saved[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate)
local wait = 0
if refund then
    level = math.min(capacity, level + 1)
elseif level >= 1 then
    level = level - 1
else
    wait = (1 - level) / rate
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return tostring(wait)
"""
"""Take one token from the bucket at KEYS[1] (ARGV: capacity, tokens per second, and
"refund" to give one back instead).
Returns the wait in seconds as a string (Lua numbers become integers on the way out):
"0" when taken, else the time until one would be, with nothing taken."""

KEY_PREFIX = "keel:ratelimit:"
PROBE_KEY = KEY_PREFIX + "(probe)"
"""The bucket :meth:`RedisState.recheck_limits` draws from: no key's id looks like it."""
RETRY_SECONDS = 1.0
T = TypeVar("T")

Use = Literal["rate_limits", "keys"]
LIMITS: Use = "rate_limits"
KEYS: Use = "keys"
UNREACHABLE = "unreachable"
_TROUBLE = {
    UNREACHABLE: "Redis unreachable ({}): until it answers again per-key rate limits hold per "
    "replica and the keys last read from Redis stay in force; completions are not affected",
    LIMITS: "Redis refuses the rate-limit script ({}): until it runs it again per-key rate "
    "limits hold per replica; completions are not affected",
    KEYS: "Redis refuses to give the keys ({}): the keys last read from it stay in force "
    "until it does",
}
"""What each problem means, logged once as it starts (the error in the braces)."""

REFUSED = (
    "Redis refuses keel's connection ({}): check the password, user and database of "
    "[state] redis_url (keel doctor checks them); until it takes them per-key rate limits "
    "hold per replica and the keys last read from Redis stay in force; completions are not "
    "affected"
)
"""How an unreachable Redis that turned keel away is logged: no network trouble."""


def is_refused(exc: BaseException) -> bool:
    """Redis turned keel's connection away: its password or user (redis-py files those
    under ConnectionError, so they read "unreachable"), or a database it does not have."""
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        return True
    return isinstance(exc, ResponseError) and "DB index is out of range" in str(exc)


@dataclass(frozen=True, slots=True)
class Problem:
    error: str
    since: float
    """When it began (epoch seconds)."""


class RedisState:
    """One Redis connection pool, for the process's life, and whether Redis serves each
    use keel has for it (the limits, the keys)."""

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
        self._answered_once = False
        self._problems: dict[str, Problem] = {}
        """What keeps Redis from serving now: UNREACHABLE (every use), or a use whose
        commands Redis refuses while it answers others (a full Redis refuses the script
        that writes; an ACL may refuse scripts or the keys)."""
        self._next_try = 0.0
        if metrics is not None:
            metrics.state_store("redis", True)

    @property
    def up(self) -> bool | None:
        """None before the first call; then whether keel can do all it uses Redis for:
        it answers, and refuses none of it."""
        if not self._answered_once and not self._problems:
            return None
        return not self._problems

    def problem(self, use: Use) -> Problem | None:
        """Why ``use`` cannot be served from Redis now (Redis unreachable first), or None."""
        return self._problems.get(UNREACHABLE) or self._problems.get(use)

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
            self.failed(None, exc)
        else:
            self.answered(None)

    def worth_trying(self) -> bool:
        """While the limits cannot be shared, one call a second tries Redis; the others
        do not wait."""
        if self.problem(LIMITS) is None:
            return True
        now = self.clock()
        if now < self._next_try:
            return False
        self._next_try = now + RETRY_SECONDS
        return True

    async def recheck_limits(self) -> None:
        """While Redis answers but refused the limit script, run it again (once a second,
        on a bucket no key uses), so that a replica without traffic learns it may share
        the limits again; called by whatever follows Redis each second (``SharedKeys``)."""
        if LIMITS not in self._problems or not self.worth_trying():
            return
        try:
            await self.bounded(lambda: self.script(keys=[PROBE_KEY], args=[1, 1.0]))
        except (RedisError, OSError) as exc:
            self.failed(LIMITS, exc)
        else:
            self.answered(LIMITS)

    def failed(self, use: Use | None, exc: Exception) -> None:
        """A call for ``use`` (None: none in particular) got no answer, or a refusal."""
        message = masked_url(str(exc) or type(exc).__name__)
        gone = (RedisConnectionError, RedisTimeoutError, OSError)
        refused = is_refused(exc)  # a wrong password or database: every use, told as such
        what: str = UNREACHABLE if use is None or refused or isinstance(exc, gone) else use
        was_up = self.up is not False
        known = self._problems.get(what)
        self._problems[what] = Problem(message, known.since if known else time.time())
        self._next_try = self.clock() + RETRY_SECONDS
        if known is None:
            log.warning("%s", (REFUSED if refused else _TROUBLE[what]).format(message))
        if was_up and self.metrics is not None:
            self.metrics.state_store("redis", False)

    def answered(self, use: Use | None) -> None:
        """A call for ``use`` (None: a PING) got its answer: Redis answers, and does
        that use's commands."""
        self._answered_once = True
        cleared = [what for what in (UNREACHABLE, use) if what and self._problems.pop(what, None)]
        if not cleared:
            return
        if not self._problems:
            log.warning("Redis answers again: per-key rate limits are shared and its keys current")
            if self.metrics is not None:
                self.metrics.state_store("redis", True)
            return
        for what, problem in self._problems.items():
            log.warning("Redis answers again, but: %s", _TROUBLE[what].format(problem.error))

    def status(self) -> dict[str, object]:
        """The limits' part of ``/v1/providers``' shared state."""
        problem = self.problem(LIMITS)
        return {
            "store": "redis",
            "up": problem is None,
            "rate_limits": "per_replica" if problem else "shared",
            "last_error": problem.error if problem else None,
            "down_since": problem.since if problem else None,
        }

    async def aclose(self) -> None:
        await self.redis.aclose()


class SharedKeyRateLimiter:
    """``per_minute`` requests a minute per key across every replica on ``state``'s Redis,
    falling back to ``local`` (this replica's buckets) while Redis does not answer or
    refuses the script."""

    def __init__(self, per_minute: int, state: RedisState) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1 (got {per_minute})")
        self.per_minute = per_minute
        self.state = state
        self.local = KeyRateLimiter(per_minute)

    async def acquire(self, who: str) -> float:
        """0 if allowed now, else the seconds until a request would be (nothing taken)."""
        if (answer := await self._shared(who)) is not None:
            return float(answer)
        if self.state.metrics is not None:
            self.state.metrics.rate_limited_locally()
        return self.local.take(who)

    async def refund(self, who: str) -> None:
        """Give back a token where it was taken (Redis, else this replica's buckets)."""
        if await self._shared(who, "refund") is None:
            await self.local.refund(who)

    async def _shared(self, who: str, *extra: str) -> bytes | str | None:
        """The bucket script's answer for ``who`` on Redis (``extra``: its further
        arguments), or None where Redis is not worth trying or does not answer."""
        if not self.state.worth_trying():
            return None
        args: list[str | int | float] = [self.per_minute, self.per_minute / 60.0, *extra]
        try:
            answer = await self.state.bounded(
                lambda: self.state.script(keys=[KEY_PREFIX + who], args=args)
            )
        except (RedisError, OSError) as exc:
            self.state.failed(LIMITS, exc)
            return None
        self.state.answered(LIMITS)
        return answer  # type: ignore[no-any-return]  # the script's wait, as Redis sent it
