"""A frozen PostgreSQL (every postgres process SIGSTOPped: connections open, no answer)
holds up nothing but the reads of the events store, and those for one deadline at most:
they run on a thread of their own, not the event loop's shared executor (whose 6
threads on 2 cores it used up, so repository context, and with it completions, waited
13 s), and a read that misses its deadline fails the reads behind it and marks reads
down until the database answers again."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from keel.config import IndexConfig, Paths, RepositoryConfig
from keel.errors import Unavailable
from keel.index.retrieve import RepositoryRetriever
from keel.state import postgres_events
from keel.state.postgres_events import PostgresEventStore
from tests.conftest import running_keel
from tests.index.conftest import write_repo
from tests.state.servers import PostgresServer, wait_until

PREFIX = (
    "from weather.client import WeatherClient\n\n\n"
    "def weekly_report(client, city_name):\n"
    "    forecast = client.fetch_forecast(city_name, days=7)\n"
    "    return fore"
)


def answers(store: PostgresEventStore) -> bool:
    try:
        return store.acceptance(0, time.time()) == []
    except Unavailable:
        return False


@contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    pids = [postmaster, *map(int, children)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def retriever_of(tmp_path: Path) -> RepositoryRetriever:
    repo = write_repo(tmp_path / "repo")
    built = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(min_score=0.0),
        Paths(tmp_path / "data"),
    )
    built.update()
    return built


async def timed(awaitable: object) -> tuple[object, float]:
    assert asyncio.iscoroutine(awaitable) or isinstance(awaitable, asyncio.Future)
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started


async def test_editor_events_on_a_frozen_database_hold_up_no_completion(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reviewer's case in one process: editor events for completions another
    replica served (their language is read from the database) while it is frozen,
    then repository context for a completion and any other work of the loop's
    executor. Each event's read queued a thread of the shared executor for up to 10 s,
    then 10 more for a reconnect; context search queued behind them."""
    monkeypatch.setattr(postgres_events, "STATEMENT_SECONDS", 4.0)
    retriever = retriever_of(tmp_path)
    path = str(tmp_path / "repo" / "weather" / "report.py")
    assert await retriever.retrieve(prefix=PREFIX, filepath=path, git_url=None, language="python")
    store = PostgresEventStore(postgres_url, flush_seconds=0.05)
    try:
        wait_until(lambda: store.up is True)
        assert await store.language_of("cmpl-unknown") is None  # the reader is connected
        with frozen(postgres_server):
            started = time.monotonic()
            events = [asyncio.create_task(store.language_of(f"cmpl-other-{n}")) for n in range(40)]
            await asyncio.sleep(0.3)
            snippets, searched = await timed(
                retriever.retrieve(
                    prefix=PREFIX + "cast", filepath=path, git_url=None, language="python"
                )
            )
            _, other = await timed(asyncio.to_thread(lambda: None))
            languages = await asyncio.gather(*events)
            took = time.monotonic() - started
            assert snippets, "repository context went missing"
            assert searched < 2.0, f"repository context waited {searched:.1f} s"
            assert other < 2.0, f"the loop's executor was held for {other:.1f} s"
            assert languages == [None] * 40
            assert took < 4.0 + 3.0, f"the events' reads took {took:.1f} s"
            # reads are down now: the next one does not wait at all
            _, later = await timed(store.language_of("cmpl-later"))
            assert later < 1.0
    finally:
        store.close(timeout=1.0)


def test_reads_behind_a_hung_read_fail_with_it_then_at_once_until_it_answers(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/stats/completions while frozen: each read waited up to 10 s for the one
    before it, then 10 s more of its own (13.7 s and 15.7 s before a 503), and every
    later one waited again. Now one deadline for all, then none."""
    monkeypatch.setattr(postgres_events, "STATEMENT_SECONDS", 6.0)
    store = PostgresEventStore(postgres_url, flush_seconds=0.05)

    def read() -> float:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.acceptance(0, time.time())
        return time.monotonic() - started

    try:
        wait_until(lambda: store.up is True)
        store.acceptance(0, time.time())  # the reader's connection is made and kept
        with frozen(postgres_server), ThreadPoolExecutor(2) as pool:
            first = pool.submit(read)
            time.sleep(3.0)
            behind = pool.submit(read)
            assert first.result() < 6.0 + 2.0
            assert behind.result() < 5.0, "a read behind a hung one waited its own deadline"
            assert store.up is False
            assert "no answer within 6 s" in str(store.status()["last_error"])
            for _ in range(5):  # down: every read fails at once while it is frozen
                assert read() < 1.0
                time.sleep(0.4)
        wait_until(lambda: answers(store), timeout=20)
        assert store.up is True
    finally:
        store.close(timeout=1.0)


async def test_repository_context_does_not_queue_behind_the_loops_executor(
    tmp_path: Path,
) -> None:
    """Whatever holds the shared executor's threads, context search has its own."""
    retriever = retriever_of(tmp_path)
    path = str(tmp_path / "repo" / "weather" / "report.py")
    release = threading.Event()
    held = [asyncio.create_task(asyncio.to_thread(release.wait, 30)) for _ in range(40)]
    try:
        await asyncio.sleep(0.2)
        snippets = await asyncio.wait_for(
            retriever.retrieve(prefix=PREFIX, filepath=path, git_url=None, language="python"),
            timeout=5,
        )
        assert snippets
    finally:
        release.set()
        await asyncio.gather(*held)


def test_unavailable_is_raised_while_a_read_waits_for_the_frozen_database(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing while a read hangs on the frozen database returns at once."""
    monkeypatch.setattr(postgres_events, "STATEMENT_SECONDS", 3.0)
    store = PostgresEventStore(postgres_url, flush_seconds=0.05)
    wait_until(lambda: store.up is True)
    store.acceptance(0, time.time())
    with frozen(postgres_server), ThreadPoolExecutor(1) as pool:
        hung = pool.submit(store.acceptance, 0, time.time())
        time.sleep(0.5)
        started = time.monotonic()
        store.close(timeout=1.0)
        assert time.monotonic() - started < 2.5
        with pytest.raises(Unavailable):
            hung.result()


def test_an_editor_event_on_a_frozen_database_is_answered_at_once(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    """An event for a completion another replica served waited for its language, read
    from the database: a frozen (or locked) one held the editor's request for ~10 s."""
    config = f'[events]\ndatabase_url = "{postgres_url}"\n'
    with running_keel(tmp_path / "keel", config) as keel, keel.client() as client:
        event = {"type": "view", "completion_id": "cmpl-another-replicas", "choice_index": 0}
        assert client.post("/v1/events", json=event).status_code == 200  # reads connected
        with frozen(postgres_server):
            started = time.monotonic()
            answered = client.post("/v1/events", json={**event, "completion_id": "cmpl-x"})
            took = time.monotonic() - started
    assert answered.status_code == 200, answered.text
    assert took < 2.0, f"the event waited {took:.1f} s for the database"
