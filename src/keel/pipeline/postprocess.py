"""Postprocessing of a raw completion into what the editor shows.

:func:`postprocess` runs small pure steps, each usable and tested alone.
The ideas follow tabby-agent's postprocess filters (``limitScopeByIndentation``,
``removeRepetitiveLines``, ``removeDuplicatedBlockClosingLine``,
``dropDuplicated``, ``trimSpace``) without tree-sitter: scope is judged by
indentation, which works for brace languages as well as for Python.

Cutting at the first stop word is the generator's job (it stops the model
early); everything here sees text that already ended.

Conventions: ``prefix`` is the text before the cursor and ``suffix`` the text
after it, both with ``\\n`` newlines. The *cursor line* is the part of the
prefix after its last newline; the *suffix line* is the part of the suffix
before its first newline (the rest of the cursor line).
"""

from __future__ import annotations

import re

from keel.pipeline.languages import Language
from keel.pipeline.prompt import split_lines

REPETITION_THRESHOLD = 3
"""A line repeated this many times in a row at the end of a completion is a model loop."""

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_CONTINUATION_WORDS = frozenset(
    ("else", "elif", "elsif", "except", "finally", "catch", "rescue", "ensure")
)


def postprocess(text: str, *, prefix: str, suffix: str, language: Language) -> str:
    """The completion to show for ``text`` generated at the cursor, or ``""``.

    Steps, in order: keep one line when the cursor is mid-line, cut at a
    Markdown code fence (not in prose), drop a model loop (repeated lines, or a
    last line ending in a repeated piece), cut at the end of
    the cursor's scope, drop a closing line the suffix already has, drop a
    tail that repeats the suffix line, end at a bracket the next line closes
    already, trim whitespace, drop the completion if
    it only repeats the suffix.
    """
    if not text.strip():
        return ""
    if is_mid_line(prefix, suffix):
        text = first_line(text)
    if language.name not in PROSE:
        text = cut_at_fence(text)
    text = remove_repetitive_lines(text, prefix=prefix)
    text = drop_line_ending_in_repetition(text)
    text = limit_scope(text, prefix=prefix, suffix=suffix, language=language)
    text = drop_duplicated_closing_line(text, prefix=prefix, suffix=suffix)
    text = drop_suffix_overlap(text, prefix=prefix, suffix=suffix)
    text = drop_closer_the_next_line_has(text, prefix=prefix, suffix=suffix)
    text = trim_space(text, prefix=prefix, suffix=suffix)
    if repeats_suffix(text, suffix=suffix):
        return ""
    return text if text.strip() else ""


PROSE = frozenset(("markdown", "restructuredtext", "asciidoc"))
"""Languages whose text may hold a Markdown code fence (not ``unknown``, plain text
included: an ``/infill`` request names no language, and is mostly code)."""


def cut_at_fence(text: str) -> str:
    """``text`` up to a line that begins a Markdown code fence: an instruct model
    answering in a code file wrote one (answers of only ``` after a function's head)."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            return "\n".join(lines[:index])
    return text


def cursor_line(prefix: str) -> str:
    """The part of the cursor's line before the cursor."""
    return prefix.rpartition("\n")[2]


def suffix_line(suffix: str) -> str:
    """The part of the cursor's line after the cursor."""
    return suffix.partition("\n")[0]


def indentation(line: str) -> int:
    """Leading spaces and tabs, each counted as one (as tabby-agent does)."""
    return len(line) - len(line.lstrip(" \t"))


def is_mid_line(prefix: str, suffix: str) -> bool:
    """Whether the cursor sits between code on its line: then only one line fits."""
    return bool(cursor_line(prefix).strip()) and bool(suffix_line(suffix).strip())


def first_line(text: str) -> str:
    """The completion up to its first newline."""
    return text.partition("\n")[0]


