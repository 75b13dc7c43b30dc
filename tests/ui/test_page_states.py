"""The status page's states in Chromium against one real keel: a narrow screen, keel not
answering, keys it cannot send or that are refused, a provider held back, a fallback
serving, replicas, and text a reader can read (WCAG AA contrast, names for assistive
technology). Where a state is hard to bring about for real (a breaker open), the page's
real /v1/stats is fetched and one field changed on its way to the page."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from tests.conftest import KeelProcess, start_keel
from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.ui.config import FALLBACK_TOKENS, PRIMARY_TOKENS, UI_KEY, ui_config
from tests.ui.test_browser import PRIMARY, SCREENSHOTS, browser  # noqa: F401 - the module's Chromium

pytestmark = [pytest.mark.browser, pytest.mark.integration]

REPLICAS = '.card[data-role="completion"][data-provider^="completion/openai/completion#1@"]'


@pytest.fixture(scope="module")
def keel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KeelProcess, FakeUpstream]]:
    """Completion: a primary, then one link of two replicas. Probes are rare, so that a
    fault a test scripts on the primary goes to the request it is meant for."""
    primary = FakeUpstream(tokens=PRIMARY_TOKENS).start()
    fallback = FakeUpstream(tokens=FALLBACK_TOKENS, embedding_dim=4).start()
    replica = FakeUpstream(tokens=FALLBACK_TOKENS).start()
    config = ui_config(
        primary.url, fallback.url, probe_interval=30, fallback_replicas=(replica.url,)
    )
    server = start_keel(tmp_path_factory.mktemp("ui-states") / "root", config)
    try:
        server.wait_ready(120)
        yield server, primary
    finally:
        server.stop()
        for upstream in (primary, fallback, replica):
            upstream.stop()


def open_page(browser: Browser, url: str, **context: Any) -> Page:  # noqa: F811
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{url}/?refresh=0.5")
    return page


def unlock(page: Page) -> None:
    page.fill("#key-input", UI_KEY)
    page.click("#key-submit")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator(".card").first).to_be_visible()


def test_a_phone_wide_screen_does_not_scroll_sideways(
    browser: Browser,  # noqa: F811
    keel: tuple[KeelProcess, FakeUpstream],
) -> None:
    """390 px wide: one column that fits (the page was 527 px wide: two-column grids of
    420 px minimum, cards of 260 px, tables and the playground past their panels)."""
    server, _ = keel
    page = open_page(browser, server.url, viewport={"width": 390, "height": 844})
    try:
        unlock(page)
        page.click("#play-run")
        expect(page.locator("#play-result")).to_be_visible()
        expect(page.locator("#models table")).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / "status-page-390px.png", full_page=True)
        assert width <= 390, f"the page is {width} px wide at 390"
        past = page.evaluate(
            """() => [...document.querySelectorAll('.panel, .tile, .card, textarea, .top > *')]
                .filter((el) => el.getBoundingClientRect().right > 390)
                .map((el) => el.className || el.tagName)"""
        )
        assert not past, f"past the screen's edge: {past}"
        # The header's "status" and the live dot keep apart.
        gap = page.evaluate(
            """() => document.querySelector('#live .dot').getBoundingClientRect().left
                - document.querySelector('.brand .sub').getBoundingClientRect().right"""
        )
        top = page.evaluate(
            """() => document.querySelector('#live').getBoundingClientRect().top
                - document.querySelector('.brand').getBoundingClientRect().bottom"""
        )
        assert gap >= 8 or top >= 0, f"'status' and the live dot touch ({gap} px)"
    finally:
        page.context.close()


def test_what_keel_last_said_is_marked_stale_while_it_does_not_answer(
    browser: Browser,  # noqa: F811
    keel: tuple[KeelProcess, FakeUpstream],
) -> None:
    """Every card said serving, "all up", workers ready while no answer came; now the
    dashboard is greyed and dated until keel answers again."""
    server, _ = keel
    page = open_page(browser, server.url)
    try:
        unlock(page)
        dashboard = page.locator("#dashboard")
        expect(dashboard).not_to_have_class(re.compile(r"\bstale\b"))
        expect(page.locator("#stale-note")).to_be_hidden()

        page.route("**/v1/stats", lambda route: route.abort())
        expect(page.locator("#banner")).to_contain_text("keel is not answering")
        expect(dashboard).to_have_class(re.compile(r"\bstale\b"))
        note = page.locator("#stale-note")
        expect(note).to_be_visible()
        expect(note).to_contain_text(re.compile(r"as of \d\d:\d\d:\d\d"))
        opacity = page.evaluate(
            "getComputedStyle(document.querySelector('#roles').closest('main > *')).opacity"
        )
        assert float(opacity) < 1, "the stale cards look as current ones"

        page.unroute("**/v1/stats")
        expect(dashboard).not_to_have_class(re.compile(r"\bstale\b"))
        expect(note).to_be_hidden()
        expect(page.locator("#banner")).to_be_hidden()
    finally:
        page.context.close()


def test_a_key_no_header_can_carry_is_refused_at_entry(
    browser: Browser,  # noqa: F811
    keel: tuple[KeelProcess, FakeUpstream],
) -> None:
    """A pasted smart quote made Headers.set throw, shown as "keel is not answering" and
    polled every 2 s for good; now it is refused where it is typed, and nothing is sent."""
    server, _ = keel
    page = open_page(browser, server.url)
    try:
        expect(page.locator("#auth")).to_be_visible()
        polls: list[str] = []
        page.on("request", lambda request: polls.append(request.url))
        page.fill("#key-input", f"{UI_KEY}\u201d")
        page.click("#key-submit")
        error = page.locator("#auth-error")
        expect(error).to_contain_text(
            "this key holds a character no key can hold", ignore_case=True
        )
        expect(error).to_contain_text("\u201d")
        page.wait_for_timeout(1500)  # three polls' worth at ?refresh=0.5
        assert not [url for url in polls if "/v1/" in url], polls
        expect(page.locator("#banner")).to_be_hidden()
        expect(page.locator("#live-text")).not_to_contain_text("not answering")

        # One kept from before in the tab's storage: dropped, and the same words.
        page.evaluate(f"sessionStorage.setItem('keel.apiKey', '{UI_KEY}\u201d')")
        page.reload()
        expect(error).to_contain_text("no key can hold")
        expect(page.locator("#banner")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('keel.apiKey')") is None
    finally:
        page.context.close()


def test_the_page_works_under_the_path_a_proxy_serves_keel_at(
    browser: Browser,  # noqa: F811
    keel: tuple[KeelProcess, FakeUpstream],
) -> None:
    """Behind a proxy at ``https://tools.example/keel/`` the page asked the host's root
    for its script and style (404s: an unstyled page with no figures) and for
    ``/v1/stats``. Its URLs are relative now. The proxy is played by the browser's
    router: ``/keel/...`` goes to keel, anything else is the host's 404."""
    server, _ = keel
    prefix = f"{server.url}/keel/"
    outside: list[str] = []

    def proxy(route: Route) -> None:
        url = route.request.url
        if not url.startswith(prefix):
            outside.append(url)
            route.fulfill(status=404, body="not keel's")
            return
        route.continue_(url=f"{server.url}/{url.removeprefix(prefix)}")

    context = browser.new_context()
    context.route(f"{server.url}/**", proxy)
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        page.goto(f"{prefix}?refresh=0.5")
        unlock(page)
        page.click("#play-run")
        expect(page.locator("#play-result")).to_be_visible()
        expect(page.locator("#models table")).to_be_visible()
        assert page.evaluate("getComputedStyle(document.body).margin") != "8px"  # styled
    finally:
        context.close()
    assert outside == [], outside


