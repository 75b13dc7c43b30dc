"""Stop words over a stream of pieces, with a chat model's tool-call parts among them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from keel.pipeline.completion import read_until_stop, until_stop
from keel.providers.base import Parts, joined, parts, piece_count

CALL = {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f"}}
ARGUMENTS = {"index": 0, "function": {"arguments": '{"a": 1}'}}


async def stream(*pieces: str) -> AsyncIterator[str]:
    for piece in pieces:
        yield piece


async def test_text_held_for_a_stop_word_goes_out_with_the_tool_call_that_ends_it() -> None:
    """The end of "Let me che" might begin "check": it is held, then the call shows the
    text is over, and it goes out with the call."""
    pieces = stream("Let me ", "che", parts("", [CALL]))
    out = [piece async for piece in until_stop(pieces, ["check"])]
    assert "".join(out) == "Let me che"
    *text, last = out
    assert not any(isinstance(piece, Parts) for piece in text)
    assert isinstance(last, Parts) and last.endswith("che") and last.deltas == (CALL,)


async def test_a_stop_word_still_ends_text_without_calls() -> None:
    assert await read_until_stop(stream("a", "b", "\n\n", "c"), ["\n\n"]) == "ab"


async def test_a_whole_answer_keeps_every_call_part_in_order() -> None:
    """The call's parts, joined into one entry (its arguments after its name)."""
    pieces = stream("Sure. ", parts("", [CALL]), parts("", [ARGUMENTS]))
    whole = await read_until_stop(pieces, [])
    assert whole == "Sure. "
    called = {**CALL, "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert isinstance(whole, Parts) and whole.deltas == (called,)
    assert piece_count(whole) == 3


def test_joined_pieces_count_their_tokens_and_plain_text_stays_plain() -> None:
    plain = joined(["a", "b", "c"])
    assert plain == "abc" and piece_count(plain) == 3 and not isinstance(plain, Parts)
    mixed = joined([plain, parts("", [CALL], pieces=2)])
    assert isinstance(mixed, Parts) and piece_count(mixed) == 5


async def test_reasoning_passes_stop_words_by_and_stays_with_its_piece() -> None:
    """A thinking model's reasoning is not text: a stop word in it stops nothing, and it
    goes on (ahead of any text held back) as it came."""
    pieces = stream(parts("", reasoning="think\n\nmore"), "Hi", parts("", reasoning="!"), " there")
    out = [piece async for piece in until_stop(pieces, ["\n\n"])]
    assert "".join(p.reasoning for p in out if isinstance(p, Parts)) == "think\n\nmore!"
    assert "".join(out) == "Hi there"
    whole = joined(out)
    assert isinstance(whole, Parts) and whole.reasoning == "think\n\nmore!" and whole == "Hi there"
