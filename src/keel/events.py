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
    """``max_rows`` bounds the table: past it, the oldest rows go (checked every
    ``prune_every`` inserts, so the cost is amortised)."""

    def __init__(self, path: Path, *, max_rows: int = 1_000_000, prune_every: int = 1000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self.prune_every = prune_every
        self._inserts = 0
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
            self._inserts += 1
            if self._inserts % self.prune_every == 0:
                self._db.execute(
                    "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                    (self.max_rows,),
                )

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

    def acceptance(self, since: float, until: float) -> list[dict[str, object]]:
        """Served, viewed, selected and dismissed completions by language and provider,
        for completions served in [since, until]; rate = selected / viewed."""
        query = """
            SELECT c.language, json_extract(c.data, '$.provider') AS provider,
                   COUNT(DISTINCT c.completion_id),
                   COUNT(DISTINCT CASE WHEN e.kind = 'view' THEN e.completion_id END),
                   COUNT(DISTINCT CASE WHEN e.kind = 'select' THEN e.completion_id END),
                   COUNT(DISTINCT CASE WHEN e.kind = 'dismiss' THEN e.completion_id END)
            FROM events c
            LEFT JOIN events e ON e.completion_id = c.completion_id AND e.kind != 'completion'
            WHERE c.kind = 'completion' AND c.ts BETWEEN ? AND ?
            GROUP BY 1, 2 ORDER BY 3 DESC
        """
        with self._lock:
            rows = self._db.execute(query, (since, until)).fetchall()
        return [
            {
                "language": language or "unknown",
                "provider": provider,
                "served": served,
                "viewed": viewed,
                "selected": selected,
                "dismissed": dismissed,
                "acceptance_rate": round(selected / viewed, 4) if viewed else None,
            }
            for language, provider, served, viewed, selected, dismissed in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
