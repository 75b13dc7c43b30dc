"""A schema whose tables went missing behind keel's back is made whole again: at start
(the bookkeeping rows are not taken on trust) and while running (the writer finds the
table gone and reconnects, which migrates), against a real PostgreSQL."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import psycopg
import pytest

from keel.events import SqliteEventStore
from keel.state.migrate import MIGRATIONS_TABLE, migrate_postgres
from keel.state.postgres_events import PostgresEventStore
from tests.state.servers import wait_until


def relations(url: str) -> set[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE 'keel_events%%'"
        ).fetchall()
    return {str(row[0]) for row in rows}


def test_a_dropped_events_table_is_made_again_at_start(postgres_url: str) -> None:
    """It was never made again, not even by a restart: keel_schema_migrations said
    version 2, and every write failed with 'relation "keel_events" does not exist'."""
    with psycopg.connect(postgres_url) as connection:
        assert migrate_postgres(connection) == [1, 2, 3]
        connection.execute("DROP TABLE keel_events")
        connection.commit()
        assert migrate_postgres(connection) == [1, 2, 3]
        assert migrate_postgres(connection) == []
        versions = connection.execute(f"SELECT version FROM {MIGRATIONS_TABLE}").fetchall()
    assert versions == [(1,), (2,), (3,)]
    assert relations(postgres_url) == {
        "keel_events",
        "keel_events_id_seq",
        "keel_events_pkey",
        "keel_events_completion",
        "keel_events_kind_ts",
        "keel_events_ts",
        "keel_events_event_key",
    }


def test_a_dropped_index_alone_is_made_again(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as connection:
        migrate_postgres(connection)
        connection.execute("INSERT INTO keel_events (ts, kind) VALUES (1, 'view')")
        connection.execute("DROP INDEX keel_events_ts")
        connection.commit()
        assert migrate_postgres(connection) == [2]
        count = connection.execute("SELECT COUNT(*) FROM keel_events").fetchone()
    assert count == (1,)  # the rows are kept: only what is missing is made
    assert "keel_events_ts" in relations(postgres_url)


def test_tables_without_their_version_rows_are_adopted(postgres_url: str) -> None:
    """keel_schema_migrations emptied (or dropped) with the events table still there:
    version 1 ran again and failed on the existing table, so the store never came up."""
    with psycopg.connect(postgres_url) as connection:
        migrate_postgres(connection)
        connection.execute("INSERT INTO keel_events (ts, kind) VALUES (1, 'view')")
        connection.execute(f"DROP TABLE {MIGRATIONS_TABLE}")
        connection.commit()
        assert migrate_postgres(connection) == [1, 2, 3]
        count = connection.execute("SELECT COUNT(*) FROM keel_events").fetchone()
    assert count == (1,)


async def test_a_table_dropped_while_running_is_made_again_and_no_event_is_lost(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At run time the writer reported the store "unreachable" and kept the events
    until they were dropped; now it reconnects at once, which makes the table again."""
    store = PostgresEventStore(postgres_url, flush_seconds=0.05)
    try:
        wait_until(lambda: store.up is True)
        await store.record("completion", completion_id="cmpl-before", language="go")
        wait_until(lambda: store.status()["buffered"] == 0)
        with psycopg.connect(postgres_url) as connection:
            connection.execute("DROP TABLE keel_events")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="keel.events"):
            for n in range(5):
                await store.record("view", completion_id=f"cmpl-{n}", choice_index=0)
            wait_until(lambda: store.status()["buffered"] == 0)
        assert store.counts() == {"view": 5}
        status = store.status()
        assert status["up"] is True
        assert status["dropped"] == 0
        assert status["last_error"] is None
        assert "unreachable" not in caplog.text
        assert "the events table is missing" in caplog.text
    finally:
        store.close()


def test_a_dropped_sqlite_events_table_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    SqliteEventStore(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE events")
    db.commit()
    db.close()
    store = SqliteEventStore(path)
    assert store.counts() == {}
    store.close()
