"""The status page in a real browser against a real keel: Debian's chromium, driven by
Playwright (sync API, so these are plain sync tests), nothing loaded from elsewhere."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from tests import deps
from tests.conftest import ARTIFACTS, KeelProcess, free_port, start_keel
from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.ui.config import FALLBACK_TOKENS, PRIMARY_TOKENS, UI_KEY, ui_config

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REFRESH_SECONDS = 1.0
PROBE_SECONDS = 0.5
PRIMARY = "completion/openai/completion"
FALLBACK = "completion/openai/completion#1"
SCREENSHOTS = ARTIFACTS / "ui"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    deps.wait_for("system")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-deps` (Debian's chromium package)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[KeelProcess, FakeUpstream, FakeUpstream]]:
    primary = FakeUpstream(tokens=PRIMARY_TOKENS).start()
    fallback = FakeUpstream(tokens=FALLBACK_TOKENS, embedding_dim=4).start()
    keel = start_keel(
        tmp_path / "root",
        ui_config(
            primary.url, fallback.url, probe_interval=PROBE_SECONDS, embedded_last_resort=True
        ),
    )
    try:
        keel.wait_ready(120)
        yield keel, primary, fallback
    finally:
        keel.stop()
        primary.stop()
        fallback.stop()


def some_traffic(keel: KeelProcess) -> None:
    """Completions in two languages, half of the Python ones accepted: data for the charts."""
    headers = {"Authorization": f"Bearer {UI_KEY}"}
    with httpx.Client(base_url=keel.url, headers=headers, timeout=30) as http:
        for i, language in enumerate(["python"] * 4 + ["rust"] * 2):
            body = {"language": language, "segments": {"prefix": f"x{i} = ", "suffix": "\n"}}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            completion_id = response.json()["id"]
            kinds = ["view", "select"] if i in (0, 1) else ["view"]
            for kind in kinds:
                event = {"type": kind, "completion_id": completion_id, "choice_index": 0}
                assert http.post("/v1/events", json=event).status_code == 200


def card(page: Page, name: str) -> str:
    return f'.card[data-role="completion"][data-provider="{name}"]'


def test_status_page_shows_live_state_and_runs_the_playground(
    browser: Browser, world: tuple[KeelProcess, FakeUpstream, FakeUpstream]
) -> None:
    keel, primary, _ = world
    # the first completion's prompt over the primary's window: keel sends it again at half
    too_long = {"error": {"message": "This model's maximum context length is 2048 tokens"}}
    primary.behave(Behaviour.error(400, too_long), times=1)
    some_traffic(keel)
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    elsewhere: list[str] = []

    def note(request: Request) -> None:
        if not request.url.startswith(keel.url):
            elsewhere.append(request.url)

    page.on("request", note)
    page.set_default_timeout(15_000)
    try:
        page.goto(f"{keel.url}/?refresh={REFRESH_SECONDS}")

        # Without a key: a prompt, and nothing of the dashboard.
        expect(page.locator("#auth")).to_be_visible()
        expect(page.locator("#dashboard")).to_be_hidden()
        assert page.locator(".card").count() == 0
        page.fill("#key-input", "not-the-key")
        page.click("#key-submit")
        expect(page.locator("#auth-error")).to_contain_text("refused")
        assert page.locator(".card").count() == 0
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / "key-prompt.png")
        page.fill("#key-input", UI_KEY)
        page.click("#key-submit")

        # Live state: the primary serves, the fallback stands by, the embedded model last.
        expect(page.locator("#dashboard")).to_be_visible()
        serving = page.locator(card(page, PRIMARY))
        expect(serving).to_have_attribute("data-serving", "true")
        expect(serving).to_have_attribute("data-status", "ok")
        expect(serving).to_contain_text("prompts halved")  # what keel did, shown
        expect(page.locator(card(page, FALLBACK))).to_have_attribute("data-serving", "false")
        expect(page.locator('.card[data-role="chat"]')).to_have_count(1)
        expect(page.locator("#acceptance tr[data-language=python]")).to_contain_text("50%")
        expect(page.locator("#models")).to_contain_text("SmolLM2")
        expect(page.locator("#latency-chart circle.p50-dot").first).to_be_attached()
        expect(page.locator("#traffic-chart rect.bar").first).to_be_attached()

        # The playground, through the same key.
        page.select_option("#play-language", "python")
        page.click("#play-run")
        expect(page.locator("#play-provider")).to_have_text(PRIMARY)
        expect(page.locator("#play-completion")).to_contain_text("fibonacci(n - 1)")
        expect(page.locator("#play-prompt")).to_contain_text("def fibonacci(n):")

        # Stop the primary: its card turns red and the fallback takes over.
        primary.stop()
        stopped = time.monotonic()
        deadline_ms = (REFRESH_SECONDS + 2 * PROBE_SECONDS + 1.0 + 4.0) * 1000  # +probe timeout
        down = page.locator(card(page, PRIMARY))
        expect(down).to_have_attribute("data-status", "down", timeout=deadline_ms)
        turned_red = time.monotonic() - stopped
        expect(down).to_have_css("border-left-color", red_of(page))
        expect(page.locator(card(page, FALLBACK))).to_have_attribute("data-serving", "true")
        expect(down.locator(".last-error")).to_be_visible()

        page.screenshot(path=SCREENSHOTS / "status-page.png", full_page=True)
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=SCREENSHOTS / "status-page-dark.png", full_page=True)
        assert not elsewhere, f"the page loaded from elsewhere: {elsewhere}"
        print(f"primary card red {turned_red:.1f}s after the backend stopped")

        # A refresh past what a browser's timer holds (2^31-1 ms runs at once), as an
        # operator types to pause the page: the poll at its load, then none, not a tight
        # loop. Counted from the load on: a poll of the page before, due as it was left,
        # could land after the new one was asked for (a flaky "2 polls in a second").
        polls: list[str] = []
        page.on("request", lambda request: polls.append(request.url))
        for asked in ("3000000", "Infinity"):
            page.goto(f"{keel.url}/?refresh={asked}")
            expect(page.locator("#live-text")).to_have_text("live · every 86400 s")
            polls.clear()
            page.wait_for_timeout(1000)
            stats = [url for url in polls if "/v1/stats" in url]
            assert not stats, f"?refresh={asked}: {len(stats)} polls in the second after its load"
    finally:
        context.close()


def red_of(page: Page) -> str:
    """The computed colour the stylesheet gives a down card (light scheme)."""
    value: str = page.evaluate(
        """() => {
            const probe = document.createElement("div");
            probe.style.color = getComputedStyle(document.documentElement)
                .getPropertyValue("--down").trim();
            document.body.append(probe);
            const colour = getComputedStyle(probe).color;
            probe.remove();
            return colour;
        }"""
    )
    assert value.startswith("rgb(") and value != "rgb(0, 0, 0)", value
    return value


def test_stores_that_do_not_answer_are_on_the_page(browser: Browser, tmp_path: Path) -> None:
    """Redis and PostgreSQL configured, neither answering (nothing listens on their
    ports): the page says which is down, what keel does meanwhile (limits per replica,
    keys as last read, events held), and why on hover. It showed neither store before."""
    backend = FakeUpstream(tokens=PRIMARY_TOKENS).start()
    stores = (
        f'\n[state]\nredis_url = "redis://127.0.0.1:{free_port()}/0"\n'
        f'\n[events]\ndatabase_url = "postgresql://keel@127.0.0.1:{free_port()}/keel"\n'
    )
    keel = start_keel(tmp_path / "root", ui_config(backend.url, backend.url) + stores)
    context = browser.new_context()
    try:
        keel.wait_ready(120)
        some_traffic(keel)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(f"{keel.url}/?refresh={REFRESH_SECONDS}")
        page.fill("#key-input", UI_KEY)
        page.click("#key-submit")
        tile = page.locator("#shared-state")
        expect(tile).to_contain_text("Redis & PostgreSQL down")
        expect(tile).to_contain_text("rate limits per replica")
        expect(tile).to_contain_text("keys as last read")
        expect(tile).to_contain_text(re.compile(r"events database down · [1-9]\d* held"))
        expect(tile).to_have_class(re.compile(r"\bbad\b"))
        assert "127.0.0.1" in (tile.get_attribute("title") or ""), "the stores' errors on hover"
    finally:
        context.close()
        keel.stop()
        backend.stop()
