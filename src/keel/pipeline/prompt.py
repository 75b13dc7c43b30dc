"""Prompt building for code completion: FIM templates, truncation, snippets.

Everything here is pure: token counts come from the caller (the model's
tokenizer lives on the provider side), so truncation is token-aware without
this module knowing any tokenizer.

The order of work is the point (Tabby truncates by bytes after templating,
which cuts FIM markers and context first): split the prefix and the suffix
into lines, truncate each separately to its own budget by whole lines, then
prepend the snippet comments to the prefix, then fill the template.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from keel.pipeline.languages import Language

FIM_TEMPLATES: dict[str, str] = {
    "starcoder": "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
    "codellama": "<PRE> {prefix} <SUF>{suffix} <MID>",
    "deepseek-coder": "<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
    "codegemma": "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
    "qwen2.5-coder": "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
    "codestral": "[SUFFIX]{suffix}[PREFIX]{prefix}",
}
"""Model family -> FIM template, as in Tabby's model registry.

Codestral reads the suffix first (SPM order) and has no middle marker: the
completion follows the prefix directly.
"""

# Checked in order against the normalised model name (lower case, with "_",
# ".", and spaces turned into "-"), so "Qwen2.5-Coder" and "qwen2_5_coder"
# both read "qwen2-5-coder".
_FAMILY_MARKERS: tuple[tuple[str, str], ...] = (
    ("deepseek-coder", "deepseek-coder"),
    ("deepseekcoder", "deepseek-coder"),
    ("codellama", "codellama"),
    ("code-llama", "codellama"),
    ("codegemma", "codegemma"),
    ("qwen2-5-coder", "qwen2.5-coder"),
    ("codestral", "codestral"),
    ("starcoder", "starcoder"),
)

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(prefix|suffix)\}")


def model_family(model_name: str) -> str | None:
    """The FIM family of a model name or GGUF file name, or None if none is known."""
    normalised = re.sub(r"[\s_.]", "-", model_name.lower())
    for marker, family in _FAMILY_MARKERS:
        if marker in normalised:
            return family
    return None


def template_for_model(model_name: str) -> str | None:
    """The FIM template for a model, or None for prefix-only prompting.

    None covers models trained without FIM markers (SmolLM2, the embedded
    default, and any name keel does not recognise): they only see the prefix.
    """
    family = model_family(model_name)
    return None if family is None else FIM_TEMPLATES[family]


TEMPLATE_OF_MARKERS = {
    "starcoder": "starcoder",
    "qwen2.5-coder / codegemma": "qwen2.5-coder",
    "deepseek-coder": "deepseek-coder",
    "codellama": "codellama",
    "codestral": "codestral",
}
"""The template family of each set of FIM markers a GGUF vocabulary may hold
(``keel.models.gguf.FIM_TOKEN_SETS``)."""


def check_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` is usable by :func:`render_template`.

    A template must contain ``{prefix}``; any other ``{name}`` is a mistake
    (Tabby's template syntax has only these two; ``{{`` and ``}}`` are
    literal braces).
    """
    if "{prefix}" not in template:
        raise ValueError("a prompt template must contain '{prefix}'")
    leftover = _PLACEHOLDER.sub("", template)
    stray = re.search(r"\{[^{}]*\}", leftover)
    if stray is not None:
        raise ValueError(
            f"unknown placeholder {stray.group(0)!r} in prompt template; "
            "only '{prefix}' and '{suffix}' are filled in ('{{' and '}}' for literal braces)"
        )


Markup = tuple[tuple[int, int], ...]
"""Where a prompt keel built holds its own text (a FIM template's markers), as ``(start,
end)`` offsets: all else in it is the user's (code, snippets), which a model must read as
text, never as control tokens (a file holding ``<|endoftext|>``)."""


def render_template(template: str | None, prefix: str, suffix: str) -> str:
    """Fill a FIM template; None means the prompt is the prefix alone.

    Only the template's placeholders are interpreted: prefix and suffix are
    inserted verbatim, so braces in code never act as placeholders (no
    ``str.format`` on user text). An empty suffix is rendered as ``"\\n"``,
    as Tabby does: FIM models were trained on files that end with a newline.
    """
    return render_marked(template, prefix, suffix)[0]


