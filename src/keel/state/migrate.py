"""Versioned schema migrations: numbered SQL scripts, each applied once, in order.

A database records the versions it has in ``keel_schema_migrations``; on
open, keel applies the ones it lacks, each step together with its version
row (SQLite: one transaction per step; Postgres: one for the whole run), so
a crash mid-way never leaves half a step. On Postgres, replicas starting
together take an advisory lock first, so one of them migrates and the
others find the work done. Migrations only add
(tables, columns, indexes): a replica still on the previous release keeps
working against a schema one step ahead of it during a rolling upgrade.

A version row is not taken on trust: each migration names the tables and
indexes it makes (:attr:`Migration.creates`), and one whose objects are gone
(a table dropped by hand, a partial restore) is applied again. Every step is
written to be run again safely (``IF NOT EXISTS``), so re-applying one, or
adopting objects made before their version row, never fails on what is there.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

MIGRATIONS_TABLE = "keel_schema_migrations"
ADVISORY_LOCK = 0x6B65656C  # "keel": one lock id for every keel sharing a database


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    creates: tuple[str, ...] = ()
    """The tables and indexes it makes: if one is missing, the step is applied again."""


SQLITE: tuple[Migration, ...] = (
    Migration(
        1,
        "events",
        """
        CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            completion_id TEXT,
            choice_index INTEGER,
            view_id TEXT,
            elapsed INTEGER,
            select_kind TEXT,
            language TEXT,
            data TEXT
        );
        CREATE INDEX IF NOT EXISTS events_completion ON events (completion_id);
        """,
        ("events", "events_completion"),
    ),
    Migration(
        2, "events_ts", "CREATE INDEX IF NOT EXISTS events_ts ON events (ts);", ("events_ts",)
    ),
)
"""Version 1 is the schema keel had before migrations (IF NOT EXISTS: adopted as it is)."""

POSTGRES: tuple[Migration, ...] = (
    Migration(
        1,
        "events",
        """
        CREATE TABLE IF NOT EXISTS keel_events (
            id BIGSERIAL PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            completion_id TEXT,
            choice_index BIGINT,
            view_id TEXT,
            elapsed BIGINT,
            select_kind TEXT,
            language TEXT,
            data JSONB
        );
        CREATE INDEX IF NOT EXISTS keel_events_completion ON keel_events (completion_id);
        CREATE INDEX IF NOT EXISTS keel_events_kind_ts ON keel_events (kind, ts);
        """,
        ("keel_events", "keel_events_completion", "keel_events_kind_ts"),
    ),
    Migration(
        2,
        "events_ts",
        "CREATE INDEX IF NOT EXISTS keel_events_ts ON keel_events (ts);",
        ("keel_events_ts",),
    ),
    Migration(
        3,
        "event_key",
        """
        ALTER TABLE keel_events ADD COLUMN IF NOT EXISTS event_key UUID;
        CREATE UNIQUE INDEX IF NOT EXISTS keel_events_event_key ON keel_events (event_key)
            WHERE event_key IS NOT NULL;
        """,
        ("keel_events_event_key",),
    ),
)
"""Version 2 serves ``[events] retention_days``: deleting by age without a full scan.
Version 3 gives each event a key of its own, so a batch written again after a commit whose
answer never came (the connection lost mid-``COMMIT``) stores nothing twice. Rows from
before it, and from a replica still on the release before, have none; the index is
partial, so making it reads the table once and sorts nothing."""


def check_order(migrations: tuple[Migration, ...]) -> None:
    """Versions run 1, 2, 3, ... with no gap or repeat (a test calls this on each list)."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..n in order, got {versions}")


_CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)


def migrate_sqlite(db: sqlite3.Connection, migrations: tuple[Migration, ...] = SQLITE) -> list[int]:
    """Apply what ``db`` lacks; returns the versions applied now. ``db`` is in autocommit
    mode (``isolation_level=None``), so each step is its own explicit transaction."""
    db.execute(_CREATE_TABLE)
    applied = {row[0] for row in db.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")}
    present = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    done = []
    for migration in migrations:
        if migration.version in applied and present.issuperset(migration.creates):
            continue
        db.executescript(
            f"BEGIN IMMEDIATE;\n{migration.sql}\n"
            f"INSERT OR IGNORE INTO {MIGRATIONS_TABLE} VALUES "
            f"({int(migration.version)}, '{migration.name}', datetime('now'));\nCOMMIT;"
        )
        present.update(migration.creates)
        done.append(migration.version)
    return done


def migrate_postgres(
    connection: psycopg.Connection[tuple[object, ...]],
    migrations: tuple[Migration, ...] = POSTGRES,
) -> list[int]:
    """Apply what the database lacks, under an advisory lock; returns the versions applied.

    A version is lacking if its row is missing or any object it made is (a
    ``keel_events`` dropped by hand was never made again, even by a restart: events
    piled up and were dropped, the store shown "unreachable")."""
    done = []
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
        connection.execute(_CREATE_TABLE)
        applied = {row[0] for row in connection.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")}
        for migration in migrations:
            if migration.version in applied and _present(connection, migration.creates):
                continue
            with connection.transaction():
                connection.execute(migration.sql)
                connection.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} VALUES (%s, %s, now()::text) "
                    "ON CONFLICT (version) DO NOTHING",
                    (migration.version, migration.name),
                )
            done.append(migration.version)
    return done


def _present(connection: psycopg.Connection[tuple[object, ...]], names: tuple[str, ...]) -> bool:
    """Whether every relation (table, index) in ``names`` exists, as the search path sees it."""
    if not names:
        return True
    row = connection.execute(
        "SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest(%s::text[]) AS name",
        (list(names),),
    ).fetchone()
    return bool(row and row[0])
