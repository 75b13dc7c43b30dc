"""A cap on a request's head (request line and headers), which uvicorn's httptools path lacks.

uvicorn's httptools parser takes a head of any size: a header line sent in pieces is
joined in memory until it ends (a 50 MB header took keel's peak memory from 72 to 172 MiB,
and was served), so is a URL (a 20 MB one took seconds of CPU, joined piece by piece),
and 100,000 headers were served. :class:`HeadLimitedProtocol` (uvicorn's own protocol with
a counter) refuses a head that has not ended within :data:`MAX_HEAD_BYTES`, or that holds
more than :data:`MAX_HEADERS` headers, as nginx, Node and h11 do: ``431 Request Header
Fields Too Large`` (``414 URI Too Long`` when the URL is most of it) in keel's one error
shape, then closes the connection, the rest of the head never read into memory. A
pipelined request refused so gets its answer after the answers of those before it.

The count is one integer per connection, added to per chunk of bytes read while a head
is being read: a chunk that ends inside a head was all head (a head that goes on is
counted from its first chunk), and a chunk that would take the head past the limit is
parsed only up to the limit, the rest fed on once the head ended within it. The bytes of
a pipelined request that arrive with the end of the request before it are not counted
(at most one read, 256 KB): a head is held to the limit plus one read, at worst. The
headers are counted as a request's head ends, and on a read that ends inside a head.
Nothing is allocated per request: about 0.3 us more a request than uvicorn's protocol.

After a refusal the connection reads on and drops what the client still sends, for up to
:data:`LINGER_SECONDS` and :data:`LINGER_BYTES`, its answer ended with a half-close: a
socket closed with unread bytes is reset, and a client still sending its head would have
seen "connection reset" instead of the 431.

A request must also arrive, head and body, within :data:`REQUEST_SECONDS` of its first
byte (a 408), and connections past :attr:`HeadLimitedProtocol.max_connections` are turned
away with a 503: uvicorn has neither, and held connections took every file descriptor.
One timer a request, armed as it begins and cancelled as it ends.

A request the parser refuses (:func:`malformed`) is answered as a refusal too: keel's
shape, naming what was wrong, after the answers before it; uvicorn wrote a plain-text
400 at once and closed, losing a pipelined request's answer. Every refusal is counted by
status and code (``keel_http_refusals_total``) and logged by ``keel.http``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from typing import Any, Final, NamedTuple, cast

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from keel.errors import KeelError, RequestError, Unavailable
from keel.serving import streaming
from keel.serving.lifecycle import FAILURE_KEY
from keel.serving.streaming import ABORT, OUTCOME

log = logging.getLogger("keel.http")

MAX_HEAD_BYTES: Final = 64 * 1024
"""The request line and headers, CRLFs included. nginx allows four 8 KiB header lines,
Node 16 KiB in all, h11 16 KiB; 64 KiB leaves room for a browser's cookies on the status
page and for an editor's headers many times over."""

MAX_HEADERS: Final = 256
"""Headers in one request (Apache and Tomcat take 100; a browser sends about 20)."""

LINGER_SECONDS: Final = 2.0
"""How long a refused connection drops what the client still sends before it closes."""

LINGER_BYTES: Final = 1024 * 1024
"""How much of it at most (the client has the answer by then, or never reads it)."""

REQUEST_SECONDS: Final = 60.0
"""How long a request may take to arrive, head and body, from its first byte (the first
of a connection's from the connection's opening): as nginx's and Node's header and
request timeouts. A connection that sent nothing, or a head or a body a byte at a time,
was held open for ever, and some thousands of them took keel off the air."""

BODY: Final = -1
"""``_head`` while a request's body is read (its headers are complete)."""
ENDED: Final = -2
"""``_head`` once a request ended inside the chunk being parsed: the head that may begin
after it, in the same chunk, is counted from the next chunk on."""
REFUSED: Final = -3
"""``_head`` after a refusal: nothing more is parsed."""


class Refusal(NamedTuple):
    """An answer of the HTTP layer's own, before (or instead of) the app's."""

    status: int
    code: str
    body: bytes
    """keel's one error shape."""


def refusal(status: int, code: str, message: str, error: type[KeelError] = RequestError) -> Refusal:
    return Refusal(status, code, json.dumps(error(message, code=code).to_body()).encode())


