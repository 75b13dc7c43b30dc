"""Completion events, kept durably in SQLite (WAL) under the data root.

Two kinds of rows share one table: ``completion`` rows written when keel
serves a completion, and the editor's ``view`` / ``select`` / ``dismiss``
events from ``POST /v1/events``. Together they make the acceptance rate one
query away. Writes run in a thread so the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
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
"""


class EventStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _insert(self, row: dict[str, object]) -> None:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._db.execute(f"INSERT INTO events ({columns}) VALUES ({marks})", list(row.values()))

    async def record(
        self,
        kind: str,
        *,
        completion_id: str | None = None,
        choice_index: int | None = None,
        view_id: str | None = None,
        elapsed: int | None = None,
        select_kind: str | None = None,
        language: str | None = None,
        data: dict[str, object] | None = None,
    ) -> None:
        row: dict[str, object] = {
            "ts": time.time(),
            "kind": kind,
            "completion_id": completion_id,
            "choice_index": choice_index,
            "view_id": view_id,
            "elapsed": elapsed,
            "select_kind": select_kind,
            "language": language,
            "data": json.dumps(data) if data is not None else None,
        }
        await asyncio.to_thread(self._insert, row)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall()
        return {str(kind): int(count) for kind, count in rows}

    def _language_of(self, completion_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT language FROM events WHERE completion_id = ? AND kind = 'completion' "
                "ORDER BY id DESC LIMIT 1",
                (completion_id,),
            ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    async def language_of(self, completion_id: str | None) -> str | None:
        """The language of the completion keel served as ``completion_id``, if it did."""
        if not completion_id:
            return None
        return await asyncio.to_thread(self._language_of, completion_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
