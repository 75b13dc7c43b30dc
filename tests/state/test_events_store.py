"""Completion events in a real PostgreSQL shared by two stores, and versioned migrations."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from keel.errors import Unavailable
from keel.events import DAY, EventRetention, EventStore, SqliteEventStore
from keel.ops.metrics import Metrics
from keel.state import postgres_events
from keel.state.migrate import MIGRATIONS_TABLE, POSTGRES, SQLITE, check_order, migrate_postgres
from keel.state.postgres_events import PostgresEventStore, redact
from tests.state.servers import CommitAnswerLost, PostgresServer, wait_until


def test_migration_lists_are_numbered_in_order() -> None:
    check_order(SQLITE)
    check_order(POSTGRES)
    with pytest.raises(ValueError, match="1..n"):
        check_order((POSTGRES[0], POSTGRES[0]))


def test_an_events_file_from_before_migrations_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(SQLITE[0].sql)
    old.execute("INSERT INTO events (ts, kind, completion_id) VALUES (1, 'view', 'cmpl-old')")
    old.commit()
    old.close()
    store = SqliteEventStore(path)
    assert store.counts() == {"view": 1}
    store.close()
    db = sqlite3.connect(path)
    assert db.execute(f"SELECT version FROM {MIGRATIONS_TABLE}").fetchall() == [(1,), (2,)]
    db.close()


def test_postgres_migrations_apply_once(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as first, psycopg.connect(postgres_url) as second:
        assert migrate_postgres(first) == [1, 2, 3]
        assert migrate_postgres(second) == []
        versions = first.execute(f"SELECT version, name FROM {MIGRATIONS_TABLE}").fetchall()
    assert versions == [(1, "events"), (2, "events_ts"), (3, "event_key")]


def test_the_password_never_leaves_in_a_log() -> None:
    assert redact("postgresql://keel:s3cret@db:5432/keel") == "postgresql://keel:***@db:5432/keel"
    assert redact("postgresql://db/keel") == "postgresql://db/keel"


async def serve_and_select(store: PostgresEventStore, completion_id: str, language: str) -> None:
    data: dict[str, object] = {"provider": "fake"}
    await store.record("completion", completion_id=completion_id, language=language, data=data)
    await store.record("view", completion_id=completion_id, choice_index=0)


async def test_two_replicas_write_one_acceptance_figure(postgres_url: str) -> None:
    replicas = [PostgresEventStore(postgres_url, flush_seconds=0.05) for _ in range(2)]
    a, b = replicas
    await serve_and_select(a, "cmpl-a", "python")
    await serve_and_select(b, "cmpl-b", "python")
    await b.record("select", completion_id="cmpl-a", choice_index=0)  # selected on the other
    wait_until(lambda: sum(a.counts().values()) == 5)
    now = time.time()
    for store in replicas:
        [row] = await asyncio.to_thread(store.acceptance, now - 60, now + 60)
        assert row == {
            "language": "python",
            "provider": "fake",
            "served": 2,
            "viewed": 2,
            "selected": 1,
            "dismissed": 0,
            "acceptance_rate": 0.5,
        }
    assert await b.language_of("cmpl-a") == "python", "read from the shared database"
    assert await a.language_of("cmpl-a") == "python", "remembered locally"
    for store in replicas:
        store.close()


async def test_an_outage_drops_and_counts_events_and_never_raises(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    metrics = Metrics()
    store = PostgresEventStore(postgres_url, metrics=metrics, max_buffered=3, flush_seconds=0.05)
    wait_until(lambda: store.up is True)
    postgres_server.stop()
    try:
        for i in range(5):
            await store.record("completion", completion_id=f"cmpl-{i}", language="go")
        wait_until(lambda: store.up is False)
        assert metrics.registry.get_sample_value(
            "keel_events_dropped_total", {"reason": "buffer_full"}
        ) == pytest.approx(2)
        assert metrics.registry.get_sample_value("keel_state_store_up", {"store": "postgres"}) == 0
        with pytest.raises(Unavailable):
            store.acceptance(0, time.time())
        assert await store.language_of("cmpl-unknown") is None
        assert store.status()["up"] is False
    finally:
        postgres_server.start()
    wait_until(lambda: store.up is True and store.status()["buffered"] == 0)
    assert store.counts() == {"completion": 3}, "the buffered events were written"
    assert metrics.registry.get_sample_value("keel_state_store_up", {"store": "postgres"}) == 1
    store.close()


async def test_a_database_down_at_startup_delays_nothing(postgres_server: PostgresServer) -> None:
    url = postgres_server.url("no_such_database")
    store = PostgresEventStore(url, max_buffered=10)
    await store.record("completion", completion_id="cmpl-x")
    wait_until(lambda: store.up is False)
    assert store.last_error
    store.close(timeout=1.0)
    assert store.dropped == 1


def insert_aged(url: str, ages_in_days: list[float]) -> None:
    """Rows written ``age`` days ago, straight into the table."""
    now = time.time()
    with psycopg.connect(url) as connection:
        for n, age in enumerate(ages_in_days):
            connection.execute(
                "INSERT INTO keel_events (ts, kind, completion_id) VALUES (%s, 'completion', %s)",
                (now - age * DAY, f"cmpl-{n}"),
            )


def insert_aged_sqlite(path: Path, ages_in_days: list[float]) -> None:
    now = time.time()
    db = sqlite3.connect(path)
    for n, age in enumerate(ages_in_days):
        db.execute(
            "INSERT INTO events (ts, kind, completion_id) VALUES (?, 'view', ?)",
            (now - age * DAY, f"cmpl-{n}"),
        )
    db.commit()
    db.close()


async def prune_and_count(store: EventStore, metrics: Metrics) -> tuple[int, dict[str, int]]:
    retention = EventRetention(store, 90, metrics)
    deleted = await retention.prune_once()
    assert metrics.registry.get_sample_value("keel_events_pruned_total") == deleted
    return deleted, store.counts()


async def test_retention_deletes_old_postgres_events_and_keeps_recent_ones(
    postgres_url: str,
) -> None:
    store = PostgresEventStore(postgres_url)
    wait_until(lambda: store.up is True)
    insert_aged(postgres_url, [400, 91, 89, 0])
    deleted, counts = await prune_and_count(store, Metrics())
    assert (deleted, counts) == (2, {"completion": 2})
    with psycopg.connect(postgres_url) as connection:
        left = connection.execute("SELECT completion_id FROM keel_events ORDER BY id").fetchall()
    assert left == [("cmpl-2",), ("cmpl-3",)]
    assert await EventRetention(store, 90).prune_once() == 0, "a second run finds nothing"
    store.close()


async def test_retention_deletes_old_sqlite_events_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    SqliteEventStore(path).close()  # create and migrate
    insert_aged_sqlite(path, [100.0] * 12_000 + [1.0] * 3)  # more than two batches
    store = SqliteEventStore(path)
    deleted, counts = await prune_and_count(store, Metrics())
    assert (deleted, counts) == (12_000, {"view": 3})
    store.close()


async def test_retention_with_postgres_down_skips_a_turn_and_never_raises(
    postgres_server: PostgresServer,
) -> None:
    store = PostgresEventStore(postgres_server.url("no_such_database"))
    assert await EventRetention(store, 30).prune_once() == 0
    store.close(timeout=1.0)


async def test_a_read_after_a_database_restart_works_and_says_it_is_up(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """The reader's kept connection dies with a restart: the first read after it is
    served on a new one (it was a 503), and a replica that only reads shows the
    database up again (it stayed "down", a false KeelSharedStoreDown)."""
    metrics = Metrics()
    store = PostgresEventStore(postgres_url, metrics=metrics, flush_seconds=0.05)
    wait_until(lambda: store.up is True)
    store.acceptance(0, time.time())  # the reader's connection is made and kept
    postgres_server.stop()
    try:
        with pytest.raises(Unavailable):
            store.acceptance(0, time.time())
        assert store.up is False
    finally:
        postgres_server.start()
    store.acceptance(0, time.time())  # no write in between: the read alone says so
    assert store.up is True
    assert metrics.registry.get_sample_value("keel_state_store_up", {"store": "postgres"}) == 1
    store.acceptance(0, time.time())
    postgres_server.stop()
    postgres_server.start()
    store.acceptance(0, time.time())  # the kept connection ended; replaced within the call
    store.close()


def cluster_pids(server: PostgresServer) -> list[int]:
    """The postmaster and every process it started."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


