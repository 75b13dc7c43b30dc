"""Scores of a completion against the hidden text.

Completions are scored as the editor would show them: the whole text, with
trailing whitespace ignored. ``first_line`` compares only the first lines,
which isolates what the model predicted from how much extra it produced.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def edit_similarity(prediction: str, target: str) -> float:
    """1 - distance / length of the longer text; 1.0 for two empty texts."""
    longest = max(len(prediction), len(target))
    if longest == 0:
        return 1.0
    return 1.0 - edit_distance(prediction, target) / longest


def _first_line(text: str) -> str:
    return text.strip("\n").split("\n", 1)[0].rstrip()


@dataclass(frozen=True, slots=True)
class Score:
    exact: bool
    similarity: float
    first_line: bool

    @classmethod
    def of(cls, prediction: str, target: str) -> Score:
        shown, wanted = prediction.rstrip(), target.rstrip()
        return cls(
            exact=shown == wanted,
            similarity=edit_similarity(shown, wanted),
            first_line=bool(wanted) and _first_line(shown) == _first_line(wanted),
        )


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    exact_match: float
    edit_similarity: float
    first_line_match: float

    @classmethod
    def of(cls, scores: Iterable[Score]) -> Summary:
        items = list(scores)
        n = len(items)
        if n == 0:
            return cls(0, 0.0, 0.0, 0.0)
        return cls(
            count=n,
            exact_match=sum(s.exact for s in items) / n,
            edit_similarity=sum(s.similarity for s in items) / n,
            first_line_match=sum(s.first_line for s in items) / n,
        )
