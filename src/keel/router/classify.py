"""Sort a provider failure into what the router does about it.

The classes come from the error tree (never from matching message text),
except "context too long": llama.cpp says it by its error ``type``
(``exceed_context_size_error``, with ``n_prompt_tokens`` and ``n_ctx``),
OpenAI by its ``code`` (``context_length_exceeded``), but vLLM and older
servers only by a 400 with a message, and llama.cpp of an embedding input over
its batch only by a 500 with a message. That one test, and reading the numbers
out of those messages, is kept here and nowhere else.
"""

from __future__ import annotations

import re
from enum import StrEnum

from keel.errors import (
    ContextLengthExceeded,
    KeelError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    WorkerCrashed,
    WorkerUnavailable,
)
from keel.rate_limit import REFUSED


class Failure(StrEnum):
    RETRYABLE = "retryable"
    """Connect refused/reset, 5xx, timeout, broken response, a 404 or 405 (no such model
    or route at the backend: keel's configuration, never the client's request, names
    both), a 408 (the backend's or a proxy's timeout): retry, then fall back."""
    CRASHED = "crashed"
    """A local worker died mid-request: fall back, never resend (it may be a poison request)."""
    RATE_LIMITED = "rate_limited"
    """429, or a 503 with Retry-After: honour it for this provider, fall back now."""
    TOO_LONG = "too_long"
    """The prompt did not fit: retry once with less context, then fall back."""
    AUTH = "auth"
    """401/403: our key is wrong; mark the provider, no retry, no breaker storm."""
    CLIENT = "client"
    """Any other 4xx: the request itself is wrong; return it to the client."""


_TOO_LONG_WORDS = re.compile(
    # what servers say of a prompt over the context, without a code that says so: OpenAI's
    # and vLLM's "maximum context length", llama.cpp's "exceeds the available context
    # size", vLLM's "Input prompt (N tokens) is too long", Anthropic's "prompt is too
    # long", Mistral's "too large for model with 32768 maximum context length", TGI's
    # "`inputs` tokens + `max_new_tokens` must be <= 4096". A word alone ("too long",
    # "exceed") took a client's mistake ("Invalid 'tools': array too long") for one: it
    # went to every provider, and the client was told its prompt did not fit.
    r"context[ _](?:length|window|size)|maximum context|too many tokens"
    r"|\b(?:prompt|input|request|tokens?)\b[^.]{0,80}?\b(?:too long|too large|exceeds?)"
    r"|tokens \+ `?max_new_tokens`? must be|must have less than \d+ tokens",
    re.IGNORECASE,
)


_TOO_LONG_FIELDS = {"context_length_exceeded", "exceed_context_size_error"}

_BATCH_REFUSAL = re.compile(
    # llama.cpp server, an embedding input over its batch (read in one, unlike a prompt):
    # "input (3001 tokens) is too large to process. increase the physical batch size
    # (current batch size: 2048)", a 500 of type server_error
    r"\((?P<prompt>\d+) tokens\) is too large to process.*?current batch size: (?P<ctx>\d+)"
)

_CONTEXT_NUMBERS = (
    _BATCH_REFUSAL,
    # llama.cpp server: "request (5000 tokens) exceeds the available context size (4096 tokens)"
    re.compile(r"\((?P<prompt>\d+) tokens\) exceeds the available context size \((?P<ctx>\d+)"),
    # llama-cpp-python: "Requested tokens (5000) exceed context window of 2048"
    re.compile(r"tokens \((?P<prompt>\d+)\) exceed context window of (?P<ctx>\d+)"),
    # OpenAI, vLLM: "maximum context length is 2048 tokens. However, you requested 3000
    # tokens (2900 in the messages, ...)" / "... your request has 3000 input tokens"
    re.compile(r"maximum context length is (?P<ctx>\d+) tokens.*?(?P<prompt>\d+) in (the|your)"),
    re.compile(r"maximum context length is (?P<ctx>\d+) tokens.*?has (?P<prompt>\d+) input"),
    re.compile(r"maximum context length is (?P<ctx>\d+) tokens"),
)


def _too_long(error: KeelError) -> bool:
    if error.code in _TOO_LONG_FIELDS:
        return True
    details = getattr(error, "details", {})
    if details.get("type") in _TOO_LONG_FIELDS or details.get("code") in _TOO_LONG_FIELDS:
        return True
    return _BATCH_REFUSAL.search(error.message) is not None


