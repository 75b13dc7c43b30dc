from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from keel.events import (
    DAY,
    INSERT_SQLITE,
    PRUNE_BATCH,
    EventRetention,
    SqliteEventStore,
    event_row,
    prune_in_batches,
)
from keel.ops.metrics import Metrics


def test_acceptance_by_language_and_provider(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite3")

    async def fill() -> None:
        for n, language in enumerate(["python", "python", "python", "go"]):
            cid = f"cmpl-{n}"
            await store.record(
                "completion", completion_id=cid, language=language, data={"provider": "local/x"}
            )
            await store.record("view", completion_id=cid, choice_index=0)
            await store.record("view", completion_id=cid, choice_index=0)  # seen twice
        await store.record("select", completion_id="cmpl-0", choice_index=0)
        await store.record("dismiss", completion_id="cmpl-1", choice_index=0)

    asyncio.run(fill())
    rows = {r["language"]: r for r in store.acceptance(0, time.time() + 1)}
    assert rows["python"] == {
        "language": "python",
        "provider": "local/x",
        "served": 3,
        "viewed": 3,
        "selected": 1,
        "dismissed": 1,
        "acceptance_rate": round(1 / 3, 4),
    }
    assert rows["go"]["acceptance_rate"] == 0.0
    assert store.acceptance(time.time() + 10, time.time() + 20) == []
    store.close()


def test_rows_an_older_keel_wrote_under_raw_ids_join_their_language(tmp_path: Path) -> None:
    """A keel before 2026-12-04 stored the client's raw language id: after an upgrade
    one language was three rows of the acceptance figures for their 90 days."""
    store = SqliteEventStore(tmp_path / "events.sqlite3")
    written = ["typescriptreact", "javascript", "javascript-typescript", "zzqx", "unknown"]

    async def fill() -> None:
        for n, language in enumerate(written):
            cid = f"cmpl-{n}"
            data = {"provider": "local/x"}
            await store.record("completion", completion_id=cid, language=language, data=data)
            await store.record("view", completion_id=cid, choice_index=0)
        await store.record("select", completion_id="cmpl-1", choice_index=0)

    asyncio.run(fill())
    rows = store.acceptance(0, time.time() + 1)
    store.close()
    assert [(r["language"], r["served"], r["viewed"], r["selected"]) for r in rows] == [
        ("javascript-typescript", 3, 3, 1),
        ("unknown", 2, 2, 0),
    ]


async def test_events_are_written_while_the_figures_are_read(tmp_path: Path) -> None:
    """The acceptance figures were read under the writer's lock, and every Tabby
    completion's answer waits on its event's insert: one read of a day's 400,000
    completions held every answer for 2.8 s. Here events go on being written, one after
    another, while the figures of 200,000 completions are read."""
    path = tmp_path / "events.sqlite3"
    store = SqliteEventStore(path)
    served = [
        event_row(
            "completion",
            {"completion_id": f"c{n}", "language": "python", "data": {"provider": "p"}},
            json.dumps,
        )
        for n in range(200_000)
    ]
    with sqlite3.connect(path) as db:
        db.executemany(INSERT_SQLITE, served)
    reading = asyncio.create_task(asyncio.to_thread(store.acceptance, 0, time.time() + 10))
    written = 0
    while not reading.done():
        await store.record("view", completion_id=f"c{written}", choice_index=0)
        written += 1
    assert (await reading)[0]["served"] == 200_000
    assert written >= 20, f"{written} events written while the figures were read"
    store.close()


def test_the_table_is_bounded(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite3", max_rows=50, prune_every=10)

    async def fill() -> None:
        for n in range(200):
            await store.record("view", completion_id=f"c{n}", choice_index=0)

    asyncio.run(fill())
    assert sum(store.counts().values()) <= 60
    store.close()


async def test_retention_prunes_at_start_and_then_every_interval(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite3")
    await store.record("view", completion_id="cmpl-0")
    now = [time.time()]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += 10 * DAY  # each turn, ten days pass: the event is past a 7-day retention
        if len(waits) == 2:
            raise asyncio.CancelledError

    metrics = Metrics()
    retention = EventRetention(store, 7, metrics, interval=3600, clock=lambda: now[0], sleep=sleep)
    with pytest.raises(asyncio.CancelledError):
        await retention.run()
    assert waits == [3600, 3600]
    assert store.counts() == {}, "kept at the first turn, pruned at the second"
    assert metrics.registry.get_sample_value("keel_events_pruned_total") == 1
    store.close()


def test_pruning_goes_on_batch_by_batch_until_one_comes_back_short() -> None:
    left = [PRUNE_BATCH, PRUNE_BATCH, 12, 0]
    assert prune_in_batches(lambda: left.pop(0)) == 2 * PRUNE_BATCH + 12
    assert left == [0], "no batch after a short one"
