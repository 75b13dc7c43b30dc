"""When a Tabby request is the same person typing on from an earlier one."""

from __future__ import annotations

from keel.serving.completion import EDIT_REACH, types_on

FILE = "".join(f"def step_{n}(value):\n    return value + {n}\n\n" for n in range(20))


def test_keystrokes_carry_on_from_the_request_before() -> None:
    before = (FILE + "def tot", "\n\nprint(total)\n")
    assert types_on(before, (FILE + "def tota", "\n\nprint(total)\n"))  # a letter
    assert types_on(before, (FILE + "def to", "\n\nprint(total)\n"))  # a backspace
    # An Enter at the end of a file: no suffix, and the prefix's window moves on.
    end = (FILE, "")
    assert types_on(end, (FILE[40:] + "\n", ""))
    assert types_on(end, (FILE[: -EDIT_REACH // 2] + "x = 1", ""))  # a few characters redone


def test_a_colleague_elsewhere_does_not_carry_on_from_it() -> None:
    mine = (FILE + "def tot", "\n\nprint(total)\n")
    assert not types_on(mine, ("class Cart:\n    def add(self, item):\n        ", "\n"))
    assert not types_on(mine, ("import os\n", ""))
    short = ("import o", "")
    assert types_on(short, ("import os", ""))
    assert not types_on(short, ("from x import y", ""))


def test_a_shared_file_end_or_an_empty_file_is_no_evidence() -> None:
    """Everyone typing at the end of a file sends the suffix "\n": two colleagues there
    cancelled each other; an empty prefix (a new file) was carried on by anything."""
    alice = ("import os\nprint(os.getcwd())", "\n")
    assert not types_on(alice, ("class Foo:\n    def bar(self):", "\n"))
    assert types_on(alice, ("import os\nprint(os.getcwd()) ", "\n"))  # her next keystroke
    assert not types_on(("", "x = 1\n"), ("totally different", "other\n"))
    # The end of every Go (or JavaScript) file: two colleagues' files, one key
    bob = ("package main\n\nfunc main() {\n\tfmt.Println(", "\n}\n")
    assert not types_on(("package billing\n\nfunc Charge() {\n\t", "\n}\n"), bob)


def test_a_prefix_a_little_longer_than_the_edit_reach_is_no_word_to_find_anywhere() -> None:
    """Between 65 and 127 characters, what was kept of the older prefix was its first
    few characters ("im" of 66), found anywhere in a colleague's file: their JavaScript
    cancelled this Python."""
    python = "import requests\n\nURL = 'https://example.org/api'\ndef fetch(q):\n  rr"
    assert 64 < len(python) < 128
    javascript = "// server bootstrap\nimport express from 'express';\nconst app = express();\n"
    assert not types_on((python, "\n"), (javascript + "app.listen(", "\n"))
    assert types_on((python, "\n"), (python + "e", "\n"))  # a keystroke on
    assert types_on((python, "\n"), (python[:-3] + "\n  return", "\n"))  # a line redone
