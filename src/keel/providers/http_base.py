"""What every HTTP provider shares: one upstream connection and its failures.

:class:`HttpUpstream` is a backend's base URL, key, timeouts and rate limit
around an ``httpx.AsyncClient``. It is also the one place where the transport's
failures become keel's error tree (see :mod:`keel.errors`)::

    httpx.TimeoutException (connect, read, write, pool)   -> UpstreamTimeout
    httpx.ConnectError, ReadError, WriteError, ...        -> UpstreamConnectError
    httpx.RemoteProtocolError (closed mid-response)       -> UpstreamProtocolError
    HTTP 401 / 403                                        -> UpstreamAuthError
    HTTP >= 400 otherwise                                 -> UpstreamStatusError
    bad JSON, not SSE, stream ended before its end marker -> UpstreamProtocolError
    an error object inside a 200 stream                   -> UpstreamStatusError
    keel's own rate limit reached (RateLimiter)           -> UpstreamStatusError, code rate_limited

A stream cut mid-way is a protocol error whatever the framing: with chunked
encoding httpx notices the missing last chunk, with a close-delimited body the
readers here notice the missing end marker (``[DONE]``, ``stop``, ``done``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypedDict, Unpack, cast

import httpx

from keel.errors import (
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from keel.providers.base import CompletionProvider, ProviderInfo
from keel.rate_limit import RateLimiter

__all__ = ["RateLimiter"]  # re-exported: the limiter every HTTP upstream takes

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection; a backend that cannot accept in 5 s is down."""

ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of an error response keel reads to find the backend's message."""

JsonObject = dict[str, Any]


