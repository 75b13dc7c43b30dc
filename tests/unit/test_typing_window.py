"""Typing on one line must not move the prompt's head: that is what lets a local
model reuse its KV cache from one keystroke to the next."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from keel.config import HttpModelConfig
from keel.pipeline.completion import build_prompt
from keel.pipeline.languages import get_language
from keel.pipeline.prompt import Snippet, split_budget
from keel.providers.base import CompletionProvider, estimate_tokens
from keel.providers.http import build_http_provider

SOURCE = Path(httpx.__file__).with_name("_client.py").read_text()


async def test_window_start_stays_put_while_typing_a_line() -> None:
    provider = build_http_provider(
        "completion",
        HttpModelConfig(kind="vllm/completion", api_endpoint="http://127.0.0.1:9/v1"),
        name="test",
        timeout=1,
    )
    assert isinstance(provider, CompletionProvider)
    python = get_language("python")
    cut = SOURCE.index("\n", 30_000) + 1  # far more prefix than the budget holds
    typed = (
        "        response = self.send(request, auth=auth, follow_redirects=follow_redirects)"
        "  # and a long trailing comment that keeps on going"
    )
    snippets = [Snippet("httpx/_models.py", "class Response:\n    pass")]
    heads = set()
    lengths = set()
    indented = []  # the prompts while only the indentation is typed: they end at the code
    try:
        for n in range(1, len(typed) + 1):
            prefix = SOURCE[:cut] + typed[:n]
            built = await build_prompt(provider, python, prefix, "\n", snippets, 1024)
            if not typed[:n].strip():
                indented.append(built.prompt)
                continue
            head, _, cursor_line = built.prompt.rpartition("\n")
            assert cursor_line == typed[:n].rstrip(" ")  # the model writes a space itself
            heads.add(head)
            lengths.add(len(built.prompt) - n)
    finally:
        await provider.aclose()
    assert len(heads) == 1, f"the window start moved {len(heads) - 1} times within one line"
    assert indented == [heads.pop().rstrip()] * 8
    assert lengths.pop() > 1000  # the window holds real context, not a stub


@pytest.mark.parametrize(
    ("side", "line"),
    [
        ("prefix", "a" * 49_000 + "\U00020000" * 1_000),
        ("suffix", "\U00020000" * 1_000 + "a" * 49_000),
        ("prefix", " " * 49_000 + "\U00020000" * 100),  # the spaces before the cut stay out
    ],
)
async def test_a_line_over_its_budget_ending_denser_than_it_starts_fits(
    side: str, line: str
) -> None:
    """The prefix's last line and the suffix's first, each alone over its budget, are cut
    by characters in proportion to the line's count: where the part kept is denser than
    the rest (ASCII, then 4-byte characters) that kept ~2.4 times the budget, which the
    backend refused. Counted again and cut again, each fits its budget."""
    provider = build_http_provider(
        "completion",
        HttpModelConfig(
            kind="mistral/completion", api_endpoint="http://127.0.0.1:9", model_name="codestral"
        ),
        name="test",
        timeout=1,
    )
    assert isinstance(provider, CompletionProvider) and provider.supports_suffix
    prefix, suffix = (f"x = 1\n{line}", "\n") if side == "prefix" else ("x = ", line)
    try:
        built = await build_prompt(provider, get_language("python"), prefix, suffix, [], 1024)
    finally:
        await provider.aclose()
    budget = split_budget(1024, has_suffix=True)
    kept = built.prompt if side == "prefix" else built.suffix
    assert kept and "\U00020000" in kept
    assert estimate_tokens(kept) <= getattr(budget, side), estimate_tokens(kept)


@pytest.mark.parametrize(
    "prefix",
    [
        "def f():\n" + " " * 49_000 + "\n" + "    x = 1\n" * 5 + "    y = ",
        "a = 1\n" + "\n" * 20_000 + "x = 1\n" * 3 + "y = ",
        "a = 1\r\n" + "\r\n" * 20_000 + "x = 1\r\n" * 3 + "y = ",
    ],
)
async def test_the_whitespace_kept_before_a_window_is_a_few_lines_worth(prefix: str) -> None:
    """The run of whitespace before a window's first line is kept (BPE merges it with
    that line's indentation), but all of it made a prompt 16 times its budget: a
    whitespace-only line of 49,000 spaces, or 20,000 blank lines, before the window."""
    provider = build_http_provider(
        "completion",
        HttpModelConfig(kind="vllm/completion", api_endpoint="http://127.0.0.1:9/v1"),
        name="test",
        timeout=1,
    )
    try:
        built = await build_prompt(provider, get_language("python"), prefix, "\n", [], 1024)
    finally:
        await provider.aclose()
    assert estimate_tokens(built.prompt) <= 1024, estimate_tokens(built.prompt)
    assert re.search(r"x = 1\r?\n *y =$", built.prompt), built.prompt[-40:]
    assert built.prompt.startswith(("\n", "\r", " "))  # some of the run is kept
