"""Completion events: SQLite under the data root (one keel), or Postgres (replicas).

Two kinds of rows share one table: ``completion`` rows written when keel
serves a completion, and the editor's ``view`` / ``select`` / ``dismiss``
events from ``POST /v1/events``. Together they make the acceptance rate one
query away. ``[events] database_url`` picks the store (:func:`open_event_store`);
both have the :class:`EventStore` interface, and neither makes a completion
wait on its database: SQLite writes run in a thread, Postgres writes are
buffered and batched (``keel.state.postgres_events``).

``[events] retention_days`` bounds both: :class:`EventRetention` deletes
older rows once at start and then hourly, in a thread, a batch at a time, so
a large first clean-up never holds a completion's own event for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, Unpack
from urllib.parse import quote

from keel.config import EventsConfig, Paths
from keel.errors import ConfigError, ConfigIssue, Unavailable
from keel.pipeline.languages import UNKNOWN, find_language
from keel.state.migrate import migrate_sqlite

if TYPE_CHECKING:
    from keel.ops.metrics import Metrics

log = logging.getLogger("keel.events")

PRUNE_BATCH = 5000
"""Rows deleted per statement by retention; the store's lock is free between batches."""
DAY = 86400.0


class EventFields(TypedDict, total=False):
    """What an event says besides its kind (the columns after ``ts`` and ``kind``)."""

    completion_id: str | None
    choice_index: int | None
    view_id: str | None
    elapsed: int | None
    select_kind: str | None
    language: str | None
    data: dict[str, object] | None


COLUMNS = ("ts", "kind", *EventFields.__annotations__)
"""The events table's columns, in the order :func:`event_row` gives their values."""


def event_row(
    kind: str, fields: EventFields, encode: Callable[[dict[str, object]], object]
) -> tuple[object, ...]:
    """One event's values in :data:`COLUMNS` order, stamped now; ``encode`` turns
    ``data`` into what the store's column takes."""
    data = fields.get("data")
    return (
        time.time(),
        kind,
        *(fields.get(name) for name in COLUMNS[2:-1]),
        None if data is None else encode(data),
    )


class EventStore(Protocol):
    """What serving, ``POST /v1/events`` and the acceptance figures need of a store."""

    async def record(self, kind: str, **fields: Unpack[EventFields]) -> None:
        """Keep one event; never raises for a database that is down."""

    async def language_of(self, completion_id: str | None) -> str | None:
        """The language of the completion served as ``completion_id``, if known."""

    def acceptance(self, since: float, until: float) -> list[dict[str, object]]:
        """Acceptance by language and provider (blocking: call it in a thread);
        raises :class:`keel.errors.Unavailable` when the database cannot answer."""

    def counts(self) -> dict[str, int]:
        """Rows by kind (blocking)."""

    def status(self) -> dict[str, object]:
        """Which store, and (for a shared one) whether it answers, for /v1/providers."""

    def prune(self, before: float) -> int:
        """Delete events older than ``before`` (epoch seconds), a batch at a time; returns
        how many (blocking); raises :class:`keel.errors.Unavailable` when it cannot."""

    def close(self) -> None: ...


def open_event_store(config: EventsConfig, paths: Paths, metrics: Metrics) -> EventStore:
    """The store ``config.database_url`` names; Postgres is reached in the background,
    so a database that is down delays no startup. A SQLite file keel cannot use is the
    config's error (it was a traceback, and uvicorn's exit 3, which supervisors retry)."""
    if config.is_postgres:
        from keel.state.postgres_events import PostgresEventStore

        return PostgresEventStore(
            config.database_url, metrics=metrics, max_buffered=config.max_buffered
        )
    path = paths.sqlite_path(config.database_url)
    try:
        return SqliteEventStore(path, metrics=metrics)
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(str(path), [sqlite_issue(path, str(exc))]) from None


def events_file_issue(config: EventsConfig, paths: Paths) -> ConfigIssue | None:
    """What is wrong with the events SQLite file, as ``keel serve`` would find it at start,
    or None (and for PostgreSQL, which ``keel doctor`` reaches on its own)."""
    if config.is_postgres:
        return None
    path = paths.sqlite_path(config.database_url)
    trouble = sqlite_trouble(path)
    return None if trouble is None else sqlite_issue(path, trouble)


def sqlite_issue(path: Path, trouble: str) -> ConfigIssue:
    if "full" in trouble or _disk_full(path):
        fix = "free some space there, or point [events] database_url at another disk"
        return ConfigIssue(
            "events.database_url",
            f"the events database {path} cannot be used ({trouble}): its disk is full: {fix}",
        )
    return ConfigIssue(
        "events.database_url",
        f"the events database {path} cannot be used ({trouble}): move it away (keel makes "
        "a new one) or point [events] database_url elsewhere",
    )


TRIAL_BYTES = 64 * 1024
"""What the trial database holds: the events file's tables, its write-ahead log and a
first day's events take about this much; a disk with less free failed after keel had
said "serving on" (SQLite's "database or disk is full", or "disk I/O error")."""