TOO_LARGE: Final = refusal(
    431,
    "request_headers_too_large",
    f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB, the most keel "
    "reads; send fewer or shorter headers (cookies, a long token)",
)
TOO_MANY: Final = refusal(
    431,
    "too_many_headers",
    f"the request has over {MAX_HEADERS} headers, the most keel reads; send fewer",
)
TOO_SLOW: Final = refusal(
    408,
    "request_timeout",
    f"the request did not arrive within {REQUEST_SECONDS:.0f} s of its first byte; send "
    "it whole, at once",
)
TOO_MANY_CONNECTIONS: Final = refusal(
    503,
    "too_many_connections",
    "keel has as many connections open as it takes; retry shortly",
    Unavailable,
)
URL_TOO_LONG: Final = refusal(
    414,
    "uri_too_long",
    f"the URL is over {MAX_HEAD_BYTES // 1024} KiB with the headers, the most keel reads; "
    "send the data in a request body",
)
PLAIN_HTTP = "keel speaks HTTP/1.1 (and 1.0) in plain text on this port"


def malformed(error: Exception, data: bytes, fresh: bool) -> Refusal:
    """The answer to a request the parser refused (llhttp's reason in ``error``):
    ``data`` is the bytes read last, ``fresh`` that the request began them."""
    reason = str(error)
    if fresh and data[:1] == b"\x16":  # a TLS record: a ClientHello
        return refusal(
            400,
            "tls_not_supported",
            f"{PLAIN_HTTP}, not TLS: call it with http://, or put a "
            "proxy that ends TLS (nginx, Caddy) in front",
        )
    if fresh and data.startswith(b"PRI * HTTP/2"):  # h2c with prior knowledge
        return refusal(505, "http2_not_supported", f"{PLAIN_HTTP}, not HTTP/2: send HTTP/1.1")
    if isinstance(error, httptools.HttpParserInvalidMethodError):
        method = data.partition(b" ")[0] if fresh else b""
        if method.isalpha() and method.isupper() and len(method) <= 32:
            return refusal(
                501,
                "method_not_implemented",
                f"keel knows no method {method.decode()}: it serves GET, HEAD, POST and OPTIONS",
            )
        if not fresh:  # what followed a request's end is no request line
            return refusal(
                400,
                "invalid_request_line",
                "the bytes after a request's end begin no "
                "request: is its Content-Length shorter than its body? Send the body's length",
            )
    if reason.startswith("Invalid") and reason.endswith("version"):
        return refusal(505, "http_version_not_supported", f"{PLAIN_HTTP}: send HTTP/1.1")
    if "Content-Length" in reason or "Transfer-Encoding" in reason:
        advice = (
            "send one Content-Length, the body's size in bytes, or 'Transfer-Encoding: "
            "chunked' alone"
        )
        return refusal(
            400, "invalid_body_length", f"the request's body length is unclear ({reason}): {advice}"
        )
    if "chunk" in reason:
        return refusal(
            400,
            "invalid_chunked_body",
            f"the chunked body is malformed ({reason}): send "
            "each chunk's size in hexadecimal, a CRLF, the chunk and a CRLF, then '0'",
        )
    return refusal(
        400,
        "invalid_http",
        f"the request is not valid HTTP/1.1 ({reason}): send each "
        "header as 'Name: value' (no space before the colon, no folded lines, no control "
        "characters), every line ending in CRLF",
    )


