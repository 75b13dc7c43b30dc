"""Whitespace at the cursor: the prompt ends at the code, the model writes the
whitespace, and the editor gets the text after it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from keel.pipeline.completion import BuiltPrompt
from keel.pipeline.cut import Cut, indent_unit, whitespace_cut


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
        # Only the spaces, tabs and newlines BPE merges with the next word: what else the
        # user typed stays in the prompt (the model wrote after a space it never saw)
        ("s = 'a\xa0", "'\n", ""),  # a no-break space in a string
        ("# 注释：\u3000", "\n", ""),  # an ideographic space an IME typed
        ("x = 1\x0c", "", ""),  # a form feed
        ("x = 1\n\x0c", "", ""),  # a form feed starting a line: no indentation
        ("x = 1 \u2028", "", ""),
        ("def f():\r\n    ", "\r\n", "\r\n    "),  # an OpenAI prompt, as written
    ],
)
def test_whitespace_cut(prefix: str, suffix: str, cut: str) -> None:
    assert whitespace_cut(prefix, suffix).text == cut


async def _pieces(parts: Sequence[str]) -> AsyncIterator[str]:
    for part in parts:
        yield part


async def _generated(cut: str | Cut, parts: Sequence[str]) -> str:
    built = BuiltPrompt("prompt", None, [], cut if isinstance(cut, Cut) else Cut(cut))
    return "".join([piece async for piece in built.generated(_pieces(parts))])


TAB = Cut("\n\t", unit="\t")
TWO = Cut("\n  ", unit="  ")
OPEN = Cut("\n    ", line_open=True, unit="    ")


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
        ("\n    ", ["\n   ", "  "], ""),  # only whitespace
        ("", [" keep", " as is"], " keep as is"),  # nothing cut
        # The model went on with the line above (``x = 1`` as ``x = 10``): the user ended
        # that line, so what it wrote there is dropped, and its next line is the answer.
        ("\n    ", ["0", "\n    return x"], "return x"),
        ("\n    ", [".getsize(p", ")\n", "    print(p)"], "print(p)"),
        ("\n    ", [" pass"], ""),
        ("\n    ", ["0"], ""),
        # ... unless that line is open (``foo(``, ``def f():``): then it goes on here.
        (OPEN, ["a, b)"], "a, b)"),
        (OPEN, [" pass"], "pass"),
        (OPEN, ["\n    return x"], "return x"),
        # Later lines in the file's indentation, level for level, where the model's
        # first line was not at the cursor's (four spaces in a file of tabs or two).
        (
            TAB,
            ["\n    if n == 0:\n        return 1\n    return n"],
            "if n == 0:\n\t\treturn 1\n\treturn n",
        ),
        (TWO, ["\n    if x:\n        y()\n\n    z()"], "if x:\n    y()\n\n  z()"),
        (TWO, ["\n  if x:\n    y()"], "if x:\n    y()"),  # the model's own matches
        (Cut("\n\t\t", unit="\t"), ["\n        a\n            b\n    c"], "a\n\t\t\tb\n\tc"),
        (
            TAB,
            ["\n    a\n        b\n          odd"],
            "a\n\t\tb\n\t\t  odd",
        ),  # part of a level stays
        (TAB, ["\n    a\n\t\tb"], "a\n\t\tb"),  # the model's tabs stay
        # A first line a level shallower than the cursor closed the cursor's block
        # (``except:``, ``}``): text inserted at the cursor cannot, so nothing is kept.
        (Cut("\n        ", unit="    "), ["\n    except OSError:\n        raise"], ""),
        (Cut("\n    ", unit="  "), ["\n  else:\n    y = 2"], ""),
        (Cut("\n\t\t", unit="\t"), ["\n    }\n    return a;"], ""),
        # Deeper than the cursor: the first line at the cursor, the rest relative to it.
        (
            Cut("\n    ", unit="    "),
            ["\n        a\n            b\n        c"],
            "a\n        b\n    c",
        ),
        # A CRLF prompt (OpenAI's route is raw): the newline and indentation written
        # again after an open line are left out as well, and CRLF stays CRLF.
        (
            Cut("\r\n    ", line_open=True, unit="    "),
            ["\r\n    a\r\n\r\n    b"],
            "a\r\n\r\n    b",
        ),
        # After spaces on a line of code: the model's own spaces go, never a newline.
        (" ", [" ", " None", " else"], "None else"),
        (" ", ["b)"], "b)"),
        (" ", ["\n    x"], "\n    x"),
    ],
)
async def test_generated_continues_after_the_cut(
    cut: str | Cut, parts: Sequence[str], text: str
) -> None:
    assert await _generated(cut, parts) == text


@pytest.mark.parametrize(
    ("prefix", "line_open", "unit"),
    [
        ("def f():\n    ", True, "    "),
        ("x = foo(\n    ", True, "    "),
        ("    x = 1\n    ", False, "    "),
        ("class A:\n  def f(self):\n    pass\n  ", False, "  "),
        ("def f():\n\t", True, "\t"),
        ("def load(path):\n    # Open the file, read every line,\n    ", False, "    "),
        ("function f() {\n  // the items, by price:\n  ", False, "  "),
        ("/**\n * doc\n */\nfunction f() {\n  a();\n  if (b) {\n    c();\n  }\n  ", False, "  "),
    ],
)
def test_a_newline_cut_knows_the_line_above_and_the_indentation(
    prefix: str, line_open: bool, unit: str
) -> None:
    cut = whitespace_cut(prefix, "\n")
    assert (cut.line_open, cut.unit) == (line_open, unit)


def test_the_indentation_step_is_the_commonest_increase() -> None:
    assert indent_unit("a\n  b\n    c\n      d\n", "  ") == "  "
    assert indent_unit("x = 1", "        ") == "        "  # nothing indented before it
    assert indent_unit("a\n    b", "\t") == "\t"


def test_nothing_is_cut_where_a_stop_word_would_end_the_answer_at_once() -> None:
    """``additional_stop_words = ["\\n"]`` (single-line completions), or a client's stop
    words: a model writing the cut whitespace would meet them first."""
    assert whitespace_cut("def f():\n    ", "", ["\n"]).text == ""
    assert whitespace_cut("def f():\n    ", "", ["\n\n", "\ndef"]).text == "\n    "
    assert whitespace_cut("x = ", "", ["\n", ""]).text == " "
    assert whitespace_cut("x = 1\n\n    ", "", ["\n\n"]).text == "\n    "  # the blank line stays
