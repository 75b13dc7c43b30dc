"""A request's head (request line and headers) is capped: a real keel on loopback, raw sockets.

uvicorn's httptools parser took a head of any size (a 50 MB header line sent in pieces was
held in memory and served); keel refuses one over 64 KiB or over 256 headers with a 431
(a 414 when the URL is most of it) in its error shape, and closes the connection.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path

import pytest
from tests.api.conftest import Backends
from tests.conftest import KeelProcess, running_keel

from keel.ops.http_limits import MAX_HEAD_BYTES, MAX_HEADERS


@pytest.fixture(scope="module")
def keel(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    root: Path = tmp_path_factory.mktemp("header-limits")
    with running_keel(root, backends.config(keys=False)) as server:
        yield server


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, object]:
        assert self.headers["content-type"] == "application/json", self.headers
        error = json.loads(self.body)["error"]
        assert isinstance(error, dict)
        return error


def connect(keel: KeelProcess) -> socket.socket:
    host, port = keel.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(reader: BufferedReader) -> Response:
    """One response (with a Content-Length) from ``reader``, a socket's ``makefile("rb")``."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers["content-length"]))
    return Response(int(status_line.split()[1]), headers, body)


def head(path: str = "/health", extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra + b"\r\n"


def head_of_size(size: int) -> bytes:
    """A GET /health head of exactly ``size`` bytes, most of it one cookie."""
    bare = head(extra=b"Cookie: \r\n")
    return head(extra=b"Cookie: " + b"c" * (size - len(bare)) + b"\r\n")


def send_in_pieces(sock: socket.socket, data: bytes, piece: int = 4096) -> None:
    for start in range(0, len(data), piece):
        sock.sendall(data[start : start + piece])


def exchange(
    keel: KeelProcess, data: bytes, *, pieces: bool = False, ends: bool = False
) -> Response:
    """Send ``data`` and read one response; ``ends``: check that keel closed the connection
    after it (EOF, nothing more)."""
    with connect(keel) as sock, sock.makefile("rb") as reader:
        if pieces:
            send_in_pieces(sock, data)
        else:
            sock.sendall(data)
        response = read_response(reader)
        if ends:
            sock.settimeout(10)
            assert reader.read() == b"", "keel sent more after its answer"  # EOF: closed
        return response


@pytest.mark.parametrize("pieces", [False, True], ids=["one-write", "in-pieces"])
def test_a_head_of_exactly_the_limit_is_served_one_byte_more_is_refused(
    keel: KeelProcess, pieces: bool
) -> None:
    data = head_of_size(MAX_HEAD_BYTES)
    assert len(data) == MAX_HEAD_BYTES
    response = exchange(keel, data, pieces=pieces)
    assert response.status == 200, response

    response = exchange(keel, head_of_size(MAX_HEAD_BYTES + 1), pieces=pieces, ends=True)
    assert response.status == 431, response
    error = response.error()
    assert error["code"] == "request_headers_too_large"
    assert error["type"] == "invalid_request_error"
    assert "64 KiB" in str(error["message"])
    assert response.headers["connection"] == "close"


def test_a_huge_header_sent_in_pieces_is_refused_without_being_read(keel: KeelProcess) -> None:
    """The reviewer's case: one header line of 50 MB (here 32 MB), sent as it goes.
    keel used to read it all (its memory peaked ~2x the header's size) and serve it."""
    size = 32 * 1024 * 1024
    peak_before = peak_rss(keel.process.pid)
    piece = b"a" * 65536
    sent = 0
    with connect(keel) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            while sent < size:
                sock.sendall(piece)
                sent += len(piece)
            sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # keel closed the connection: what it must do
        else:
            raise AssertionError("keel read a 32 MB header to its end")
    # what keel read (the limit, then up to 1 MiB dropped after its answer) and the
    # sockets' buffers (a few MB on loopback)
    assert sent < size // 2, sent
    growth = peak_rss(keel.process.pid) - peak_before
    assert growth < 16 * 1024 * 1024, f"keel's peak memory grew by {growth} bytes"


def test_a_head_a_little_over_the_limit_sent_in_pieces_gets_its_answer(
    keel: KeelProcess,
) -> None:
    """A client still sending when keel refuses reads the 431, not a reset: keel drops what
    follows for a while (up to 1 MiB) before it closes."""
    data = head(extra=b"X-Big: " + b"b" * (300 * 1024) + b"\r\n")
    response = exchange(keel, data, pieces=True, ends=True)
    assert response.status == 431, response
    assert response.error()["code"] == "request_headers_too_large"


def test_an_over_long_url_is_a_414(keel: KeelProcess) -> None:
    response = exchange(
        keel, head(path="/health?q=" + "u" * MAX_HEAD_BYTES), pieces=True, ends=True
    )
    assert response.status == 414, response
    error = response.error()
    assert error["code"] == "uri_too_long"
    assert "request body" in str(error["message"])


def test_over_the_header_count_is_refused_up_to_it_is_served(keel: KeelProcess) -> None:
    def with_headers(count: int) -> bytes:  # Host is one of them
        return head(extra=b"".join(b"X-H%d: v\r\n" % n for n in range(count - 1)))

    response = exchange(keel, with_headers(MAX_HEADERS))
    assert response.status == 200, response

    for pieces in (False, True):
        response = exchange(keel, with_headers(MAX_HEADERS + 1), pieces=pieces, ends=True)
        assert response.status == 431, response
        error = response.error()
        assert error["code"] == "too_many_headers"
        assert str(MAX_HEADERS) in str(error["message"])

    # 100,000 small headers (1.2 MB): refused once 64 KiB are read; keel drops 1 MiB
    # more, then closes, perhaps before the last ones are sent
    many = head(extra=b"".join(b"X-H%d: v\r\n" % n for n in range(100_000)))
    try:
        response = exchange(keel, many, pieces=True, ends=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # cut off before it was all sent: refused unread, as it should be
    else:
        assert response.status == 431, response


def test_keep_alive_pipelining_and_large_bodies_are_unaffected(keel: KeelProcess) -> None:
    cookie = b"Cookie: session=" + b"s" * 8000 + b"\r\n"
    body = json.dumps(
        {"language": "python", "segments": {"prefix": "x = 1\n" * 40_000}}  # 240 KB
    ).encode()
    post = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    with connect(keel) as sock, sock.makefile("rb") as reader:
        # one after another on one connection, then three pipelined in one write (the
        # big body arrives with its head: more than the head limit in one read)
        for _ in range(3):
            sock.sendall(head(extra=cookie))
            assert read_response(reader).status == 200
        sock.sendall(post)
        completion = read_response(reader)
        assert completion.status == 200, completion
        assert json.loads(completion.body)["choices"]
        sock.sendall(head(extra=cookie) + post + head())
        assert [read_response(reader).status for _ in range(3)] == [200, 200, 200]
        # a pipelined head over the limit after a good one: that is answered, it refused
        # (the part of it read with the end of the request before it, at most one read
        # of 256 KB, is not counted: 400 KB is over the limit and one read)
        sock.sendall(head() + head_of_size(400 * 1024))
        assert read_response(reader).status == 200
        refused = read_response(reader)
        assert refused.status == 431, refused


def test_a_body_over_the_body_limit_still_gets_its_413(keel: KeelProcess) -> None:
    """The body limit (the middleware's, 4 MiB by default) is not the head's."""
    body = b"{" + b" " * (5 * 1024 * 1024) + b"}"
    data = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    response = exchange(keel, data)
    assert response.status == 413, response
    assert response.error()["code"] == "payload_too_large"


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")
