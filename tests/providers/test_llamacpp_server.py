"""The ``llama.cpp/completion`` adapter against llama.cpp's own server (its HTTP listener
as xllamacpp serves it, with the embedded model) in a process of its own on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from keel.config import HttpModelConfig
from keel.providers.base import CompletionCall, CompletionProvider, GenerationParams
from keel.providers.http import build_http_provider
from tests.conftest import wait_or_kill

pytestmark = pytest.mark.integration

SERVE = """
import sys, xllamacpp
from keel.models.registry import embedded_model_path
from keel.workers.worker import _engine_params, _parse_args
args = _parse_args(["--model", str(embedded_model_path()), "--slots", "1"])
server = xllamacpp.Server(_engine_params(xllamacpp, args, "sk-test"))
print(server.listening_address, flush=True)
sys.stdin.read()  # until the test ends
"""


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        yield process.stdout.readline().strip()
    finally:
        process.stdin.close()  # its end
        wait_or_kill(process, 10)
        process.stdout.close()


def completion_provider(url: str) -> CompletionProvider:
    config = HttpModelConfig(kind="llama.cpp/completion", api_endpoint=url, api_key="sk-test")
    provider = build_http_provider("completion", config, name="llama-server", timeout=30)
    assert isinstance(provider, CompletionProvider)
    return provider


async def answer(url: str, stop: tuple[str, ...], max_tokens: int) -> str:
    provider = completion_provider(url)
    params = GenerationParams(max_tokens=max_tokens, temperature=0, stop=stop)
    try:
        return "".join(
            [p async for p in provider.stream_completion(CompletionCall("1, 2, 3,", params))]
        )
    finally:
        await provider.aclose()


async def test_streamed_answers_back_to_back_all_arrive(llama_server: str) -> None:
    """The server closes its connection after a streamed answer though it says
    keep-alive: kept in keel's pool, the next request on it failed, every other one
    ("Can not write request body", or "Server disconnected")."""
    provider = completion_provider(llama_server)
    params = GenerationParams(max_tokens=2, temperature=0)
    try:
        for _ in range(10):
            call = CompletionCall("1, 2, 3,", params)
            assert "".join([p async for p in provider.stream_completion(call)])
    finally:
        await provider.aclose()


async def test_text_that_begins_a_stop_word_is_kept_when_the_answer_ends_at_n_predict(
    llama_server: str,
) -> None:
    """The server holds such text back while it streams and drops it at ``n_predict``:
    ``" 4,"`` came as ``" "`` with stop ``"4, 5, 6"``. A stop word reached still ends
    the answer there."""
    whole = await answer(llama_server, (), 3)
    assert len(whole.strip()) > 1, whole
    assert await answer(llama_server, (whole[1:] + "\u2603",), 3) == whole
    assert await answer(llama_server, (whole[1:],), 6) == whole[:1]


async def test_an_answer_left_after_its_first_piece_has_the_prompts_figures(
    llama_server: str,
) -> None:
    """keel ends an answer early (a stop word of its own, llama.vim's ``n_indent`` or
    time limit) and never reads the server's last chunk, which alone carried the
    prompt's tokens and reading time: llama.vim's figures had no prompt read."""
    provider = completion_provider(llama_server)
    params = GenerationParams(max_tokens=40, temperature=0)
    call = CompletionCall("Once upon a time", params)
    try:
        pieces = provider.stream_completion(call)
        assert await anext(pieces)
        await pieces.aclose()  # as keel leaves an answer it has ended
    finally:
        await provider.aclose()
    assert call.reported.prompt_tokens and call.reported.prompt_tokens >= 4, call.reported
    assert call.reported.prompt_ms is not None and call.reported.prompt_ms > 0, call.reported
    assert call.reported.completion_tokens is None  # the answer's count is keel's to make
