"""Keys kept in Redis: managed with ``keel keys``, in force on every replica within a second.

With ``[state] redis_url`` set, keys can live in Redis beside the config's and
the keys file's (all are in force together). Redis holds only each key's
sha256, never the key::

    keel:keys           hash: key id -> {"sha256", "name", "admin", "created", "source"}
    keel:keys:version   a random token replaced with every change, in the same transaction
                        (random, not a counter: a Redis restarted empty and changed again
                        must not show a version a replica already has)
    keel:keys:changed   the channel every change is announced on

A replica (:class:`SharedKeys`) follows the channel and, message or not,
reads the version once a second (one GET), reading the hash only when the
version moved: a lost message costs at most a second, and a Kubernetes
Secret's minute-long sync plays no part. While Redis does not answer, or
refuses the reads or the channel, the keys read last stay in force (never
none, never open access), and the replica says so as the shared rate limits
do (``RedisState``: one log line as it starts and one as it ends,
``keel_state_store_up{store="redis"}``, ``/v1/providers``); the first full
read brings it up to date. A read that works tells nothing about the limit
script: the follower re-runs that once a second while Redis refuses it
(``RedisState.recheck_limits``). Each change a replica applies goes to its
audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError
from redis.typing import EncodableT

from keel.auth import Keys, key_hash, key_id
from keel.errors import RequestError
from keel.state.shared_limits import KEYS

if TYPE_CHECKING:
    from keel.ops.metrics import Metrics
    from keel.state.shared_limits import RedisState

log = logging.getLogger("keel.auth")

KEYS_HASH = "keel:keys"
VERSION_KEY = "keel:keys:version"
CHANNEL = "keel:keys:changed"
READ_SECONDS = 1.0
SOURCES = ("cli", "file")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SharedKey:
    """One key as Redis holds it: its hash and what it is, never the key."""

    id: str
    sha256: str
    name: str
    admin: bool = False
    created: str = ""
    source: str = "cli"
    """'cli' (``keel keys add``) or 'file' (``keel keys push``: replaced by the next push)."""

    def to_json(self) -> str:
        record = {"sha256": self.sha256, "name": self.name, "admin": self.admin}
        record |= {"created": self.created, "source": self.source}
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, id: str, raw: str | bytes) -> SharedKey:
        """The record stored under ``id``; ValueError saying what is wrong with it."""
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{id}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{id}: not a JSON object")
        sha256, name = record.get("sha256"), record.get("name")
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise ValueError(f"{id}: sha256 must be 64 lowercase hex digits")
        if not isinstance(name, str) or not isinstance(record.get("admin", False), bool):
            raise ValueError(f"{id}: name must be a string and admin true or false")
        source = record.get("source", "cli")
        if source not in SOURCES:
            raise ValueError(f"{id}: source must be one of {', '.join(SOURCES)}")
        created = str(record.get("created", ""))
        return cls(id, sha256, name, bool(record.get("admin", False)), created, source)

    def describe(self) -> str:
        return f"{self.id} ({self.name or 'no name'}, {'admin' if self.admin else 'user'})"


def new_key(name: str, *, admin: bool = False, source: str = "cli") -> tuple[str, SharedKey]:
    """A fresh random key (256 bits) and its record; the key is shown once, then gone."""
    secret = "keel-" + secrets.token_urlsafe(32)
    return secret, record_for(secret, name, admin=admin, source=source)


def record_for(secret: str, name: str, *, admin: bool = False, source: str = "cli") -> SharedKey:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return SharedKey(key_id(secret), key_hash(secret), name, admin, created, source)


def parse_records(
    raw: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str],
) -> tuple[dict[str, SharedKey], list[str]]:
    """The records of ``HGETALL keel:keys`` by id, and the problems of those that do not parse
    (skipped: a bad record grants nothing)."""
    records: dict[str, SharedKey] = {}
    problems: list[str] = []
    for raw_id, value in raw.items():
        id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        try:
            records[id] = SharedKey.from_json(id, value)
        except ValueError as exc:
            problems.append(str(exc))
    return records, problems


@dataclass(frozen=True, slots=True)
class SharedKeySet:
    """The keys read from Redis at one version, found by the hash of a presented key."""

    version: str = ""
    """The token of ``keel:keys:version`` read with these keys; '' when there is none."""
    by_hash: Mapping[str, SharedKey] = field(default_factory=dict)

    @classmethod
    def of(cls, version: str, records: Mapping[str, SharedKey]) -> SharedKeySet:
        return cls(version, {record.sha256: record for record in records.values()})

    def find(self, presented: str) -> SharedKey | None:
        """A dict lookup on the presented key's sha256: its timing tells about the hash of
        the guess, which leads nowhere near a stored key."""
        return self.by_hash.get(key_hash(presented))

    @property
    def has_admin(self) -> bool:
        return any(record.admin for record in self.by_hash.values())

    @property
    def ids(self) -> set[str]:
        return {record.id for record in self.by_hash.values()}


class KeyAdmin:
    """What ``keel keys`` does to Redis. Each change is one transaction that also replaces
    the version token and announces it, so every replica sees all of it or none of it."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def list(self) -> tuple[list[SharedKey], list[str]]:
        records, problems = parse_records(await self.redis.hgetall(KEYS_HASH))
        return sorted(records.values(), key=lambda r: (r.created, r.id)), problems

    async def add(self, name: str, *, admin: bool) -> tuple[str, SharedKey]:
        check_name(name)
        secret, record = new_key(name, admin=admin)

        def edit(records: dict[str, SharedKey]) -> None:
            named = [r for r in records.values() if name and r.name == name]
            if named:
                raise RequestError(
                    f"a key named {name!r} exists ({named[0].id}): choose another name, or "
                    f"revoke that one first (keel keys revoke {named[0].id})"
                )
            records[record.id] = record

        await self._change(edit)
        return secret, record

    async def revoke(self, ref: str) -> SharedKey:
        def edit(records: dict[str, SharedKey]) -> SharedKey:
            found = [r for r in records.values() if ref in (r.id, r.name)]
            if not found:
                raise RequestError(
                    f"no key in Redis has the id or name {ref!r}; `keel keys list` shows them"
                )
            if len(found) > 1:
                ids = ", ".join(r.id for r in found)
                raise RequestError(f"{len(found)} keys are named {ref!r} ({ids}): revoke by id")
            return records.pop(found[0].id)

        return await self._change(edit)

    async def push(self, keys: Keys, name: str) -> tuple[int, int]:
        """Make the pushed keys exactly ``keys`` (a keys file's content); keys added with
        ``keel keys add`` stay. Returns how many were added and removed."""
        wanted = [record_for(k, name, source="file") for k in keys.users]
        if keys.admin is not None:
            wanted.append(record_for(keys.admin, name, admin=True, source="file"))

        def edit(records: dict[str, SharedKey]) -> tuple[int, int]:
            old = {i: r for i, r in records.items() if r.source == "file"}
            for id in old:
                del records[id]
            for record in wanted:
                if record.id in records:
                    continue  # the same key added with `keel keys add` stays as it is
                pushed = old.get(record.id)
                records[record.id] = replace(record, created=pushed.created) if pushed else record
            new = {r.id for r in wanted}
            return len(new - old.keys()), len(old.keys() - new)

        return await self._change(edit)

    async def _change(self, edit: Callable[[dict[str, SharedKey]], T]) -> T:
        """Apply ``edit`` to the records (it may raise, changing nothing), as one
        transaction; retried if another ``keel keys`` changed them meanwhile."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(KEYS_HASH)
                    before, _ = parse_records(await pipe.hgetall(KEYS_HASH))
                    after = dict(before)
                    result = edit(after)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    gone = before.keys() - after.keys()
                    if gone:
                        pipe.hdel(KEYS_HASH, *gone)
                    changed: dict[EncodableT, EncodableT] = {
                        i: r.to_json() for i, r in after.items() if before.get(i) != r
                    }
                    if changed:
                        pipe.hset(KEYS_HASH, mapping=changed)
                    pipe.set(VERSION_KEY, secrets.token_hex(8))
                    pipe.publish(CHANNEL, "changed")
                    await pipe.execute()
                    return result
                except WatchError:
                    continue


def _stop_if_asked() -> None:
    """End the task if it was cancelled although no CancelledError came through: on
    Python 3.11 redis-py's pubsub read, under its own timeout, can swallow the one a
    shutdown sends, and then read on with no timeout left (keel's stop waited on the
    keys' follower for ever). The task still counts the request; hence this look, and
    the bound of our own around that read."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(raw: bytes | str | None) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else (raw or "")


def check_name(name: str) -> None:
    """A name is how a person finds a key again; it must not look like an id."""
    if name.startswith("key-") or not re.match(r"^[\w.@:-]{0,64}$", name):
        raise RequestError(
            f"key name {name!r}: use up to 64 letters, digits and . _ - @ :, not starting "
            "with 'key-' (ids look like that)"
        )


class SharedKeys:
    """This replica's copy of the keys in Redis, kept current by :meth:`run`."""

    def __init__(
        self,
        state: RedisState,
        *,
        metrics: Metrics | None = None,
        on_change: Callable[[str], None] | None = None,
        interval: float = READ_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.on_change = on_change
        self.interval = interval
        self.sleep = sleep
        self.current = SharedKeySet()
        self.read_at: float | None = None
        """When Redis last answered a read (epoch seconds); None before the first."""
        self._problems: list[str] = []

    async def refresh(self) -> None:
        """Read now; a Redis that does not answer is recorded, never raised."""
        try:
            await self.read()
        except (RedisError, OSError) as exc:
            self.state.failed(KEYS, exc)
        else:
            self.state.answered(KEYS)

    async def read(self) -> None:
        """One GET of the version; the whole hash only when the version moved. Whether
        that says Redis serves the keys is the caller's to record: following them also
        takes the channel."""
        version = _text(await self.state.redis.get(VERSION_KEY))
        if self.read_at is None or version != self.current.version:
            async with self.state.redis.pipeline(transaction=True) as pipe:
                pipe.get(VERSION_KEY)
                pipe.hgetall(KEYS_HASH)
                raw_version, raw = await pipe.execute()
            records, problems = parse_records(raw)
            self._apply(SharedKeySet.of(_text(raw_version), records), problems)
        self.read_at = time.time()

    async def run(self) -> None:
        """Follow changes until cancelled: on each announcement and at least once a second."""
        while True:
            _stop_if_asked()
            try:
                await self._follow()
            except (RedisError, OSError) as exc:
                self.state.failed(KEYS, exc)
            except Exception:  # a bug here must not freeze the keys for the process's life
                log.exception("following the keys in Redis failed; retrying")
            await self.sleep(self.interval)

    async def _follow(self) -> None:
        pubsub = self.state.redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            await self.read()
            while True:
                _stop_if_asked()
                async with asyncio.timeout(self.interval + self.state.timeout):
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.interval)
                # A wait that ends with no message is no answer (a frozen Redis sends
                # none): Redis answers once the read after it does.
                await self.read()
                self.state.answered(KEYS)
                await self.state.recheck_limits()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _apply(self, fresh: SharedKeySet, problems: list[str]) -> None:
        old, first = self.current, self.read_at is None
        self.current = fresh
        if self.metrics is not None:
            self.metrics.redis_keys(len(fresh.by_hash))
        if problems != self._problems:
            for problem in problems:
                log.error("a key record in Redis is unreadable and grants nothing: %s", problem)
            self._problems = problems
        if old.version and not fresh.version:
            log.warning(
                "Redis holds no keys version any more: it lost its data (restarted without "
                "persistence?); only the keys it holds now are in force from Redis"
            )
        added, revoked = sorted(fresh.ids - old.ids), sorted(old.ids - fresh.ids)
        if first:
            log.info("%d keys read from Redis (version %r)", len(fresh.by_hash), fresh.version)
        elif added or revoked:
            detail = (
                f"keys in Redis at version {fresh.version}: {len(fresh.by_hash)} in force, "
                f"added {added}, revoked {revoked}"
            )
            log.info("%s", detail)
            if self.on_change is not None:
                self.on_change(detail)

    def status(self) -> dict[str, object]:
        problem = self.state.problem(KEYS)
        return {
            "store": "redis",
            "up": problem is None,
            "keys": "last_read" if problem else "current",
            "in_force": len(self.current.by_hash),
            "version": self.current.version,
            "read_at": self.read_at,
            "last_error": problem.error if problem else None,
        }
