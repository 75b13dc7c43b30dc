"""Keys kept in a real Redis: managed by KeyAdmin, followed by a replica's SharedKeys,
in force beside the configured keys, and kept while Redis is down."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from keel.auth import Access, Keys, KeyStore, key_id
from keel.cli import main
from keel.config import AuthConfig
from keel.ops.metrics import Metrics
from keel.state.shared_keys import KEYS_HASH, VERSION_KEY, KeyAdmin, SharedKeys, record_for
from keel.state.shared_limits import RedisState, SharedKeyRateLimiter
from tests.state.servers import RedisServer

CONFIG_KEY = "config-key-0001"


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[KeyAdmin]:
    redis = Redis.from_url(redis_server.url)
    yield KeyAdmin(redis)
    await redis.aclose()


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def access(store: KeyStore, key: str) -> Access | None:
    identity = store.identify([key])
    return None if identity is None else identity.access


def replica(
    redis_server: RedisServer, tmp_path: Path, metrics: Metrics | None = None
) -> tuple[SharedKeys, KeyStore, list[str]]:
    changes: list[str] = []
    state = RedisState(redis_server.url, timeout=0.5, metrics=metrics)
    shared = SharedKeys(state, metrics=metrics, on_change=changes.append)
    store = KeyStore(AuthConfig(api_keys=[CONFIG_KEY]), tmp_path, shared=shared)
    return shared, store, changes


async def test_keys_in_redis_are_in_force_with_the_configured_ones(
    admin: KeyAdmin, redis_server: RedisServer, tmp_path: Path
) -> None:
    user, _ = await admin.add("alice", admin=False)
    boss, _ = await admin.add("ops", admin=True)
    shared, store, changes = replica(redis_server, tmp_path)
    await shared.refresh()
    assert access(store, user) is Access.USER
    assert access(store, boss) is Access.ADMIN
    assert access(store, CONFIG_KEY) is Access.USER, "the config's keys stay"
    assert access(store, "not-a-key-at-all") is None
    identity = store.identify([user])
    assert identity is not None and identity.key_id == key_id(user), "ids name Redis keys too"
    assert store.has_admin and changes == [], "the first read is no change"

    await admin.revoke("alice")
    await admin.revoke(key_id(boss))
    await shared.refresh()
    assert access(store, user) is None and access(store, boss) is None
    assert store.enabled, "no key left in Redis must not open access"
    assert "revoked" in changes[-1] and key_id(user) in changes[-1]
    await shared.state.aclose()


async def test_a_replica_follows_a_change_within_a_second(
    admin: KeyAdmin, redis_server: RedisServer, tmp_path: Path
) -> None:
    shared, store, changes = replica(redis_server, tmp_path)
    await shared.refresh()
    follow = asyncio.create_task(shared.run())
    try:
        key, record = await admin.add("", admin=False)
        await eventually(lambda: access(store, key) is Access.USER, timeout=1.5)
        assert record.id in changes[-1] and "added" in changes[-1]
        await admin.revoke(record.id)
        await eventually(lambda: access(store, key) is None, timeout=1.5)
    finally:
        follow.cancel()
    await shared.state.aclose()


async def test_a_change_without_its_message_is_read_within_a_second(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    shared, store, _ = replica(redis_server, tmp_path)
    await shared.refresh()
    follow = asyncio.create_task(shared.run())
    try:
        await asyncio.sleep(0.1)  # subscribed; the change below announces nothing
        redis = Redis.from_url(redis_server.url)
        key = "quiet-key-0001"
        record = record_for(key, "quiet")
        await redis.hset(KEYS_HASH, record.id, record.to_json())
        await redis.set(VERSION_KEY, "changed-quietly")
        await redis.aclose()
        await eventually(lambda: access(store, key) is Access.USER, timeout=1.5)
    finally:
        follow.cancel()
    await shared.state.aclose()


async def test_a_dead_redis_keeps_the_keys_read_last_and_says_so(
    admin: KeyAdmin, redis_server: RedisServer, tmp_path: Path
) -> None:
    metrics = Metrics()
    key, _ = await admin.add("alice", admin=False)
    shared, store, _ = replica(redis_server, tmp_path, metrics)
    await shared.refresh()
    assert metrics.registry.get_sample_value("keel_redis_keys") == 1

    redis_server.kill()
    await shared.refresh()
    assert access(store, key) is Access.USER, "the keys read last stay in force"
    assert access(store, "not-a-key-at-all") is None, "and access stays closed"
    status = shared.status()
    assert status["up"] is False and status["keys"] == "last_read" and status["in_force"] == 1
    assert metrics.registry.get_sample_value("keel_state_store_up", {"store": "redis"}) == 0

    redis_server.start()  # same port, empty
    redis = Redis.from_url(redis_server.url)
    new, _ = await KeyAdmin(redis).add("bob", admin=False)
    await redis.aclose()
    await shared.refresh()
    assert access(store, new) is Access.USER
    assert shared.status()["up"] is True and shared.status()["keys"] == "current"
    assert metrics.registry.get_sample_value("keel_state_store_up", {"store": "redis"}) == 1
    await shared.state.aclose()


async def test_a_frozen_redis_is_not_reported_answering_by_the_follower(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGSTOP: a rate-limit decision finds Redis silent and marks it down. The
    follower's wait for an announcement then ends with no message, which is no answer:
    it reported "Redis answers again" a second later, while Redis was still frozen."""
    shared, _, _ = replica(redis_server, tmp_path)
    limiter = SharedKeyRateLimiter(60, shared.state)
    await shared.refresh()
    follow = asyncio.create_task(shared.run())
    assert redis_server.process is not None
    try:
        await asyncio.sleep(0.1)  # subscribed, waiting for an announcement
        redis_server.process.send_signal(signal.SIGSTOP)
        await limiter.acquire("key-a")
        assert shared.state.up is False
        deadline = time.monotonic() + 1.6  # past the follower's one-second wait
        while time.monotonic() < deadline:
            assert shared.state.up is False, "reported up while Redis was frozen"
            await asyncio.sleep(0.02)
        redis_server.process.send_signal(signal.SIGCONT)
        await eventually(lambda: shared.state.up is True, timeout=4.0)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        follow.cancel()
    await shared.state.aclose()