def _nearest_dir(path: Path) -> Path | None:
    place = path.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    return place if place.is_dir() else None


def _disk_full(path: Path) -> bool:
    """Whether the disk that holds (or would hold) ``path`` has too little free for the
    events file to grow (under four trial databases' worth)."""
    place = _nearest_dir(path)
    if place is None:
        return False
    disk = os.statvfs(place)
    return disk.f_bavail * disk.f_frsize < TRIAL_BYTES * 4


def _unwritable(path: Path) -> str | None:
    """Why keel's user cannot write the existing events file ``path``, its journal files
    or its directory (where SQLite makes them), or None. SQLite opens such a file
    read-only without a word: keel served, and dropped every event ("attempt to write a
    readonly database")."""
    journals = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    for place in [path, *journals, path.parent]:
        needs = os.W_OK | (os.X_OK if place.is_dir() else 0)
        if not place.exists() or os.access(place, needs):
            continue
        if os.statvfs(place).f_flag & os.ST_RDONLY:
            return f"{place} is on a read-only file system: make it writable"
        found, me = place.stat(), _user(os.geteuid())
        mode = f"mode {found.st_mode & 0o7777:04o}"
        if found.st_uid == os.geteuid():
            return f"{place} ({mode}) is not writable by keel's user {me}: chmod u+w {place}"
        return (
            f"{place} is owned by {_user(found.st_uid)} ({mode}) and keel runs as {me}, "
            f"who cannot write it: chown {me} {place}"
        )
    return None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def sqlite_trouble(path: Path) -> str | None:
    """Why the events SQLite file at ``path`` cannot be used, or None, changing nothing
    (for ``keel doctor``): not a file, not a database, one keel's user cannot write, or
    a place where no database can be written (a trial one, of :data:`TRIAL_BYTES`, is
    made and removed)."""
    if path.exists():
        if not path.is_file():
            return "it is not a file"
        try:
            uri = f"file:{quote(str(path))}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
                db.execute("PRAGMA schema_version")
        except sqlite3.Error as exc:
            return str(exc)
        return _unwritable(path)
    place = _nearest_dir(path)
    if place is None:
        return f"{path.parent} is not a directory"
    try:
        with (
            tempfile.TemporaryDirectory(dir=place, prefix=".keel-events-check-") as trial,
            contextlib.closing(sqlite3.connect(Path(trial, "trial.sqlite3"))) as db,
        ):
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE trial (data BLOB)")
            db.execute("INSERT INTO trial VALUES (zeroblob(?))", (TRIAL_BYTES,))
            db.commit()
    except (sqlite3.Error, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return f"no database can be written in {place}: {reason}"
    return None


def acceptance_rows(rows: Iterable[Sequence[Any]]) -> list[dict[str, object]]:
    """The acceptance figures of a store's ``rows`` (language, provider and the served,
    viewed, selected and dismissed counts), one a language's canonical name and provider,
    most served first. Rows written before 2026-12-04 hold the client's raw id: after an
    upgrade one language was three rows (``typescriptreact``, ``javascript`` and
    ``javascript-typescript``) for their 90 days. The counts are of distinct
    completions, each of one language, so they add up."""
    folded: dict[tuple[str, object], list[int]] = {}
    for language, provider, *counts in rows:
        found = find_language(str(language)) if language else None
        into = folded.setdefault((found.name if found else UNKNOWN.name, provider), [0] * 4)
        for index, count in enumerate(counts):
            into[index] += int(count)
    ordered = sorted(folded.items(), key=lambda item: -item[1][0])
    return [acceptance_row(language, provider, *counts) for (language, provider), counts in ordered]


def acceptance_row(
    language: object, provider: object, served: int, viewed: int, selected: int, dismissed: int
) -> dict[str, object]:
    """One row of the acceptance figures; rate = selected / viewed."""
    return {
        "language": language or "unknown",
        "provider": provider,
        "served": served,
        "viewed": viewed,
        "selected": selected,
        "dismissed": dismissed,
        "acceptance_rate": round(selected / viewed, 4) if viewed else None,
    }


def prune_in_batches(batch: Callable[[], int]) -> int:
    """Run ``batch`` (one DELETE of at most :data:`PRUNE_BATCH` rows; how many went)
    until one comes back short; how many rows went in all."""
    deleted = 0
    while (n := batch()) == PRUNE_BATCH:
        deleted += n
    return deleted + n


INSERT_SQLITE = (
    f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
)
PRUNE_SQLITE = (
    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE ts < ? ORDER BY ts LIMIT ?)"
)


