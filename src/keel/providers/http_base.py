"""What every HTTP provider shares: one upstream connection pool and its failures.

:class:`HttpUpstream` is a backend's base URL, key, timeouts and rate limit
around an ``aiohttp.ClientSession``. It is also the one place where the
transport's failures become keel's error tree (see :mod:`keel.errors`)::

    aiohttp.ConnectionTimeoutError (connecting)           -> UpstreamTimeout
    aiohttp.SocketTimeoutError, TimeoutError (reading)    -> UpstreamTimeout
    aiohttp.ServerDisconnectedError, ClientPayloadError   -> UpstreamProtocolError
      (closed mid-response, a chunked body cut short)
    aiohttp.ClientConnectorError, ClientOSError, ...      -> UpstreamConnectError
    HTTP 401 / 403                                        -> UpstreamAuthError
    HTTP >= 400 otherwise                                 -> UpstreamStatusError
    bad JSON, not SSE, stream ended before its end marker -> UpstreamProtocolError
    an error object inside a 200 stream                   -> UpstreamStatusError
    keel's own rate limit reached (RateLimiter)           -> UpstreamStatusError, code rate_limited

A stream cut mid-way is a protocol error whatever the framing: with chunked
encoding aiohttp notices the missing last chunk, with a close-delimited body the
readers here notice the missing end marker (``[DONE]``, ``stop``, ``done``).

Why aiohttp and not httpx: measured against ``bench/upstream.py`` on the
2-core bench machine, httpx 0.28 spent 470-1,600 us of CPU per proxied
request (httpcore's pool bookkeeping, anyio's cancel scopes, a new
connection for every stream read only up to its end marker), aiohttp 70-130
us. Its pool has no connection cap (a cap nobody chose is a silent one:
admission control bounds what keel sends) and keeps a finished stream's
connection alive (see :meth:`HttpUpstream._finish`).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypedDict, Unpack

import aiohttp

from keel import jsoncodec
from keel.config import masked_url
from keel.errors import (
    KeelError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from keel.ops.logging import request_id
from keel.providers.base import (
    ChatCall,
    CompletionCall,
    CompletionProvider,
    GenerationParams,
    Parts,
    ProviderInfo,
    joined,
)
from keel.rate_limit import RateLimiter

__all__ = ["RateLimiter"]  # re-exported: the limiter every HTTP upstream takes

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection; a backend that cannot accept in 5 s is down."""

ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of an error response keel reads to find the backend's message."""

ANSWER_BODY_LIMIT = 256 * 1024 * 1024
"""Bytes of a whole (not streamed) answer keel reads: 2,048 embeddings of 3,072
dimensions, the most OpenAI serves in one request, are about 130 MB of JSON. A
backend that sent more (llama.cpp's server with ``--pooling none`` sends a vector per
token) took keel's memory with it: 600 MiB made 1.75 GB resident, with no bound but the
first-token deadline."""

JsonObject = dict[str, Any]


