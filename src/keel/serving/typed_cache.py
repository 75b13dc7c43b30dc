"""Completions with no model work: typed through, in flight, or computed ahead.

An editor sends a request per keystroke. When the user types the characters
of the suggestion on screen, the next request's prefix is the earlier
request's prefix plus the first ``k`` characters of its completion, with the
same suffix: the answer is the rest of that completion, and no model needs to
run (llama.vim and llama.vscode keep such a cache in the editor; keel keeps it
for every client). Matching is on the raw segments the editor sent, never on
the built prompt, so it holds across keel's window moves and snippet choices.

- :class:`TypedCache`: recent suggestions per *place* (editor, file,
  language); :meth:`TypedCache.rest` finds the one the request typed through.
- :class:`Flights`: generations running now, per place. A request whose
  prefix extends a running generation's prefix by what that generation has
  produced so far joins it (:meth:`Flights.join`) instead of superseding it,
  and reads its answer from the cache when it lands. A flight is cancelled
  when its last waiter leaves; a *precompute* (the completion for "the user
  accepted this", started while the engine is idle) has no waiter and is
  cancelled by the next real request that cannot use it.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from keel.providers.base import close_stream

Place = Hashable
"""Where suggestions may be reused: one editor's file in one language. Never shared
between users: a suggestion may carry context (snippets) from the user's other files."""


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A completion shown at ``prefix``|``suffix`` (newlines normalized to ``\\n``)."""

    prefix: str
    suffix: str
    text: str
    provider: str
    ahead: bool = False
    """Computed ahead, never shown: the very request it was made for may have it."""

    def rest(self, prefix: str, suffix: str) -> str | None:
        """What is left of this suggestion after the user typed to ``prefix``, or
        None when the request did not type through it (or typed all of it).

        The same request again is answered from here only by a suggestion computed
        ahead: a client asking twice for the same place (a manual trigger, often
        with a higher temperature) wants the model's answer, not a replay."""
        if suffix != self.suffix or not prefix.startswith(self.prefix):
            return None
        typed = len(prefix) - len(self.prefix)
        if typed >= len(self.text) or not self.text.startswith(prefix[len(self.prefix) :]):
            return None
        return self.text[typed:] if typed or self.ahead else None


CACHED_BYTES = 64 * 2**20
"""Memory the cache's prefixes and suffixes take in all (the places longest unused go
first): bounded by count alone, 4 MB prefixes and suffixes grew keel past 2.7 GB; by
characters, a prefix with one emoji in it (four bytes a character in Python) held
~250 MiB."""


def _size(suggestions: list[Suggestion]) -> int:
    return sum(sys.getsizeof(s.prefix) + sys.getsizeof(s.suffix) for s in suggestions)


class TypedCache:
    """The last ``per_place`` non-empty suggestions of the last ``places`` places, in at
    most ``max_bytes`` of their prefixes and suffixes."""

    def __init__(
        self, *, places: int = 256, per_place: int = 16, max_bytes: int = CACHED_BYTES
    ) -> None:
        self.places = places
        self.per_place = per_place
        self.max_bytes = max_bytes
        self.bytes = 0
        """What the kept suggestions' prefixes and suffixes add up to."""
        self._entries: OrderedDict[Place, list[Suggestion]] = OrderedDict()

    def put(self, place: Place, suggestion: Suggestion) -> None:
        if not suggestion.text:
            return
        entries = self._entries.setdefault(place, [])
        self._entries.move_to_end(place)
        self.bytes -= _size(entries)
        entries[:] = [
            e for e in entries if (e.prefix, e.suffix) != (suggestion.prefix, suggestion.suffix)
        ]
        entries.append(suggestion)
        del entries[: -self.per_place]
        self.bytes += _size(entries)
        while len(self._entries) > self.places or (
            self.bytes > self.max_bytes and len(self._entries) > 1
        ):
            self.bytes -= _size(self._entries.popitem(last=False)[1])
        while self.bytes > self.max_bytes and len(entries) > 1:  # one place, still too much
            self.bytes -= _size([entries.pop(0)])

    def rest(self, place: Place, prefix: str, suffix: str) -> tuple[str, Suggestion] | None:
        """The rest of the suggestion ``prefix`` typed through, and that suggestion;
        of several, the one made closest to the cursor (the longest prefix). None for a
        request at a place one was shown already: asked again, it wants the model's
        answer (tabby-agent's other choices, a manual trigger), and a suggestion from
        further back replayed the same text to each."""
        entries = self._entries.get(place, ())
        if any(e.prefix == prefix and e.suffix == suffix and not e.ahead for e in entries):
            return None
        best: tuple[str, Suggestion] | None = None
        for entry in entries:
            rest = entry.rest(prefix, suffix)
            if rest is not None and (best is None or len(entry.prefix) >= len(best[1].prefix)):
                best = (rest, entry)
        return best

    def known_places(self) -> list[Place]:
        return list(self._entries)

    def holds(self, place: Place, prefix: str, suffix: str) -> bool:
        """Is there a suggestion made exactly at ``prefix``|``suffix``?"""
        return any(e.prefix == prefix and e.suffix == suffix for e in self._entries.get(place, ()))