def render_marked(template: str | None, prefix: str, suffix: str) -> tuple[str, Markup]:
    """:func:`render_template`, and where the prompt holds the template's own text."""
    if template is None:
        return prefix, ()
    values = {"prefix": prefix, "suffix": suffix or "\n"}
    parts: list[str] = []
    markup: list[tuple[int, int]] = []
    length = 0

    def add(text: str, own: bool) -> None:
        nonlocal length
        if own and text:
            start = markup.pop()[0] if markup and markup[-1][1] == length else length
            markup.append((start, length + len(text)))
        parts.append(text)
        length += len(text)

    at = 0
    for match in _PLACEHOLDER.finditer(template):
        name = match.group(1)
        add(template[at : match.start()] + ("" if name else match.group(0)[0]), True)
        if name:
            add(values[name], False)
        at = match.end()
    add(template[at:], True)
    return "".join(parts), tuple(markup)


@functools.lru_cache(maxsize=16)
def control_pattern(tokens: frozenset[str]) -> re.Pattern[str] | None:
    """A pattern that finds any of a model's control tokens' texts (None: it has none)."""
    if not tokens:
        return None
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))))


def user_text_pieces(
    prompt: str, markup: Markup, controls: re.Pattern[str]
) -> list[tuple[str, bool]] | None:
    """``prompt`` in pieces, each with whether it is keel's own text (read with control
    tokens) or the user's (read as text), where the user's text holds a control token of
    the model (``controls`` matches them); None where it holds none, as almost always:
    then the prompt is read whole, as it was."""
    pieces: list[tuple[str, bool]] = []
    at = 0
    for start, end in [*markup, (len(prompt), len(prompt))]:
        if start > at:
            pieces.append((prompt[at:start], False))
        if end > start:
            pieces.append((prompt[start:end], True))
        at = end
    if not any(controls.search(text) for text, own in pieces if not own):
        return None
    return pieces


