"""What of a response schema llama.cpp's grammar cannot hold an answer to.

The engine turns a JSON schema into a grammar and samples only what the grammar allows;
what the grammar has no way to say it drops, most of it without a word, and the answer
was a 200 breaking the schema (``multipleOf: 7`` answered 1, ``uniqueItems`` [1, 1, 1],
``format: email`` "a", a ``pattern`` not anchored any string at all). Checked here, by
the rules of llama.cpp's ``common/json-schema-to-grammar.cpp``: each schema node takes one
of its branches (a string's ``pattern`` or its ``format`` or its length, an integer's
bounds), and a keyword no branch reads is not enforced."""

from __future__ import annotations

import copy
from typing import Any

UNENFORCED = (
    "multipleOf",
    "uniqueItems",
    "not",
    "if",
    "contains",
    "propertyNames",
    "patternProperties",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "minProperties",
    "maxProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
)
"""Assertions the grammar has no rule for (``then`` and ``else`` go with ``if``)."""

FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{n}" for n in range(1, 6))})
"""The string formats the grammar spells out."""

BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
LENGTHS = ("minLength", "maxLength")

SCHEMAS = ("properties", "$defs", "definitions")
"""Keywords whose value maps names to schemas."""
SCHEMA = ("items", "additionalProperties", "additionalItems")
"""Keywords whose value is a schema (or, for ``items``, a list of them)."""
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def unenforced(node: Any, where: str = "") -> tuple[str, str] | None:
    """The first keyword of ``node`` the engine would not enforce: where it is (after the
    schema, as ``.properties.zip.pattern``) and what it asks; None if every one is."""
    if not isinstance(node, dict):
        return None
    if (gap := _own_gap(node)) is not None:
        key, why = gap
        return f"{where}.{key}", why
    for path, child in _children(node, where):
        if (gap := unenforced(child, path)) is not None:
            return gap
    return None


