"""Which regex patterns of a response schema are refused before an engine sees them.

A local engine's grammar follows every way to split a text among the repeats of what
can match nothing: measured on the embedded model, ``(a*)*`` took 5.7 s,
``(a{0,5}b?){0,50}`` 25 s, ``((a{0,30}){0,30}){0,30}`` and ``(a?a?a?a?a?){1,100}``
over 30 s of both cores, while the patterns kept here answered in 0.1-0.2 s.
"""

from __future__ import annotations

import pytest

from keel.schemas.openai import pattern_problem

REFUSED = [
    "^(a*)*$",
    "^(a*)+$",
    "^(a*){2}$",
    "^(a{0,5}b?){0,50}$",
    "^((a{0,30}){0,30}){0,30}$",
    "^(a?a?a?a?a?){1,100}$",
    r"^(\d{0,3},?)*$",
    "(?:a|)*",
    "(|a)+",
    "(?P<name>a?)+",
    "(?<name>a?)+",
    r"(\b)+",
    "[a-z]{5,2}",
    "^[z-a]$",
    "[9-0]",
    r"[a-\]]",
]

KEPT = [
    "^((a+)+)+$",
    r"^(\w+\s*)+$",
    "^(a|aa)*$",
    "^(a{1,300}){1,300}$",
    "^([a-z]+[0-9]*)*$",
    "^(a*)?$",
    "^(a*){1}$",
    "^a{0,100000}$",
    r"^(\d{1,3}\.){3}\d{1,3}$",
    r"^\d{4}-\d{2}-\d{2}$",
    r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$",
    r"^(https?://)?([\w-]+\.)+[\w-]+(/[\w./?%&=-]*)?$",
    r"^[\]()*?]+$",
    "^[]a]*$",
    "[^]]*",
    r"\(*",
    "(?i:a)+",
    "[abc",
    "(a",
    ")))*",
    "[A-Za-z0-9_-]",
    "[-a]",
    r"[\d-a]",
    r"[\]-a]",
    "[!-~]",
]


@pytest.mark.parametrize("pattern", REFUSED)
def test_a_repeat_of_what_can_match_nothing_is_refused(pattern: str) -> None:
    assert pattern_problem(pattern) is not None


@pytest.mark.parametrize("pattern", KEPT)
def test_patterns_whose_repeats_each_take_a_character_are_kept(pattern: str) -> None:
    assert pattern_problem(pattern) is None


def test_the_refusal_names_the_repeat_and_what_to_do() -> None:
    said = pattern_problem("^[0-9]+(a{0,5}b?){0,50}$")
    assert said is not None
    assert said.startswith("(a{0,5}b?){0,50} repeats what can match nothing"), said
    assert "match at least one character" in said
    assert pattern_problem("x{5,2}") == (
        "{5,2} asks for at least 5 and at most 2 repeats: no value can meet both"
    )


def test_groups_nested_past_the_schema_limit_are_refused_without_recursing_away() -> None:
    assert pattern_problem("(" * 5000 + "a" + ")" * 5000) == "groups nested deeper than 64 levels"
    assert pattern_problem("(" * 60 + "a" + ")" * 60) is None
