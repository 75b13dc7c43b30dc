"""Whitespace at the cursor: the prompt ends at the code, the model writes the
whitespace itself, and the editor gets the text after it.

BPE vocabularies merge a word with the space before it, and a newline with the
next line's indentation: a prompt ending in bare whitespace is a split the model
never saw in training. After a space the embedded model wrote numbers (``"0,"``
for ``if self.auth is |``, where it wrote ``" None"`` with the space left out);
after an indentation, the line's first word with one space too many (``" return"``
after four spaces: five, an IndentationError in Python) or a second newline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

from keel.pipeline.postprocess import cursor_line, suffix_line
from keel.providers.base import close_stream

OPEN_LINE_ENDS = tuple("([{,:\\=+-*/%&|<>.")
"""How a line that goes on past its end ends: an open bracket, a comma, a colon (a
block's head), a backslash, an operator. After one, what the model writes on that
line may as well begin the next."""
COMMENT_STARTS = ("#", "//", "--", "/*", "*", ";", "%", "<!--")
"""How a comment line begins: it is never open (its ``,`` or ``:`` ends a sentence, and
the rest of the sentence is no code for the next line)."""


@dataclass(frozen=True, slots=True)
class Cut:
    """What a prompt leaves out at the cursor (:func:`whitespace_cut`), and what the
    model's text after it needs."""

    text: str = ""
    """The whitespace left out; empty when nothing is."""
    line_open: bool = False
    """After a newline: the line above the cursor's goes on past its end."""
    unit: str = ""
    """After a newline: the file's indentation step (a tab, or its spaces)."""


NO_CUT = Cut()


def whitespace_cut(prefix: str, suffix: str, stops: Sequence[str] = ()) -> Cut:
    """The whitespace at the cursor a prompt leaves out: spaces after code on the
    cursor's line (``x = |``), or, with the cursor on a blank, indented line (the
    editor's auto-indent after Enter), the newline and indentation before it.
    Nothing is cut when one of ``stops`` is in that whitespace: the model, writing
    it, would stop at once (``"\\n"`` after an indentation). Only ASCII's spaces, tabs
    and line ends are cut (those BPE merges with what follows): a no-break space, an
    ideographic space or a form feed the user typed stays in the prompt."""
    head = prefix.rstrip(" \t\r\n")
    cut = prefix[len(head) :]
    if "\n" in cut:
        if not cursor_line(cut) or suffix_line(suffix).strip():
            return NO_CUT  # at column 0 (where the model starts a line), or before code
        if cut.count("\n") > 1:
            # Blank lines above the cursor's stay in the prompt: a backend told to stop
            # at a blank line would stop on a generation that began with one.
            cut = cut[cut.rfind("\n") :]
    if not head or any(stop and stop in cut for stop in stops):
        return NO_CUT
    if "\n" not in cut:
        return Cut(cut)
    above = cursor_line(head).lstrip()
    line_open = head.endswith(OPEN_LINE_ENDS) and not above.startswith(COMMENT_STARTS)
    return Cut(cut, line_open, indent_unit(head, cursor_line(cut)))


def indent_unit(text: str, cursor: str) -> str:
    """The indentation step of the code in ``text`` with the cursor's line indented by
    ``cursor``: a tab where the cursor's indentation has one, else the commonest
    increase of leading spaces from a line to the next (the cursor's spaces when no
    line is indented before it)."""
    if "\t" in cursor:
        return "\t"
    lines = text[-8000:].splitlines()[1 if len(text) > 8000 else 0 :]  # whole lines
    widths = [len(line) - len(line.lstrip(" ")) for line in lines if line.strip()]
    steps = Counter(b - a for a, b in pairwise([*widths, len(cursor)]))
    increases = [(count, -step) for step, count in steps.items() if step > 0]
    return " " * -max(increases)[1] if increases else cursor


def after_cut(pieces: AsyncIterator[str], cut: Cut) -> AsyncIterator[str]:
    """The model's text after the whitespace ``cut`` from its prompt, as the editor
    continues it; ``pieces`` themselves when nothing was cut.

    After spaces on a line of code, the model's text goes on after the user's
    spaces. After a blank line's indentation (:class:`_NewLine`), the model's first
    line goes at the cursor, whose indentation the editor chose."""
    if not cut.text:
        return pieces
    if "\n" not in cut.text:
        return _after_spaces(pieces)
    return _new_line(pieces, _NewLine(cut))


async def _after_spaces(pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    started = False
    try:
        async for piece in pieces:
            if not started:
                piece = piece.lstrip(" \t")
                if not piece:
                    continue
                started = True
            yield piece
    finally:
        await close_stream(pieces)


async def _new_line(pieces: AsyncIterator[str], lines: _NewLine) -> AsyncIterator[str]:
    try:
        async for piece in pieces:
            if text := lines.feed(piece):
                yield text
    finally:
        await close_stream(pieces)


class _NewLine:
    """The model's text after a newline and indentation left out of its prompt.

    The model writes the newline and an indentation, and its first line goes at the
    cursor. Where it first goes on with the line above (``x = 1`` written on as
    ``0``: the model did not take the line as ended, the user did), what it writes
    before it begins a line is dropped, unless that line is open (``foo(`` written on
    as ``a, b)``, which may as well go on the next line). Where its first line is
    shallower than the cursor (``except:``, ``}``: it closed the cursor's block, which
    text inserted at the cursor cannot), nothing is kept. The lines after the first
    keep their places relative to it, in the file's indentation (four spaces a level
    where the file has a tab or two spaces)."""

    def __init__(self, cut: Cut) -> None:
        self.cursor = cursor_line(cut.text)
        self.unit = cut.unit or self.cursor
        self.line_open = cut.line_open
        self.state = "first"  # before the first line's text; then "drop", "line", "indent", "end"
        self.began_line = False
        self.pending = ""
        """Whitespace at the start of a line, placed once the line's text comes."""
        self.model: str | None = None
        """The model's indentation of its first line (None: it went on the line above)."""
        self.step: int | None = None
        """The model's spaces a level, from the first line it indents deeper."""

    def feed(self, piece: str) -> str:
        out: list[str] = []
        for char in piece:
            if self.state == "end":
                break
            if self.state == "line":
                if char == "\n":
                    self.state, self.pending = "indent", ""
                out.append(char)
            elif char == "\n":
                if self.state == "indent":  # a blank line inside the text
                    out.append("\r\n" if self.pending.endswith("\r") else "\n")
                self.began_line, self.pending = True, ""
                if self.state == "drop":
                    self.state = "first"
            elif self.state == "drop":
                continue
            elif char in " \t\r":
                self.pending += char
            elif self.state == "indent":
                out.append(self.reindent(self.pending.replace("\r", "")) + char)
                self.state = "line"
            elif self.began_line or self.line_open:
                self.model = self.pending.replace("\r", "") if self.began_line else None
                if self.model is not None and self._shallower(self.model):
                    self.state = "end"  # it closed the cursor's block: nothing fits here
                    break
                out.append(char)
                self.state = "line"
            else:
                self.state = "drop"  # the model went on with the line above
        return "".join(out)

    def _shallower(self, model: str) -> bool:
        """Whether the model's first line is a level of the file less indented than the
        cursor (by length where both indent alike, by levels where one has tabs and the
        other spaces)."""
        tabs, model_tabs = "\t" in self.cursor, "\t" in model
        if tabs == model_tabs:  # a whole level of the file less (two spaces a level
            return len(self.cursor) - len(model) >= len(self.unit)  # is a model's style)
        cursor_levels = self.cursor.count("\t") if tabs else len(self.cursor) // len(self.unit)
        return _levels(model) < cursor_levels

    def reindent(self, indent: str) -> str:
        """A later line's indentation: its levels relative to the model's first line,
        from the cursor's, in the file's unit. A line in the model's own indentation
        where the model and the file indent alike (or the model's first line was on
        the line above) is kept as written."""
        model, cursor, unit = self.model, self.cursor, self.unit
        if model is None or not unit or model.strip(" ") or indent.strip(" "):
            return indent
        if model == cursor and (
            unit == " " * len(unit) and model == unit * (len(model) // len(unit))
        ):
            return indent  # the model indents as the file does
        depth = len(indent) - len(model)
        if depth > 0 and self.step is None:
            self.step = depth
        step = self.step or (len(unit) if unit.strip(" ") == "" else 4)
        levels, rest = divmod(depth, step)
        if levels >= 0:
            return cursor + unit * levels + " " * rest
        keep = len(cursor) - len(unit) * -levels
        return cursor[: max(0, keep)] + " " * rest if keep >= 0 else ""


def _levels(indent: str) -> int:
    """Levels of a model's indentation: its tabs, and its spaces four (or two) a level."""
    spaces = indent.count(" ")
    return indent.count("\t") + (spaces // 4 if spaces % 4 == 0 else spaces // 2)