def _children(node: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """The schemas in ``node``, each with where it is."""
    children: list[tuple[str, Any]] = []
    for key, value in node.items():
        if key in SCHEMAS and isinstance(value, dict):
            children += [(f"{where}.{key}.{name}", child) for name, child in value.items()]
        elif isinstance(value, list) and (key in SCHEMA_LISTS or key in SCHEMA):
            children += [(f"{where}.{key}[{at}]", child) for at, child in enumerate(value)]
        elif key in SCHEMA:
            children.append((f"{where}.{key}", value))
    return children


def held(schema: Any) -> Any:
    """``schema`` with each ``pattern`` spelled as the engine's grammar reads it (``\\d``
    as ``[0-9]``, ``\\w`` as ``[0-9A-Za-z_]``, ``\\/`` as ``/``): the engine accepted
    any string for a pattern with an escape it has no rule for, with a warning in its
    log. Of the patterns it still cannot hold (a schema not strict: a strict one was
    refused), one matching a backslash or a quote is left out: the engine wrote them raw,
    no JSON, a failure counted against it (the others it takes as any string, and says
    so in its log). ``schema`` itself is left as it is."""
    copied = copy.deepcopy(schema)
    nodes = [copied]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            if isinstance(pattern := node.get("pattern"), str):
                spelled, unheld = _spelled(pattern)
                if unheld is not None and set(unheld) <= UNWRITTEN:
                    del node["pattern"]
                else:
                    node["pattern"] = spelled
            nodes += [child for _, child in _children(node, "")]
    return copied


def held_format(response_format: dict[str, Any]) -> dict[str, Any]:
    """A chat's ``response_format`` with its JSON schema :func:`held`."""
    described = response_format.get("json_schema")
    if not isinstance(described, dict) or "schema" not in described:
        return response_format
    return {**response_format, "json_schema": {**described, "schema": held(described["schema"])}}


CLASS_ESCAPES = {"d": "0-9", "w": "0-9A-Za-z_"}
"""JSON Schema's (ECMA-262's) character class escapes the engine lacks, as class ranges."""
ESCAPES = frozenset("xuntr.-(){}[]|*+?^$")
"""What the engine's grammar reads after a backslash outside a character class."""
ESCAPES_IN_CLASS = frozenset("xuntr-]")
"""...and inside one (other punctuation is itself there, but ``^``, which it refuses)."""
UNWRITTEN = frozenset('\\"')
"""Characters a pattern may match that the engine writes into the JSON string as they are,
unescaped: the answer is no JSON (and its failure was counted against the engine)."""


def _spelled(pattern: str) -> tuple[str, str | None]:
    """``pattern`` as the engine's grammar can read it, and the first of its constructs
    it still cannot (an escape such as ``\\s`` or ``\\b``, a lookaround), or None."""
    out: list[str] = []
    at, in_class, negated, unheld = 0, False, False, None
    while at < len(pattern):
        char = pattern[at]
        if char == "\\" and at + 1 < len(pattern):
            char, trouble = _escape(pattern, at, in_class, out)
            if not (negated and pattern[at + 1] in UNWRITTEN):  # [^\\"]: kept out, fine
                unheld = unheld or trouble
            at += 1
        elif char in UNWRITTEN and not negated:
            unheld = unheld or char
        elif char == "[" and not in_class:
            in_class, negated = True, pattern.startswith("[^", at)
            if pattern.startswith(("[]", "[^]"), at):  # no class, or all: no rule for it
                unheld = unheld or pattern[at : at + 3]
        elif char == "]" and in_class:
            in_class = negated = False
        elif char == "-" and in_class and out and out[-1] in CLASS_ESCAPES.values():
            char = "\\-"  # after \\d spelled as 0-9, a range's dash would join them
        elif pattern.startswith("(?", at) and not pattern.startswith("(?:", at):
            unheld = unheld or pattern[at : at + 3]
        out.append(char)
        at += 1
    return "".join(out), unheld


def _escape(pattern: str, at: int, in_class: bool, out: list[str]) -> tuple[str, str | None]:
    """The escape at ``at`` as the engine reads it, and what of it it cannot, if any."""
    escaped = pattern[at + 1]
    if escaped in CLASS_ESCAPES:
        ranges = CLASS_ESCAPES[escaped]
        if not in_class:
            return f"[{ranges}]", None
        if out and out[-1] == "-":  # a range's dash before it: a dash, as ECMA reads it
            out[-1] = "\\-"
        return ranges, None
    if escaped in UNWRITTEN:  # matched, it is written raw; kept out, the engine reads it
        return pattern[at : at + 2], f"\\{escaped}"
    if escaped == "u" and pattern.startswith("{", at + 2):
        return pattern[at : at + 2], "\\u{"
    if escaped in (ESCAPES_IN_CLASS if in_class else ESCAPES):
        return pattern[at : at + 2], None
    if not escaped.isalnum() and not (in_class and escaped == "^"):
        return escaped, None  # a punctuation character escaped: itself
    return pattern[at : at + 2], f"\\{escaped}"


def _own_gap(node: dict[str, Any]) -> tuple[str, str] | None:
    """The first keyword of this node itself the engine would not enforce."""
    for key in UNENFORCED:
        if node.get(key) not in (None, False):
            return key, f"{key} is asked for"
    found: str | None
    pattern, form = node.get("pattern"), node.get("format")
    if isinstance(pattern, str) and not (pattern.startswith("^") and pattern.endswith("$")):
        return "pattern", (
            f"the pattern {pattern!r} is not anchored (JSON Schema's patterns match anywhere "
            "in the string; anchored with ^ and $ it matches the whole string, which the "
            "engine can hold)"
        )
    if isinstance(pattern, str) and (unheld := _spelled(pattern)[1]) is not None:
        return "pattern", (
            f"the pattern {pattern!r} uses {unheld}, which the engine's grammar has no rule"
            " for (it reads \\d and \\w; spell the rest as a class: [ ] for \\s)"
        )
    if isinstance(form, str) and form not in FORMATS:
        return "format", f"the format {form!r} is asked for (it holds date, time, date-time, uuid)"
    if pattern is not None or form is not None:
        found = next((key for key in LENGTHS if key in node), None)
        if found is not None:
            return found, f"{found} beside a {'pattern' if pattern is not None else 'format'}"
    kind = node.get("type")
    if "number" in (kind if isinstance(kind, list) else [kind]):
        found = next((key for key in BOUNDS if key in node), None)
        if found is not None:  # held for an integer (or a node with no type: one)
            return found, f"{found} on a number (it holds an integer's bounds)"
    return None