@dataclass(eq=False)
class Flight:
    """A generation running for ``prefix``|``suffix`` at ``place``."""

    place: Place
    prefix: str
    suffix: str
    precompute: bool
    produced: str = ""
    """The raw text generated so far (before postprocessing)."""
    waiters: int = 0
    task: asyncio.Task[Any] | None = field(default=None, repr=False)

    def extended_by(self, prefix: str, suffix: str) -> bool:
        """Does ``prefix`` extend this flight's prefix by text it has already produced?
        (The same request again joins only a precompute, as in :meth:`Suggestion.rest`.)"""
        typed = prefix[len(self.prefix) :]
        return (
            suffix == self.suffix
            and prefix.startswith(self.prefix)
            and self.produced.startswith(typed)
            and bool(typed or self.precompute)
        )

    async def recording(self, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
        """``pieces``, noted in :attr:`produced` as they come (before stop words are
        settled: a joiner only needs to know the text is on its way)."""
        self.produced = ""
        try:
            async for piece in pieces:
                self.produced += piece
                yield piece
        finally:
            await close_stream(pieces)

    def leave(self) -> None:
        """A waiter is gone; with nobody left waiting, the work is cancelled."""
        self.waiters -= 1
        if self.waiters <= 0 and self.task is not None:
            self.task.cancel("no one waits for this completion any more")

    async def wait(self) -> None:
        """Until the flight has landed (or failed, or was cancelled); never raises
        the flight's own error: the waiter then does the work itself."""
        assert self.task is not None
        await asyncio.wait([self.task])


class Flights:
    """The generations running now, by place."""

    def __init__(self) -> None:
        self._running: dict[Place, list[Flight]] = {}

    def __iter__(self) -> Iterator[Flight]:
        for flights in self._running.values():
            yield from flights

    @property
    def busy(self) -> bool:
        """Is any real (not precomputing) generation running?"""
        return any(not flight.precompute for flight in self)

    def join(self, place: Place, prefix: str, suffix: str) -> Flight | None:
        """The running flight ``prefix`` extends, now with one more waiter; the
        caller must :meth:`Flight.leave` it. The flight closest to the cursor wins."""
        candidates = [
            f
            for f in self._running.get(place, ())
            if f.task is not None and not f.task.done() and f.extended_by(prefix, suffix)
        ]
        if not candidates:
            return None
        flight = max(candidates, key=lambda f: len(f.prefix))
        flight.waiters += 1
        return flight

    def start(self, flight: Flight, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` as ``flight``; it leaves the registry when it ends."""
        task = asyncio.get_running_loop().create_task(work, name="completion-flight")
        flight.task = task
        self._running.setdefault(flight.place, []).append(flight)

        def landed(done: asyncio.Task[Any]) -> None:
            if not done.cancelled():
                done.exception()  # its waiters saw it, or nobody needs to
            flights = self._running.get(flight.place, [])
            if flight in flights:
                flights.remove(flight)
            if not flights:
                self._running.pop(flight.place, None)

        task.add_done_callback(landed)
        return task

    def cancel_precomputes(self, keep: Flight | None = None) -> None:
        """A real request needs the engine: precomputes nobody waits for stop at once."""
        for flight in list(self):
            if flight.precompute and flight.waiters <= 0 and flight is not keep:
                assert flight.task is not None
                flight.task.cancel("a real request needs the engine")

    def running_at(self, place: Place, prefix: str, suffix: str) -> bool:
        return any(f.prefix == prefix and f.suffix == suffix for f in self._running.get(place, ()))

    async def aclose(self) -> None:
        """Cancel every flight and wait for them to end."""
        tasks = [f.task for f in self if f.task is not None]
        for task in tasks:
            task.cancel("shutting down")
        if tasks:
            await asyncio.wait(tasks)