class SqliteEventStore:
    """Events in one SQLite file (WAL). ``max_rows`` bounds the table: past it, the
    oldest rows go (checked every ``prune_every`` inserts, so the cost is amortised)."""

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = 1_000_000,
        prune_every: int = 1000,
        metrics: Metrics | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.metrics = metrics
        self.dropped = 0
        self.last_error: str | None = None
        self._warned = 0.0
        self.max_rows = max_rows
        self.prune_every = prune_every
        self._inserts = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        migrate_sqlite(self._db)
        self._lock = threading.Lock()
        # The figures read on a connection of their own: WAL lets them read while events
        # are written. On the writer's, one read of a day's 400,000 completions held
        # every completion's answer (which waits on its event's insert) for 2.8 s.
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reading = threading.Lock()
        self._identity = _file_identity(path)

    def _gone(self) -> str | None:
        """Why the file keel opened is no longer the one at its path, or None.

        Deleted while keel runs (the data root removed: ``rm -rf $KEEL_ROOT``), SQLite
        goes on writing to the unlinked file: POST /v1/events answered 200 for events
        nobody could ever read, the store said it was up, and the figures were a 500
        (``disk I/O error``). A stat per write costs ~1 µs."""
        if _file_identity(self.path) == self._identity:
            return None
        return (
            f"the events file {self.path} was deleted or replaced while keel ran (was the "
            f"data root {self.path.parent} removed?): events are not kept until keel is "
            "restarted, which makes a new one"
        )

    def _insert(self, row: tuple[object, ...]) -> None:
        with self._lock:
            if (gone := self._gone()) is not None:
                raise sqlite3.OperationalError(gone)
            self._db.execute(INSERT_SQLITE, row)
            self._inserts += 1
            if self._inserts % self.prune_every == 0:
                self._db.execute(
                    "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                    (self.max_rows,),
                )

    async def record(self, kind: str, **fields: Unpack[EventFields]) -> None:
        """Keep one event; one the file cannot take (a full disk, a read-only file) is
        dropped and counted (``keel_events_dropped_total{reason="write_failed"}``): it
        was every Tabby completion's and ``/infill``'s 500 while the disk was full."""
        try:
            await asyncio.to_thread(self._insert, event_row(kind, fields, json.dumps))
        except sqlite3.Error as exc:
            self.dropped += 1
            self.last_error = f"{self.path}: {exc}"
            if self.metrics is not None:
                self.metrics.events_dropped("write_failed")
            if time.monotonic() - self._warned > 60:  # once a minute, not once an event
                self._warned = time.monotonic()
                log.warning("events not stored (%s); dropped so far: %d", exc, self.dropped)
        else:
            self.last_error = None

    def _read(self, query: str, parameters: tuple[object, ...] = ()) -> list[Any]:
        """The rows of ``query`` on the reader's connection; a file gone or unreadable is
        :class:`Unavailable` naming it (it was a 500 with a traceback)."""
        if (gone := self._gone()) is not None:
            raise Unavailable(gone)
        try:
            with self._reading:
                return list(self._reader.execute(query, parameters).fetchall())
        except sqlite3.Error as exc:
            raise Unavailable(f"the events file {self.path} cannot be read: {exc}") from exc

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT kind, COUNT(*) FROM events GROUP BY kind")
        return {str(kind): int(count) for kind, count in rows}

    def _language_of(self, completion_id: str) -> str | None:
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT language FROM events WHERE completion_id = ? AND kind = 'completion' "
                    "ORDER BY id DESC LIMIT 1",
                    (completion_id,),
                ).fetchone()
        except sqlite3.Error:  # unknown, as for an id keel did not serve: the event is kept
            return None
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
        return acceptance_rows(self._read(query, (since, until)))

    def status(self) -> dict[str, object]:
        gone = self._gone()
        last_error = gone or self.last_error
        status: dict[str, object] = {"store": "sqlite", "up": last_error is None}
        if self.dropped or gone:
            status.update(dropped=self.dropped, last_error=last_error)
        return status

    def prune(self, before: float) -> int:
        def batch() -> int:
            with self._lock:  # released between batches: inserts go on meanwhile
                return int(self._db.execute(PRUNE_SQLITE, (before, PRUNE_BATCH)).rowcount)

        try:
            return prune_in_batches(batch)
        except sqlite3.Error as exc:
            raise Unavailable(f"events file {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._reading:
            self._reader.close()
        with self._lock:
            self._db.close()


def _file_identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (None: there is none)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class EventRetention:
    """Deletes events older than ``days`` at start and then every ``interval`` seconds,
    off the request path; counts them in ``keel_events_pruned_total``. A store that
    cannot answer is logged and tried again at the next turn."""

    def __init__(
        self,
        store: EventStore,
        days: int,
        metrics: Metrics | None = None,
        *,
        interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.days = days
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.sleep = sleep

    async def prune_once(self) -> int:
        """Delete what is past retention now; how many rows went (0 if the store failed)."""
        cutoff = self.clock() - self.days * DAY
        try:
            deleted = await asyncio.to_thread(self.store.prune, cutoff)
        except Unavailable as exc:
            log.warning("events retention skipped this time: %s", exc.message)
            return 0
        if self.metrics is not None:
            self.metrics.events_pruned(deleted)
        if deleted:
            log.info("events retention: %d events older than %d days deleted", deleted, self.days)
        return deleted

    async def run(self) -> None:
        """Prune now, then every ``interval`` seconds, until cancelled."""
        while True:
            await self.prune_once()
            await self.sleep(self.interval)
