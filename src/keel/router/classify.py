"""Sort a provider failure into what the router does about it.

The classes come from the error tree (never from matching message text),
except "context too long", which backends report only as a 400 with a
message; that one test is kept here and nowhere else.
"""

from __future__ import annotations

from enum import StrEnum

from keel.errors import (
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


class Failure(StrEnum):
    RETRYABLE = "retryable"
    """Connect refused/reset, 5xx, timeout, broken response: retry, then fall back."""
    CRASHED = "crashed"
    """A local worker died mid-request: fall back, never resend (it may be a poison request)."""
    RATE_LIMITED = "rate_limited"
    """429: honour Retry-After for this provider, fall back now."""
    TOO_LONG = "too_long"
    """The prompt did not fit: retry once with less context, then fall back."""
    AUTH = "auth"
    """401/403: our key is wrong; mark the provider, no retry, no breaker storm."""
    CLIENT = "client"
    """Any other 4xx: the request itself is wrong; return it to the client."""


_TOO_LONG_MARKERS = (
    "context length",
    "context_length",
    "context window",
    "maximum context",
    "too long",
    "too many tokens",
    "exceed",
)


def classify(error: KeelError) -> Failure:
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
        if error.code == "rate_limited" or status == 429:
            return Failure.RATE_LIMITED
        if status is not None and 400 <= status < 500:
            text = error.message.lower()
            if status in (400, 413, 422) and any(m in text for m in _TOO_LONG_MARKERS):
                return Failure.TOO_LONG
            return Failure.CLIENT
        return Failure.RETRYABLE
    if isinstance(error, UpstreamError):
        return Failure.RETRYABLE
    return Failure.CLIENT if error.status_code < 500 else Failure.RETRYABLE