def test_a_refused_key_is_said_in_the_pages_words_and_keyed_links_say_so(
    browser: Browser,  # noqa: F811
    keel: tuple[KeelProcess, FakeUpstream],
) -> None:
    """The refusal read as advice for curl ("send 'Authorization: Bearer <key>'"); the
    footer's links to JSON answer a browser 401, which the page did not say."""
    server, _ = keel
    page = open_page(browser, server.url)
    try:
        page.fill("#key-input", "not-the-key")
        page.click("#key-submit")
        error = page.locator("#auth-error")
        expect(error).to_contain_text("The key was refused")
        expect(error).to_contain_text("check it")
        expect(error).not_to_contain_text("Authorization")

        unlock(page)
        for path in ("v1/providers", "v1/stats", "metrics"):
            link = page.locator(f'#json-links a[data-path="{path}"]')
            expect(link).to_have_attribute("data-needs-key", "true")
        expect(page.locator('#json-links a[data-path="ready"]')).not_to_have_attribute(
            "data-needs-key", "true"
        )
        expect(page.locator("#json-links")).to_contain_text("needs your key")
        expect(page.locator("#json-key-note")).to_contain_text(
            f"curl -H 'Authorization: Bearer …' {server.url}/v1/providers"
        )
    finally:
        page.context.close()


