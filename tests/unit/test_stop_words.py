"""Stop words over a stream of pieces, with a chat model's tool-call parts among them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from keel.pipeline.completion import read_until_stop, until_stop
from keel.providers.base import ToolCalls, joined, piece_count, tool_calls

CALL = {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f"}}
ARGUMENTS = {"index": 0, "function": {"arguments": '{"a": 1}'}}


async def stream(*pieces: str) -> AsyncIterator[str]:
    for piece in pieces:
        yield piece


async def test_text_held_for_a_stop_word_goes_out_with_the_tool_call_that_ends_it() -> None:
    """The end of "Let me che" might begin "check": it is held, then the call shows the
    text is over, and it goes out with the call."""
    pieces = stream("Let me ", "che", tool_calls("", [CALL]))
    out = [piece async for piece in until_stop(pieces, ["check"])]
    assert "".join(out) == "Let me che"
    *text, last = out
    assert not any(isinstance(piece, ToolCalls) for piece in text)
    assert isinstance(last, ToolCalls) and last.endswith("che") and last.deltas == (CALL,)


async def test_a_stop_word_still_ends_text_without_calls() -> None:
    assert await read_until_stop(stream("a", "b", "\n\n", "c"), ["\n\n"]) == "ab"


async def test_a_whole_answer_keeps_every_call_part_in_order() -> None:
    pieces = stream("Sure. ", tool_calls("", [CALL]), tool_calls("", [ARGUMENTS]))
    whole = await read_until_stop(pieces, [])
    assert whole == "Sure. "
    assert isinstance(whole, ToolCalls) and whole.deltas == (CALL, ARGUMENTS)
    assert piece_count(whole) == 3


def test_joined_pieces_count_their_tokens_and_plain_text_stays_plain() -> None:
    plain = joined(["a", "b", "c"])
    assert plain == "abc" and piece_count(plain) == 3 and not isinstance(plain, ToolCalls)
    mixed = joined([plain, tool_calls("", [CALL], pieces=2)])
    assert isinstance(mixed, ToolCalls) and piece_count(mixed) == 5