class CloseDelimitedCycle(RequestResponseCycle):
    """An HTTP/1.0 request's cycle: an answer of no stated length (a stream) goes out as
    it is and ends with the connection, as HTTP/1.0 frames it. uvicorn chunked it, which
    RFC 9112 forbids for a 1.0 request (section 6.1): the client (ApacheBench, a proxy
    speaking 1.0 upstream, as nginx does by default) read the chunk sizes as text."""

    unbounded = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            self.unbounded = (
                self.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
                and not any(name.lower() == b"content-length" for name, _ in headers)
            )
            if self.unbounded:  # not chunked, and every byte may go
                self.chunked_encoding, self.expected_content_length = False, sys.maxsize
        elif self.unbounded and not message.get("more_body", False):
            self.expected_content_length = len(message.get("body", b""))  # the last piece
        await RequestResponseCycle.send(self, message)


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a head over :data:`MAX_HEAD_BYTES` or
    :data:`MAX_HEADERS`.

    It calls uvicorn's methods by their class, not through ``super()``, which on Python
    3.11 builds an object on each call: these run for every request."""

    _head: int = 0
    """Bytes read of the head being read (0 between requests), or :data:`BODY`,
    :data:`ENDED`, :data:`REFUSED`."""
    _dropped: int = 0
    """Bytes dropped since the refusal."""
    _refusal: bytes = b""
    """The refusal's answer, status line to body."""
    _deadline: asyncio.TimerHandle | None = None
    """When the request being read is too slow (:data:`REQUEST_SECONDS`)."""
    _stalled: asyncio.TimerHandle | None = None
    """When a client that takes none of what is written to it is dropped."""
    max_connections: int = 10_000
    """Connections served at once; one more is answered 503 and closed at once. Set by
    :class:`keel.ops.server.Server` from the file descriptors keel may open: uncapped,
    held connections used them all, and keel could answer no one (nor reach a model)."""
    refusals: dict[tuple[int, str], int] = {}  # noqa: RUF012 - counted for the process
    """Answers of this layer's own so far, by status and code
    (``keel_http_refusals_total``)."""
    _said_at: float = -60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        HttpToolsProtocol.connection_made(self, transport)
        if len(self.connections) > self.max_connections:
            self._head = REFUSED
            refused = _count(TOO_MANY_CONNECTIONS)
            if self.loop.time() - HeadLimitedProtocol._said_at >= 10:  # a line per 10 s
                HeadLimitedProtocol._said_at = self.loop.time()
                log.warning(
                    "connection refused (503 too_many_connections): %d open, the most keel "
                    "takes with its open-file limit; %d refused since keel started",
                    len(self.connections) - 1,
                    refused,
                )
            self._refusal = self._answer(TOO_MANY_CONNECTIONS, b"retry-after: 1\r\n")
            transport.write(self._refusal)
            transport.close()
            return
        self._deadline = self.loop.call_later(REQUEST_SECONDS, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._stalled is not None:
            self._stalled.cancel()
        HttpToolsProtocol.connection_lost(self, exc)

    def pause_writing(self) -> None:
        """The transport holds more than it may of what was written: a client that takes
        none of it for :data:`~keel.serving.streaming.WRITE_STALL_SECONDS` is dropped. A
        whole answer (5.9 MB, a chat without streaming) stayed in keel's memory for as
        long as such a client kept its connection: 20 of them, 226 MB. (A stream's
        writes are watched as they are made as well, see ``streaming``.)"""
        HttpToolsProtocol.pause_writing(self)
        if self._stalled is None:
            self._stalled = self.loop.call_later(streaming.WRITE_STALL_SECONDS, self._takes_nothing)

    def resume_writing(self) -> None:
        HttpToolsProtocol.resume_writing(self)
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _takes_nothing(self) -> None:
        self._stalled = None
        log.warning(
            "a client took none of its answer for %.0f s: its connection is closed",
            streaming.WRITE_STALL_SECONDS,
        )
        self.transport.abort()

    def _too_slow(self) -> None:
        """The request being read took :data:`REQUEST_SECONDS`: a 408, and closed."""
        self._deadline = None
        if self._head == REFUSED or self.transport.is_closing():
            return
        if self._head != BODY:  # a head (or nothing yet): answered in turn
            self._refuse(TOO_SLOW, f"request not in within {REQUEST_SECONDS:.0f} s")
        else:  # a body: the app waits on it
            self._refuse_body(TOO_SLOW, f"its body took over {REQUEST_SECONDS:.0f} s")

    def data_received(self, data: bytes) -> None:
        head = self._head
        if head < 0:
            if head == BODY:
                self._feed(data, fresh=False)
                return
            if head == REFUSED:
                self._linger(len(data))
                return
            head = self._head = 0  # ENDED: the last chunk ended a request, this one a head
        room = MAX_HEAD_BYTES - head
        if len(data) <= room:
            self._feed(data, fresh=head == 0)
            if self._head >= 0:  # the chunk ended inside the head: all of it was head
                self._head += len(data)
                if self.headers is not None and len(self.headers) > MAX_HEADERS:
                    self._refuse(TOO_MANY, f"over {MAX_HEADERS} headers")
            return
        # The head ends within the room left, or it is over the limit: parse up to there.
        # (uvicorn passes the bytes to httptools, which takes any buffer: no copies.)
        view = cast(bytes, memoryview(data))
        self._feed(view[:room], fresh=head == 0)
        if self._head >= 0:  # no end within the limit
            if 2 * len(getattr(self, "url", b"")) > MAX_HEAD_BYTES:  # the URL is most of it
                self._refuse(URL_TOO_LONG, f"URL over {MAX_HEAD_BYTES // 2} bytes")
            else:
                self._refuse(TOO_LARGE, f"head over {MAX_HEAD_BYTES} bytes")
        elif (
            self._head != REFUSED
            and not self.transport.is_closing()
            and self.transport.get_protocol() is self  # not upgraded to a websocket
        ):
            self._feed(view[room:], fresh=False)

    def _feed(self, data: bytes, *, fresh: bool) -> None:
        """uvicorn's ``data_received``, with a malformed request answered in keel's shape
        after the answers before it (uvicorn wrote its plain-text 400 at once and closed
        the connection: a pipelined request's answer before it was lost) and an upgrade
        keel does not take left unsaid (``curl --http2`` asks for h2c on every request,
        served over HTTP/1.1: a warning each). ``fresh``: a request began ``data``."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
        except httptools.HttpParserError as exc:
            if self._head == REFUSED:  # a refusal's raise: answered already
                return
            fresh = fresh and self._head >= 0  # no request ended within ``data``
            answer = malformed(exc, bytes(data[:64]), fresh)
            if self._head == BODY:  # in the body of the request being read
                self._refuse_body(answer, str(exc))
            else:
                self._refuse(answer, str(exc))

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        if self._deadline is None:  # the connection's next request: timed from its first byte
            self._deadline = self.loop.call_later(REQUEST_SECONDS, self._too_slow)
        # how a stream drops a client that takes none of it (keel.serving.streaming)
        self.scope["extensions"] = {ABORT: self.transport.abort}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        self._head = BODY
        if len(self.headers) > MAX_HEADERS:
            self._refuse(TOO_MANY, f"over {MAX_HEADERS} headers")
            raise RequestError("too many headers")  # stops the parser; answered already
        HttpToolsProtocol.on_headers_complete(self)
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            self.cycle.__class__ = CloseDelimitedCycle
            # no interim answer to a 1.0 client, which cannot read one (RFC 9110 15.2):
            # its Expect: 100-continue is ignored, it sends its body regardless
            self.cycle.waiting_for_100_continue = False

    def on_message_complete(self) -> None:
        self._head = ENDED
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        HttpToolsProtocol.on_message_complete(self)

    def _refuse(self, answer: Refusal, reason: str) -> None:
        """Answer ``answer`` once the answers before it are written, end the connection's
        writing and drop what the client still sends."""
        self._refusing(answer, reason)
        cycle = self.cycle  # the last request before this one (pipelined ones run in turn)
        if cycle is not None and not cycle.response_complete:
            cycle.on_response = self._after_last_answer
        else:
            self._send_refusal()

    def _refuse_body(self, answer: Refusal, reason: str) -> None:
        """Refuse the request whose body is being read, in place of the app's answer."""
        self._refusing(answer, reason)
        cycle = self.cycle
        state = cycle.scope.setdefault("state", {})  # the request counted with this status
        state[OUTCOME], state[FAILURE_KEY] = answer.status, reason
        if self.pipeline and self.pipeline[0][0] is cycle:  # not begun: answered in turn

            async def refused(scope: Any, receive: Any, send: Any) -> None:
                cycle.disconnected = True  # the app's answer is this
                self._send_refusal()

            self.pipeline[0] = (cycle, refused)
        elif not cycle.response_started:
            cycle.disconnected = True  # the app's answer, if it comes, goes nowhere
            cycle.message_event.set()  # its wait for the body ends
            self._send_refusal()
        elif cycle.response_complete:
            self.transport.close()
        else:
            cycle.keep_alive = False  # answered already: closed once it is written

    def _refusing(self, answer: Refusal, reason: str) -> None:
        """Note a refusal: its count, its log line, its answer."""
        self._head = REFUSED
        _count(answer)
        request_id = uuid.uuid4().hex
        client = f"{self.client[0]}:{self.client[1]} " if self.client else ""
        log.info(
            "%srequest refused with %d %s: %s (request id %s)",
            client,
            answer.status,
            answer.code,
            reason,
            request_id,
        )
        extra = b"x-request-id: %s\r\n" % request_id.encode()
        self._refusal = self._answer(answer, extra)

    def _answer(self, answer: Refusal, extra: bytes = b"") -> bytes:
        """A whole answer that closes the connection, status line to body."""
        content = [STATUS_LINE[answer.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(answer.body),
                b"cache-control: no-store\r\n",
                extra,
                b"connection: close\r\n\r\n",
                answer.body,
            ]
        )
        return b"".join(content)

    def _after_last_answer(self) -> None:
        self.on_response_complete()
        self._send_refusal()

    def _send_refusal(self) -> None:
        if self.transport.is_closing():  # the answer before it closed the connection
            return
        self.transport.write(self._refusal)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _linger(self, size: int) -> None:
        self._dropped += size
        if self._dropped > LINGER_BYTES:
            self.transport.close()


def _count(answer: Refusal) -> int:
    """Count ``answer`` once more (``keel_http_refusals_total``); how often it was given."""
    key = (answer.status, answer.code)
    times = HeadLimitedProtocol.refusals[key] = HeadLimitedProtocol.refusals.get(key, 0) + 1
    return times
