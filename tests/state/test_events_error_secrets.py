"""Whatever a PostgreSQL driver error says, the events store never repeats the URL's
password: not in its status (``/v1/providers``), its log, or an error it raises."""

from __future__ import annotations

import logging
import time

import pytest

from keel.errors import Unavailable
from keel.state.postgres_events import PostgresEventStore, scrub
from tests.state.servers import PostgresServer, wait_until


async def test_a_password_the_driver_quotes_is_never_shown(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq quotes the token it could not decode: ``invalid percent-encoded token:
    "Q7%zzpgSECRET"`` was in /v1/providers and the log. (keel's config now refuses
    such a URL; the store must not rely on that.)"""
    url = f"postgresql://keel:Q7%zzpgSECRET@127.0.0.1:{postgres_server.port}/keel"
    with caplog.at_level(logging.DEBUG, logger="keel.events"):
        store = PostgresEventStore(url, flush_seconds=0.05)
        try:
            wait_until(lambda: store.up is False)
            await store.record("view", completion_id="cmpl-1", choice_index=0)
            with pytest.raises(Unavailable) as read:
                store.acceptance(0, time.time())
            with pytest.raises(Unavailable) as pruned:
                store.prune(time.time())
            status = store.status()
        finally:
            store.close(timeout=1.0)
    shown = [str(status), read.value.message, pruned.value.message, caplog.text]
    assert "invalid percent-encoded token" in str(status["last_error"])  # the cause is kept
    for text in shown:
        assert "SECRET" not in text
        assert "Q7" not in text


def test_scrub_removes_the_password_as_written_and_decoded() -> None:
    url = "postgresql://keel:p%40ss%2Fw0rd@db.example:5432/keel"
    message = (
        'FATAL: password "p@ss/w0rd" is wrong, connecting with '
        "postgresql://keel:p%40ss%2Fw0rd@db.example:5432/keel; token p%40ss%2Fw0rd"
    )
    scrubbed = scrub(message, url)
    assert "p@ss/w0rd" not in scrubbed
    assert "p%40ss%2Fw0rd" not in scrubbed
    assert "w0rd" not in scrubbed
    assert scrubbed.startswith('FATAL: password "***" is wrong')
    assert scrub('relation "keel_events" does not exist', url) == (
        'relation "keel_events" does not exist'
    )
