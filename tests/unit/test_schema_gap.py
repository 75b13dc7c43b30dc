"""A response schema's patterns as the local engine's grammar reads them (held) or cannot
(refused when strict, left out when not). What the engine reads was found by sending each
pattern to it and reading its warnings ("JSON schema conversion was incomplete")."""

from __future__ import annotations

import pytest

from keel.providers.schema_gap import held, unenforced


@pytest.mark.parametrize(
    ("pattern", "sent"),
    [
        (r"^\d{5}$", "^[0-9]{5}$"),  # the engine took any string for \d
        (r"^[\w.]+$", "^[0-9A-Za-z_.]+$"),
        (r"^a\/b\'c$", "^a/b'c$"),  # identity escapes it had no rule for
        # a dash beside a class escape is a dash, as ECMA reads it, never a range: "+-0-9"
        # ran from + to 0 (",./" allowed, "1".."8" not), "_-." was a reversed range
        (r"^[+-\d]{6}$", r"^[+\-0-9]{6}$"),
        (r"^[\w-\.]+$", r"^[0-9A-Za-z_\-.]+$"),
        (r"^[\d-z]$", r"^[0-9\-z]$"),
        (r"^[a-z\-]+$", r"^[a-z\-]+$"),  # what it reads, unchanged
        (r'^[^"\\]+$', r'^[^"\\]+$'),  # quotes and backslashes kept out: fine
    ],
)
def test_a_pattern_is_spelled_as_the_engine_reads_it(pattern: str, sent: str) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}
    assert held(schema)["properties"]["s"]["pattern"] == sent
    assert schema["properties"]["s"]["pattern"] == pattern, "the client's schema untouched"
    assert unenforced(schema) is None


@pytest.mark.parametrize(
    ("pattern", "unheld"),
    [
        (r"^\s+$", r"\s"),
        (r"^\bab$", r"\b"),
        (r"^(?=a)a$", "(?="),
        (r"^[a\^]+$", r"\^"),  # the engine refuses it in a class
        (r"^[]a]+$", "[]a"),
        (r"^\u{1F600}$", r"\u{"),
        (r"^\\d$", "\\\\"),  # a backslash matched: written raw, no JSON (a 503 before)
        (r'^a"b$', '"'),
    ],
)
def test_a_pattern_the_engine_cannot_hold_is_named(pattern: str, unheld: str) -> None:
    """Refused when strict; not strict, one matching a backslash or a quote is left out
    (the engine wrote them raw: no JSON, a 503 counted against it), the rest go as they
    are (the engine takes any string for them, and says so in its log)."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}
    where, why = unenforced(schema) or ("", "")
    assert where == ".properties.s.pattern" and f"uses {unheld}," in why, why
    sent = held(schema)["properties"]["s"].get("pattern")
    assert sent == (None if unheld in ("\\\\", '"') else pattern), sent
