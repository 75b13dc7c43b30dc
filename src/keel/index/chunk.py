"""Cut a source file into chunks a completion prompt can show.

Where a tree-sitter grammar is installed for the file's extension, chunks
follow the syntax: each top-level definition that fits is one chunk, small
neighbours (imports, constants, one-line functions) are grouped, and a
definition too large to show is cut along its own children (the methods of
a class, the statements of a body). Elsewhere, and for any node with no
children to cut along, chunks are windows of whole lines.

Grammars come from PyPI wheels (``tree-sitter-python`` and friends) and are
loaded once per process; none is downloaded at run time.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import PurePosixPath
from typing import Any

log = logging.getLogger("keel.index")

MAX_CHUNK_LINES = 24
MAX_CHUNK_CHARS = 640
MIN_CHUNK_CHARS = 24
"""Chunks with less text than this (a lone ``}``) are not worth a snippet."""

_GRAMMARS: dict[str, tuple[str, str]] = {
    "py": ("tree_sitter_python", "language"),
    "pyi": ("tree_sitter_python", "language"),
    "js": ("tree_sitter_javascript", "language"),
    "jsx": ("tree_sitter_javascript", "language"),
    "mjs": ("tree_sitter_javascript", "language"),
    "cjs": ("tree_sitter_javascript", "language"),
    "ts": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "go": ("tree_sitter_go", "language"),
    "rs": ("tree_sitter_rust", "language"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "h": ("tree_sitter_c", "language"),
    "cc": ("tree_sitter_cpp", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
    "cxx": ("tree_sitter_cpp", "language"),
    "hpp": ("tree_sitter_cpp", "language"),
    "hh": ("tree_sitter_cpp", "language"),
    "rb": ("tree_sitter_ruby", "language"),
}
"""File extension -> (grammar module, function returning its language pointer)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Lines ``start_line``..``end_line`` (0-based, inclusive) of a file, and their text."""

    start_line: int
    end_line: int
    text: str


@cache
def _parser(extension: str) -> Any | None:
    spec = _GRAMMARS.get(extension)
    if spec is None:
        return None
    try:
        import tree_sitter

        module = importlib.import_module(spec[0])
        language = tree_sitter.Language(getattr(module, spec[1])())
        return tree_sitter.Parser(language)
    except (ImportError, AttributeError, ValueError) as exc:
        # They are keel's dependencies: one that does not load is a broken or mismatched
        # install (a tree-sitter older than the grammar's ABI), not a choice.
        log.warning(
            "files ending .%s are chunked by lines, not by their syntax: %s cannot be used "
            "(%s: %s); reinstall it with a tree-sitter that reads it: "
            "pip install -U tree-sitter %s",
            extension,
            spec[0],
            type(exc).__name__,
            exc,
            spec[0].replace("_", "-"),
        )
        return None


def chunk_file(relpath: str, text: str) -> list[Chunk]:
    """The chunks of ``text``, the content of the file at ``relpath``, in file order."""
    lines = text.split("\n")
    if not text.strip():
        return []
    parser = _parser(PurePosixPath(relpath).suffix.lstrip("."))
    spans: list[tuple[int, int]] | None = None
    if parser is not None:
        try:
            tree = parser.parse(text.encode("utf-8"))
        except ValueError:
            tree = None
        if tree is not None:
            spans = list(_syntax_spans(tree.root_node, lines))
    if spans is None:
        spans = list(_line_windows(0, len(lines) - 1, lines))
    chunks = []
    for start, end in _merge_small(spans, lines):
        body = "\n".join(lines[start : end + 1]).strip("\n")
        if len(body.strip()) >= MIN_CHUNK_CHARS:
            chunks.append(Chunk(start, end, body))
    return chunks


def _size(start: int, end: int, lines: list[str]) -> tuple[int, int]:
    return end - start + 1, sum(len(line) + 1 for line in lines[start : end + 1])


def _fits(start: int, end: int, lines: list[str]) -> bool:
    count, chars = _size(start, end, lines)
    return count <= MAX_CHUNK_LINES and chars <= MAX_CHUNK_CHARS


def _children(node: Any) -> list[Any]:
    return [child for child in node.children if child.end_byte > child.start_byte]


def _syntax_spans(root: Any, lines: list[str]) -> Iterator[tuple[int, int]]:
    """Line spans of ``root``'s children: each child that fits, or else its own children
    (a node without any: its lines in windows). Small neighbours are merged afterwards by
    :func:`_merge_small`.

    A walk with a stack of its own, not a call per level: a chain of 1,200 ``+`` in one
    expression is a tree that deep, and the recursion limit failed the whole
    repository's index on that one file."""
    levels = [iter([root])]
    while levels:
        node = next(levels[-1], None)
        if node is None:
            levels.pop()
            continue
        start, end = node.start_point.row, node.end_point.row
        if node is not root and _fits(start, end, lines):
            yield (start, end)
        elif children := _children(node):
            levels.append(iter(children))
        else:
            yield from _line_windows(start, end, lines)


def _line_windows(start: int, end: int, lines: list[str]) -> Iterator[tuple[int, int]]:
    """Windows of whole lines from ``start`` to ``end`` within the size limits."""
    line = start
    while line <= end:
        stop = line
        while stop + 1 <= end and _fits(line, stop + 1, lines):
            stop += 1
        yield (line, stop)
        line = stop + 1


def _merge_small(spans: list[tuple[int, int]], lines: list[str]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping spans with tiny neighbours merged when the result fits."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            start = merged[-1][1] + 1
            if start > end:
                continue
        if merged and _fits(merged[-1][0], end, lines):
            previous = merged[-1]
            if _size(*previous, lines)[1] < MAX_CHUNK_CHARS // 4 or (
                _size(start, end, lines)[1] < MAX_CHUNK_CHARS // 4
            ):
                merged[-1] = (previous[0], end)
                continue
        merged.append((start, end))
    return merged
