"""Time for the router's tests: a clock the test moves and a sleep that moves it."""

from __future__ import annotations

import pytest


class FakeClock:
    """A monotonic clock that only moves when told; ``sleep`` advances it at once."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