def remove_repetitive_lines(text: str, *, prefix: str = "") -> str:
    """Cut a model loop: the same line repeated at the end of the completion.

    Looking from the end (blank lines skipped, the last line also matching
    when it is a cut-off start of the repeated line, since generation stops
    mid-line), a run of :data:`REPETITION_THRESHOLD` or more equal lines is
    reduced to its first line and everything after it is dropped. Only a run
    that reaches the end counts: a loop runs until the token limit, while
    equal lines followed by other code (rows of a zero matrix) are real.
    Lines compare with their indentation (the first one as completed on the
    cursor line of ``prefix``), so nested closing braces differ.
    """
    lines = split_lines(text)
    if not lines:
        return text
    shown = [cursor_line(prefix) + lines[0], *lines[1:]]
    content = [i for i, line in enumerate(shown) if line.strip()]
    if len(content) < REPETITION_THRESHOLD:
        return text
    last = shown[content[-1]].rstrip()
    repeated = shown[content[-2]].rstrip()
    if last != repeated and not (repeated.startswith(last) and content[-1] == len(lines) - 1):
        return text
    run = [content[-1]]
    for index in reversed(content[:-1]):
        if shown[index].rstrip() != repeated:
            break
        run.append(index)
    if len(run) < REPETITION_THRESHOLD:
        return text
    return "".join(lines[: run[-1] + 1]).rstrip()


def limit_scope(text: str, *, prefix: str, suffix: str, language: Language) -> str:
    """Cut the completion where it leaves the block the cursor is in.

    The reference is the indentation of the cursor line (or, when that is
    blank, of the nearest non-blank line above). A completion that opens a
    new block may go deeper; the first later line indented less than the
    limit closes the block. That closing line (``}``, ``end``) is kept only
    when the suffix does not already close the block at that level; in
    indentation-scoped languages such as Python, where a dedented line is new
    code in the outer block, only when it closes a bracket the cursor's line or
    the completion left open (``)``, ``]``, ``}`` of a multi-line call or literal:
    dropped, the code did not parse, or an answer that was only the closer was
    empty). A line that dedents and at once opens a block (``} else {``,
    ``elif x:``) continues.
    """
    lines = split_lines(text)
    if len(lines) < 2:
        return text
    current = cursor_line(prefix)
    reference = _reference_indentation(prefix)
    if reference is None:
        return text
    first_content = next((line for line in lines if line.strip()), None)
    if first_content is None:
        return text
    first_is_blank = not lines[0].strip()
    if not first_is_blank and current.strip():
        # Continuing the cursor line: the block it is in (or opens) is the scope.
        limit = reference + 1
        allow_closing = indentation(lines[1]) > reference
    else:
        completion_indent = indentation(
            first_content if first_is_blank else current + first_content
        )
        limit = reference + 1 if completion_indent > reference else reference
        allow_closing = True

    next_in_suffix = _next_suffix_line(suffix)
    if next_in_suffix is not None:
        allow_closing = allow_closing and indentation(next_in_suffix) < limit

    index = 1
    while index < len(lines):
        line = lines[index]
        if line.strip() and indentation(line) < limit and not _continues_block(lines, index):
            keep = allow_closing and not (
                next_in_suffix is not None and _same_line(line, next_in_suffix)
            )
            if language.indentation_scoped:  # new code in the outer block, unless it
                keep = keep and _closes_open_bracket(line, current + "".join(lines[:index]))
            if keep:
                index += 1
            break
        index += 1
    if index < len(lines):
        return "".join(lines[:index]).rstrip()
    return text


def drop_duplicated_closing_line(text: str, *, prefix: str, suffix: str) -> str:
    """Drop a last line that closes a block the suffix closes on its next line.

    Only a closing line (``}``, ``)``, ``]``, ``end``, ``</tag>``) at the
    same indentation as the suffix's next non-blank line counts: a ``}``
    indented deeper closes a block the completion itself opened.
    """
    lines = split_lines(text)
    if len(lines) < 2:
        return text
    last = lines[-1].rstrip()
    following = _next_suffix_line(suffix)
    if following is None or not _is_closing(last):
        return text
    if _same_line(last, following):
        return "".join(lines[:-1]).rstrip()
    return text