async def test_a_database_that_stops_answering_is_down_and_holds_nothing(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database host frozen (its processes stopped, not gone: connections open, no
    answer): reads, editor events and shutdown waited for minutes, with the store shown
    up (KeelSharedStoreDown could not fire). Each wait is bounded now, and says so."""
    monkeypatch.setattr(postgres_events, "STATEMENT_SECONDS", 1.0)
    metrics = Metrics()
    store = PostgresEventStore(postgres_url, metrics=metrics, flush_seconds=0.05)
    wait_until(lambda: store.up is True)
    store.acceptance(0, time.time())  # the reader's connection is made and kept
    frozen = cluster_pids(postgres_server)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.acceptance(0, time.time())
        assert time.monotonic() - started < 8
        assert store.up is False
        assert metrics.registry.get_sample_value("keel_state_store_up", {"store": "postgres"}) == 0
        await store.record("completion", completion_id="cmpl-frozen", language="go")
        started = time.monotonic()
        store.close(timeout=1.0)
        assert time.monotonic() - started < 5, "shutdown waited on the frozen database"
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


async def test_an_event_with_a_nul_loses_nothing(postgres_url: str) -> None:
    """PostgreSQL refuses NUL in text: one editor event with it lost the 20 written in
    its batch, and a read of it called the database unreachable."""
    store = PostgresEventStore(postgres_url, flush_seconds=5.0, batch_rows=1000)
    wait_until(lambda: store.up is True)
    for i in range(20):
        await store.record("view", completion_id=f"cmpl-{i}", choice_index=0)
    await store.record("view", completion_id="cmpl-\x00", choice_index=0)
    store._wake.set()  # the batch now, not in 5 s
    wait_until(lambda: store.status()["buffered"] == 0)
    assert store.counts() == {"view": 21} and store.dropped == 0
    assert await store.language_of("cmpl-\x00") is None
    assert store.up is True
    store.close()


async def test_a_read_only_database_keeps_the_events_until_it_takes_them(
    postgres_url: str,
) -> None:
    """A database back read-only (a demoted primary, a standby after a failover) is not
    one that refuses the rows: they wait, as while it is down. They were dropped."""
    server, database = postgres_url.rsplit("/", 1)
    metrics = Metrics()
    store = PostgresEventStore(postgres_url, metrics=metrics, flush_seconds=0.05)
    wait_until(lambda: store.up is True)

    def read_only(on: bool) -> None:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            value = "on" if on else "off"
            admin.execute(
                f'ALTER DATABASE "{database}" SET default_transaction_read_only = {value}'
            )
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )

    read_only(True)
    try:
        for i in range(3):
            await store.record("completion", completion_id=f"cmpl-ro-{i}", language="go")
        wait_until(lambda: store.up is False)
        await asyncio.sleep(3 * postgres_events.RETRY_SECONDS)  # the writer tries, read-only
        assert store.dropped == 0 and store.status()["buffered"] == 3
    finally:
        read_only(False)
    wait_until(lambda: store.status()["buffered"] == 0 and store.up is True)
    assert store.counts() == {"completion": 3} and store.dropped == 0
    store.close()


FULL_DISK = """
import asyncio, resource, sys
from pathlib import Path
from keel.events import SqliteEventStore
from keel.ops.metrics import Metrics

async def main() -> None:
    metrics = Metrics()
    store = SqliteEventStore(Path(sys.argv[1]), metrics=metrics)
    await store.record("completion", completion_id="cmpl-before", language="python")
    # From here no file of this process may grow past 256 KiB, as on a disk that is full
    # (CPython ignores SIGXFSZ: the write fails with EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
    for n in range(400):
        await store.record("completion", completion_id=f"cmpl-{n}", data={"pad": "x" * 4000})
    dropped = metrics.registry.get_sample_value(
        "keel_events_dropped_total", {"reason": "write_failed"}
    )
    print(store.dropped, int(dropped), store.status()["up"])

asyncio.run(main())
"""


def test_an_events_file_that_cannot_grow_drops_events_and_never_fails_a_request(
    tmp_path: Path,
) -> None:
    """A full disk made every Tabby completion and ``/infill`` a 500 (the event of the
    answer could not be written). The event is dropped, counted and shown instead."""
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "events.sqlite3")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dropped, counted, up = done.stdout.split()
    assert int(dropped) > 0 and int(counted) == int(dropped), done.stdout
    assert up == "False"
    assert "events not stored" in done.stderr


async def test_a_write_lock_holds_no_more_connections_and_no_figures_are_given_meanwhile(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock on the table (a ``CREATE INDEX``'s SHARE, a ``VACUUM FULL``) blocks the
    inserts and lets reads through. keel gave up on each insert by shutting its socket,
    which the waiting backend never noticed: every retry's new connection waited beside
    it, until the server refused other applications. And the figures read meanwhile left
    out every event waiting in memory, answered 200. The server now ends the statement
    itself, and the figures are a 503 until the events are written."""
    monkeypatch.setattr(postgres_events, "STATEMENT_SECONDS", 1.0)
    server, database = postgres_url.rsplit("/", 1)
    store = PostgresEventStore(postgres_url, flush_seconds=0.05)
    wait_until(lambda: store.up is True)
    store.acceptance(0, time.time())  # the reader's connection is made and kept

    def backends(admin: psycopg.Connection[tuple[object, ...]]) -> int:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
        assert row is not None
        return int(str(row[0]))

    with (
        psycopg.connect(postgres_url, autocommit=True) as admin,
        psycopg.connect(postgres_url) as locker,
    ):
        locker.execute("LOCK TABLE keel_events IN SHARE MODE")
        try:
            await store.record("completion", completion_id="cmpl-locked", language="go")
            wait_until(lambda: store.up is False)
            counts = []
            for _ in range(6):  # six retries' worth (RETRY_SECONDS + a 0.9 s bound)
                await asyncio.sleep(1.0)
                counts.append(backends(admin) - 1)  # the locker's own
            assert max(counts) <= 2, f"keel's backends, a second apart: {counts}"
            with pytest.raises(Unavailable, match="takes no writes"):
                store.acceptance(0, time.time())
        finally:
            locker.rollback()
    wait_until(lambda: store.status()["buffered"] == 0 and store.up is True)
    assert store.counts() == {"completion": 1}
    assert [row["served"] for row in store.acceptance(0, time.time())] == [1]
    store.close()


async def test_a_batch_whose_commit_answer_was_lost_is_not_stored_twice(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection lost after the server took a ``COMMIT`` and before its answer
    came: keel cannot know the batch was stored, and writes it again. Each row was then
    stored twice (acceptance counts distinct ids and stayed right; anyone counting rows
    did not); each event now carries a key, and the rows already there are skipped."""
    monkeypatch.setattr(postgres_events, "STATEMENT_SECONDS", 1.0)
    relay = CommitAnswerLost(postgres_server.port)
    store = PostgresEventStore(
        postgres_url.replace(f":{postgres_server.port}/", f":{relay.port}/"), flush_seconds=0.05
    )
    try:
        wait_until(lambda: store.up is True)
        relay.arm()
        for n in range(3):
            await store.record("completion", completion_id=f"cmpl-lost-{n}", language="go")
        wait_until(lambda: store.up is False)  # no answer within the second
        assert relay.lost > 0
        wait_until(lambda: store.status()["buffered"] == 0 and store.up is True)
    finally:
        store.close()
        relay.close()
    with psycopg.connect(postgres_url) as check:
        rows = check.execute(
            "SELECT completion_id, count(*) FROM keel_events GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert rows == [(f"cmpl-lost-{n}", 1) for n in range(3)]