async def test_push_replaces_the_pushed_keys_and_keeps_the_added_ones(
    admin: KeyAdmin, redis_server: RedisServer, tmp_path: Path
) -> None:
    added, _ = await admin.add("alice", admin=False)
    assert await admin.push(Keys(("file-key-0001", "file-key-0002"), "file-admin-01"), "k") == (
        3,
        0,
    )
    assert await admin.push(Keys(("file-key-0002", "file-key-0003")), "k") == (1, 2)
    records, problems = await admin.list()
    assert problems == []
    assert {r.id for r in records} == {key_id(k) for k in (added, "file-key-0002", "file-key-0003")}
    shared, store, _ = replica(redis_server, tmp_path)
    await shared.refresh()
    assert access(store, "file-key-0001") is None
    assert access(store, "file-key-0003") is Access.USER
    assert access(store, added) is Access.USER
    await shared.state.aclose()


async def test_an_unreadable_record_grants_nothing_and_the_rest_work(
    admin: KeyAdmin, redis_server: RedisServer, tmp_path: Path
) -> None:
    key, _ = await admin.add("alice", admin=False)
    await admin.redis.hset(KEYS_HASH, "key-broken", "{not json")
    shared, store, _ = replica(redis_server, tmp_path)
    await shared.refresh()
    assert access(store, key) is Access.USER
    records, problems = await admin.list()
    assert [r.name for r in records] == ["alice"] and problems[0].startswith("key-broken")
    await admin.revoke("alice")  # a change leaves the unreadable record as it is
    assert await admin.redis.hexists(KEYS_HASH, "key-broken")
    await shared.state.aclose()