def context_numbers(error: KeelError) -> tuple[int | None, int | None]:
    """The prompt's tokens and the context's size, as far as the backend's refusal of a
    prompt over its context gives them."""
    details = getattr(error, "details", {})
    prompt, context = details.get("n_prompt_tokens"), details.get("n_ctx")
    if isinstance(prompt, int) and isinstance(context, int):
        return prompt, context
    for pattern in _CONTEXT_NUMBERS:
        found = pattern.search(error.message)
        if found is not None:
            groups = found.groupdict()
            return int(groups["prompt"]) if groups.get("prompt") else None, int(groups["ctx"])
    return None, None


def prompt_fits(error: KeelError) -> bool:
    """Whether the backend's numbers say the prompt fits its context, and the tokens
    asked for on top of it do not (vLLM, OpenAI: "'max_tokens' ... is too large: 4000.
    This model's maximum context length is 2048 tokens and your request has 10 input
    tokens"): a shorter prompt does not help, fewer tokens do."""
    prompt, context = context_numbers(error)
    return prompt is not None and context is not None and prompt < context


def context_overflow(
    error: KeelError, role: str = "completion", limit_name: str = "max_tokens"
) -> ContextLengthExceeded:
    """The caller's 400 for a prompt the backend found too long, with the numbers
    (prompt tokens, context size) when the backend gave them, and what to do (for an
    embedding: shorter inputs; there are no tokens to ask fewer of). ``limit_name``:
    the client's name for its cap on new tokens."""
    prompt, context = context_numbers(error)
    what = "an input" if role == "embedding" else "the prompt"
    if prompt_fits(error) and role != "embedding":
        # vLLM and OpenAI say so when the prompt fits and the tokens asked for do not:
        # "'max_tokens' ... is too large: 4000. This model's maximum context length is
        # 2048 tokens and your request has 10 input tokens"; keel said the prompt was over
        return ContextLengthExceeded(
            f"the prompt has {prompt} tokens, and with the tokens asked for it is over the "
            f"model's context of {context} tokens; ask for fewer tokens ({limit_name}), or "
            "send a shorter prompt",
            prompt_tokens=prompt,
            context_size=context,
            param=limit_name,
        )
    if prompt is not None and context is not None:
        where = "over" if prompt > context else "filling, with no room for an answer,"
        text = f"{what} has {prompt} tokens, {where} the model's context of {context} tokens"
    elif context is not None:
        text = f"{what} does not fit the model's context of {context} tokens"
    else:
        text = f"{what} does not fit the model's context"
    if role == "embedding":
        advice = (
            "send shorter inputs (a local embedding model reads up to [model.embedding.local] "
            "context_size tokens of one)"
        )
    elif prompt is not None and context is not None:  # fewer tokens leave it as long
        advice = "send a shorter prompt"
    else:
        advice = "send a shorter prompt or ask for fewer tokens"
    # The backend's own words only where keel has no numbers to give: llama.cpp's
    # advice ("increase the physical batch size", "try increasing it") is an
    # operator's, and contradicted keel's
    said = f" ({error.message})" if context is None else ""
    return ContextLengthExceeded(
        f"{text}; {advice}{said}",
        prompt_tokens=prompt,
        context_size=context,
        param=_PROMPT_FIELD.get(role, "prompt"),
    )


_PROMPT_FIELD = {"chat": "messages", "embedding": "input"}
"""The request field a role's prompt comes from, as OpenAI names it in ``param``."""


def without_name(message: str, name: str) -> str:
    """An endpoint's error as said after its name (an upstream error begins with it)."""
    return message.removeprefix(f"{name}: ")


def classify(error: KeelError) -> Failure:
    if _too_long(error):
        return Failure.TOO_LONG
    if isinstance(error, WorkerCrashed):
        return Failure.CRASHED
    if isinstance(error, UpstreamAuthError):
        return Failure.AUTH
    if isinstance(error, UpstreamConnectError | UpstreamTimeout | UpstreamProtocolError):
        return Failure.RETRYABLE
    if isinstance(error, WorkerUnavailable):
        return Failure.RETRYABLE
    if isinstance(error, UpstreamStatusError):
        status = error.upstream_status
        if error.code in ("rate_limited", REFUSED) or status == 429:
            return Failure.RATE_LIMITED
        if status == 503 and error.retry_after is not None:
            # an overloaded (or model-loading) server naming its pause, as a 429 does: it
            # was resent at once and the client told to come back in 1 s
            return Failure.RATE_LIMITED
        if status in (404, 405, 408):  # 408: a proxy's or the server's own timeout
            return Failure.RETRYABLE
        if status is not None and 400 <= status < 500:
            text = error.message.lower()
            if status in (400, 413, 422) and _TOO_LONG_WORDS.search(text):
                return Failure.TOO_LONG
            return Failure.CLIENT
        return Failure.RETRYABLE
    if isinstance(error, UpstreamError):
        return Failure.RETRYABLE
    return Failure.CLIENT if error.status_code < 500 else Failure.RETRYABLE