def patched_stats(change: Callable[[dict[str, Any]], None]) -> Callable[[Route], None]:
    """A route handler: keel's own /v1/stats, changed by ``change`` on its way."""

    def handle(route: Route) -> None:
        response = route.fetch()
        if response.status != 200:  # the key's refusal, as it came
            route.fulfill(response=response)
            return
        stats = response.json()
        change(stats)
        route.fulfill(response=response, body=json.dumps(stats))

    return handle


def provider(stats: dict[str, Any], role: str, index: int) -> dict[str, Any]:
    found: dict[str, Any] = stats["providers"]["roles"][role]["providers"][index]
    return found


def breaker_open_and_held_back(stats: dict[str, Any]) -> None:
    chat = provider(stats, "chat", 0)
    chat.update(breaker="open", healthy=False, usable=False, last_error="HTTP 500: boom")
    provider(stats, "completion", 2).update(rate_limited_for=41.3, usable=False)


CONTRAST = """(selectors) => {
  const parse = (c) => {
    const p = c.match(/rgba?\\(([^)]+)\\)/)[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) =>
    [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat(1);
  const lum = (c) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
  };
  const background = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const bg = parse(getComputedStyle(e).backgroundColor);
      if (bg[3] > 0) layers.push(bg);
      if (bg[3] === 1) break;
    }
    return layers.reverse().reduce((under, layer) => over(layer, under), [255, 255, 255, 1]);
  };
  const found = [];
  for (const selector of selectors) {
    for (const el of document.querySelectorAll(selector)) {
      if (!el.getClientRects().length || !el.textContent.trim()) continue;
      const bg = background(el);
      const fg = over(parse(getComputedStyle(el).color), bg);
      const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
      const ratio = Math.round(((a + 0.05) / (b + 0.05)) * 100) / 100;
      found.push([selector, el.textContent.trim().slice(0, 30), ratio]);
    }
  }
  return found;
}"""

SMALL_TEXT = [
    ".pill",
    ".last-error",
    "button",
    ".hint",
    ".foot",
    ".needs-key",
    ".tile .label",
    ".tile .detail",
    ".role-admission",
    ".card-model",
    ".facts dt",
    "th",
    ".state",
    ".play-placeholder",
    ".play-controls label",
    ".brand .sub",
    "#live-text",
]


