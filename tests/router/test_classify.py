"""Every error of the tree lands in the failure class the router acts on."""

from __future__ import annotations

import pytest

from keel.errors import (
    KeelError,
    RequestError,
    Unavailable,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    WorkerCrashed,
    WorkerUnavailable,
)
from keel.router.classify import Failure, classify, context_overflow


def status(code: int | None, message: str = "boom", **kwargs: object) -> UpstreamStatusError:
    return UpstreamStatusError(message, provider="p", upstream_status=code, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UpstreamConnectError("refused", provider="p"), Failure.RETRYABLE),
        (UpstreamTimeout("slow", provider="p"), Failure.RETRYABLE),
        (UpstreamProtocolError("bad json", provider="p"), Failure.RETRYABLE),
        (UpstreamError("odd", provider="p"), Failure.RETRYABLE),
        (WorkerUnavailable("starting"), Failure.RETRYABLE),
        (WorkerCrashed("SIGKILL", provider="p"), Failure.CRASHED),
        (UpstreamAuthError("401", provider="p", upstream_status=401), Failure.AUTH),
        (UpstreamAuthError("403", provider="p", upstream_status=403), Failure.AUTH),
        (status(500), Failure.RETRYABLE),
        (status(502), Failure.RETRYABLE),
        (status(503), Failure.RETRYABLE),
        (status(None), Failure.RETRYABLE),  # an error inside a 200 stream
        (status(429), Failure.RATE_LIMITED),
        (UpstreamStatusError("own limit", provider="p", code="rate_limited"), Failure.RATE_LIMITED),
        (status(400), Failure.CLIENT),
        (status(404), Failure.RETRYABLE),  # no such model or route: keel's config
        (status(405), Failure.RETRYABLE),
        (status(409), Failure.CLIENT),
        (status(422, "temperature must be >= 0"), Failure.CLIENT),
        (status(400, "This model's maximum context length is 2048 tokens"), Failure.TOO_LONG),
        (status(413, "prompt too long"), Failure.TOO_LONG),
        (status(400, "Input prompt (5000 tokens) is too long and exceeds limit"), Failure.TOO_LONG),
        (status(400, "prompt is too long: 210000 tokens > 200000 maximum"), Failure.TOO_LONG),
        (
            status(400, "Prompt contains 40000 tokens, too large for model with 32768 maximum"),
            Failure.TOO_LONG,
        ),
        (
            status(422, "`inputs` tokens + `max_new_tokens` must be <= 4096. Given: 5000"),
            Failure.TOO_LONG,
        ),
        # a client's mistake in the same words: it went to every provider as an overflow
        (
            status(400, "Invalid 'tools': array too long. Expected an array with maximum length"),
            Failure.CLIENT,
        ),
        (status(400, "'stop' may not exceed 4 sequences"), Failure.CLIENT),
        (
            status(400, "max_tokens is too large: 9000. This model supports at most 4096"),
            Failure.CLIENT,
        ),
        (status(409, "context length"), Failure.CLIENT),
        (RequestError("bad"), Failure.CLIENT),
        (Unavailable("down"), Failure.RETRYABLE),
        (KeelError("internal"), Failure.RETRYABLE),
    ],
)
def test_classify(error: KeelError, expected: Failure) -> None:
    assert classify(error) is expected


LLAMACPP_TOO_LONG = {
    "code": 400,
    "message": "the request exceeds the available context size, try increasing it",
    "type": "exceed_context_size_error",
    "n_prompt_tokens": 5000,
    "n_ctx": 4096,
}


