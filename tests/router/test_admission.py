"""Admission control and superseding, with real asyncio tasks."""

from __future__ import annotations

import asyncio

import pytest

from keel.errors import Overloaded
from keel.router.admission import CALLER, Admission, Superseder


async def hold(admission: Admission, release: asyncio.Event, entered: list[int], n: int) -> None:
    async with admission.slot():
        entered.append(n)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrency_limit_then_queue_then_429() -> None:
    admission = Admission("completion", max_concurrent=2, queue_size=1, queue_timeout=5.0)
    release = asyncio.Event()
    entered: list[int] = []
    tasks = [asyncio.create_task(hold(admission, release, entered, n)) for n in range(3)]
    await settle()
    assert entered == [0, 1]
    assert (admission.active, admission.waiting) == (2, 1)
    assert admission.under_pressure

    with pytest.raises(Overloaded) as caught:
        async with admission.slot():
            pass
    error = caught.value
    assert error.status_code == 429
    assert error.retry_after is not None and error.retry_after >= 1
    assert "queue full" in error.message
    assert admission.rejected == 1

    release.set()
    await asyncio.gather(*tasks)
    assert entered == [0, 1, 2]
    assert (admission.active, admission.waiting) == (0, 0)
    assert not admission.under_pressure


class Depths:
    """The queue-depth gauge as the metrics keep it: the last value set per role."""

    def __init__(self) -> None:
        self.depth: dict[str, int] = {}
        self.waits: list[str] = []

    def rejected(self, role: str, reason: str) -> None: ...
    def degraded(self, role: str) -> None: ...

    def queue_depth(self, role: str, n: int) -> None:
        self.depth[role] = n

    def queue_wait(self, role: str, seconds: float) -> None:
        self.waits.append(role)


async def test_a_gates_queue_is_the_roles_queue_in_its_figures_and_pressure() -> None:
    """Requests waiting at a role's gate (its local model, for a model server's role)
    put the role under pressure and count in its queue depth, added to its own."""
    events = Depths()
    role = Admission(
        "completion", max_concurrent=1024, queue_size=4, queue_timeout=5.0, events=events
    )
    gate = role.gate("local/m", 1)
    assert role.gate("local/m", 1) is gate
    release = asyncio.Event()
    entered: list[int] = []
    tasks = [asyncio.create_task(hold(gate, release, entered, n)) for n in range(3)]
    await settle()
    assert (gate.active, gate.waiting, role.waiting) == (1, 2, 0)
    assert role.under_pressure and events.depth == {"completion": 2}
    assert role.snapshot()["gates"] == {"local/m": gate.snapshot()}
    release.set()
    await asyncio.gather(*tasks)
    assert not role.under_pressure and events.depth == {"completion": 0}
    assert events.waits == ["completion", "completion"]


async def test_queue_timeout_is_a_429() -> None:
    admission = Admission("chat", max_concurrent=1, queue_size=5, queue_timeout=0.05)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, [], 0))
    await settle()
    with pytest.raises(Overloaded, match="no slot within"):
        async with admission.slot():
            pass
    assert admission.waiting == 0
    release.set()
    await holder
    async with admission.slot():
        assert admission.active == 1


async def test_zero_queue_refuses_at_once_when_busy() -> None:
    admission = Admission("embedding", max_concurrent=1, queue_size=0, queue_timeout=5.0)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, [], 0))
    await settle()
    with pytest.raises(Overloaded):
        async with admission.slot():
            pass
    release.set()
    await holder


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    admission = Admission("completion", max_concurrent=1, queue_size=1, queue_timeout=5.0)
    release = asyncio.Event()
    entered: list[int] = []
    holder = asyncio.create_task(hold(admission, release, entered, 0))
    await settle()
    waiter = asyncio.create_task(hold(admission, release, entered, 1))
    await settle()
    assert admission.waiting == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert admission.waiting == 0
    # The queue has room again.
    third = asyncio.create_task(hold(admission, release, entered, 2))
    await settle()
    assert admission.waiting == 1
    release.set()
    await asyncio.gather(holder, third)
    assert entered == [0, 2]
    assert admission.active == 0


