"""What of a response schema llama.cpp's grammar cannot hold an answer to.

The engine turns a JSON schema into a grammar and samples only what the grammar allows;
what the grammar has no way to say it drops, most of it without a word, and the answer
was a 200 breaking the schema (``multipleOf: 7`` answered 1, ``uniqueItems`` [1, 1, 1],
``format: email`` "a", a ``pattern`` not anchored any string at all). Checked here, by
the rules of llama.cpp's ``common/json-schema-to-grammar.cpp``: each schema node takes one
of its branches (a string's ``pattern`` or its ``format`` or its length, an integer's
bounds), and a keyword no branch reads is not enforced."""

from __future__ import annotations

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
    children: list[tuple[str, Any]] = []
    for key, value in node.items():
        if key in SCHEMAS and isinstance(value, dict):
            children += [(f"{where}.{key}.{name}", child) for name, child in value.items()]
        elif isinstance(value, list) and (key in SCHEMA_LISTS or key in SCHEMA):
            children += [(f"{where}.{key}[{at}]", child) for at, child in enumerate(value)]
        elif key in SCHEMA:
            children.append((f"{where}.{key}", value))
    for path, child in children:
        if (gap := unenforced(child, path)) is not None:
            return gap
    return None


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
