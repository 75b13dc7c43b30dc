"""Done-when for issue 16: two real keel replicas on loopback sharing one Redis and one
PostgreSQL (both real), with a fake fast upstream as their completion provider."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from keel.auth import key_id
from keel.config import parse_settings
from keel.errors import ConfigError
from keel.state.shared_limits import KEY_PREFIX
from tests.conftest import KeelProcess, keel_cli, start_keel
from tests.fakes.upstreams import FakeUpstream
from tests.state.servers import PostgresServer, RedisServer

HTTP = httpx.Client(timeout=10)
"""One client for the module: making one loads the CA bundle (~20 ms), and the tests
send a few hundred requests."""


@pytest.fixture(autouse=True, scope="session")
def _close_http() -> Iterator[None]:
    """Closed when the session ends: a worker that steals this module's tests after
    running others would find a client closed at the end of its first share of them."""
    yield
    HTTP.close()


KEY = "replica-key-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}
KINDS = {"completion": "openai/completion", "chat": "openai/chat", "embedding": "openai/embedding"}


def replica_config(
    upstream: FakeUpstream,
    *,
    per_minute: int,
    redis_url: str | None = None,
    database_url: str | None = None,
    max_buffered: int = 10_000,
) -> str:
    lines = ["[server]", "completion_timeout = 10", "[auth]", f"api_keys = [{json.dumps(KEY)}]"]
    lines.append(f"requests_per_minute = {per_minute}")
    if redis_url is not None:
        lines += ["[state]", f"redis_url = {json.dumps(redis_url)}"]
    if database_url is not None:
        lines += ["[events]", f"database_url = {json.dumps(database_url)}"]
        lines.append(f"max_buffered = {max_buffered}")
    for role, kind in KINDS.items():
        lines += [f"[model.{role}]", "embedded_last_resort = false"]
        lines += [f"[model.{role}.http]", f'kind = "{kind}"']
        lines.append(f'api_endpoint = "http://127.0.0.1:{upstream.port}/v1"')
    return "\n".join(lines) + "\n"


@contextmanager
def replicas(tmp_path: Path, config: str, n: int = 2) -> Iterator[list[KeelProcess]]:
    started = [start_keel(tmp_path / f"replica-{i}", config) for i in range(n)]
    try:
        for replica in started:
            replica.wait_ready(60)
        yield started
    finally:
        for replica in started:
            replica.stop()


def complete(replica: KeelProcess, language: str = "python") -> httpx.Response:
    body = {"language": language, "segments": {"prefix": "def f(", "suffix": "\n"}}
    return HTTP.post(f"{replica.url}/v1/completions", json=body, headers=AUTH, timeout=30)


def metric(replica: KeelProcess, name: str, **labels: str) -> float | None:
    text = HTTP.get(f"{replica.url}/metrics", headers=AUTH, timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def shared_state(replica: KeelProcess) -> dict[str, Any]:
    body: dict[str, Any] = HTTP.get(f"{replica.url}/v1/providers", headers=AUTH).json()
    return body["shared_state"]  # type: ignore[no-any-return]


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def test_a_key_limited_to_60_a_minute_gets_60_across_two_replicas(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    config = replica_config(upstream, per_minute=60, redis_url=redis_server.url)
    with replicas(tmp_path, config) as (a, b):
        started = time.monotonic()
        statuses = [complete((a, b)[i % 2]).status_code for i in range(120)]
        elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, statuses
    served = statuses.count(200)
    # A minute's worth at once plus the refill while the run lasted (one a second);
    # without sharing it would be 120.
    assert 60 <= served <= 60 + int(elapsed) + 1, (served, elapsed)


def test_killing_redis_mid_run_fails_no_completion_and_sharing_resumes(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    config = replica_config(upstream, per_minute=6000, redis_url=redis_server.url)
    bucket = KEY_PREFIX + key_id(KEY)
    with replicas(tmp_path, config) as pair:
        statuses = [complete(pair[i % 2]).status_code for i in range(10)]
        store = redis.Redis.from_url(redis_server.url)
        assert store.exists(bucket), "the bucket lives in Redis"
        store.close()

        redis_server.kill()
        statuses += [complete(pair[i % 2]).status_code for i in range(20)]
        assert statuses == [200] * 30, "no completion failed"
        for replica in pair:
            assert metric(replica, "keel_state_store_up", store="redis") == 0
            local = metric(replica, "keel_rate_limit_local_decisions_total")
            assert local is not None and local > 0
            assert shared_state(replica)["rate_limits"]["rate_limits"] == "per_replica"
            assert "Redis unreachable" in replica.log.read_text()

        redis_server.start()  # same port, empty
        for replica in pair:

            def shared_again(replica: KeelProcess = replica) -> bool:
                assert complete(replica).status_code == 200
                return metric(replica, "keel_state_store_up", store="redis") == 1

            eventually(shared_again)
            assert shared_state(replica)["rate_limits"]["rate_limits"] == "shared"
        store = redis.Redis.from_url(redis_server.url)
        assert store.exists(bucket), "limits are kept in Redis again"
        store.close()


def stats(replica: KeelProcess) -> list[dict[str, Any]]:
    response = HTTP.get(f"{replica.url}/v1/stats/completions", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["data"]
    return rows


def served_once_written(replica: KeelProcess) -> list[object] | None:
    """The served counts, or None while keel says the figures would leave events out."""
    response = HTTP.get(f"{replica.url}/v1/stats/completions", headers=AUTH, timeout=10)
    if response.status_code == 503:
        assert "takes no writes now" in response.text, response.text
        return None
    assert response.status_code == 200, response.text
    return [row["served"] for row in response.json()["data"]]


def event(replica: KeelProcess, kind: str, completion_id: str) -> None:
    body = {"type": kind, "completion_id": completion_id, "choice_index": 0, "elapsed": 5}
    body["view_id"] = f"view-{completion_id}"
    response = HTTP.post(f"{replica.url}/v1/events", json=body, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text


def test_events_sent_to_both_replicas_make_one_acceptance_figure(
    tmp_path: Path, upstream: FakeUpstream, postgres_url: str
) -> None:
    config = replica_config(upstream, per_minute=6000, database_url=postgres_url)
    with replicas(tmp_path, config) as (a, b):
        first, second = (complete(r).json()["id"] for r in (a, b))
        event(b, "view", first)  # shown by the editor through the other replica
        event(a, "view", second)
        event(a, "select", first)
        event(b, "dismiss", second)
        expected = {"served": 2, "viewed": 2, "selected": 1, "dismissed": 1}
        for replica in (a, b):

            def complete_figure(replica: KeelProcess = replica) -> bool:
                rows = stats(replica)
                return len(rows) == 1 and all(rows[0][k] == v for k, v in expected.items())

            eventually(complete_figure)
            [row] = stats(replica)
            assert row["language"] == "python"
            assert row["acceptance_rate"] == 0.5


def test_a_postgres_outage_fails_no_completion_and_counts_dropped_events(
    tmp_path: Path, upstream: FakeUpstream, postgres_server: PostgresServer, postgres_url: str
) -> None:
    config = replica_config(upstream, per_minute=6000, database_url=postgres_url, max_buffered=3)
    with replicas(tmp_path, config, n=1) as (replica,):
        assert shared_state(replica)["events"] == {
            "store": "postgres",
            "up": True,
            "last_error": None,
            "buffered": 0,
            "dropped": 0,
        }
        postgres_server.stop()
        try:
            statuses = [complete(replica).status_code for _ in range(10)]
            assert statuses == [200] * 10, "no completion failed"
            eventually(lambda: metric(replica, "keel_state_store_up", store="postgres") == 0)
            dropped = metric(replica, "keel_events_dropped_total", reason="buffer_full")
            assert dropped == 7, "3 buffered, the rest dropped and counted"
            response = HTTP.get(f"{replica.url}/v1/stats/completions", headers=AUTH)
            assert response.status_code == 503
            assert "events database is unreachable" in response.json()["error"]["message"]
            assert shared_state(replica)["events"]["up"] is False
        finally:
            postgres_server.start()
        # a 503 until the events that waited are written: figures without them are wrong
        eventually(lambda: served_once_written(replica) == [3])
        assert metric(replica, "keel_state_store_up", store="postgres") == 1


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ({"events": {"database_url": "mysql://db/keel"}}, "mysql://db/keel"),
        ({"events": {"database_url": "sqlite:///"}}, "sqlite:///"),
        ({"state": {"redis_url": "http://redis:6379"}}, "http://redis:6379"),
    ],
)
def test_a_bad_store_url_is_a_config_error_naming_it(section: dict[str, Any], value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(section, source="config.toml")
    assert value in caught.value.message


def test_a_key_added_to_the_shared_keys_file_works_on_every_replica_within_seconds(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    keys = tmp_path / "shared" / "keys.toml"
    keys.parent.mkdir()
    keys.write_text(f"api_keys = [{json.dumps(KEY)}]\n")
    config = replica_config(upstream, per_minute=6000)
    config = config.replace("[auth]\n", f"[auth]\nkeys_file = {json.dumps(str(keys))}\n", 1)
    new = {"Authorization": "Bearer a-key-added-later"}
    with replicas(tmp_path, config) as pair:
        for replica in pair:
            assert HTTP.get(f"{replica.url}/v1/models", headers=new).status_code == 401
        keys.write_text(f'api_keys = [{json.dumps(KEY)}, "a-key-added-later"]\n')
        for replica in pair:  # each re-reads the file at most a second after it changes
            eventually(
                lambda r=replica: HTTP.get(f"{r.url}/v1/models", headers=new).status_code == 200,
                timeout=10,
            )


def keys_cli(config: Path, *args: str) -> str:
    """Run `keel keys ... --config CONFIG` as a person would; its stdout."""
    env = {**os.environ, "KEEL_ROOT": str(config.parent)}
    done = keel_cli("keys", "--config", str(config), *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def accepted(replica: KeelProcess, key: str) -> bool:
    headers = {"Authorization": f"Bearer {key}"}
    status = HTTP.get(f"{replica.url}/v1/models", headers=headers, timeout=10).status_code
    assert status in {200, 401}, status
    return status == 200


def on_every_replica(pair: list[KeelProcess], check: Callable[[KeelProcess], bool]) -> None:
    """``check`` holds on each replica within about a second (the CLI has returned)."""
    for replica in pair:
        eventually(functools.partial(check, replica), timeout=2.0)


def test_keys_managed_in_redis_apply_on_every_replica_within_a_second(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    config = replica_config(upstream, per_minute=6000, redis_url=redis_server.url)
    with replicas(tmp_path, config) as pair:
        config_file = pair[0].root / "config.toml"
        alice = keys_cli(config_file, "add", "--name", "alice").strip()
        on_every_replica(pair, lambda r: accepted(r, alice))
        bob = keys_cli(config_file, "add", "--name", "bob").strip()
        listing = keys_cli(config_file, "list")
        assert key_id(alice) in listing and "bob" in listing and alice not in listing
        keys_cli(config_file, "revoke", "alice")
        on_every_replica(pair, lambda r: not accepted(r, alice))
        on_every_replica(pair, lambda r: accepted(r, bob))

        redis_server.kill()
        on_every_replica(pair, lambda r: shared_state(r)["keys"]["up"] is False)
        for replica in pair:
            assert accepted(replica, bob), "the keys read last stay in force"
            assert accepted(replica, KEY), "and so do the config's"
            assert not accepted(replica, alice), "nothing opens"
            assert shared_state(replica)["keys"]["keys"] == "last_read"
            assert metric(replica, "keel_state_store_up", store="redis") == 0
            assert "keys last read from Redis stay in force" in replica.log.read_text()

        redis_server.start()  # same port, empty (no persistence here): bob is gone with it
        carol = keys_cli(config_file, "add", "--name", "carol").strip()
        on_every_replica(pair, lambda r: accepted(r, carol))
        for replica in pair:
            assert shared_state(replica)["keys"]["keys"] == "current"
            assert metric(replica, "keel_state_store_up", store="redis") == 1
            audit = (replica.root / "audit.log").read_text()
            assert key_id(alice) in audit and "keys_reload" in audit