@pytest.mark.parametrize(
    ("error", "numbers"),
    [
        (status(400, LLAMACPP_TOO_LONG["message"], details=LLAMACPP_TOO_LONG), (5000, 4096)),
        (
            UpstreamStatusError(
                "too long",
                provider="local",
                code="context_length_exceeded",
                upstream_status=400,
                details={"n_prompt_tokens": 5000, "n_ctx": 4096},
            ),
            (5000, 4096),
        ),
        (
            status(
                400,
                "This model's maximum context length is 2048 tokens. However, you requested "
                "3000 tokens (2900 in the messages, 100 in the completion).",
            ),
            (2900, 2048),
        ),
        (
            status(400, "request (700 tokens) exceeds the available context size (512 tokens)"),
            (700, 512),
        ),
        (status(400, "This model's maximum context length is 8192 tokens"), (None, 8192)),
        (
            # an embedding input over llama.cpp's batch: a 500 of type server_error
            status(
                500,
                "input (3001 tokens) is too large to process. increase the physical batch "
                "size (current batch size: 512)",
                details={"code": 500, "type": "server_error"},
            ),
            (3001, 512),
        ),
    ],
    ids=[
        "llama.cpp-fields",
        "engine-code",
        "vllm-openai",
        "llama.cpp-text",
        "context-only",
        "llama.cpp-embedding-batch",
    ],
)
def test_a_prompt_over_the_context_is_the_callers_400_with_the_numbers(
    error: KeelError, numbers: tuple[int | None, int | None]
) -> None:
    assert classify(error) is Failure.TOO_LONG
    overflow = context_overflow(error)
    assert overflow.status_code == 400 and overflow.code == "context_length_exceeded"
    assert (overflow.prompt_tokens, overflow.context_size) == numbers
    body = overflow.to_body()["error"]
    assert isinstance(body, dict) and body["context_size"] == numbers[1]
    # the backend's own words only where keel has no numbers of its own to give
    assert (error.message in overflow.message) is (numbers[1] is None)
    assert body["param"] == "prompt"


@pytest.mark.parametrize(
    "message",
    [
        "'max_tokens' or 'max_completion_tokens' is too large: 4000. This model's maximum "
        "context length is 2048 tokens and your request has 10 input tokens (4000 > 2048 - 10)",
        "This model's maximum context length is 2048 tokens. However, you requested 4010 "
        "tokens (10 in the messages, 4000 in the completion). Please reduce the length of the "
        "messages or completion.",
    ],
    ids=["vllm", "openai"],
)
def test_a_prompt_that_fits_with_too_many_tokens_asked_for_blames_max_tokens(
    message: str,
) -> None:
    """The prompt fits; the tokens asked for do not. keel said the prompt (10 tokens) was
    over the context (2048), with ``param: prompt``."""
    overflow = context_overflow(status(400, message))
    body = overflow.to_body()["error"]
    assert isinstance(body, dict) and body["param"] == "max_tokens"
    assert (overflow.prompt_tokens, overflow.context_size) == (10, 2048)
    assert "fewer tokens (max_tokens)" in overflow.message
    assert "over the model's context of 2048" in overflow.message
    # named as the client named it (OpenAI's reasoning models take max_completion_tokens)
    named = context_overflow(status(400, message), "chat", "max_completion_tokens")
    assert named.param == "max_completion_tokens"
    assert "fewer tokens (max_completion_tokens)" in named.message


@pytest.mark.parametrize(
    ("role", "param"), [("completion", "prompt"), ("chat", "messages"), ("embedding", "input")]
)
def test_an_over_long_prompt_names_the_field_it_came_from(role: str, param: str) -> None:
    """Chat has no ``prompt`` field: OpenAI names ``messages`` (keel said ``prompt``)."""
    error = UpstreamStatusError(
        "the request exceeds the available context size", provider="p", upstream_status=400
    )
    assert context_overflow(error, role).param == param


def test_a_prompt_exactly_the_context_is_not_called_over_it() -> None:
    """2,048 tokens in a 2,048-token context is refused rightly, as "over" it wrongly."""
    error = UpstreamStatusError(
        "request (2048 tokens) exceeds the available context size (2048 tokens)",
        provider="p",
        upstream_status=400,
    )
    message = context_overflow(error, "chat").message
    assert "2048 tokens, filling, with no room for an answer, the model's context" in message
    # a prompt that fills the context alone: asking for fewer tokens cannot help
    assert message.endswith("; send a shorter prompt"), message
    over = UpstreamStatusError(
        "request (2049 tokens) exceeds the available context size (2048 tokens)",
        provider="p",
        upstream_status=400,
    )
    assert "2049 tokens, over the model's context of 2048" in context_overflow(over, "chat").message
