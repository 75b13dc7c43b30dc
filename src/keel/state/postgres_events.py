"""Completion events in PostgreSQL, shared by every replica; writes never wait.

``record`` puts the row in a bounded in-memory buffer and returns at once; a
writer thread sends the buffer in batches (every ``flush_seconds``, or as
soon as ``batch_rows`` are waiting). While the database is down the rows stay
buffered and the writer retries once a second; past ``max_buffered`` new
rows are dropped and counted (``keel_events_dropped_total{reason}``), so an
outage costs events, never completions or memory. A database that cannot write
now (read-only, a standby) is treated as down. A batch the database refuses for
its content is written again a row at a time, and only the rows it refuses are
dropped, with their own reason, rather than retried forever. Nothing waits on
the database longer than :data:`STATEMENT_SECONDS`.

Reads (acceptance, the language of a completion) go to the database on a
connection and a thread of their own (``keel-events-reader``), never on the
event loop's shared executor, whose few threads a frozen database used up
(repository context, and so completions, queued behind them for 13 s). Each
read has one deadline, :data:`STATEMENT_SECONDS` from when it was asked, for
its wait in the queue and its statement together; the first read that misses
it, or hangs and then fails, marks reads down: the reads queued behind it fail
at once, and later ones fail at once until the database answers again (the
writer gets through, or a ``SELECT 1`` tried in the background, one at a time,
does). A read refused at once (the database down or restarting) marks
nothing: the next one tries again.
Acceptance raises :class:`keel.errors.Unavailable` while it cannot answer.
The language of a completion this replica served is remembered locally, so
an editor event needs no read in the common case.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import islice
from queue import SimpleQueue
from typing import TYPE_CHECKING, Unpack
from urllib.parse import unquote

import psycopg
from psycopg.types.json import Jsonb

from keel.config import masked_url
from keel.errors import Unavailable
from keel.events import (
    COLUMNS,
    PRUNE_BATCH,
    EventFields,
    acceptance_rows,
    event_row,
    prune_in_batches,
)
from keel.state.migrate import migrate_postgres

if TYPE_CHECKING:
    from keel.ops.metrics import Metrics

log = logging.getLogger("keel.events")

INSERT = (
    f"INSERT INTO keel_events ({', '.join(COLUMNS)}, event_key) "
    f"VALUES ({', '.join(['%s'] * (len(COLUMNS) + 1))}) "
    "ON CONFLICT (event_key) WHERE event_key IS NOT NULL DO NOTHING"
)
"""Each row carries a key made when it was recorded: a batch whose commit keel could not
see through (its connection shut mid-``COMMIT``, the answer lost) is sent again, and the
rows the database already has are skipped rather than stored twice."""
ACCEPTANCE = """
    SELECT c.language, c.data->>'provider' AS provider,
           COUNT(DISTINCT c.completion_id),
           COUNT(DISTINCT CASE WHEN e.kind = 'view' THEN e.completion_id END),
           COUNT(DISTINCT CASE WHEN e.kind = 'select' THEN e.completion_id END),
           COUNT(DISTINCT CASE WHEN e.kind = 'dismiss' THEN e.completion_id END)
    FROM keel_events c
    LEFT JOIN keel_events e ON e.completion_id = c.completion_id AND e.kind != 'completion'
    WHERE c.kind = 'completion' AND c.ts BETWEEN %s AND %s
    GROUP BY 1, 2 ORDER BY 3 DESC
"""
REMEMBERED_LANGUAGES = 10_000
RETRY_SECONDS = 1.0
STATEMENT_SECONDS = 10.0
"""The longest a read, a batch or a migration may wait on the database. One that stopped
answering (its host frozen, not down) held the status page, editor events and shutdown
for minutes, while keel said it was up."""

HUNG_SECONDS = 1.0
"""A read that failed after this long hung (a frozen host, a connect timing out) rather
than being refused: reads are then down, and fail at once, until the database answers."""

Row = tuple[object, ...]
NOT_ANSWERING = "the events database is not answering; acceptance figures return when it does"


def _not_answering_within() -> str:  # read when used: tests shorten the deadline
    return f"no answer within {STATEMENT_SECONDS:g} s"


@dataclass(frozen=True, slots=True)
class _Read:
    future: Future[list[Row]]
    query: str
    params: tuple[object, ...]
    deadline: float


def _clean(value: object) -> object:
    """A text value PostgreSQL can store: it refuses NUL, and one event's NUL (an
    editor's ``completion_id``) lost every event written with it."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


