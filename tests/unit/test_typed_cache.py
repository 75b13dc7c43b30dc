"""The typed-through cache and the registry of running generations, alone."""

from __future__ import annotations

import asyncio

from keel.serving.typed_cache import Flight, Flights, Suggestion, TypedCache

PLACE = ("editor", "a.py", "python")


def suggestion(prefix: str, text: str, suffix: str = "\n") -> Suggestion:
    return Suggestion(prefix, suffix, text, "local")


def test_typing_the_suggestion_leaves_its_rest() -> None:
    cache = TypedCache()
    cache.put(PLACE, suggestion("x = ", "compute(a, b)"))
    assert cache.rest(PLACE, "x = ", "\n") is None  # the same request again: the model's
    hit = cache.rest(PLACE, "x = comp", "\n")
    assert hit is not None and hit[0] == "ute(a, b)"


def test_typing_something_else_or_all_of_it_is_a_miss() -> None:
    cache = TypedCache()
    cache.put(PLACE, suggestion("x = ", "compute(a, b)"))
    assert cache.rest(PLACE, "x = comb", "\n") is None  # typed a different character
    assert cache.rest(PLACE, "x = compute(a, b)", "\n") is None  # nothing left to show
    assert cache.rest(PLACE, "x = comp", "\n    y\n") is None  # the text after moved
    assert cache.rest(PLACE, "y = comp", "\n") is None  # not the same line
    assert cache.rest(("other", "a.py", "python"), "x = comp", "\n") is None


def test_the_suggestion_made_closest_to_the_cursor_wins() -> None:
    cache = TypedCache()
    cache.put(PLACE, suggestion("x = ", "compute(a)"))
    cache.put(PLACE, suggestion("x = comp", "are(b)"))
    hit = cache.rest(PLACE, "x = compa", "\n")
    assert hit is not None and hit[0] == "re(b)"
    hit = cache.rest(PLACE, "x = compu", "\n")
    assert hit is not None and hit[0] == "te(a)"


def test_a_suggestion_computed_ahead_answers_the_request_it_was_made_for() -> None:
    cache = TypedCache()
    cache.put(PLACE, Suggestion("x = f(a)", "\n", "\ny = 2", "local", ahead=True))
    hit = cache.rest(PLACE, "x = f(a)", "\n")
    assert hit is not None and hit[0] == "\ny = 2"


def test_empty_suggestions_are_not_kept_and_places_are_bounded() -> None:
    cache = TypedCache(places=2, per_place=2)
    cache.put(PLACE, suggestion("a", ""))
    assert not cache.holds(PLACE, "a", "\n")
    for n in range(3):
        cache.put(PLACE, suggestion(f"p{n}", "text"))
    assert not cache.holds(PLACE, "p0", "\n") and cache.holds(PLACE, "p2", "\n")
    cache.put(("b",), suggestion("q", "text"))
    cache.put(("c",), suggestion("q", "text"))
    assert cache.rest(PLACE, "p2", "\n") is None  # the least recent place went


def test_the_cache_is_bounded_by_the_text_it_holds() -> None:
    """Bounded by count alone, requests with 4 MB of prefix and suffix grew keel past
    2.7 GB: the places used longest ago go, then a place's oldest suggestions."""
    cache = TypedCache(max_bytes=10_000)
    big = "x" * 3_000
    for n in range(5):
        cache.put((f"file{n}",), suggestion(big + str(n), "text", suffix=""))
    assert cache.bytes <= 10_000
    assert not cache.holds(("file0",), big + "0", "") and cache.holds(("file4",), big + "4", "")
    for n in range(5):
        cache.put(PLACE, suggestion(big + f"p{n}", "text", suffix=""))
    assert cache.bytes <= 10_000 and cache.holds(PLACE, big + "p4", "")


def test_the_bound_is_memory_not_characters() -> None:
    """One emoji makes Python keep a whole prefix at four bytes a character: a cap of
    characters held ~250 MiB where it meant 64."""
    cache = TypedCache(max_bytes=30_000)
    for n in range(5):  # 3,000 characters each, ~12 KB each in memory
        cache.put((f"file{n}",), suggestion("😀" + "x" * 3_000 + str(n), "text", suffix=""))
    assert cache.bytes <= 30_000
    assert not cache.holds(("file2",), "😀" + "x" * 3_000 + "2", "")


async def test_a_request_joins_a_flight_it_extends_by_produced_text() -> None:
    flights = Flights()
    flight = Flight(PLACE, "x = ", "\n", precompute=False, waiters=1)
    release = asyncio.Event()
    flights.start(flight, release.wait())
    flight.produced = "compute("
    assert flights.join(PLACE, "x = comb", "\n") is None
    assert flights.join(PLACE, "x = compute(a", "\n") is None  # not produced yet
    assert flights.join(PLACE, "x = ", "\n") is None  # the same request supersedes it
    assert flights.join(PLACE, "x = comp", "\n") is flight
    assert flight.waiters == 2
    flight.leave()
    flight.leave()  # nobody waits any more: the work is cancelled
    await flight.wait()
    assert flight.task is not None and flight.task.cancelled()
    assert list(flights) == []


async def test_a_real_request_cancels_precomputes_nobody_waits_for() -> None:
    flights = Flights()
    ahead = Flight(PLACE, "x = compute(a)", "\n", precompute=True)
    joined = Flight(PLACE, "y = ", "\n", precompute=True)
    flights.start(ahead, asyncio.Event().wait())
    flights.start(joined, asyncio.Event().wait())
    assert flights.join(PLACE, "y = ", "\n") is joined
    assert not flights.busy and flights.running_at(PLACE, "x = compute(a)", "\n")
    flights.cancel_precomputes()
    await ahead.wait()
    assert ahead.task is not None and ahead.task.cancelled()
    assert joined.task is not None and not joined.task.done()
    await flights.aclose()
    assert joined.task.cancelled()
