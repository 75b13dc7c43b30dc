"""Config reloads while completions run and others wait in the admission queue, through
a real keel process and fake backends on loopback that hold their answers until the
reload is done.

A request admitted before a reload (running, or queued for a slot) is served under the
config it was admitted by, on the provider that config routed it to, and that provider
is stopped only once no such request is left. What a user saw when keel stopped it
sooner: the running requests lost their connection, a 502 (or, when the backend had
sent its headers, a hang until the first-token timeout and a 504), and the queued ones
went to the stopped provider, whose connection pool reopened and was never closed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KeelProcess, running_keel
from tests.fakes.upstreams import Behaviour, FakeUpstream

pytestmark = pytest.mark.integration

DELAY = 0.1
"""Seconds each fake backend takes to its first token, once released (:func:`held`)."""
SLOTS = 3
QUEUED = 9
LATER = 3
"""Requests sent after the reload: the new config serves them."""
PROVIDER = "completion/openai/completion"
FALLBACK = "completion/openai/completion#1"


def config(
    primary: str,
    *,
    fallback: str | None = None,
    others: str,
    model: str = "coder",
    cooldown: float = 60.0,
) -> str:
    """Completion: ``primary`` (then ``fallback``), at most SLOTS at once, no embedded model
    and one attempt per provider (a broken request is the client's 5xx, not a silent
    retry); chat and embedding on ``others``."""
    completion = (
        f'kind = "openai/completion"\napi_endpoint = "{primary}/v1"\n'
        f'model_name = "{model}"\nfirst_token_timeout = 3\n'
    )
    parts = [
        "[server]\ncompletion_timeout = 20\n",
        f"[routing]\nretry_attempts_per_provider = 1\nbreaker_cooldown_seconds = {cooldown}\n",
        f"[model.completion]\nembedded_last_resort = false\nmax_concurrent = {SLOTS}\n"
        f"queue_size = 32\nqueue_timeout = 20\n",
        f"[model.completion.http]\n{completion}",
        f'[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "{others}/v1"\n',
        f'[model.embedding.http]\nkind = "openai/embedding"\napi_endpoint = "{others}/v1"\n',
    ]
    if fallback is not None:
        parts.append(
            f'[[model.completion.fallback]]\nkind = "openai/completion"\n'
            f'api_endpoint = "{fallback}/v1"\nfirst_token_timeout = 3\n'
        )
    return "\n".join(parts)


@dataclass
class Outcome:
    status: int | None = None
    body: dict[str, Any] | None = None
    error: str | None = None


class Load:
    """Non-streamed completions, each from a thread of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._threads: list[threading.Thread] = []

    def send(self, n: int) -> list[Outcome]:
        sent = [Outcome() for _ in range(n)]
        for outcome in sent:
            thread = threading.Thread(target=self._post, args=(outcome,))
            thread.start()
            self._threads.append(thread)
        self.outcomes += sent
        return sent

    def _post(self, outcome: Outcome) -> None:
        body = {"prompt": "def reload(", "max_tokens": 8, "temperature": 0}
        try:
            response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=30)
        except httpx.HTTPError as exc:  # a reset, a hang past 30 s
            outcome.error = f"{type(exc).__name__}: {exc}"
            return
        outcome.status = response.status_code
        outcome.body = response.json()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(40)
        assert not any(thread.is_alive() for thread in self._threads), "a request hung"


def queue(keel: KeelProcess) -> tuple[int, int]:
    """The completion requests running and waiting for a slot."""
    roles = httpx.get(f"{keel.url}/v1/providers", timeout=10).json()["roles"]
    admission = roles["completion"]["admission"]
    return admission["active"], admission["waiting"]


def wait_for(what: str, predicate: Callable[[], bool], keel: KeelProcess) -> None:
    deadline = time.monotonic() + 15
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within 15 s\n{keel.log.read_text()}"
        time.sleep(0.02)


def reloads(keel: KeelProcess) -> int:
    audit = keel.root / "audit.log"
    return audit.read_text().count('"action":"config_reload"') if audit.exists() else 0


def reload(keel: KeelProcess, text: str, how: str) -> None:
    """Write ``text`` as the config and reload it (``how``: "api" or "sighup"), applied."""
    before = reloads(keel)
    (keel.root / "config.toml").write_text(text)
    if how == "api":
        applied = httpx.post(f"{keel.url}/v1/admin/reload", timeout=30)
        assert applied.status_code == 200, applied.text
    else:
        keel.process.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: reloads(keel) > before, keel)


def completions(upstream: FakeUpstream) -> int:
    """The completions ``upstream`` was sent (the prober only connects within a test)."""
    return sum(1 for r in upstream.requests if r.method == "POST" and r.path == "/v1/completions")


def running(keel: KeelProcess, upstream: FakeUpstream) -> bool:
    """SLOTS completions running (sent to ``upstream``) and QUEUED waiting for a slot."""
    return queue(keel) == (SLOTS, QUEUED) and completions(upstream) == SLOTS


def stops(keel: KeelProcess) -> list[str]:
    """The providers keel has stopped, as its log says."""
    marker = "keel.router: stopped "
    lines = keel.log.read_text().splitlines()
    return sorted(line.split(marker, 1)[1] for line in lines if marker in line)