@contextmanager
def _bounded(connection: psycopg.Connection[Row], seconds: float | None = None) -> Iterator[None]:
    """Fail what ``connection`` runs inside if it takes over ``seconds`` (by default
    :data:`STATEMENT_SECONDS`):
    the socket is shut down under the waiting call, which then raises OperationalError,
    saying the database did not answer (psycopg's own words were "server closed the
    connection unexpectedly", which it had not). (A cancel request goes through the
    server, which may be the thing not answering.)"""

    fired = threading.Event()

    def abort() -> None:
        fired.set()
        with suppress(OSError, psycopg.Error):
            shut = socket.socket(fileno=os.dup(connection.pgconn.socket))
            try:
                shut.shutdown(socket.SHUT_RDWR)
            finally:
                shut.close()

    timer = threading.Timer(STATEMENT_SECONDS if seconds is None else max(0.0, seconds), abort)
    timer.daemon = True
    timer.start()
    try:
        yield
    except psycopg.OperationalError as exc:
        if fired.is_set():  # keel shut the socket, not the server: say it did not answer
            raise psycopg.OperationalError(_not_answering_within()) from exc
        raise
    finally:
        timer.cancel()


def _bound_on_the_server(connection: psycopg.Connection[Row]) -> None:
    """The server ends a statement of this session itself a little before keel gives up
    on it. keel's own bound only shuts its socket: a backend waiting on a lock (a
    ``CREATE INDEX``, a ``VACUUM FULL``) or on a synchronous standby did not notice, and
    each retry's new connection waited beside it, ~one more a replica every 11 s, until
    other applications were refused connections. Set with ``SET``, not as a startup
    option, which a pgbouncer in front refuses."""
    ms = max(1, round(STATEMENT_SECONDS * 900))
    with connection.cursor() as cursor:
        cursor.execute(f"SET statement_timeout = {ms}")
        cursor.execute(f"SET lock_timeout = {ms}")
    connection.commit()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message) with nothing of ``url``'s password: the URL masked
    wherever it appears, and the password itself, as written and percent-decoded, as
    ``***``. libpq quotes what it could not parse (``invalid percent-encoded token:
    "Q7%zzpgSECRET"``), which went to ``/v1/providers`` and the log."""
    text = masked_url(text)
    rest = url.partition("//")[2]
    secrets = set()
    for userinfo in (rest.rpartition("@")[0], rest.split("/", 1)[0].rpartition("@")[0]):
        password = userinfo.partition(":")[2]
        secrets.update({password, unquote(password)})
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """``url`` without its password, for logs and status pages."""
    return masked_url(url)


PRUNE = (
    "DELETE FROM keel_events WHERE id IN "
    "(SELECT id FROM keel_events WHERE ts < %s ORDER BY ts LIMIT %s)"
)


class PostgresEventStore:
    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics | None = None,
        max_buffered: int = 10_000,
        batch_rows: int = 500,
        flush_seconds: float = 0.2,
        connect_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.metrics = metrics
        self.max_buffered = max_buffered
        self.batch_rows = batch_rows
        self.flush_seconds = flush_seconds
        self.connect_timeout = connect_timeout
        self.up: bool | None = None
        """None until the first attempt; then whether the last write or read got through."""
        self.last_error: str | None = None
        self.dropped = 0
        self._buffer: deque[Row] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._writer: psycopg.Connection[Row] | None = None
        self._reader: psycopg.Connection[Row] | None = None
        self._writer_error: Exception | None = None
        """The writer's last failure, until it writes again."""
        self._remaking = False
        """The writer found the table missing and reconnects to make it again."""
        self._reads: SimpleQueue[_Read | None] = SimpleQueue()
        self._reads_guard = threading.RLock()
        self._pending: set[Future[list[Row]]] = set()
        """Reads queued or running on the reader thread."""
        self._reads_down = False
        """A read failed or missed its deadline: reads fail at once until one gets through."""
        self._reader_thread = threading.Thread(
            target=self._read_forever, name="keel-events-reader", daemon=True
        )
        self._reader_thread.start()
        self._languages: OrderedDict[str, str | None] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="keel-events-writer", daemon=True)
        self._thread.start()

    # writing ----------------------------------------------------------------

    async def record(self, kind: str, **fields: Unpack[EventFields]) -> None:
        row = (*map(_clean, event_row(kind, fields, Jsonb)), uuid.uuid4())
        completion_id = fields.get("completion_id")
        if kind == "completion" and completion_id:
            self._languages[completion_id] = fields.get("language")
            if len(self._languages) > REMEMBERED_LANGUAGES:
                self._languages.popitem(last=False)
        with self._lock:
            if len(self._buffer) >= self.max_buffered:
                self._drop(1, "buffer_full")
                return
            self._buffer.append(row)
            waiting = len(self._buffer)
        if self.metrics is not None:
            self.metrics.events_buffered(waiting)
        if waiting >= self.batch_rows:
            self._wake.set()

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self.metrics is not None:
            self.metrics.events_dropped(reason, n)

    def _run(self) -> None:
        try:  # connect (and migrate) at startup, so the status is known before any event
            self._writer = self._connect()
            self._writing(None)
        except psycopg.Error as exc:
            self._writing(exc)
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            closing = self._closing
            try:
                while self._flush_once():
                    pass
            except Exception:  # a bug here must not end the writer: events would pile up
                log.exception("the events writer failed; retrying")
                time.sleep(RETRY_SECONDS)
            if closing:
                # Closed here too: a writer still busy when close() gave up waiting (a
                # statement on a frozen database) left its connection to the collector,
                # which warned of it in whatever ran then.
                self._close_writer()
                return

    def _flush_once(self) -> bool:
        """Write one batch; True if there may be more to write now."""
        with self._lock:
            batch = list(islice(self._buffer, self.batch_rows))
        if not batch:
            return False
        try:
            connection = self._writer = self._writer or self._connect()
            self._insert(connection, batch)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # refused for its content: the rows it can take are written one by one, and
            # only the others dropped (a whole batch went with one bad row)
            self._close_writer()
            refused = self._insert_singly(batch)
            log.error(
                "the events database refused %d events, dropping them: %s",
                refused,
                scrub(_first_line(exc), self.url),
            )
            self._remove(len(batch))
            self._drop(refused, "rejected")
            return True
        except psycopg.Error as exc:
            self._close_writer()
            if isinstance(exc, psycopg.errors.UndefinedTable) and not self._remaking:
                # keel_events dropped under keel: the next connection makes it again
                # (migrate_postgres checks the tables, under the advisory lock), at once.
                # It was shown as an outage, events piling up, until the bookkeeping rows
                # were deleted by hand.
                self._remaking = True
                log.warning(
                    "the events table is missing in %s (%s): making it again",
                    redact(self.url),
                    scrub(_first_line(exc), self.url),
                )
                return True
            # unreachable, or unable to write now (a read-only standby after a failover):
            # the rows wait, as while it is down; they were dropped as refused
            self._writing(exc)
            if not self._closing:
                time.sleep(RETRY_SECONDS)
            return False
        self._remaking = False
        self._remove(len(batch))
        self._writing(None)
        return True

    @staticmethod
    def _insert(connection: psycopg.Connection[Row], rows: list[Row]) -> None:
        with _bounded(connection), connection.cursor() as cursor:
            cursor.executemany(INSERT, rows)
            connection.commit()

    def _insert_singly(self, batch: list[Row]) -> int:
        """Write ``batch`` a row at a time on a new connection; how many were refused."""
        refused = 0
        with self._connect() as connection:
            for row in batch:
                try:
                    self._insert(connection, [row])
                except (psycopg.DataError, psycopg.IntegrityError):
                    connection.rollback()
                    refused += 1
        return refused

    def _writing(self, error: Exception | None) -> None:
        """How the writer's last try went (None: it wrote), for the store's state."""
        self._writer_error = error
        if error is None:
            self._succeeded()
        else:
            self._failed(error)

    def _remove(self, n: int) -> None:
        with self._lock:
            for _ in range(n):
                self._buffer.popleft()
            waiting = len(self._buffer)
        if self.metrics is not None:
            self.metrics.events_buffered(waiting)

    def _connect(self) -> psycopg.Connection[Row]:
        """A connection to a database migrated to the current schema version."""
        connection = psycopg.connect(self.url, connect_timeout=max(1, round(self.connect_timeout)))
        try:
            with _bounded(connection):
                _bound_on_the_server(connection)
                applied = migrate_postgres(connection)
        except BaseException:  # read-only, frozen: not a connection to keep
            connection.close()
            raise
        if applied:
            log.info("events database migrated to version %d", applied[-1])
        return connection

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _failed(self, exc: Exception) -> None:
        message = scrub(_first_line(exc), self.url)
        if refused(exc):  # never to be waited out: it was "unreachable", buffering for ever
            message += f" ({REFUSED_FIX})"
        if isinstance(exc, psycopg.errors.UndefinedTable):
            # still missing after making it again: not an outage, and not one to wait out
            message += (
                " (a keel table is missing and keel could not make it again: restart keel, "
                "or check that its database user may create tables)"
            )
        if self.up is not False:
            log.warning(
                "events database %s %s (%s): buffering up to %d events, dropping "
                "beyond; completions are not affected",
                redact(self.url),
                "refuses keel"
                if refused(exc)
                else "unreachable"
                if isinstance(exc, (psycopg.OperationalError, TimeoutError))
                else "failing",
                message,
                self.max_buffered,
            )
        self.up = False
        self.last_error = message
        if self.metrics is not None:
            self.metrics.state_store("postgres", False)

    def _succeeded(self) -> None:
        with self._reads_guard:
            self._reads_down = False
        if self.up is False:
            log.warning("events database %s reachable again", redact(self.url))
        self.up = True
        self.last_error = None
        if self.metrics is not None:
            self.metrics.state_store("postgres", True)

    # reading ----------------------------------------------------------------

    def _ask(self, query: str, params: tuple[object, ...]) -> tuple[Future[list[Row]], float]:
        """Queue a read for the reader thread; the future and its deadline. While reads
        are down it fails at once, and tries the database in the background instead
        (one try at a time), whose answer brings reads back."""
        deadline = time.monotonic() + STATEMENT_SECONDS
        with self._reads_guard:
            if self._closing:
                raise Unavailable("the events store is closing")
            if self._reads_down:
                if not self._pending:
                    self._queue("SELECT 1", (), deadline)
                raise Unavailable(NOT_ANSWERING)
            return self._queue(query, tuple(map(_clean, params)), deadline), deadline

    def _queue(self, query: str, params: tuple[object, ...], deadline: float) -> Future[list[Row]]:
        future: Future[list[Row]] = Future()
        self._pending.add(future)
        future.add_done_callback(self._finished)
        self._reads.put(_Read(future, query, params, deadline))
        return future

    def _finished(self, future: Future[list[Row]]) -> None:
        with self._reads_guard:
            self._pending.discard(future)

    def _reads_failed(self, exc: Exception | None) -> None:
        """A read failed or missed its deadline (``exc``, to report; None: reported
        already): the store is down for reads, and the reads queued behind it fail now
        rather than each waiting out its own deadline."""
        with self._reads_guard:
            first = not self._reads_down
            self._reads_down = True
            for future in list(self._pending):
                future.cancel()  # only those not yet running
        if first and exc is not None:
            self._failed(exc)

    def _wait(self, future: Future[list[Row]], deadline: float) -> list[Row]:
        """The rows of a queued read, for a caller in a thread; Unavailable past the
        deadline (the caller's thread, often the loop's shared executor's, is freed)."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self._reads_failed(TimeoutError(_not_answering_within()))
            raise Unavailable(NOT_ANSWERING) from None
        except CancelledError:
            raise Unavailable(NOT_ANSWERING) from None

    def _query(self, query: str, params: tuple[object, ...]) -> list[Row]:
        return self._wait(*self._ask(query, params))

    def _read_forever(self) -> None:
        """The reader thread: one read at a time on its own connection, until closed."""
        while (read := self._reads.get()) is not None:
            if not read.future.set_running_or_notify_cancel():
                continue  # cancelled while queued: reads went down
            try:
                rows = self._read(read)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                read.future.set_exception(exc)
            else:
                read.future.set_result(rows)
        if self._reader is not None:
            with suppress(psycopg.Error, OSError):
                self._reader.close()
            self._reader = None

    def _read(self, read: _Read) -> list[Row]:
        started = time.monotonic()
        if started >= read.deadline:  # its caller has given up on it
            raise Unavailable(NOT_ANSWERING)
        try:
            rows = self._query_locked(read.query, read.params, read.deadline)
        except Unavailable:
            if time.monotonic() - started >= HUNG_SECONDS:
                self._reads_failed(None)
            # else refused at once (down, restarting): the next read may try again,
            # at no cost, and gets through as soon as the database is back
            raise
        with self._reads_guard:
            self._reads_down = False
        return rows

    def _query_locked(self, query: str, params: tuple[object, ...], deadline: float) -> list[Row]:
        """Rows of ``query``, on the reader thread. A kept connection the server has
        ended since (a restart) is replaced once, within the same read if its deadline
        allows; a read that works says the database is up (only the writer said so, and
        a quiet replica stayed "down")."""
        while True:
            kept = self._reader is not None
            try:
                if self._reader is None:
                    self._reader = self._connect()
                    self._reader.autocommit = True
                with _bounded(self._reader, deadline - time.monotonic()):
                    rows = self._reader.execute(query, params).fetchall()
            except psycopg.Error as exc:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
                if kept and time.monotonic() < deadline:
                    continue
                self._failed(exc)
                why = (
                    f"refuses keel: {REFUSED_FIX}"
                    if refused(exc)
                    else "is unreachable; acceptance figures return when it does"
                )
                raise Unavailable(f"the events database {why}") from exc
            with self._lock:
                stuck = self._writer_error is not None and bool(self._buffer)
            if stuck:  # the figures would leave out the events waiting: none, not wrong ones
                raise Unavailable(
                    "the events database takes no writes now (events wait in memory); "
                    "acceptance figures return when it does"
                )
            self._succeeded()
            return rows

    async def language_of(self, completion_id: str | None) -> str | None:
        if not completion_id:
            return None
        if completion_id in self._languages:
            return self._languages[completion_id]
        if self.up is False:
            return None
        query = (
            "SELECT language FROM keel_events WHERE completion_id = %s AND kind = 'completion' "
            "ORDER BY id DESC LIMIT 1"
        )
        try:  # on the reader thread, not the loop's shared executor
            future, deadline = self._ask(query, (completion_id,))
        except Unavailable:
            return None
        waiting = asyncio.wrap_future(future)
        await asyncio.wait({waiting}, timeout=max(0.0, deadline - time.monotonic()))
        if not waiting.done():
            waiting.cancel()
            self._reads_failed(TimeoutError(_not_answering_within()))
            return None
        if waiting.cancelled() or waiting.exception() is not None:
            return None
        rows = waiting.result()
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    def acceptance(self, since: float, until: float) -> list[dict[str, object]]:
        return acceptance_rows(self._query(ACCEPTANCE, (since, until)))

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT kind, COUNT(*) FROM keel_events GROUP BY kind", ())
        return {str(kind): int(str(count)) for kind, count in rows}

    def prune(self, before: float) -> int:
        """On a connection of its own, so neither the writer nor the reads wait on it;
        every replica may run it, and the later ones find nothing to delete."""
        try:
            with self._connect() as connection:
                connection.autocommit = True
                return prune_in_batches(
                    lambda: connection.execute(PRUNE, (before, PRUNE_BATCH)).rowcount
                )
        except psycopg.Error as exc:
            raise Unavailable(
                f"the events database did not answer ({scrub(_first_line(exc), self.url)})"
            ) from exc

    def status(self) -> dict[str, object]:
        with self._lock:
            waiting = len(self._buffer)
        return {
            "store": "postgres",
            "up": self.up is not False,
            "last_error": self.last_error,
            "buffered": waiting,
            "dropped": self.dropped,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered (for up to ``timeout`` s if the database answers), then stop."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            left = len(self._buffer)
        if left:
            self._drop(left, "shutdown")
            log.warning("%d events not written to the events database before shutdown", left)
        if not self._thread.is_alive():
            self._close_writer()
        with self._reads_guard:  # reads queued now fail; a hung one is left to its deadline
            for future in list(self._pending):
                future.cancel()
        self._reads.put(None)  # the reader thread closes its connection and ends


REFUSED_FIX = (
    "fix [events] database_url: its user, password, database or options; a restart or "
    "reload applies it"
)


def refused(exc: BaseException) -> bool:
    """Whether the server answered and refused (a password, a user, a database,
    pg_hba), or libpq refused the URL itself (an option's value), not a connection that
    never reached a server: none of these passes by waiting. libpq gives no code for a
    failed connection: the server's own error says "FATAL:" (unless its messages are
    translated; a password it asked for tells too). A server that answered it has no TLS,
    to a URL that requires TLS, will never take that URL either."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate is not None:
        return True
    said = str(exc)
    pgconn = exc.pgconn if isinstance(exc, psycopg.Error) else None
    asked = pgconn is not None and (pgconn.used_password or pgconn.needs_password)
    option = re.search(r"invalid (?:\w+ value|connection option)", said) is not None
    return asked or option or "FATAL:" in said or "server does not support SSL" in said