def keys_command(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_adds_lists_pushes_and_revokes(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\nredis_url = "{redis_server.url}"\n')
    code, secret, err = keys_command(capsys, "--config", str(config), "add", "--name", "ci")
    assert code == 0 and "only time the key is shown" in err
    secret = secret.strip()
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('api_keys = ["pushed-key-0001"]\nadmin_key = "pushed-admin-01"\n')
    code, out, _ = keys_command(capsys, "push", str(keys_file), "--config", str(config))
    assert code == 0 and "2 keys (2 added, 0 removed)" in out
    code, out, _ = keys_command(capsys, "list", "--config", str(config))
    assert code == 0 and key_id(secret) in out and "ci" in out and secret not in out
    assert key_id("pushed-admin-01") in out and "admin" in out
    code, out, _ = keys_command(capsys, "revoke", "ci", "--config", str(config))
    assert code == 0 and key_id(secret) in out
    code, _, err = keys_command(capsys, "revoke", "ci", "--config", str(config))
    assert code == 2 and "no key in Redis has the id or name 'ci'" in err


def test_revoking_a_key_the_config_still_grants_says_so(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key pushed from the keys_file the config also reads, revoked in Redis, was said
    "refused on every replica" while every replica took it from the file."""
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('api_keys = ["filekey-aaaa-bbbb"]\n')
    config = tmp_path / "config.toml"
    config.write_text(
        f'[state]\nredis_url = "{redis_server.url}"\n[auth]\nkeys_file = "{keys_file}"\n'
    )
    code, _, _ = keys_command(capsys, "push", str(keys_file), "--config", str(config))
    assert code == 0
    code, out, err = keys_command(capsys, "revoke", "keys.toml", "--config", str(config))
    assert code == 1 and "refused on every replica" not in out, (out, err)
    assert "the config still grants it (the keys_file" in err and "filekey" not in err, err


def test_cli_mistakes_are_errors_that_say_what_to_do(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_redis = tmp_path / "plain.toml"
    no_redis.write_text("[server]\nport = 8080\n")
    code, _, err = keys_command(capsys, "--config", str(no_redis), "list")
    assert code == 78 and "state.redis_url" in err and "Traceback" not in err
    assert "[auth] api_keys, or a keys_file" in err, "the one-machine way, said"

    config = tmp_path / "config.toml"
    config.write_text(f'[state]\nredis_url = "{redis_server.url}"\n')
    bad = tmp_path / "keys.toml"
    bad.write_text('api_keys = ["short"]\n')
    code, _, err = keys_command(capsys, "--config", str(config), "push", str(bad))
    assert code == 78 and str(bad) in err and "at least 8 characters" in err

    redis_server.kill()
    code, _, err = keys_command(capsys, "--config", str(config), "add", "--name", "x")
    assert code == 1 and "did not answer" in err and "no key was read or changed" in err
    assert "Traceback" not in err


def test_keys_told_a_wrong_password_say_redis_refused_it(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said Redis "did not answer" and to check that Redis runs: it had answered, no."""
    client = SyncRedis.from_url(redis_server.url)
    client.config_set("requirepass", "right-Secret")
    client.close()
    config = tmp_path / "config.toml"
    wrong = redis_server.url.replace("redis://", "redis://:wrong-Secret@")
    config.write_text(f'[state]\nredis_url = "{wrong}"\n')
    code, _, err = keys_command(capsys, "--config", str(config), "list")
    assert code == 1 and "refused keel's connection" in err, err
    assert "the password, user and database" in err and "no key was read or changed" in err
    assert "wrong-Secret" not in err and "did not answer" not in err


def test_keys_refused_by_a_full_redis_say_so(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis at its maxmemory refuses the write: it said Redis "did not answer" and to
    check that it runs."""
    client = SyncRedis.from_url(redis_server.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        config = tmp_path / "config.toml"
        config.write_text(f'[state]\nredis_url = "{redis_server.url}"\n')
        code, _, err = keys_command(capsys, "--config", str(config), "add", "--name", "erin")
        assert code == 1 and "refused the command" in err and "maxmemory" in err, err
        assert "did not answer" not in err
    finally:
        client.config_set("maxmemory", "0")
        client.close()