def drop_suffix_overlap(text: str, *, prefix: str, suffix: str) -> str:
    """Drop the end of the completion that the suffix line already starts with.

    Models often write the closing ``)`` or ``;`` that follows the cursor.
    The longest end of ``text`` equal to a start of the suffix line is
    removed, but never a closing bracket the line needs: the overlap is
    shortened until, on the cursor line with completion and suffix line
    joined, no bracket type ends up with more openers than before (which
    would mean the removed bracket closed something the completion opened).
    """
    line_after = suffix_line(suffix)
    if not line_after or not text:
        return text
    overlap = 0
    for size in range(min(len(text), len(line_after)), 0, -1):
        if text.endswith(line_after[:size]):
            overlap = size
            break
    opened = _open_brackets(cursor_line(prefix))  # once: a minified line is megabytes

    def balance(rest: str) -> dict[str, int]:
        return {kind: opened[kind] + count for kind, count in _open_brackets(rest).items()}

    before = balance(text + line_after)
    while overlap:
        after = balance(text[:-overlap] + line_after)
        if all(after[kind] <= max(0, before[kind]) for kind in _OPENERS):
            return text[:-overlap]
        overlap -= 1
        while overlap and not text.endswith(line_after[:overlap]):
            overlap -= 1
    return text


_REPEATING_END = (re.compile(r"(.{3,}?)\1{5,}$"), re.compile(r"(.{10,}?)\1{3,}$"))
"""A line ending in a run of one piece of text, as tabby-agent's
``removeLineEndsWithRepetition`` finds it: a model looping inside a line."""


def drop_line_ending_in_repetition(text: str) -> str:
    """The completion without its last line when that line ends in a loop
    (``path.join(path.join(path.join(...``, ``1.1.1.1.1...``); the lines before stay."""
    head, _, last = text.rpartition("\n")
    if any(pattern.search(last) for pattern in _REPEATING_END):
        return head
    return text


def drop_closer_the_next_line_has(text: str, *, prefix: str, suffix: str) -> str:
    """The completion up to a bracket it closes but never opened (nor the cursor's line
    before it), when the suffix's next line begins with that bracket: after Enter
    inside ``[``, ``(`` or ``{`` the editor has put the closer on the line below
    already, and the model, writing on, closed it again (``1, 2, 3]`` above ``]``)."""
    if suffix_line(suffix).strip():
        return text  # the cursor's own line goes on: drop_suffix_overlap's business
    below = next((line.lstrip() for line in suffix.split("\n")[1:] if line.strip()), "")
    found = first_unpaired_closer(text, opened=cursor_line(prefix))
    if found is None or found[1] != below[:1]:
        return text
    return text[: found[0]].rstrip()


QUOTES = "\"'`"


def first_unpaired_closer(
    text: str, *, opened: str = "", open_quotes: str = ""
) -> tuple[int, str] | None:
    """Where ``text`` first closes something it did not open: a bracket beyond those
    ``opened`` left open, or a quote in ``open_quotes`` (a string the text goes on in).
    The text's own strings are skipped. None if it closes nothing."""
    balance = _open_brackets(opened)
    depth = {closer: max(0, balance[opener]) for opener, closer in _OPENERS.items()}
    inside: str | None = None
    for index, char in enumerate(text):
        if inside is not None:
            inside = None if char == inside else inside
        elif char in open_quotes or (char in _CLOSERS and depth[char] == 0):
            return index, char
        elif char in QUOTES:
            inside = char
        elif char in _OPENERS:
            depth[_OPENERS[char]] += 1
        elif char in _CLOSERS:
            depth[char] -= 1
    return None