def auth_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` when a key is configured; every supported kind accepts it."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# --- translating failures -------------------------------------------------


@contextmanager
def translate_errors(provider: str) -> Iterator[None]:
    """Re-raise httpx's exceptions as keel's ``Upstream*`` errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for data",
            httpx.WriteTimeout: "sending the request",
            httpx.PoolTimeout: "waiting for a free connection",
        }.get(type(exc), "waiting")
        raise UpstreamTimeout(f"timed out {phase}", provider=provider) from exc
    except httpx.RemoteProtocolError as exc:
        raise UpstreamProtocolError(
            f"connection closed mid-response: {exc}", provider=provider
        ) from exc
    except httpx.ConnectError as exc:
        raise UpstreamConnectError(f"cannot connect: {exc}", provider=provider) from exc
    except httpx.DecodingError as exc:
        raise UpstreamProtocolError(f"undecodable response: {exc}", provider=provider) from exc
    except httpx.TransportError as exc:
        raise UpstreamConnectError(
            f"connection failed: {type(exc).__name__}: {exc}", provider=provider
        ) from exc


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds)


def error_message(body: bytes) -> str:
    """The backend's own words from an error body, whichever shape it uses.

    OpenAI, vLLM and llama.cpp send ``{"error": {"message": ...}}``; Ollama
    ``{"error": "..."}``; Mistral ``{"message": ...}``; Voyage and FastAPI
    servers ``{"detail": ...}``. Anything else is shown as text, shortened.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return _shorten(text) or "(empty body)"
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            value = data.get(key)
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return _shorten(value["message"])
            if isinstance(value, str) and value:
                return _shorten(value)
            if isinstance(value, list) and value:
                return _shorten(json.dumps(value))
    return _shorten(text)


def _shorten(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def status_error(provider: str, status: int, body: bytes, retry_after: str | None) -> UpstreamError:
    """The error for a response with status >= 400."""
    message = error_message(body)
    if status in (401, 403):
        return UpstreamAuthError(
            f"rejected our API key (HTTP {status}): {message}",
            provider=provider,
            upstream_status=status,
        )
    return UpstreamStatusError(
        f"HTTP {status}: {message}",
        provider=provider,
        upstream_status=status,
        retry_after=parse_retry_after(retry_after),
        details=error_details(body),
    )


def error_details(body: bytes) -> dict[str, object]:
    """The error object of an error body (llama.cpp's carries ``type``,
    ``n_prompt_tokens`` and ``n_ctx``), for the router to classify by fields."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    return dict(error) if isinstance(error, dict) else {}


async def raise_for_status(response: httpx.Response, provider: str) -> None:
    """Raise the translated error if ``response`` failed; reads at most 64 KiB of it."""
    if response.status_code < 400:
        return
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= ERROR_BODY_LIMIT:
            break
    raise status_error(
        provider, response.status_code, bytes(body), response.headers.get("retry-after")
    )


def decode_json(text: str | bytes, provider: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        shown = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
        raise UpstreamProtocolError(
            f"malformed JSON from upstream: {_shorten(shown, 200)!r}", provider=provider
        ) from exc


def decode_json_object(text: str | bytes, provider: str) -> JsonObject:
    data = decode_json(text, provider)
    if not isinstance(data, dict):
        raise UpstreamProtocolError(
            f"expected a JSON object, got {type(data).__name__}", provider=provider
        )
    return data


def stream_error(payload: JsonObject, provider: str) -> UpstreamStatusError | None:
    """An error object sent inside a 200 stream (vLLM, llama.cpp, Ollama do this)."""
    error = payload.get("error")
    return None if error is None else in_stream_error(error, provider)


def in_stream_error(error: object, provider: str) -> UpstreamStatusError:
    status = None
    if isinstance(error, dict):
        message = str(error.get("message") or error)
        code = error.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 else None
    else:
        message = str(error)
    return UpstreamStatusError(
        f"error in stream: {_shorten(message)}",
        provider=provider,
        upstream_status=status,
        details=dict(error) if isinstance(error, dict) else None,
    )


def text_field(container: JsonObject, key: str, provider: str) -> str:
    """The text at ``key`` (missing or null is empty); anything else is a protocol error."""
    value = container.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UpstreamProtocolError(f"expected text in {key!r}, got {value!r}", provider=provider)
    return value


def vector_of(value: object, provider: str) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in value
    ):
        raise UpstreamProtocolError(
            f"embedding is not a list of numbers: {str(value)[:100]}", provider=provider
        )
    return [float(x) for x in value]


# --- stream readers --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


_SSE_FIELDS = frozenset({"data", "event", "id", "retry"})


async def iter_sse(lines: AsyncIterator[str], provider: str) -> AsyncGenerator[SseEvent, None]:
    """Server-sent events from decoded lines.

    Stricter than the SSE spec on purpose: a line that is not a known field or
    a comment means the backend is not speaking SSE (an HTML error page, raw
    JSON lines), which is reported instead of silently skipped. llama.cpp's
    ``error: {...}`` line is accepted and becomes an ``error`` event. An event
    not closed by a blank line when the body ends is dropped, as the spec says.
    """
    event = "message"
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value or "message"
        elif name == "error":
            yield SseEvent("error", value)
        elif name not in _SSE_FIELDS:
            raise UpstreamProtocolError(
                f"not an event stream: unexpected line {_shorten(line, 200)!r}",
                provider=provider,
            )


async def iter_sse_json(
    lines: AsyncIterator[str], provider: str
) -> AsyncGenerator[JsonObject, None]:
    """JSON payloads of an SSE stream up to ``data: [DONE]``.

    Error events and error objects raise. If the body ends without ``[DONE]``
    the stream was cut: raises :class:`UpstreamProtocolError`. Protocols with
    their own end marker (llama.cpp's ``stop``) stop iterating before that.
    """
    async with aclosing(iter_sse(lines, provider)) as events:
        async for event in events:
            if event.data.strip() == "[DONE]":
                return
            if event.event == "error":
                detail = decode_json(event.data, provider)
                if isinstance(detail, dict) and "error" in detail:
                    detail = detail["error"]
                raise in_stream_error(detail, provider)
            payload = decode_json_object(event.data, provider)
            error = stream_error(payload, provider)
            if error is not None:
                raise error
            yield payload
    raise UpstreamProtocolError("stream ended before its end marker", provider=provider)


async def iter_ndjson(lines: AsyncIterator[str], provider: str) -> AsyncGenerator[JsonObject, None]:
    """Objects of a newline-delimited JSON stream (Ollama); the caller checks the end marker."""
    async for line in lines:
        if not line.strip():
            continue
        payload = decode_json_object(line, provider)
        error = stream_error(payload, provider)
        if error is not None:
            raise error
        yield payload


LineParser = Callable[[AsyncIterator[str], str], AsyncGenerator[JsonObject, None]]


# --- the connection ----------------------------------------------------------


class HttpUpstream:
    """One backend: base URL, auth, timeouts, rate limit and error translation.

    Owns its ``httpx.AsyncClient`` unless one is passed in (then the caller
    closes it). Timeouts are set per request, so a shared client works too:
    ``CONNECT_TIMEOUT`` to connect, ``timeout`` for each read, write and pool wait.
    """

    def __init__(
        self,
        *,
        provider: str,
        endpoint: str,
        api_key: str | None,
        timeout: float,
        rate_limiter: RateLimiter | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.provider = provider
        self.endpoint = endpoint.rstrip("/")
        self.timeout = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)
        self.rate_limiter = rate_limiter
        self.headers = auth_headers(api_key)
        self._owns_client = client is None
        self.client = client if client is not None else httpx.AsyncClient(timeout=self.timeout)

    def url(self, path: str) -> str:
        return self.endpoint + path

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    async def _admit(self) -> None:
        if self.rate_limiter is not None:
            await self.rate_limiter.acquire(self.provider)

    async def post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST ``body`` and return the decoded JSON answer."""
        await self._admit()
        with translate_errors(self.provider):
            response = await self.client.post(
                self.url(path), json=dict(body), headers=self.headers, timeout=self.timeout
            )
        await raise_for_status(response, self.provider)
        return decode_json(response.content, self.provider)

    @asynccontextmanager
    async def stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[httpx.Response]:
        """POST ``body`` and hold the streaming response open while the caller reads it.

        Leaving the block, normally or by an exception, cancellation or the
        consumer closing its generator, closes the response, which drops the
        connection and so stops the work upstream. Transport errors raised
        while the caller reads are translated too.
        """
        await self._admit()
        headers = {**self.headers, "Accept": "text/event-stream, application/x-ndjson"}
        with translate_errors(self.provider):
            async with self.client.stream(
                "POST", self.url(path), json=dict(body), headers=headers, timeout=self.timeout
            ) as response:
                await raise_for_status(response, self.provider)
                yield response

    async def _payloads(
        self, path: str, body: Mapping[str, Any], parse: LineParser
    ) -> AsyncGenerator[JsonObject, None]:
        async with (
            self.stream(path, body) as response,
            aclosing(response_lines(response)) as lines,
            aclosing(parse(lines, self.provider)) as payloads,
        ):
            async for payload in payloads:
                yield payload

    def sse_payloads(self, path: str, body: Mapping[str, Any]) -> AsyncGenerator[JsonObject, None]:
        """JSON payloads of a streamed SSE answer; see :func:`iter_sse_json`."""
        return self._payloads(path, body, iter_sse_json)

    def ndjson_payloads(
        self, path: str, body: Mapping[str, Any]
    ) -> AsyncGenerator[JsonObject, None]:
        """Objects of a streamed NDJSON answer; see :func:`iter_ndjson`."""
        return self._payloads(path, body, iter_ndjson)


def response_lines(response: httpx.Response) -> AsyncGenerator[str, None]:
    """``response.aiter_lines()``, typed as the generator it is so it can be closed."""
    return cast(AsyncGenerator[str, None], response.aiter_lines())


class HttpBacked:
    """Mixin for providers built on one :class:`HttpUpstream`."""

    def __init__(self, upstream: HttpUpstream, info: ProviderInfo) -> None:
        self.upstream = upstream
        self.info = info

    async def aclose(self) -> None:
        await self.upstream.aclose()

    def status(self) -> dict[str, object]:
        """``rate_limit``: the configured limit and the time requests waited on it
        (``None``: no limit, keel sends whatever its clients ask for)."""
        limiter = self.upstream.rate_limiter
        return {"state": "ok", "rate_limit": None if limiter is None else limiter.snapshot()}


class CompletionOptions(TypedDict, total=False):
    """What every HTTP completion adapter takes from its config table."""

    prompt_template: str | None
    stop_words: tuple[str, ...]
    max_input_length: int | None


class HttpCompletion(HttpBacked, CompletionProvider):
    """Base of the HTTP completion adapters: the upstream and the config's options."""

    def __init__(
        self, upstream: HttpUpstream, info: ProviderInfo, **options: Unpack[CompletionOptions]
    ) -> None:
        super().__init__(upstream, info)
        self.prompt_template = options.get("prompt_template")
        self.stop_words = options.get("stop_words", ())
        self.max_input_length = options.get("max_input_length")


def generation_fields(
    *, temperature: float | None, stop: tuple[str, ...], seed: int | None, seed_field: str = "seed"
) -> JsonObject:
    """The optional sampling fields, left out when unset so the backend's defaults apply."""
    fields: JsonObject = {}
    if temperature is not None:
        fields["temperature"] = temperature
    if stop:
        fields["stop"] = list(stop)
    if seed is not None:
        fields[seed_field] = seed
    return fields