def traced(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with the request id of the request being served (``X-Request-Id``), so
    one request can be followed from keel's log into the backend's."""
    current = request_id.get()
    return headers if current is None else {**headers, "X-Request-Id": current}


def auth_headers(api_key: str | None, key_header: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer`` when a key is configured, which every kind accepts but
    Azure OpenAI's, whose keys go in a header of their own (``key_header``: ``api-key``)."""
    if not api_key:
        return {}
    return {key_header: api_key} if key_header else {"Authorization": f"Bearer {api_key}"}


# --- translating failures -------------------------------------------------


@contextmanager
def translate_errors(provider: str, secret: str | None = None) -> Iterator[None]:
    """Re-raise the transport's exceptions as keel's ``Upstream*`` errors, with keel's
    ``secret`` for the backend (its api_key) masked in what the backend said: a backend
    or gateway that echoes the key it refused ("Incorrect API key provided: Bearer ...")
    put it in the client's error, ``/v1/providers`` and the log."""
    try:
        yield
    except KeelError as exc:
        if secret and secret in exc.message:
            exc.message = exc.message.replace(secret, "***")
            exc.args = (exc.message,)
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamTimeout("timed out connecting", provider=provider) from exc
    except TimeoutError as exc:  # aiohttp.SocketTimeoutError and ServerTimeoutError too
        raise UpstreamTimeout("timed out waiting for data", provider=provider) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamProtocolError(
            f"connection closed mid-response: {_cut_short(exc)}", provider=provider
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamConnectError(f"cannot connect: {exc}", provider=provider) from exc
    except aiohttp.ClientResponseError as exc:  # a malformed status line or header
        raise UpstreamProtocolError(f"not HTTP: {exc.message}", provider=provider) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamConnectError(
            f"connection failed: {type(exc).__name__}: {exc}", provider=provider
        ) from exc


def _cut_short(exc: aiohttp.ClientError) -> str:
    """How a backend's answer ended early, in plain words: aiohttp's own text read as a
    backend's HTTP 400 ("<TransferEncodingError: 400, message='Not enough data to
    satisfy transfer length header.'>")."""
    said = str(exc)
    if "reset by peer" in said:
        return "the backend reset the connection"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the backend closed the connection before its answer's end"
    if "transfer length" in said or "Content-Length" in said or "not completed" in said:
        return "the backend's answer was cut short (fewer bytes than it announced)"
    return said


def parse_retry_after(
    value: str | None, *, sent: str | None = None, now: datetime | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date). A date
    is read against the response's own ``Date`` (``sent``) where it has one, else against
    ``now`` (keel's clock): a backend whose clock is an hour ahead of keel's (one not yet
    set right after a resume) turned "in 30 s" into an hour of 429s."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        when = _http_date(text)
        if when is None:
            return None
        seconds = (when - (_http_date(sent) or now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):  # "inf", "1e999": every request of the role was a 500
        return None
    return min(max(0.0, seconds), RETRY_AFTER_CAP)


def _http_date(text: str | None) -> datetime | None:
    try:
        when = parsedate_to_datetime(text or "")
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


RETRY_AFTER_CAP = 3600.0
"""The longest a backend's ``Retry-After`` keeps keel off it: past an hour, keel asks
again (a quota's day is found out by the next request)."""


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
    """``text`` within ``limit`` characters, its control characters escaped (``\\n``): a
    backend's error body with a line break wrote lines of its choosing into keel's log."""
    text = _CONTROL.sub(lambda found: repr(found[0])[1:-1], text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def status_error(
    provider: str, status: int, body: bytes, headers: Mapping[str, str], url: str = ""
) -> UpstreamError:
    """The error for a response with status >= 400 and ``headers`` to a request for
    ``url``: a 404 or 405 names it (a route the backend does not have: an api_endpoint
    ending in the route keel adds called ``.../chat/completions/chat/completions``, and
    said only "HTTP 404: Not Found")."""
    message, details = error_message(body), error_details(body)
    if status in (404, 405) and url:
        message += (
            f" (at {masked_url(url)}: check api_endpoint, the server's base URL without "
            "the route keel adds, e.g. http://HOST:PORT/v1, and model_name)"
        )
    if status in (401, 403):
        return UpstreamAuthError(
            f"rejected our API key (HTTP {status}): {message}",
            provider=provider,
            upstream_status=status,
        )
    if status == 429 and QUOTA_EXHAUSTED in (details.get("code"), details.get("type")):
        # Not a pause: a rate limit's 1 s default had it asked again every second, and
        # clients told to retry in 1 s, while the account stayed out of credit.
        return UpstreamAuthError(
            f"its account's quota is used up (HTTP 429 {QUOTA_EXHAUSTED}): {message}; add"
            " credit or raise the plan's limit, then it is routed to after a health check",
            provider=provider,
            upstream_status=status,
            code="upstream_quota_exhausted",
        )
    return UpstreamStatusError(
        f"HTTP {status}: {message}",
        provider=provider,
        upstream_status=status,
        retry_after=parse_retry_after(headers.get("retry-after"), sent=headers.get("date")),
        details=details,
    )


QUOTA_EXHAUSTED = "insufficient_quota"
"""OpenAI's error code (and type) for an account out of credit, sent with a 429."""


def error_details(body: bytes) -> dict[str, object]:
    """The error object of an error body (llama.cpp's carries ``type``,
    ``n_prompt_tokens`` and ``n_ctx``), for the router to classify by fields."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    return dict(error) if isinstance(error, dict) else {}


async def raise_for_status(response: aiohttp.ClientResponse, provider: str) -> None:
    """Raise the translated error if ``response`` failed; reads at most 64 KiB of it.

    A redirect is a failure too, saying where it points: followed, a 301 turned the POST
    into a GET (the target's 405 blamed on the backend), a loop sent 10 requests a try,
    and a redirect to another host was answered there without the API key, all unsaid."""
    if response.status < 300:
        return
    if response.status < 400:
        location = response.headers.get("location", "(no Location)")
        raise UpstreamStatusError(
            f"redirected to {location} (HTTP {response.status}); keel does not follow "
            "redirects: set api_endpoint to the address they lead to",
            provider=provider,
            upstream_status=response.status,
        )
    body = await _read_at_most(response.content, ERROR_BODY_LIMIT)
    raise status_error(provider, response.status, body, response.headers, str(response.url))


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes."""
    body = bytearray()
    while len(body) < limit:
        chunk = await content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def read_answer(response: aiohttp.ClientResponse, provider: str) -> bytes:
    """A whole answer's body, refused past :data:`ANSWER_BODY_LIMIT` (the connection is
    closed then, with the rest unread)."""
    length = response.content_length
    if length is None:  # chunked
        body = await _read_at_most(response.content, ANSWER_BODY_LIMIT + 1)
        if len(body) <= ANSWER_BODY_LIMIT:
            return body
    elif length <= ANSWER_BODY_LIMIT:
        return await response.read()
    response.close()
    raise UpstreamProtocolError(
        f"an answer over {ANSWER_BODY_LIMIT // 2**20} MiB: not one keel reads", provider=provider
    )


def decode_json(text: str | bytes, provider: str) -> Any:
    try:
        return jsoncodec.loads(text)
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
    """The text at ``key`` (missing or null is empty); anything else is a protocol error.
    Half of a UTF-16 surrogate pair (``"\\ud83d"`` in one frame, its other half in the
    next) is no character: it is U+FFFD here (it was a 500 for a whole answer, and a
    stream cut off with no end)."""
    value = container.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UpstreamProtocolError(f"expected text in {key!r}, got {value!r}", provider=provider)
    if not value.isascii():
        return _LONE_SURROGATE.sub("\ufffd", value)
    return value


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""A surrogate left in decoded JSON text: a pair is decoded as its one character."""


def vector_of(value: object, provider: str) -> list[float]:
    """A backend's embedding as floats; NaN or an infinity (a Python backend's bare
    ``NaN``, as Ollama's bge-m3 has sent) is refused like any other non-number: it went to
    the client as ``null`` in a 200, into a vector store."""
    if not isinstance(value, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value
    ):
        raise UpstreamProtocolError(
            f"embedding is not a list of finite numbers: {str(value)[:100]}", provider=provider
        )
    return [float(x) for x in value]


# --- stream readers --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


_SSE_FIELDS = frozenset({"data", "event", "id", "retry"})


def _text(line: str | bytes) -> str:
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    return line.rstrip("\r\n")


class SseParser:
    """Server-sent events, one line at a time.

    Stricter than the SSE spec on purpose: a line that is not a known field or
    a comment means the backend is not speaking SSE (an HTML error page, raw
    JSON lines), which is reported instead of silently skipped. llama.cpp's
    ``error: {...}`` line is accepted and becomes an ``error`` event. An event
    not closed by a blank line when the body ends is dropped, as the spec says.
    """

    __slots__ = ("provider", "event", "data", "size")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.event = "message"
        self.data: list[str] = []
        self.size = 0

    def feed(self, line: str) -> SseEvent | None:
        """The event ``line`` completes, if any."""
        if not line:
            done = SseEvent(self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data, self.size = "message", [], 0
            return done
        if line[0] == ":":
            return None
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            # An event ends at a blank line: data lines without one, sent as fast as
            # loopback goes, took keel to 8.5 GB in the 60 s of a chat's first-token limit
            self.size += len(value)
            if self.size > LINE_LIMIT:
                raise UpstreamProtocolError(
                    f"an event over {LINE_LIMIT} characters: not a stream keel reads",
                    provider=self.provider,
                )
            self.data.append(value)
        elif name == "event":
            self.event = value or "message"
        elif name == "error":
            return SseEvent("error", value)
        elif name not in _SSE_FIELDS:
            # a JSON body: a server that ignores "stream": true, or an error sent as a 200
            what = (
                "one JSON body, where a stream was asked" if line[0] == "{" else "unexpected line"
            )
            raise UpstreamProtocolError(
                f"not an event stream: {what} {_shorten(line, 200)!r}", provider=self.provider
            )
        return None


def sse_json(event: SseEvent, provider: str) -> JsonObject | None:
    """The JSON payload of an event; ``None`` at ``[DONE]``. Error events and
    error objects raise."""
    if event.data.strip() == "[DONE]":
        return None
    if event.event == "error":
        detail = decode_json(event.data, provider)
        if isinstance(detail, dict) and "error" in detail:
            detail = detail["error"]
        raise in_stream_error(detail, provider)
    payload = decode_json_object(event.data, provider)
    error = stream_error(payload, provider)
    if error is not None:
        raise error
    return payload


class SseJson:
    """JSON payloads of an SSE stream, a line at a time, up to ``data: [DONE]``.

    Error events and error objects raise. If the body ends before ``[DONE]``
    the stream was cut (:meth:`ended` raises). Protocols with their own end
    marker (llama.cpp's ``stop``) are done before that.
    """

    __slots__ = ("provider", "events", "done")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.events = SseParser(provider)
        self.done = False

    def feed(self, line: str) -> JsonObject | None:
        event = self.events.feed(line)
        if event is None:
            return None
        payload = sse_json(event, self.provider)
        self.done = payload is None
        return payload

    def ended(self) -> None:
        if not self.done:
            raise UpstreamProtocolError(
                "stream ended before its end marker", provider=self.provider
            )


class NdJson:
    """Objects of a newline-delimited JSON stream (Ollama); the caller checks the end marker."""

    __slots__ = ("provider",)
    done = False

    def __init__(self, provider: str) -> None:
        self.provider = provider

    def feed(self, line: str) -> JsonObject | None:
        if not line.strip():
            return None
        payload = decode_json_object(line, self.provider)
        error = stream_error(payload, self.provider)
        if error is not None:
            raise error
        return payload

    def ended(self) -> None:
        pass


Parser = SseJson | NdJson


async def payload_batches(
    batches: AsyncIterable[list[str]] | AsyncIterable[list[bytes]], parser: Parser
) -> AsyncGenerator[list[JsonObject], None]:
    """The payloads of each batch of body lines (what one read brought), until the
    parser is done or the body ends; an error in a batch comes after the payloads
    before it."""
    async for lines in batches:
        payloads = []
        try:
            for line in lines:
                payload = parser.feed(_text(line))
                if parser.done:
                    break
                if payload is not None:
                    payloads.append(payload)
        except UpstreamError:
            if payloads:  # what came before the error is the client's
                yield payloads
            raise
        if payloads:
            yield payloads
        if parser.done:
            return
    parser.ended()


# --- the connection ----------------------------------------------------------

DRAIN_SECONDS = 0.1
"""How long a stream read to its end marker may take to finish its body, so its
connection can be reused."""

EndMarker = Callable[[JsonObject], bool]
Refused = Callable[[UpstreamError], Mapping[str, Any] | None]
"""Given a backend's refusal of a request, the body to send instead, or None."""

READ_BUFFER = 1 << 18
"""Bytes aiohttp buffers per response; a body line (one SSE event) may be twice that."""


def new_session() -> aiohttp.ClientSession:
    """A pool for one or more backends: no connection cap, no cookies, keep-alive;
    a request on a kept connection says so in its ``trace_request_ctx`` (see
    :meth:`HttpUpstream._post`)."""
    reuse = aiohttp.TraceConfig()
    reuse.on_connection_reuseconn.append(_note_reuse)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        read_bufsize=READ_BUFFER,
        trace_configs=[reuse],
    )


async def _note_reuse(_session: object, context: Any, _params: object) -> None:
    if isinstance(request := context.trace_request_ctx, dict):
        request["reused"] = True


LINE_LIMIT = 2 * READ_BUFFER
"""Bytes of one body line (one SSE ``data:`` line), or characters of one SSE event's data,
keel holds before calling it garbage."""
ANSWER_CHARS = 16 * 2**20
"""Characters of one streamed answer (~4 M tokens, past any model's output): a backend
that sends more did not stop."""


BATCH_BYTES = 64 * 1024
"""The most of a body read at once into a batch: a client that reads slowly (or not at
all) holds one batch of its answer in keel, not all aiohttp had buffered (one stalled
stream held ~4.5 MiB)."""


async def body_line_batches(
    content: aiohttp.StreamReader, provider: str
) -> AsyncGenerator[list[bytes], None]:
    """The body's complete lines, a batch per read: whatever arrived together goes
    up the layers above (parsing, timeouts, stop words, the client's stream) once,
    not once per token; a token sent alone still goes up alone, at once.

    When the connection breaks mid-body aiohttp raises at the next read even with
    data still in its buffer, so those lines are handed out first (the client
    must get every token the backend sent before the cut), then the error raised.
    """
    pending = b""
    try:
        while chunk := await content.read(BATCH_BYTES):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            if len(pending) > LINE_LIMIT:
                raise UpstreamProtocolError(
                    f"a body line over {LINE_LIMIT} bytes: not a stream keel reads",
                    provider=provider,
                )
            if lines:
                yield lines
    except aiohttp.ClientPayloadError:
        buffered: Iterable[bytes] = getattr(content, "_buffer", ())
        yield (pending + b"".join(buffered)).split(b"\n")
        raise
    if pending:
        yield [pending]


def _encode(body: Mapping[str, Any]) -> bytes:
    return jsoncodec.dumps(body if isinstance(body, dict) else dict(body))


class HttpUpstream:
    """One backend: base URL, auth, timeouts, rate limit and error translation.

    Owns its ``aiohttp.ClientSession`` (made at the first request, inside the
    running loop) unless one is passed in (then the caller closes it).
    Timeouts are set per request, so a shared session works too:
    ``CONNECT_TIMEOUT`` to connect, ``timeout`` for each read.
    """

    def __init__(
        self,
        *,
        provider: str,
        endpoint: str,
        api_key: str | None,
        timeout: float,
        key_header: str | None = None,
        rate_limiter: RateLimiter | None = None,
        client: aiohttp.ClientSession | None = None,
    ) -> None:
        self.provider = provider
        # A query (Azure's ?api-version=, a ?key= credential) stays at the end of each
        # route's URL (the route was appended to it: "/v1?key=K/completions"), and a
        # fragment, which no server sees, goes (it swallowed the route)
        base, _, self._query = endpoint.split("#", 1)[0].partition("?")
        self.endpoint = base.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=timeout
        )
        self.rate_limiter = rate_limiter
        self.secret = api_key
        self.headers = auth_headers(api_key, key_header)
        self._json_headers = {**self.headers, "Content-Type": "application/json"}
        self._stream_headers = {
            **self._json_headers,
            "Accept": "text/event-stream, application/x-ndjson",
        }
        self._owns_client = client is None
        self._client = client

    @property
    def client(self) -> aiohttp.ClientSession:
        if self._client is None or (self._owns_client and self._client.closed):
            self._client = new_session()
        return self._client

    def url(self, path: str) -> str:
        return f"{self.endpoint}{path}?{self._query}" if self._query else self.endpoint + path

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.close()

    async def _admit(self) -> None:
        if self.rate_limiter is not None:
            await self.rate_limiter.acquire(self.provider)

    async def _post(
        self, path: str, body: Mapping[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST ``body``, once more on a new connection if a kept one was closed by the
        server before it answered: the race every keep-alive client has, and what
        llama.cpp's server does after each streamed answer though it says keep-alive
        (every other request back to back failed, "Can not write request body" or
        "Server disconnected")."""
        url, data = self.url(path), _encode(body)
        request: dict[str, bool] = {}

        def send(traced_as: dict[str, bool] | None) -> Awaitable[aiohttp.ClientResponse]:
            return self.client.post(  # a redirect is not followed: raise_for_status says it
                url,
                data=data,
                headers=traced(headers),
                timeout=self.timeout,
                trace_request_ctx=traced_as,
                allow_redirects=False,
            )

        try:
            response = await send(request)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not request.get("reused") or isinstance(exc, aiohttp.ClientConnectorError):
                raise
            response = await send(None)
        return response

    async def post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST ``body`` and return the decoded JSON answer."""
        await self._admit()
        with translate_errors(self.provider, self.secret):
            async with await self._post(path, body, self._json_headers) as response:
                await raise_for_status(response, self.provider)
                raw = await read_answer(response, self.provider)
        return decode_json(raw, self.provider)

    async def _batches(
        self,
        path: str,
        body: Mapping[str, Any],
        parser: Parser,
        last: EndMarker | None,
        again: Refused | None = None,
    ) -> AsyncGenerator[list[JsonObject], None]:
        """POST ``body`` and yield the answer's payloads, a batch per read, while
        holding the response open. ``again``: given the backend's refusal, the body to
        send once more at once instead (None: the refusal stands).

        However this ends (the end marker, an exception, a cancellation, the
        consumer closing the generator), :meth:`_finish` settles the connection.
        """
        await self._admit()
        with translate_errors(self.provider, self.secret):
            response = await self._post(path, body, self._stream_headers)
            finished = False
            try:
                try:
                    await raise_for_status(response, self.provider)
                except UpstreamError as error:
                    if again is None or (instead := again(error)) is None:
                        raise
                    await self._finish(response, False)
                    response = await self._post(path, instead, self._stream_headers)
                    await raise_for_status(response, self.provider)
                lines = body_line_batches(response.content, self.provider)
                async with aclosing(payload_batches(lines, parser)) as batches:
                    async for batch in batches:
                        finished = last is not None and any(map(last, batch))
                        yield batch
                finished = True
            finally:
                await self._finish(response, finished)

    @staticmethod
    async def _finish(response: aiohttp.ClientResponse, finished: bool) -> None:
        """Back to the pool when the whole body has arrived, else closed: dropping the
        connection is how the backend learns to stop generating.

        A stream read to its end marker (``finished``) is drained for up to
        :data:`DRAIN_SECONDS` first: the body's last chunk usually comes with
        the marker, and a kept connection saves the next request a connect.
        """
        content = response.content
        if finished and not content.is_eof():
            with suppress(TimeoutError, aiohttp.ClientError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    while await content.readany():
                        pass
        if content.is_eof():
            response.release()
        else:
            response.close()

    def sse_batches(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        last: EndMarker | None = None,
        again: Refused | None = None,
    ) -> AsyncGenerator[list[JsonObject], None]:
        """JSON payloads of a streamed SSE answer (see :class:`SseJson`), a batch per
        read. ``last`` tells the answer's final payload (a protocol's own end marker);
        ``again``: see :meth:`_batches`."""
        return self._batches(path, body, SseJson(self.provider), last, again)

    def ndjson_batches(
        self, path: str, body: Mapping[str, Any], *, last: EndMarker | None = None
    ) -> AsyncGenerator[list[JsonObject], None]:
        """Objects of a streamed NDJSON answer (see :class:`NdJson`), a batch per read."""
        return self._batches(path, body, NdJson(self.provider), last)


async def stream_texts(
    batches: AsyncGenerator[list[JsonObject], None],
    text: Callable[[JsonObject], str],
    done: EndMarker,
    call: CompletionCall | ChatCall,
    provider: str,
    *,
    unfinished: Callable[[], str | None] | None = None,
) -> AsyncGenerator[str, None]:
    """The ``text`` of each payload, one piece per batch (see :func:`joined`), up to
    and including the payload ``done`` marks; ``unfinished``: the error, if any, when
    the body ends first (for protocols whose reader cannot tell).

    Every payload with text holds a token at least, so a backend that sends more of them
    than the ``call``'s ``max_tokens`` ignored it: the answer ends there, for ``length``,
    and the connection is closed, which stops the backend (one that streamed without end,
    given 5, took keel to 4 GB in 15 s). Past :data:`ANSWER_CHARS`, with no limit asked,
    the backend did not stop, and the answer fails as its error."""
    limit, count, size = call.params.max_tokens, 0, 0
    async with aclosing(batches):
        async for batch in batches:
            texts, finished, rest = [], False, None
            for at, payload in enumerate(batch):
                piece = text(payload)
                if piece or isinstance(piece, Parts):
                    if count == limit:
                        call.reported.finish_reason, finished = "length", True
                        break
                    count += 1
                    size += len(piece)
                    if isinstance(piece, Parts):  # reasoning and tool calls, beside the text
                        size += len(piece.reasoning) + len(jsoncodec.dumps(piece.deltas))
                    texts.append(piece)
                if done(payload):
                    finished = True
                    rest = batch[at + 1 :]
                    break
            if size > ANSWER_CHARS:
                raise UpstreamProtocolError(
                    f"an answer over {ANSWER_CHARS:,} characters: the backend did not stop",
                    provider=provider,
                )
            if texts:
                yield joined(texts)
            if finished:
                if rest is not None:
                    await _read_past_the_end(rest, batches, text)
                return
    if unfinished is not None and (error := unfinished()) is not None:
        raise UpstreamProtocolError(error, provider=provider)


async def _read_past_the_end(
    rest: list[JsonObject],
    batches: AsyncGenerator[list[JsonObject], None],
    text: Callable[[JsonObject], str],
) -> None:
    """The payloads after the one that ended the answer, for what ``text`` notes of them
    (a usage chunk, as OpenAI's ``stream_options.include_usage`` and vLLM send after the
    finish chunk: its counts were dropped, and the client got keel's estimate), for up
    to :data:`DRAIN_SECONDS`, as long as the body would be drained anyway."""
    with suppress(TimeoutError, UpstreamError):
        async with asyncio.timeout(DRAIN_SECONDS):
            for payload in rest:
                text(payload)
            async for batch in batches:
                for payload in batch:
                    text(payload)


def field_text(field: str, provider: str) -> Callable[[JsonObject], str]:
    """A payload's text at ``field`` (see :func:`text_field`), for :func:`stream_texts`."""
    return lambda payload: text_field(payload, field, provider)


class HttpBacked:
    """Mixin for providers built on one :class:`HttpUpstream`."""

    def __init__(self, upstream: HttpUpstream, info: ProviderInfo) -> None:
        self.upstream = upstream
        self.info = info
        self.rate_limiter = upstream.rate_limiter

    async def aclose(self) -> None:
        await self.upstream.aclose()

    def status(self) -> dict[str, object]:
        """``rate_limit``: the configured limit and the time requests waited on it
        (``None``: no limit, keel sends whatever its clients ask for)."""
        limiter = self.rate_limiter
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
    params: GenerationParams, *, stop: tuple[str, ...] | None = None, seed_field: str = "seed"
) -> JsonObject:
    """The optional sampling fields, left out when unset so the backend's defaults apply;
    ``stop`` in place of the params' own (a backend that takes fewer)."""
    fields: JsonObject = {}
    if params.temperature is not None:
        fields["temperature"] = params.temperature
    if params.top_p is not None:
        fields["top_p"] = params.top_p
    if params.frequency_penalty is not None:
        fields["frequency_penalty"] = params.frequency_penalty
    if params.presence_penalty is not None:
        fields["presence_penalty"] = params.presence_penalty
    stop = params.stop if stop is None else stop
    if stop:
        fields["stop"] = list(stop)
    if params.seed is not None:
        fields[seed_field] = params.seed
    return fields
