"""Whitespace at the cursor: the prompt ends at the code, the model writes the
whitespace, and the editor gets the text after it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from keel.pipeline.completion import BuiltPrompt, whitespace_cut


@pytest.mark.parametrize(
    ("prefix", "suffix", "cut"),
    [
        ("def f():\n    ", "\n", "\n    "),
        ("def f():  \n\t\t", "", "  \n\t\t"),
        ("x = 1\n\n    ", "", "\n    "),  # the blank line above stays: not a "\n\n" stop
        ("if x:\n        ", "\nelse:\n", "\n        "),
        ("x = 1\n", "", ""),  # column 0: the line's place is what the model sees
        ("    ", "", ""),  # nothing before it
        ("foo(a, ", ")", " "),  # after code on its line
        ("x =\t", "", "\t"),
        ("x = 1", "", ""),
        ("def f():\n    ", "return 1\n", ""),  # code after the cursor on its line
        ("", "", ""),
    ],
)
def test_whitespace_cut(prefix: str, suffix: str, cut: str) -> None:
    assert whitespace_cut(prefix, suffix) == cut


async def _pieces(parts: Sequence[str]) -> AsyncIterator[str]:
    for part in parts:
        yield part


async def _generated(cut: str, parts: Sequence[str]) -> str:
    built = BuiltPrompt("prompt", None, [], cut)
    return "".join([piece async for piece in built.generated(_pieces(parts))])


@pytest.mark.parametrize(
    ("cut", "parts", "text"),
    [
        ("\n    ", ["\n", "    ", "ret", "urn x\n    y"], "return x\n    y"),
        ("\n    ", ["\n    return x"], "return x"),
        # The first line at the cursor's indentation, which the editor chose.
        ("\n    ", ["\n        deeper"], "deeper"),
        ("\n  ", ["\n    four spaces\n}"], "four spaces\n}"),
        ("\n    ", ["\n  ", "shallower"], "shallower"),
        ("\n    ", ["\n\n    after a blank line"], "after a blank line"),
        ("\n\t", ["\n\tx = 1"], "x = 1"),
        ("\n    ", [" pass"], "pass"),  # on the line before, or at the cursor: the same
        ("\n    ", ["\n   ", "  "], ""),  # only whitespace
        ("", [" keep", " as is"], " keep as is"),  # nothing cut
        # After spaces on a line of code: the model's own spaces go, never a newline.
        (" ", [" ", " None", " else"], "None else"),
        (" ", ["b)"], "b)"),
        (" ", ["\n    x"], "\n    x"),
    ],
)
async def test_generated_continues_after_the_cut(cut: str, parts: Sequence[str], text: str) -> None:
    assert await _generated(cut, parts) == text


def test_nothing_is_cut_where_a_stop_word_would_end_the_answer_at_once() -> None:
    """``additional_stop_words = ["\\n"]`` (single-line completions), or a client's stop
    words: a model writing the cut whitespace would meet them first."""
    assert whitespace_cut("def f():\n    ", "", ["\n"]) == ""
    assert whitespace_cut("def f():\n    ", "", ["\n\n", "\ndef"]) == "\n    "
    assert whitespace_cut("x = ", "", ["\n", ""]) == " "
    assert whitespace_cut("x = 1\n\n    ", "", ["\n\n"]) == "\n    "  # the blank line stays
