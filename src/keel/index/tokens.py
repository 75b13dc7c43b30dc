"""Code text -> BM25 terms, the same way for indexed chunks and for queries.

Terms are identifiers, lower-cased, plus the words they are made of
(``getUserName`` and ``get_user_name`` both give ``get``, ``user``,
``name``), so a query matches a chunk that spells a name differently or
uses only part of it. Keywords and very common names carry no signal and
are dropped from queries (BM25's IDF would make them nearly worthless, but
they still cost time).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
MAX_TERM_LENGTH = 40

STOP_TERMS = frozenset(
    [
        "a",
        "an",
        "and",
        "as",
        "assert",
        "async",
        "await",
        "break",
        "case",
        "catch",
        "class",
        "const",
        "continue",
        "def",
        "default",
        "del",
        "do",
        "elif",
        "else",
        "end",
        "enum",
        "except",
        "export",
        "extends",
        "false",
        "final",
        "finally",
        "fn",
        "for",
        "from",
        "func",
        "function",
        "go",
        "if",
        "impl",
        "import",
        "in",
        "interface",
        "is",
        "let",
        "match",
        "mod",
        "module",
        "mut",
        "new",
        "nil",
        "none",
        "not",
        "null",
        "of",
        "or",
        "package",
        "pass",
        "pub",
        "public",
        "private",
        "protected",
        "raise",
        "return",
        "self",
        "static",
        "struct",
        "super",
        "switch",
        "this",
        "throw",
        "true",
        "try",
        "type",
        "use",
        "var",
        "void",
        "while",
        "with",
        "yield",
        "int",
        "str",
        "bool",
        "float",
        "string",
    ]
)


def identifiers(text: str) -> Iterator[str]:
    """Identifiers in ``text``, in order, as written."""
    for match in _IDENTIFIER.finditer(text):
        yield match.group(0)


def terms_of_identifier(identifier: str) -> list[str]:
    """The identifier itself (lower case) and, if it is compound, its words."""
    whole = identifier.strip("_").lower()
    if not whole or len(whole) > MAX_TERM_LENGTH:
        return []
    words = [w.lower() for w in _WORD.findall(identifier)]
    words = [w for w in words if len(w) > 1 and w != whole]
    return [whole, *dict.fromkeys(words)]


def document_terms(text: str) -> str:
    """The terms of a chunk as one space-separated string (indexed with a whitespace tokenizer)."""
    return " ".join(term for name in identifiers(text) for term in terms_of_identifier(name))


def query_terms(lines: Iterable[str], *, limit: int = 48) -> list[str]:
    """Distinct informative terms from ``lines``, the last line's first, at most ``limit``."""
    seen: dict[str, None] = {}
    for line in reversed(list(lines)):
        for name in reversed(list(identifiers(line))):
            for term in terms_of_identifier(name):
                if term in STOP_TERMS or len(term) < 2 or term.isdigit():
                    continue
                seen.setdefault(term, None)
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)
