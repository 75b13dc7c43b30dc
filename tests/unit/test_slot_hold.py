"""The worker's slot choice keeps a slot for completions from chats, within limits.

The whole behaviour, with the real engine, is in tests/integration/test_engine.py;
here the limits: one slot, no recent completion, and the longest a chat is held."""

from __future__ import annotations

import threading

import pytest

from keel.workers import worker
from keel.workers.worker import _SlotPool


def test_a_chat_is_held_only_while_completions_are_served() -> None:
    pool = _SlotPool(2)
    first, _, _ = pool.acquire("chat one", threading.Event(), chat=True)
    second, held, waited = pool.acquire("chat two", threading.Event(), chat=True)
    assert {first, second} == {0, 1} and not held and waited == 0  # no completion yet


def test_one_slot_keeps_nothing_back() -> None:
    pool = _SlotPool(1)
    assert pool.acquire("def f(", threading.Event()) == (0, False, 0)
    pool.release(0)
    assert pool.acquire("a chat", threading.Event(), chat=True) == (0, False, 0)


def test_a_held_chat_takes_the_kept_slot_after_the_hold_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "HOLD_LIMIT", 0.2)
    pool = _SlotPool(2)
    typed, _, _ = pool.acquire("def f(", threading.Event())
    pool.release(typed)  # a completion was served
    running, held, _ = pool.acquire("chat one", threading.Event(), chat=True)
    assert not held
    kept, held, waited = pool.acquire("chat two", threading.Event(), chat=True)
    assert held and kept != running  # waited out the limit, then took the kept slot
    assert waited >= 0.2


def test_a_held_chat_cancelled_leaves_without_a_slot() -> None:
    pool = _SlotPool(2)
    pool.release(pool.acquire("def f(", threading.Event())[0])
    pool.acquire("chat one", threading.Event(), chat=True)
    cancelled = threading.Event()
    got: list[tuple[int | None, bool, float]] = []
    waiter = threading.Thread(
        target=lambda: got.append(pool.acquire("chat two", cancelled, chat=True))
    )
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # held
    cancelled.set()
    pool.wake()
    waiter.join(5)
    assert [(slot, held) for slot, held, _ in got] == [(None, True)]
    assert got[0][2] >= 0.2


def test_requests_that_wait_for_a_slot_take_it_in_the_order_they_came() -> None:
    """Every waiter woke when a slot freed and whichever ran first took it: under load
    one waited past the role's deadline while newer ones went ahead (a soak's 4-token
    completion timed out at 30 s). A newer request arriving as the slot frees waits its
    turn behind the one already waiting."""
    pool = _SlotPool(1)
    first, _, _ = pool.acquire("a = 1", threading.Event())
    older, newer = threading.Event(), threading.Event()
    got: list[int | None] = []
    waiting = threading.Thread(
        target=lambda: got.append(pool.acquire("b = 2", older)[0]), daemon=True
    )
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # no slot free: it waits
    leave = threading.Timer(0.5, lambda: (newer.set(), pool.wake()))  # then it leaves
    leave.start()
    pool.release(first)
    try:
        slot, _, waited = pool.acquire("c = 3", newer)
        assert slot is None and waited > 0.4, "the newer request went first"
        waiting.join(5)
        assert got == [first]
    finally:
        leave.cancel()
        older.set()
        pool.wake()


def test_a_chat_stays_held_while_completions_keep_coming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Held 30 s at most: one user's eight chats each took the kept slot after 30 s, and
    a colleague's typing waited 13 s and more behind them."""
    monkeypatch.setattr(worker, "HOLD_LIMIT", 1.0)  # gaps of typing well within it
    pool = _SlotPool(2)
    pool.release(pool.acquire("def f(", threading.Event())[0])  # a completion was served
    running, _, _ = pool.acquire("chat one", threading.Event(), chat=True)
    got: list[tuple[int | None, bool, float]] = []
    chat = threading.Thread(
        target=lambda: got.append(pool.acquire("chat two", threading.Event(), chat=True))
    )
    chat.start()
    for n in range(6):  # someone types: a completion every 0.1 s, for twice the limit
        chat.join(0.1)
        assert chat.is_alive(), f"the chat took the kept slot while completions came ({n})"
        pool.release(pool.acquire(f"def f{n}(", threading.Event())[0])
    chat.join(5)  # typing stopped: the kept slot is the chat's once the limit has passed
    [(slot, held, waited)] = got
    assert held and slot != running and waited >= 0.6 + 1.0