def trim_space(text: str, *, prefix: str, suffix: str) -> str:
    """Trim whitespace the editor would show as noise.

    Trailing spaces are removed from every line but the last. Leading spaces and tabs go
    when the cursor line already ends with whitespace (no double space),
    trailing whitespace and newlines when nothing but whitespace follows the
    cursor on its line (tabby-agent's ``trimSpace``).
    """
    lines = text.split("\n")
    text = "\n".join([*(line.rstrip(" \t") for line in lines[:-1]), lines[-1]])
    current = cursor_line(prefix)
    if current.strip() and current[-1] in " \t":
        text = text.lstrip(" \t")
    after = suffix_line(suffix)
    if not after.strip() or after[0] in " \t":
        text = text.rstrip()
    return text


def repeats_suffix(text: str, *, suffix: str) -> bool:
    """Whether the completion only repeats what follows the cursor.

    Compares the first (up to three) non-blank lines of both, whitespace
    trimmed, allowing an edit distance of 1 or 5% of the longer text, as
    tabby-agent's ``dropDuplicated`` does. Unlike there, texts shorter than
    8 characters must match exactly: a one-character completion is one edit
    away from almost any one-character suffix (``n`` before ``)``).
    """
    ours = [line for line in split_lines(text) if line.strip()]
    theirs = [line for line in split_lines(suffix) if line.strip()]
    count = min(3, len(ours), len(theirs))
    if count == 0:
        return False
    left = "".join(ours[:count]).strip()
    right = "".join(theirs[:count]).strip()
    if min(len(left), len(right)) < 8:
        return left == right
    threshold = max(1, int(0.05 * max(len(left), len(right))))
    return _edit_distance_within(left, right, threshold)


def _reference_indentation(prefix: str) -> int | None:
    for line in reversed(prefix.split("\n")):
        if line.strip():
            return indentation(line)
    return None


def _next_suffix_line(suffix: str) -> str | None:
    """The first non-blank line after the suffix line, without its newline."""
    for line in suffix.split("\n")[1:]:
        if line.strip():
            return line.rstrip()
    return None


def _same_line(line: str, other: str) -> bool:
    """Whether two lines read the same at the same indentation (one may be cut short)."""
    a, b = line.rstrip(), other.rstrip()
    return bool(a and b) and (a.startswith(b) or b.startswith(a))


def _continues_block(lines: list[str], index: int) -> bool:
    """Whether a dedented line closes one branch and opens the next (``} else {``, ``elif:``).

    A dedented line that opens a block but starts something new (``def g():``)
    does not count: that is the next item, not the rest of this one.
    """
    line = lines[index]
    following = next((line for line in lines[index + 1 :] if line.strip()), None)
    if following is None or indentation(following) <= indentation(line):
        return False
    stripped = line.strip()
    word = stripped.split(maxsplit=1)[0].rstrip(":{")
    return stripped[0] in _CLOSERS or word in _CONTINUATION_WORDS


def _is_closing(line: str) -> bool:
    stripped = line.strip()
    if not stripped:
        return False
    if stripped[0] in _CLOSERS or stripped.startswith("</"):
        return True
    word = stripped.split(maxsplit=1)[0].rstrip(";,)")
    return word in ("end", "fi", "done", "esac", "endif", "endfunction")


def _closes_open_bracket(line: str, before: str) -> bool:
    """Whether ``line`` begins with the closer of a bracket ``before`` left open."""
    opener = _CLOSERS.get(line.lstrip()[:1])
    return opener is not None and _open_brackets(before)[opener] > 0


def _open_brackets(text: str) -> dict[str, int]:
    """Openers minus closers per bracket type (strings and comments not parsed). Counted
    by ``str.count``: a loop over each character held the event loop for 0.3 s a call
    on a minified file's 3.8 MB cursor line, which every request then waited out."""
    return {opener: text.count(opener) - text.count(closer) for opener, closer in _OPENERS.items()}


def _edit_distance_within(a: str, b: str, limit: int) -> bool:
    """Whether the Levenshtein distance of ``a`` and ``b`` is at most ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return False
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            cost = 0 if char_a == char_b else 1
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost))
        if min(current) > limit:
            return False
        previous = current
    return previous[-1] <= limit