def held(name: str) -> FakeUpstream:
    """A backend that holds every answer until its release, then answers ``name`` DELAY
    seconds after each request: the requests running at a reload are running."""
    upstream = FakeUpstream(tokens=(name,))
    upstream.behave(Behaviour.slow_first_token(DELAY))
    upstream.hold()
    upstream.start()
    return upstream


def stop_all(*upstreams: FakeUpstream) -> None:
    for upstream in upstreams:
        upstream.stop()
    assert not any(upstream.errors for upstream in upstreams)


def assert_clean(log: str) -> None:
    """Nothing went wrong inside keel: no attempt failed, nothing leaked or crashed."""
    failed = [line for line in log.splitlines() if " failed (" in line]
    assert not failed, "\n".join(failed)
    assert "Unclosed" not in log, log
    assert "Traceback" not in log, log


def served(outcomes: list[Outcome], text: str) -> None:
    """Every one a 200 (never a 5xx, a reset or a hang) with ``text``, its backend's."""
    for outcome in outcomes:
        assert outcome.error is None, outcome.error
        assert outcome.status == 200, (outcome.status, outcome.body)
        assert outcome.body is not None
        assert outcome.body["choices"][0]["text"] == text, outcome.body


@dataclass(frozen=True)
class Change:
    """A reload under load: the config before and after (from the old, new and other
    backends' URLs), how it is reloaded, and what it must do."""

    how: str
    before: Callable[[str, str, str], str]
    after: Callable[[str, str, str], str]
    later_text: str
    """Whose answer the requests sent after the reload get."""
    stopped: tuple[str, ...]


CHANGES = {
    # the completion provider on another backend: a new provider, the old one stopped
    "new-url-api": Change(
        "api",
        lambda old, _new, others: config(old, others=others),
        lambda _old, new, others: config(new, others=others),
        later_text="new",
        stopped=(PROVIDER,),
    ),
    # the same backend with a setting changed: a new provider on the same URL
    "new-setting-sighup": Change(
        "sighup",
        lambda old, _new, others: config(old, others=others),
        lambda old, _new, others: config(old, others=others, model="coder-2"),
        later_text="old",
        stopped=(PROVIDER,),
    ),
    # the provider the queued requests were routed to is gone (its fallback's backend
    # is the primary now)
    "removed-sighup": Change(
        "sighup",
        lambda old, new, others: config(old, fallback=new, others=others),
        lambda _old, new, others: config(new, others=others),
        later_text="new",
        stopped=(PROVIDER, FALLBACK),
    ),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_reload_under_load_answers_every_running_and_queued_request(
    tmp_path: Path, change: Change
) -> None:
    """SLOTS completions running and QUEUED waiting for a slot when the completion
    provider is replaced (another URL, a changed setting) or removed: every one is a 200
    from the backend it was admitted for, the requests sent after the reload are the new
    config's, each request reached a backend once (no connection broke under it), and
    the replaced providers are stopped once they are done, with nothing left open."""
    old, new, others = held("old"), held("new"), FakeUpstream().start()
    urls = (old.url, new.url, others.url)
    try:
        with running_keel(tmp_path, change.before(*urls)) as keel:
            load = Load(keel.url)
            admitted = load.send(SLOTS + QUEUED)
            wait_for("the queue", lambda: running(keel, old), keel)
            reload(keel, change.after(*urls), change.how)
            later = load.send(LATER)
            old.release()
            new.release()
            load.join()
            wait_for("the stops", lambda: stops(keel) == sorted(change.stopped), keel)
        served(admitted, "old")
        served(later, change.later_text)
        assert completions(old) + completions(new) == SLOTS + QUEUED + LATER
        assert completions(new) == (LATER if change.later_text == "new" else 0)
        assert_clean(keel.log.read_text())
    finally:
        stop_all(old, new, others)


def test_two_reloads_in_a_row_wait_for_the_requests_of_both(tmp_path: Path) -> None:
    """A first reload that keeps the completion provider but changes ``[routing]`` (so
    its endpoint starts afresh), then a second that replaces the provider, while the
    requests admitted before the first still run and queue. The second reload stopped
    the provider at once: it counted the requests of its own predecessor only (none),
    so the three running got a 502 (connection closed mid-response) and the nine queued
    were sent to the stopped provider, its connection pool reopened and never closed.
    Now every one is a 200 from the backend it was admitted for, each sent once, and the
    provider is stopped after them."""
    old, new, others = held("old"), held("new"), FakeUpstream().start()
    try:
        with running_keel(tmp_path, config(old.url, others=others.url)) as keel:
            load = Load(keel.url)
            admitted = load.send(SLOTS + QUEUED)
            wait_for("the queue", lambda: running(keel, old), keel)
            reload(keel, config(old.url, others=others.url, cooldown=30), "api")
            reload(keel, config(new.url, others=others.url, cooldown=30), "sighup")
            later = load.send(LATER)
            old.release()
            new.release()
            load.join()
            wait_for("the stop", lambda: stops(keel) == [PROVIDER], keel)
        served(admitted, "old")
        served(later, "new")
        assert (completions(old), completions(new)) == (SLOTS + QUEUED, LATER)
        assert_clean(keel.log.read_text())
    finally:
        stop_all(old, new, others)
