"""Typing on one line must not move the prompt's head: that is what lets a local
model reuse its KV cache from one keystroke to the next."""

from __future__ import annotations

from pathlib import Path

import httpx

from keel.config import HttpModelConfig
from keel.pipeline.completion import build_prompt
from keel.pipeline.languages import get_language
from keel.pipeline.prompt import Snippet
from keel.providers.base import CompletionProvider
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
