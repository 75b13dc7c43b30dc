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
from keel.router.classify import Failure, classify


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
        (status(404), Failure.CLIENT),
        (status(422, "temperature must be >= 0"), Failure.CLIENT),
        (status(400, "This model's maximum context length is 2048 tokens"), Failure.TOO_LONG),
        (status(413, "prompt too long"), Failure.TOO_LONG),
        (status(404, "context length"), Failure.CLIENT),
        (RequestError("bad"), Failure.CLIENT),
        (Unavailable("down"), Failure.RETRYABLE),
        (KeelError("internal"), Failure.RETRYABLE),
    ],
)
def test_classify(error: KeelError, expected: Failure) -> None:
    assert classify(error) is expected
