"""The fake backend itself: a test's stop leaves nothing for a later test to trip on."""

from __future__ import annotations

import gc
import json
import socket

from tests.fakes.upstreams import Behaviour, FakeUpstream


def test_a_fake_stopped_before_its_client_read_the_answer_closes_the_connection():
    """An answer the client has not read is buffered in the fake's transport; closed, it
    would wait to send it, the fake's loop ends first, and the socket is left to the
    garbage collector: a ResourceWarning, an error in whichever test runs then."""
    fake = FakeUpstream().start()
    fake.behave(Behaviour.endless())
    body = json.dumps({"prompt": "x", "stream": True}).encode()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", fake.port))
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        client.recv(1)  # the answer has begun; the rest piles up in the fake's buffer
        fake.stop()
    gc.collect()  # an unclosed transport warns here, and pytest fails the test


def test_a_vector_size_no_model_makes_is_refused_as_openai_does():
    """A fuzzer asked for 29,723,326,987 dimensions: the fake ran out of memory making
    them and dropped the connection, which keel rightly took for a broken backend."""
    with FakeUpstream() as fake:
        body = json.dumps({"input": "x", "dimensions": 29_723_326_987}).encode()
        with socket.create_connection(("127.0.0.1", fake.port)) as client:
            client.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: fake\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert not fake.errors