def test_held_back_providers_say_why_and_the_page_reads_for_everyone(
    browser: Browser,  # noqa: F811
    keel: tuple[KeelProcess, FakeUpstream],
) -> None:
    """A breaker open read "down" (health was looked at first), a rate limit had no
    time; and the page's small text is AA (4.5:1) in both schemes, its title and roles
    are headings, its charts and live regions are named for a screen reader."""
    server, _ = keel
    page = open_page(browser, server.url)
    try:
        page.route("**/v1/stats", patched_stats(breaker_open_and_held_back))
        unlock(page)
        chat = page.locator('.card[data-role="chat"]')
        expect(chat.locator(".pill.down")).to_have_text("breaker open")
        held = page.locator(REPLICAS).nth(1)
        expect(held.locator(".pill.warn")).to_have_text(re.compile(r"^rate limited for 4[12] s$"))

        expect(page.locator("h1")).to_contain_text("keel")
        expect(page.locator(".role h3")).to_have_text(["completion", "chat", "embedding"])
        for chart in ("#latency-chart", "#traffic-chart"):
            svg = page.locator(f"{chart} svg")
            expect(svg).to_have_attribute("role", "img")
            expect(svg).to_have_attribute("aria-label", re.compile(r"last hour"))
        expect(page.locator("#live")).to_have_attribute("aria-live", "polite")
        expect(page.locator("#banner")).to_have_attribute("aria-live", "polite")

        expect(page.locator(".pill.serving").first).to_be_visible()
        expect(page.locator(".pill.ok").first).to_have_text("standby")
        expect(page.locator(".needs-key").first).to_be_visible()
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
            found = page.evaluate(CONTRAST, SMALL_TEXT)
            shown = {selector for selector, _, _ in found}
            assert {".pill", ".last-error", "button", ".foot"} <= shown, shown
            faint = [f for f in found if f[2] < 4.5]
            assert not faint, f"{scheme}: under 4.5:1: {faint}"

        # a poll in flight in the patched handler would meet "Route is already handled"
        page.unroute_all(behavior="ignoreErrors")
        page.route("**/v1/stats", lambda route: route.abort())
        expect(page.locator("#banner")).to_be_visible()
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
            found = page.evaluate(CONTRAST, ["#banner", "#stale-note"])
            assert len(found) == 2 and all(f[2] >= 4.5 for f in found), f"{scheme}: {found}"
    finally:
        page.context.close()


def test_the_serving_badge_follows_the_fallback_that_served_and_replicas_are_one_link(
    browser: Browser,  # noqa: F811
    keel: tuple[KeelProcess, FakeUpstream],
) -> None:
    """The badge went to the first usable provider: a primary that refused a request
    (429) and was usable again seconds later read "serving" while the fallback served
    (the role's serving_fallback said so). Two replicas of one link were drawn as
    primary → fallback, one "standby". Runs last: it leaves the role on its fallback."""
    server, primary = keel
    page = open_page(browser, server.url)
    try:
        unlock(page)
        chain = page.locator('.role[data-role="completion"] .chain')
        expect(chain.locator(".arrow")).to_have_count(1)  # primary → the replicas' link
        replicas = chain.locator(".replicas .card")
        expect(replicas).to_have_count(2)
        # the primary serves: the link of replicas stands by, both alike
        expect(chain.locator(".replicas .pill")).to_have_text(["standby", "standby"])

        # 5 s: the page (refreshed every 0.5 s) must see the wait on a loaded machine too
        primary.behave(Behaviour.error(429, {"error": {"message": "slow down"}}, retry_after="5"))
        headers = {"Authorization": f"Bearer {UI_KEY}"}
        body = {"language": "python", "segments": {"prefix": "x = ", "suffix": "\n"}}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Keel-Provider"].startswith("completion/openai/completion#1@")
        primary.reset_behaviour()

        first = page.locator(f'.card[data-role="completion"][data-provider="{PRIMARY}"]')
        expect(first.locator(".pill.warn")).to_have_text(re.compile(r"^rate limited for [1-5] s$"))
        # Its wait over, the primary is usable again; the fallback served the last request.
        expect(first).to_have_attribute("data-status", "ok", timeout=10_000)
        expect(first).to_have_attribute("data-serving", "false")
        expect(first.locator(".pill")).to_have_text(["standby"])
        for i in range(2):
            expect(replicas.nth(i)).to_have_attribute("data-serving", "true")
        expect(page.locator('.role[data-role="completion"] .role-fallback')).to_have_text(
            "serving from fallback"
        )
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / "serving-fallback-replicas.png", full_page=True)
        stats = httpx.get(f"{server.url}/v1/providers", headers=headers).json()
        assert stats["roles"]["completion"]["serving_fallback"] is True
    finally:
        page.context.close()
