"""Every error answer's access-log line says the error code the client got: a full
queue's 429 and a key's over its ``requests_per_minute`` both logged
``POST /v1/chat/completions -> 429 in 1 ms key=key-...``, and with keys every line
carries ``key=``, so the README's "a throttled key and a full queue no longer look
alike" held for no one; a 4xx said nothing of why."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import ADMIN_KEY, USER, USER_KEY, build_app, listening, serving
from tests.fakes.upstreams import Behaviour, FakeUpstream

OTHER_KEY = "api-test-other-key-0123456789"
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
ASK = {"messages": [{"role": "user", "content": "Hi"}]}
CHAT = "/v1/chat/completions"


def config(upstream: str) -> str:
    """Chat one request at a time, none waiting; each key 3 model requests a minute."""
    roles = "".join(
        f"""
[model.{role}]
embedded_last_resort = false
max_concurrent = 1
queue_size = 0

[model.{role}.http]
kind = "openai/{role}"
api_endpoint = "{upstream}/v1"
model_name = "fake-{role}"
"""
        for role in ("completion", "chat", "embedding")
    )
    return f"""
[routing]
probe_interval_seconds = 600

[auth]
api_keys = ["{USER_KEY}", "{OTHER_KEY}"]
admin_key = "{ADMIN_KEY}"
requests_per_minute = 3
{roles}"""


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server
        server.release()


def logged(caplog: pytest.LogCaptureFixture, answer: httpx.Response) -> str:
    """The access-log line of ``answer``, the one request of its status so far."""
    mark = f"POST {CHAT} -> {answer.status_code} "
    lines = [r.getMessage() for r in caplog.records if r.name == "keel.access"]
    [line] = [line for line in lines if line.startswith(mark)]
    return line


async def test_each_error_answer_logs_its_code(
    upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(tmp_path / "keel", config(upstream.url))
    caplog.set_level(logging.INFO, logger="keel")
    async with serving(app) as client:
        invalid = await client.post(CHAT, json={"messages": "Hi"}, headers=USER)
        assert invalid.status_code == 400, invalid.text
        line = logged(caplog, invalid)
        assert f" code={invalid.json()['error']['code']}" in line, line

        upstream.hold()  # the one chat slot taken
        before = len(upstream.requests)
        held = asyncio.create_task(client.post(CHAT, json=ASK, headers=USER))
        await upstream.wait_for(lambda: len(upstream.requests) > before)
        queue_full = await client.post(CHAT, json=ASK, headers=USER)
        assert queue_full.status_code == 429, queue_full.text
        queue_line = logged(caplog, queue_full)
        upstream.release()
        assert (await held).status_code == 200
        # keel's own refusal is not the key's request: this is its third this minute
        third = await client.post(CHAT, json=ASK, headers=USER)
        assert third.status_code == 200, third.text
        caplog.clear()
        key_limited = await client.post(CHAT, json=ASK, headers=USER)  # its 4th this minute
        assert key_limited.status_code == 429, key_limited.text
        key_line = logged(caplog, key_limited)
        caplog.clear()

        upstream.behave(Behaviour.error(429, retry_after="30"), times=1)
        busy_backend = await client.post(CHAT, json=ASK, headers=OTHER)
        assert busy_backend.status_code == 429, busy_backend.text
        line = logged(caplog, busy_backend)
        assert f" code={busy_backend.json()['error']['code']}" in line, line

    queue_code = queue_full.json()["error"]["code"]
    key_code = key_limited.json()["error"]["code"]
    assert queue_code != key_code
    assert f" code={queue_code}" in queue_line, queue_line
    assert f" code={key_code}" in key_line, key_line


async def test_keels_own_refusals_do_not_use_up_a_keys_requests(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A full queue's 429 is keel's refusal, not the key's request: an SDK retrying it
    (the openai SDK's default two retries) used up the key's requests_per_minute on
    them and met its own limit next (3 calls, 1 served)."""
    app = build_app(tmp_path / "keel", config(upstream.url))
    async with serving(app) as client:
        upstream.hold()  # the one chat slot taken (the key's first request this minute)
        held = asyncio.create_task(client.post(CHAT, json=ASK, headers=USER))
        await upstream.wait_for(lambda: len(upstream.requests) > 0)
        for _ in range(4):
            refused = await client.post(CHAT, json=ASK, headers=USER)
            assert refused.json()["error"]["code"] == "overloaded", refused.text
        upstream.release()
        assert (await held).status_code == 200
        served = [await client.post(CHAT, json=ASK, headers=USER) for _ in range(2)]
    assert [answer.status_code for answer in served] == [200, 200], served[-1].text


async def test_a_client_that_left_is_no_info_line(
    upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An editor drops the keystroke before the last itself (tabby-agent does): each was
    an INFO line, 316 of a soak's 327. Still counted (a 499), logged at DEBUG."""
    app = build_app(tmp_path / "keel", config(upstream.url))
    caplog.set_level(logging.DEBUG, logger="keel")
    upstream.hold()
    async with listening(app) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps(ASK).encode()
        head = (
            f"POST {CHAT} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {USER_KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await upstream.wait_for(lambda: len(upstream.requests) > 0)
        writer.close()

        def left() -> list[logging.LogRecord]:
            return [r for r in caplog.records if f"{CHAT} -> 499" in r.getMessage()]

        for _ in range(100):
            if left():
                break
            await asyncio.sleep(0.05)
    [line] = left()
    assert line.levelno == logging.DEBUG and "code=client_disconnected" in line.getMessage()


async def test_a_refusals_line_names_the_client_a_proxy_forwarded_for(
    upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong key through a proxy on this machine was logged with no address at all: a
    client trying keys could not be traced. The line names the client, as uvicorn reads
    it (the address a loopback proxy forwarded for)."""
    app = build_app(tmp_path / "keel", config(upstream.url))
    caplog.set_level(logging.INFO, logger="keel")
    async with listening(app) as url, httpx.AsyncClient(base_url=url) as client:
        wrong = {"Authorization": "Bearer not-a-key-0123"}
        for forwarding in (
            {"X-Forwarded-For": "203.0.113.5"},
            {"X-Real-IP": "203.0.113.6"},  # nginx set up with this header alone
            {"Forwarded": 'for="[2001:db8::7]:4711";proto=https'},
            {},
        ):
            refused = await client.get("/v1/providers", headers={**wrong, **forwarding})
            assert refused.status_code == 401, refused.text
    lines = [r.getMessage() for r in caplog.records if r.name == "keel.access"]
    assert [line.rsplit(" ", 1)[-1] for line in lines if "-> 401" in line] == [
        "client=203.0.113.5",
        "client=203.0.113.6",
        "client=2001:db8::7",
        "client=127.0.0.1",
    ], lines
