"""Loopback ports for the servers the tests start, without two tests sharing one.

A port read from ``bind(port 0)`` and released is free for a moment only: under
pytest-xdist another worker's ``bind(0)`` could be handed it before the first test's
keel bound it, and then both tests talked to one keel (each saw the other's requests and
its own keel exit on "port in use"). So each xdist worker hands out ports from a range of
its own, below Linux's ephemeral range (32768-60999 by default, which outgoing
connections and ``bind(0)`` draw from), each port once per process, and only one that
binds now."""

from __future__ import annotations

import itertools
import os
import random
import socket

BASE = 10_000
SPAN = 1_500  # ports per xdist worker: gw0 10000-11499, gw1 11500-12999, ... gw14 below 32768


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...
    return int(worker.removeprefix("gw"))


def _candidates() -> itertools.cycle[int]:
    start = BASE + _worker_index() * SPAN
    ports = list(range(start, start + SPAN))
    first = random.randrange(SPAN)  # a run right after another does not retry its ports
    return itertools.cycle(ports[first:] + ports[:first])


_next = _candidates()


def free_port() -> int:
    """A loopback port nothing holds now, that no other test of this run is handed."""
    for _ in range(SPAN):
        port = next(_next)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in this worker's range ({SPAN} ports tried)")
