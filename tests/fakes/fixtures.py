"""Pytest fixtures for the fakes; ``tests/conftest.py`` imports them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.upstreams import FakeUpstream, unused_port


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """A fresh fake backend on 127.0.0.1, behaving normally; stopped after the test."""
    with FakeUpstream() as server:
        yield server
    assert not server.errors, f"the fake upstream failed: {server.errors!r}"


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens: connecting is refused."""
    return f"http://127.0.0.1:{unused_port()}"
