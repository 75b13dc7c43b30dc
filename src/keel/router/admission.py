"""Admission control: a concurrency limit and a bounded queue per role (narrower for
the local engine a model server's role falls back to), and
superseding (a newer completion from the same editor for the same file
cancels the older one, which the user no longer waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol

from keel.errors import Overloaded

CALLER: ContextVar[str | None] = ContextVar("keel_caller", default=None)
"""Whose request this is (its key's id; None without keys): a slot that frees goes to
the waiting caller with the fewest running (:meth:`Admission.slot`)."""


class AdmissionEvents(Protocol):
    def rejected(self, role: str, reason: str) -> None: ...
    def queue_depth(self, role: str, n: int) -> None: ...
    def queue_wait(self, role: str, seconds: float) -> None: ...
    def degraded(self, role: str) -> None: ...


class Admission:
    def __init__(
        self,
        role: str,
        *,
        max_concurrent: int,
        queue_size: int,
        queue_timeout: float,
        events: AdmissionEvents | None = None,
        parent: Admission | None = None,
    ) -> None:
        self.role = role
        self.events = events
        self.parent = parent
        self.gates: dict[str, Admission] = {}
        """Narrower limits inside this one, by provider (:meth:`gate`)."""
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self._waiters: list[tuple[str | None, asyncio.Future[None]]] = []
        """The requests waiting for a slot, oldest first, with their callers."""
        self._running: dict[str | None, int] = {}
        """The slots each caller holds."""
        self.active = 0
        self.waiting = 0
        self.rejected = 0
        self.arriving = 0
        """Requests on their way to a slot (:meth:`arrival`)."""
        self.queued = 0
        """Requests that waited for a slot, and their waits' sum (``queue_wait_seconds``)."""
        self.queue_wait_seconds = 0.0
        self.degraded = 0
        """Requests served smaller because others were queueing (:meth:`note_degraded`)."""

    @property
    def under_pressure(self) -> bool:
        """Requests are queueing (here or at a gate): serve smaller work (less context,
        fewer tokens) first."""
        return self.waiting > 0 or any(gate.waiting for gate in self.gates.values())

    def carry_counts(self, previous: Admission) -> None:
        """Go on counting from the role's admission a reload replaced, as its metrics
        do (``/v1/providers`` began at 0 again while the counters went on)."""
        self.rejected += previous.rejected
        self.queued += previous.queued
        self.queue_wait_seconds += previous.queue_wait_seconds
        self.degraded += previous.degraded

    def note_degraded(self) -> None:
        """A request was served smaller for that (a trim the client did not ask for)."""
        self.degraded += 1
        if self.events is not None:
            self.events.degraded(self.role)

    def gate(self, provider: str, max_concurrent: int) -> Admission:
        """A narrower limit for the requests of this role that go to ``provider``, with
        this role's queue size and wait: a local engine that a role served by a model
        server (1,024 at once) falls back to would take every request of a burst at once,
        for minutes of 504s, where its own role would queue them and refuse the rest."""
        gate = self.gates.get(provider)
        if gate is None:
            gate = self.gates[provider] = Admission(
                f"{self.role} on {provider}",
                max_concurrent=max_concurrent,
                queue_size=self.queue_size,
                queue_timeout=self.queue_timeout,
                events=self.events,
                parent=self,
            )
        return gate

    @property
    def _root(self) -> Admission:
        return self.parent or self

    def _reject(self, why: str, reason: str) -> Overloaded:
        self.rejected += 1
        if self.events is not None:
            self.events.rejected(self._root.role, reason)
        return Overloaded(
            f"{self.role}: {why} ({self.active} running, {self.waiting} waiting); retry shortly",
            retry_after=max(1.0, self.queue_timeout / 2),
        )

    @property
    def busy(self) -> bool:
        """A request is running, waiting for a slot or on its way to one."""
        return bool(self.active or self.waiting or self.arriving)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """A request that reads what its prompt needs before it asks for a slot (a Tabby
        completion's snippets, read in a thread): counted as on its way until it ends,
        so that a reload does not stop the providers it is yet to go to."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the ``max_concurrent`` slots, at once or after a wait in the queue. A slot
        that frees goes to the waiting caller (:data:`CALLER`) with the fewest slots, the
        oldest of its requests first: one key's sixteen completions queued ahead of a
        colleague's keystroke, which waited for all of them (p50 10 s, 2 of 3 a 429)."""
        caller = CALLER.get()
        if self.active >= self.max_concurrent or self._waiters:
            await self._queue(caller)
        self.active += 1
        self._running[caller] = self._running.get(caller, 0) + 1
        try:
            yield
        finally:
            self.active -= 1
            if (left := self._running[caller] - 1) > 0:
                self._running[caller] = left
            else:
                del self._running[caller]
            self._hand_on()

    def _hand_on(self) -> None:
        """A free slot to the next waiter: of the callers waiting, the one running fewest."""
        while self._waiters and self.active < self.max_concurrent:
            running = self._running.get
            chosen = min(range(len(self._waiters)), key=lambda i: running(self._waiters[i][0], 0))
            _, waiter = self._waiters.pop(chosen)
            if not waiter.done():
                waiter.set_result(None)
                self.active += 1  # held for it: taken over (or given back) as it wakes
                return

    async def _queue(self, caller: str | None) -> None:
        """Wait for a slot, within the queue's size and time."""
        if self.waiting >= self.queue_size:
            raise self._reject("queue full", "queue_full")
        self.waiting += 1
        self._report()
        started = time.monotonic()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((caller, waiter))
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
            self.active -= 1  # the slot held for it, taken over by slot()
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # handed a slot as it left
                self.active -= 1
                self._hand_on()
            else:
                self._waiters = [entry for entry in self._waiters if entry[1] is not waiter]
            if isinstance(exc, TimeoutError):
                raise self._reject(
                    f"no slot within {self.queue_timeout:.0f}s", "queue_timeout"
                ) from None
            raise
        finally:
            self.waiting -= 1
            self._report()
            waited = time.monotonic() - started
            self.queued += 1
            self.queue_wait_seconds += waited
            if self.events is not None:
                self.events.queue_wait(self._root.role, waited)

    def _report(self) -> None:
        """The role's queue depth: its own queue and its gates'."""
        if self.events is not None:
            root = self._root
            depth = root.waiting + sum(gate.waiting for gate in root.gates.values())
            self.events.queue_depth(root.role, depth)

    def _by_key(self) -> dict[str, int]:
        """The slots each key holds, most first: who the others wait behind."""
        held = [(n, key) for key, n in self._running.items() if key is not None]
        return {key: n for n, key in sorted(held, reverse=True)}

    def snapshot(self) -> dict[str, object]:
        gates = {name: gate.snapshot() for name, gate in self.gates.items()}
        return {
            "max_concurrent": self.max_concurrent,
            "active": self.active,
            "waiting": self.waiting,
            "queue_size": self.queue_size,
            "rejected": self.rejected,
            "queued": self.queued,
            "queue_wait_seconds": round(self.queue_wait_seconds, 3),
            "degraded": self.degraded,
            **({"gates": gates} if gates else {}),
            **({"running_by_key": by_key} if (by_key := self._by_key()) else {}),
        }


class Superseder:
    """Tracks the running requests per key; a new one cancels the older ones it carries
    on from."""

    def __init__(self) -> None:
        self._running: dict[Any, dict[asyncio.Task[Any], Any]] = {}
        self.superseded = 0
        """Requests that ended superseded (counted by their server, as the metric is: one
        whose client had left first, as tabby-agent aborts the older request itself, is
        the client's cancellation, not counted)."""

    def claim(
        self,
        key: Any,
        task: asyncio.Task[Any],
        where: Any = None,
        carries_on: Callable[[Any], bool] | None = None,
    ) -> None:
        """``task`` runs under ``key`` at ``where``; the running ones it carries on from
        (``carries_on`` of their ``where``; None: every one) are cancelled."""
        running = self._running.setdefault(key, {})
        for previous, there in list(running.items()):
            if previous is task or previous.done():
                continue
            if carries_on is None or carries_on(there):
                previous.cancel("superseded")
                del running[previous]
        running[task] = where

    def release(self, key: Any, task: asyncio.Task[Any]) -> None:
        running = self._running.get(key)
        if running is not None:
            running.pop(task, None)
            if not running:
                del self._running[key]
