"""Deterministic completion tasks cut from real code.

Two kinds, half each:

- ``line``: a cursor at a token boundary inside a line of code; the task is
  the rest of that line.
- ``block``: a cursor at the start of the indented body of a Python block
  opener (``def ...:``, ``if ...:``, ``for ...:``), after the editor's
  auto-indent; the task is the whole body, when it has 1 to 6 lines.

What the task hides is removed from the file: the prefix is everything
before the cursor and the suffix everything after the hidden text, as an
editor would send them. Sampling depends only on the files and the seed.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from keel.index.walk import list_source_files

Kind = Literal["line", "block"]

MIN_PREFIX_LINES = 8
MAX_BLOCK_LINES = 6
MAX_BLOCK_CHARS = 320
_CODE_LINE = re.compile(r"[=(]|^\s*(return|raise|if|elif|for|while|with|assert|yield)\b")
_BLOCK_OPENER = re.compile(r"^\s*(def|async def|if|elif|else|for|while|with|try|except|finally)\b")
_IDENT = re.compile(r"[A-Za-z0-9_]")


@dataclass(frozen=True, slots=True)
class Sample:
    repo: str
    relpath: str
    line: int
    """0-based line of the cursor."""
    kind: Kind
    prefix: str
    suffix: str
    target: str


def _in_string_or_comment(lines: list[str], index: int) -> bool:
    """A cheap guard against docstrings: an odd number of triple quotes before the line."""
    before = "\n".join(lines[:index])
    return (before.count('"""') + before.count("'''")) % 2 == 1


def _line_candidates(lines: list[str]) -> list[tuple[int, int]]:
    found = []
    for index in range(MIN_PREFIX_LINES, len(lines)):
        line = lines[index]
        stripped = line.strip()
        if len(stripped) < 12 or stripped.startswith(("#", '"', "'", "@")):
            continue
        if not _CODE_LINE.search(line) or _in_string_or_comment(lines, index):
            continue
        indent = len(line) - len(line.lstrip())
        end = len(line.rstrip())
        for column in range(indent + 4, end - 3):
            previous, current = line[column - 1], line[column]
            if bool(_IDENT.match(previous)) != bool(_IDENT.match(current)) and current != " ":
                found.append((index, column))
    return found


def _block_body(lines: list[str], opener: int) -> tuple[int, int] | None:
    """Lines ``opener + 1 .. end`` (inclusive) of the block's body, if it is small enough."""
    base = len(lines[opener]) - len(lines[opener].lstrip())
    end = opener
    for index in range(opener + 1, len(lines)):
        line = lines[index]
        if not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= base:
            break
        end = index
    if end == opener:
        return None
    body = lines[opener + 1 : end + 1]
    code_lines = [line for line in body if line.strip()]
    if not 1 <= len(code_lines) <= MAX_BLOCK_LINES or sum(map(len, body)) > MAX_BLOCK_CHARS:
        return None
    if not lines[opener + 1].strip():
        return None
    return opener + 1, end


def _block_candidates(lines: list[str]) -> list[tuple[int, int]]:
    found = []
    for index in range(MIN_PREFIX_LINES, len(lines) - 1):
        line = lines[index].rstrip()
        if not line.endswith(":") or not _BLOCK_OPENER.match(line):
            continue
        if _in_string_or_comment(lines, index):
            continue
        body = _block_body(lines, index)
        if body is not None:
            found.append(body)
    return found


def _cut_line(repo: str, relpath: str, lines: list[str], index: int, column: int) -> Sample:
    before = "\n".join(lines[:index])
    prefix = (before + "\n" if index else "") + lines[index][:column]
    target = lines[index][column:].rstrip()
    suffix = "\n" + "\n".join(lines[index + 1 :])
    return Sample(repo, relpath, index, "line", prefix, suffix, target)


def _cut_block(repo: str, relpath: str, lines: list[str], start: int, end: int) -> Sample:
    first = lines[start]
    indent = first[: len(first) - len(first.lstrip())]
    prefix = "\n".join(lines[:start]) + "\n" + indent
    target = "\n".join(lines[start : end + 1])[len(indent) :].rstrip()
    suffix = "\n" + "\n".join(lines[end + 1 :])
    return Sample(repo, relpath, start, "block", prefix, suffix, target)


def sample_repository(repo: str, root: Path, count: int, seed: int) -> list[Sample]:
    """``count`` tasks from the Python files of ``root``, half of each kind, sorted by place.

    The random generator is seeded with ``seed`` and the repository's name,
    so adding a repository does not change another's samples.
    """
    rng = random.Random(seed * 1_000_003 + zlib.crc32(repo.encode()))
    line_pool: list[tuple[str, list[str], int, int]] = []
    block_pool: list[tuple[str, list[str], int, int]] = []
    for source in list_source_files(root, max_file_bytes=1_000_000):
        if source.language.name != "python":
            continue
        try:
            lines = source.path.read_text("utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            continue
        line_pool += [(source.relpath, lines, i, c) for i, c in _line_candidates(lines)]
        block_pool += [(source.relpath, lines, s, e) for s, e in _block_candidates(lines)]
    blocks = min(count // 2, len(block_pool))
    picked_lines = rng.sample(line_pool, min(count - blocks, len(line_pool)))
    picked_blocks = rng.sample(block_pool, blocks)
    samples = [_cut_line(repo, p, lines, i, c) for p, lines, i, c in picked_lines]
    samples += [_cut_block(repo, p, lines, s, e) for p, lines, s, e in picked_blocks]
    samples.sort(key=lambda s: (s.relpath, s.line, s.kind))
    return samples
