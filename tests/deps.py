"""What `make test` still installs while the tests run: tabby-agent (npm) and Debian's
packages (apt). It starts pytest once the venv is in and leaves a marker per install in
``.deps-pending/`` (see the Makefile), holding the pid of the make recipe that waits for
it; a test that needs what an install brings waits here for its marker to go."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

PENDING = Path(__file__).resolve().parents[1] / ".deps-pending"
WAIT_SECONDS = 240.0  # under pytest-timeout's 300 s, over a slow mirror's apt-get


def _waiting_make(name: str) -> int | None:
    """The pid of the make still installing ``name``, or None (done, or never started:
    a marker whose make is gone was left by an interrupted run)."""
    try:
        pid = int((PENDING / name).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def wait_for(name: str) -> None:
    """Until ``make node-deps`` (``"node"``) or ``make system-deps`` (``"system"``),
    started by the `make test` running these tests, has finished, if it has not."""
    deadline = time.monotonic() + WAIT_SECONDS
    while _waiting_make(name) is not None:
        if time.monotonic() > deadline:
            pytest.fail(f"`make {name}-deps` still installing after {WAIT_SECONDS:.0f} s")
        time.sleep(0.25)
