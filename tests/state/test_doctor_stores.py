"""``keel doctor`` reaches each configured shared store and is let in: a store that
refuses keel's credentials fails it (never the password in the finding); one that does
not answer is a warning, as keel starts and serves without it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from keel.config import Settings
from keel.errors import Unavailable
from keel.ops.doctor import DoctorOptions, Report, check_stores, run_checks
from keel.state.postgres_events import PostgresEventStore
from keel.state.shared_limits import RedisState
from tests.ports import free_port
from tests.state.servers import PostgresServer, RedisServer

PASSWORD_USER = "keel_doctor_pw"


def stores(settings: dict[str, object]) -> Report:
    report = Report()
    check_stores(report, Settings.model_validate(settings), 3.0)
    return report


def finding(report: Report, name: str) -> tuple[str, str]:
    found = [check for check in report.checks if check.name == name]
    assert len(found) == 1, report.checks
    return found[0].status, found[0].detail


@pytest.fixture
def redis_with_password(redis_server: RedisServer) -> Iterator[RedisServer]:
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("requirepass", "right-Secret")
    client.close()
    yield redis_server


def with_password(url: str, password: str) -> str:
    return url.replace("redis://", f"redis://:{password}@").replace(
        "postgresql://keel@", f"postgresql://{PASSWORD_USER}:{password}@"
    )


def test_doctor_fails_on_a_redis_that_refuses_keels_password(
    redis_with_password: RedisServer, tmp_path: Path
) -> None:
    url = with_password(redis_with_password.url, "wrong-Secret")
    (tmp_path / "config.toml").write_text(f'[state]\nredis_url = "{url}"\n')
    report = run_checks(
        DoctorOptions(port=free_port(), library_timeout=60), environ={"KEEL_ROOT": str(tmp_path)}
    )
    status, detail = finding(report, "redis")
    assert status == "FAIL", detail
    assert "invalid username-password pair" in detail, detail
    assert "wrong-Secret" not in detail and "***" in detail
    assert report.exit_code != 0

    right = with_password(redis_with_password.url, "right-Secret")
    assert finding(stores({"state": {"redis_url": right}}), "redis")[0] == "ok"
    no_password = stores({"state": {"redis_url": redis_with_password.url}})
    assert finding(no_password, "redis")[0] == "FAIL", "NOAUTH: a password is needed"


def test_an_unreachable_redis_is_a_warning_not_a_failure(redis_server: RedisServer) -> None:
    redis_server.kill()
    report = stores({"state": {"redis_url": redis_server.url}})
    status, detail = finding(report, "redis")
    assert status == "warn" and "unreachable" in detail and "keel starts anyway" in detail
    assert report.exit_code == 0


@pytest.mark.parametrize(
    ("refuse", "allow", "status", "said"),
    [
        (
            [
                ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
                ("CONFIG", "SET", "maxmemory", "1"),
            ],
            [("CONFIG", "SET", "maxmemory", "0")],
            "warn",
            "refuses the rate-limit script (command not allowed when used memory",
        ),
        (
            [("ACL", "SETUSER", "default", "-@scripting")],
            [("ACL", "SETUSER", "default", "+@all")],
            "FAIL",
            "refuses the rate-limit script (this user has no permissions to run the 'evalsha'",
        ),
        (
            [("ACL", "SETUSER", "default", "resetchannels")],
            [("ACL", "SETUSER", "default", "allchannels")],
            "FAIL",
            "refuses the keys' change channel keel:keys:changed (this user has no permissions",
        ),
    ],
    ids=["full", "acl_without_scripts", "acl_without_the_channel"],
)
def test_doctor_runs_what_keel_does_in_redis_not_just_ping(
    redis_server: RedisServer,
    refuse: list[tuple[str, ...]],
    allow: list[tuple[str, ...]],
    status: str,
    said: str,
) -> None:
    """A Redis that answers PING but refuses the limit script or the keys' channel
    passed doctor as "ok"; keel then ran with limits per replica or keys never
    updated, said only in a log line. An ACL's refusal does not heal: a failure."""
    settings = {"state": {"redis_url": redis_server.url}}
    assert finding(stores(settings), "redis")[0] == "ok"
    client = redis.Redis.from_url(redis_server.url)
    try:
        for command in refuse:
            client.execute_command(*command)
        report = stores(settings)
        found, detail = finding(report, "redis")
        assert (found, report.exit_code != 0) == (status, status == "FAIL"), detail
        assert said.lower() in detail.lower(), detail
        assert "until it allows it" in detail, detail
        assert ("raise maxmemory" in detail) == (status == "warn"), detail
    finally:
        for command in allow:
            client.execute_command(*command)
        client.close()
    assert finding(stores(settings), "redis")[0] == "ok"