async def test_a_failing_request_gives_its_slot_back() -> None:
    admission = Admission("completion", max_concurrent=1, queue_size=0, queue_timeout=1.0)
    with pytest.raises(ValueError):
        async with admission.slot():
            raise ValueError("boom")
    async with admission.slot():
        assert admission.active == 1


async def test_superseder_cancels_the_older_request_for_the_same_key() -> None:
    superseder = Superseder()
    forever = asyncio.Event()
    first = asyncio.create_task(forever.wait())
    second = asyncio.create_task(forever.wait())
    other = asyncio.create_task(forever.wait())
    superseder.claim(("editor", "a.py"), first)
    superseder.claim(("editor", "b.py"), other)
    superseder.claim(("editor", "a.py"), second)
    await settle()
    assert first.cancelled()
    assert not second.done() and not other.done()

    # The old one's release must not drop the new one's claim.
    superseder.release(("editor", "a.py"), first)
    third = asyncio.create_task(forever.wait())
    superseder.claim(("editor", "a.py"), third)
    await settle()
    assert second.cancelled()

    superseder.release(("editor", "a.py"), third)
    fourth = asyncio.create_task(forever.wait())
    superseder.claim(("editor", "a.py"), fourth)
    await settle()
    assert not third.done(), "a released request is not cancelled later"
    for task in (third, fourth, other):
        task.cancel()
    await asyncio.gather(third, fourth, other, return_exceptions=True)


async def test_superseder_cancels_only_the_requests_the_new_one_carries_on_from() -> None:
    """Under one key (a team's shared key), a request from elsewhere is left running."""
    superseder = Superseder()
    forever = asyncio.Event()
    mine, theirs, next_keystroke = (asyncio.create_task(forever.wait()) for _ in range(3))
    superseder.claim("team", mine, "mine")
    superseder.claim("team", theirs, "theirs", lambda there: there == "theirs")
    await settle()
    assert not mine.done(), "a colleague's request is no keystroke of mine"
    superseder.claim("team", next_keystroke, "mine", lambda there: there == "mine")
    await settle()
    assert mine.cancelled() and not theirs.done()
    for task in (mine, theirs, next_keystroke):
        superseder.release("team", task)
    assert not superseder._running, "released: nothing kept per key"
    for task in (theirs, next_keystroke):
        task.cancel()
    await asyncio.gather(theirs, next_keystroke, return_exceptions=True)


async def test_a_freed_slot_goes_to_the_waiting_key_running_fewest() -> None:
    """One key's sixteen completions queued ahead of a colleague's keystroke, which waited
    for all of them first (p50 10 s, two of three a 429). A key's own requests keep
    their order, and a cancelled waiter gives its turn on."""
    admission = Admission("completion", max_concurrent=2, queue_size=16, queue_timeout=5.0)
    releases = {n: asyncio.Event() for n in range(8)}
    entered: list[int] = []

    def as_caller(key: str, n: int) -> asyncio.Task[None]:
        CALLER.set(key)  # the task copies the context as it is now
        return asyncio.create_task(hold(admission, releases[n], entered, n))

    flood = [as_caller("key-a", n) for n in range(5)]  # 0 and 1 run, 2-4 wait
    await settle()
    gone = as_caller("key-b", 5)
    colleague = as_caller("key-b", 6)
    await settle()
    assert entered == [0, 1] and admission.waiting == 5
    assert admission.snapshot()["running_by_key"] == {"key-a": 2}
    gone.cancel()  # a waiter that leaves: its turn goes on
    await settle()
    releases[0].set()
    await settle()
    assert entered == [0, 1, 6]  # key-b ran none: its request goes before key-a's
    assert admission.snapshot()["running_by_key"] == {"key-a": 1, "key-b": 1}
    releases[1].set()
    releases[6].set()
    await settle()
    assert entered == [0, 1, 6, 2, 3]  # key-a's own, in the order they came
    for event in releases.values():
        event.set()
    await asyncio.gather(*flood, colleague, return_exceptions=True)
    assert entered == [0, 1, 6, 2, 3, 4]
    assert (admission.active, admission.waiting) == (0, 0) and not admission._running