def split_lines(text: str) -> list[str]:
    """Lines of ``text`` with their ``\\n`` kept; ``"".join`` gives ``text`` back.

    Only ``\\n`` separates lines (``str.splitlines`` would also split on form
    feeds and Unicode separators, which code may contain). A trailing
    newline does not start an extra empty line; ``""`` has no lines.
    """
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def keep_tail(lines: Sequence[str], counts: Sequence[int], budget: int, *, step: int = 16) -> str:
    """The end of the prefix that fits in ``budget`` tokens, cut at a line start.

    ``counts[i]`` is the token count of ``lines[i]``. Whole lines are kept
    from the end. When lines must be dropped, the first kept line is moved
    forward to a multiple of ``step`` (counted from the first given line):
    while the user types, the window start then stays put for ``step`` lines
    instead of sliding one line at a time, so a local model can reuse its
    cached prompt prefix. The cost is up to ``step - 1`` lines of unused
    budget, so the step shrinks to a quarter of the lines that fit (estimated
    from the lines above the cursor, so it is fixed while a line is typed)
    when fewer than ``4 * step`` do; ``step=1`` keeps as much as fits.

    The last line holds the cursor and is never dropped: if it alone is over
    budget (minified code, a data blob), it is cut by characters in
    proportion to its count, keeping its end.
    """
    _check_counts(lines, counts, budget, step)
    if not lines or budget <= 0:
        return ""
    start = len(lines)
    total = 0
    while start > 0 and total + counts[start - 1] <= budget:
        start -= 1
        total += counts[start]
    if start == len(lines):
        return _cut_line_tail(lines[-1], counts[-1], budget)
    if start > 0:
        # The step must not depend on ``start``: while the cursor line grows, a
        # step recomputed from it can shrink and move the window start backwards.
        # Lines above the cursor do not change within a line, so neither does this.
        above = counts[:-1]
        per_line = max(1.0, sum(above) / len(above)) if above else 1.0
        step = min(step, max(1, int(budget / per_line) // 4))
        aligned = -(-start // step) * step
        if aligned < len(lines):
            start = aligned
    return "".join(lines[start:])


def keep_head(lines: Sequence[str], counts: Sequence[int], budget: int) -> str:
    """The start of the suffix that fits in ``budget`` tokens, cut after a line end.

    Whole lines are kept from the start. If the first line (the rest of the
    cursor line) alone is over budget, its start is kept, cut by characters
    in proportion to its count. The suffix needs no stable end: what follows
    the cursor changes the prompt anyway.
    """
    _check_counts(lines, counts, budget, 1)
    if not lines or budget <= 0:
        return ""
    end = 0
    total = 0
    while end < len(lines) and total + counts[end] <= budget:
        total += counts[end]
        end += 1
    if end == 0:
        line = lines[0]
        return line[: len(line) * budget // counts[0]]
    return "".join(lines[:end])


def _cut_line_tail(line: str, count: int, budget: int) -> str:
    keep = len(line) * budget // count
    return line[len(line) - keep :] if keep else ""


def _check_counts(lines: Sequence[str], counts: Sequence[int], budget: int, step: int) -> None:
    if len(lines) != len(counts):
        raise ValueError(f"{len(lines)} lines but {len(counts)} token counts")
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")


@dataclass(frozen=True, slots=True)
class PromptBudget:
    """Token budgets for the parts of a completion prompt."""

    prefix: int
    suffix: int
    snippets: int


TEMPLATE_RESERVE = 16
"""Tokens kept free for the FIM markers a template adds."""


def split_budget(max_input_length: int, *, has_suffix: bool) -> PromptBudget:
    """Split a model's input budget between snippets, prefix and suffix.

    After :data:`TEMPLATE_RESERVE` for the FIM markers: snippets get up to a
    third, the suffix a quarter when there is one, the prefix the rest, so at
    least 5/12. What snippets leave unused is not given to the prefix: its
    window would then grow back over earlier lines whenever a keystroke's
    snippets shrink, and a local engine reads a window whose start moved back
    all over again; and every token more is prompt a CPU engine reads before
    the first token. The prefix gets the most because the text right before the
    cursor predicts the completion best; the suffix mostly tells the model
    where to stop.
    """
    if max_input_length < 2 * TEMPLATE_RESERVE:
        raise ValueError(
            f"max_input_length must be at least {2 * TEMPLATE_RESERVE} tokens, "
            f"got {max_input_length}"
        )
    available = max_input_length - TEMPLATE_RESERVE
    snippets = available // 3
    suffix = available // 4 if has_suffix else 0
    return PromptBudget(prefix=available - snippets - suffix, suffix=suffix, snippets=snippets)


@dataclass(frozen=True, slots=True)
class Snippet:
    """Code from elsewhere shown to the model: a declaration or a related chunk.

    ``score`` is None for declarations (the client resolved them, they are
    not ranked).
    """

    filepath: str
    body: str
    score: float | None = None


def format_snippets(language: Language, snippets: Sequence[Snippet]) -> str:
    """Snippets as a comment block to put before the prefix, as Tabby writes it.

    Each snippet is ``{comment} Path: {filepath}`` followed by its body
    lines commented out; snippets are separated by a bare comment line. The
    block ends with a newline. Languages without a line comment get ``""``:
    there is no way to show them code that the model reads as context.
    """
    comment = language.line_comment
    if not snippets or not comment:
        return ""
    lines: list[str] = []
    for index, snippet in enumerate(snippets):
        if index:
            lines.append("")
        lines.append(f"Path: {snippet.filepath}")
        body = [line.removesuffix("\r") for line in snippet.body.split("\n")]
        if body[-1] == "":
            body.pop()
        lines.extend(body)
    return "".join(f"{comment} {line}\n" if line else f"{comment}\n" for line in lines)


def select_snippets(
    snippets: Sequence[Snippet], counts: Sequence[int], budget: int
) -> list[Snippet]:
    """The snippets to show, in the given (priority) order, within ``budget`` tokens.

    The caller orders them: declarations first, then by score. A snippet
    that does not fit is skipped and later, smaller ones may still be taken,
    so one large declaration cannot crowd out every other snippet. Exact
    duplicates (same path and body) are taken once. ``counts[i]`` is the
    token count of ``snippets[i]``; the comment markers add about one token
    per line, which the template reserve and the prefix budget absorb.
    """
    if len(snippets) != len(counts):
        raise ValueError(f"{len(snippets)} snippets but {len(counts)} token counts")
    chosen: list[Snippet] = []
    seen: set[tuple[str, str]] = set()
    used = 0
    for snippet, count in zip(snippets, counts, strict=True):
        key = (snippet.filepath, snippet.body)
        if key in seen or not snippet.body.strip() or used + count > budget:
            continue
        seen.add(key)
        chosen.append(snippet)
        used += count
    return chosen


def normalize_newlines(text: str) -> tuple[str, bool]:
    """``text`` with ``\\r\\n`` turned into ``\\n``, and whether it had any ``\\r\\n``."""
    return text.replace("\r\n", "\n"), "\r\n" in text


def restore_newlines(text: str, crlf: bool) -> str:
    """Turn ``\\n`` back into ``\\r\\n`` when the request used it.

    A ``\\r\\n`` the model produced itself is not doubled.
    """
    if not crlf:
        return text
    return text.replace("\r\n", "\n").replace("\n", "\r\n")