@contextlib.contextmanager
def password_role(server: PostgresServer) -> Iterator[None]:
    """A role that must give its password (the test cluster trusts everyone else)."""
    with psycopg.connect(server.url(), autocommit=True) as connection:
        connection.execute(f"DROP ROLE IF EXISTS {PASSWORD_USER}")
        connection.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD 'right-Secret'")
        hba = server.data / "pg_hba.conf"
        before = hba.read_text()
        hba.write_text(f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n{before}")
        connection.execute("SELECT pg_reload_conf()")
        try:
            yield
        finally:
            hba.write_text(before)
            connection.execute("SELECT pg_reload_conf()")


def test_doctor_fails_on_a_postgres_that_refuses_keel(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    with password_role(postgres_server):
        url = with_password(postgres_server.url(), "wrong-Secret")
        (tmp_path / "config.toml").write_text(f'[events]\ndatabase_url = "{url}"\n')
        report = run_checks(
            DoctorOptions(port=free_port(), library_timeout=60),
            environ={"KEEL_ROOT": str(tmp_path)},
        )
        status, detail = finding(report, "postgres")
        assert status == "FAIL", detail
        assert "password authentication failed" in detail, detail
        assert "wrong-Secret" not in detail and "***" in detail
        assert report.exit_code != 0

        right = with_password(postgres_server.url(), "right-Secret")
        status, detail = finding(stores({"events": {"database_url": right}}), "postgres")
        assert status == "ok", detail
    missing = postgres_server.url("keel_no_such_database")
    status, detail = finding(stores({"events": {"database_url": missing}}), "postgres")
    assert status == "FAIL" and "does not exist" in detail, detail
    tls = postgres_server.url() + "?sslmode=require"  # the test server has no TLS
    status, detail = finding(stores({"events": {"database_url": tls}}), "postgres")
    assert status == "FAIL" and "SSL" in detail, detail


def test_an_unreachable_postgres_is_a_warning_not_a_failure() -> None:
    url = f"postgresql://keel:pw@127.0.0.1:{free_port()}/keel"  # nothing listens there
    report = stores({"events": {"database_url": url}})
    status, detail = finding(report, "postgres")
    assert status == "warn" and "unreachable" in detail, detail
    assert report.exit_code == 0


def test_no_store_configured_is_no_finding() -> None:
    assert stores({}).checks == []


async def test_serve_names_a_redis_that_turns_keel_away_not_an_unreachable_one(
    redis_with_password: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password (redis-py files it under ConnectionError) or a database Redis
    does not have was logged as "Redis unreachable": a config mistake told as a network
    one, while keys added with `keel keys` were 401s on that replica."""
    caplog.set_level(logging.WARNING, "keel.state")
    base = redis_with_password.url.rsplit("/", 1)[0]
    for url in (
        with_password(redis_with_password.url, "wrong-Secret"),
        with_password(f"{base}/99", "right-Secret"),
    ):
        caplog.clear()
        state = RedisState(url, timeout=2.0)
        await state.ping()
        assert state.status()["up"] is False
        assert "Redis refuses keel's connection" in caplog.text, caplog.text
        assert "unreachable" not in caplog.text and "Secret" not in caplog.text, caplog.text
        await state.aclose()


def test_a_postgres_url_that_can_never_work_is_said_so(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An option libpq refuses (sslmode=bogus) was a warning, "unreachable", from doctor
    (exit 0), and serve buffered events for its whole life as if the database were down;
    a wrong password at serve was "unreachable" too, and the figures' 503 said they
    "return when it does"."""
    bogus = postgres_server.url() + "?sslmode=bogus"
    status, detail = finding(stores({"events": {"database_url": bogus}}), "postgres")
    assert status == "FAIL" and "fix [events] database_url" in detail, detail
    caplog.set_level(logging.WARNING, "keel.state")
    with password_role(postgres_server):
        wrong = with_password(postgres_server.url(), "wrong-Secret")
        store = PostgresEventStore(wrong, flush_seconds=0.05)
        try:
            with pytest.raises(Unavailable) as caught:
                store.acceptance(0, 1)
            assert "refuses keel: fix [events] database_url" in caught.value.message
            assert "refuses keel" in caplog.text and "unreachable" not in caplog.text
            assert "wrong-Secret" not in caplog.text + caught.value.message
        finally:
            store.close(timeout=1.0)
