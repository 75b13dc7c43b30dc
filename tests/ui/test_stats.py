"""The status page's figures: the per-minute ring, and /v1/stats through the real app."""

from __future__ import annotations

import asyncio
import os
import random
import re
import tomllib
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from keel.app import create_app
from keel.config import Paths, parse_settings
from keel.ops.stats import RequestStats, Throttled, percentile, rss_bytes
from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.ui.config import FALLBACK_TOKENS, PRIMARY_TOKENS, UI_KEY, ui_config

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name, never fetched


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    ordered = [float(i) for i in range(1, 101)]
    assert percentile(ordered, 0.5) == 50.0
    assert percentile(ordered, 0.95) == 95.0


def test_minutes_count_requests_errors_and_completion_latency() -> None:
    clock = Clock(6000.0)
    stats = RequestStats(window_minutes=3, clock=clock, wall=clock)
    stats.record(role="completion", status=200, seconds=0.1)
    stats.record(role="completion", status=200, seconds=0.3)
    stats.record(role="chat", status=200, seconds=9.0)  # counted, not a completion latency
    stats.record(role="completion", status=503, seconds=5.0)
    stats.record(role="embedding", status=429, seconds=0.0)
    stats.record(role="completion", status=400, seconds=0.0)  # the client's fault
    clock.now += 125  # two minutes later: one quiet minute between
    stats.record(role="completion", status=200, seconds=0.2)

    series = stats.series()
    assert [m["t"] for m in series] == [6000.0, 6060.0, 6120.0]
    first, quiet, last = series
    assert (first["requests"], first["errors"], first["completions"]) == (6, 2, 2)
    assert (first["p50_ms"], first["p95_ms"]) == (100.0, 300.0)
    assert quiet == {
        "t": 6060.0,
        "requests": 0,
        "errors": 0,
        "completions": 0,
        "p50_ms": None,
        "p95_ms": None,
    }
    assert (last["requests"], last["p50_ms"]) == (1, 200.0)
    assert stats.summary() == {
        "requests": 7,
        "errors": 2,
        "completions": 3,
        "p50_ms": 200.0,
        "p95_ms": 300.0,
    }

    clock.now += 180  # three minutes on: everything above has left the window
    assert stats.summary()["requests"] == 0
    assert [m["requests"] for m in stats.series()] == [0, 0, 0]


@pytest.mark.parametrize("step", [-3600.0, -90.0, 3690.0])
def test_a_wall_clock_step_keeps_the_last_hour_and_moves_its_labels(step: float) -> None:
    """NTP setting the wall clock right (or a resume): an hour back drew nothing while
    the totals still counted, and the minute after it wiped them (the last hour's
    outage gone from the page); 90 s back put requests in a minute not yet drawn. The
    minutes are counted on the monotonic clock and labelled with the wall's when drawn."""
    mono, wall = Clock(1000.0), Clock(36_000.0)
    stats = RequestStats(window_minutes=5, clock=mono, wall=wall)
    stats.record(role="chat", status=502, seconds=0.1)
    mono.now += 61
    wall.now += 61 + step
    assert sum(minute["errors"] for minute in stats.series()) == 1
    stats.record(role="completion", status=200, seconds=0.2)
    series = stats.series()
    assert [minute["requests"] for minute in series][-2:] == [1, 1], series
    assert stats.summary()["errors"] == 1 and stats.summary()["requests"] == 2
    labels = [minute["t"] for minute in series]
    assert [b - a for a, b in pairwise(labels)] == [60.0] * 4
    assert 0 <= wall.now - labels[-1] < 60, (labels, wall.now)  # the minute holding now
    mono.now += 10
    wall.now += 10
    assert [minute["t"] for minute in stats.series()] == labels  # one label a minute


def test_memory_stays_bounded_under_load() -> None:
    clock = Clock(0.0)
    stats = RequestStats(
        window_minutes=2, samples_per_minute=50, clock=clock, wall=clock, rng=random.Random(1)
    )
    for minute in range(5):
        clock.now = minute * 60.0
        for i in range(1000):
            stats.record(role="completion", status=200, seconds=i / 1000)
    assert len(stats._minutes) == 2
    assert all(len(m.latencies) == 50 for m in stats._minutes)
    # The reservoir is a fair sample: its median is near the true one (0.5 s).
    p50 = stats.series()[-1]["p50_ms"]
    assert isinstance(p50, float) and 300 < p50 < 700
    assert stats.series()[-1]["completions"] == 1000


async def test_a_throttled_figure_is_computed_once_per_ttl() -> None:
    clock = Clock(0.0)
    figure: Throttled[int] = Throttled(ttl=30.0, clock=clock)
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return calls

    assert await asyncio.gather(*(figure.get(compute) for _ in range(5))) == [1] * 5
    clock.now = 29.9
    assert await figure.get(compute) == 1
    clock.now = 30.0
    assert await figure.get(compute) == 2


def test_resident_memory_of_a_live_and_a_gone_process(tmp_path: Path) -> None:
    mine = rss_bytes(os.getpid())
    assert mine is not None and mine > 10 * 2**20
    assert rss_bytes(2**22 + 12345) is None
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "statm").write_text("not numbers")
    assert rss_bytes(77, proc=tmp_path) is None


def test_the_page_loads_nothing_from_elsewhere() -> None:
    folder = resources.files("keel").joinpath("ui")
    names = sorted(item.name for item in folder.iterdir() if not item.name.startswith("_"))
    assert names == ["index.html", "keel.css", "keel.js"]
    for name in names:
        text = folder.joinpath(name).read_text(encoding="utf-8").replace(SVG_NAMESPACE, "")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name
        assert "@import" not in text and "url(http" not in text, name
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["keel"]
    assert {"ui/*.html", "ui/*.js", "ui/*.css"} <= set(package_data)


@pytest.fixture
def backends() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with (
        FakeUpstream(tokens=PRIMARY_TOKENS) as primary,
        FakeUpstream(tokens=FALLBACK_TOKENS, embedding_dim=4) as fallback,
    ):
        yield primary, fallback


@pytest.fixture
async def client(
    backends: tuple[FakeUpstream, FakeUpstream], tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    primary, fallback = backends
    config = ui_config(primary.url, fallback.url, probe_interval=60)
    settings = parse_settings(tomllib.loads(config), "test")
    app: FastAPI = create_app(settings, Paths(tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {UI_KEY}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=headers
        ) as http:
            yield http


def tabby(language: str, prefix: str = "x = ") -> dict[str, object]:
    return {"language": language, "segments": {"prefix": prefix, "suffix": "\n"}}


async def test_stats_count_model_requests_and_fold_acceptance_by_language(
    client: httpx.AsyncClient, backends: tuple[FakeUpstream, FakeUpstream]
) -> None:
    served: dict[str, list[str]] = {"python": [], "go": []}
    for language, times in (("python", 3), ("go", 1)):
        for i in range(times):
            response = await client.post(
                "/v1/completions", json=tabby(language, f"v{i} = "), headers={"User-Agent": str(i)}
            )
            assert response.status_code == 200, response.text
            served[language].append(response.json()["id"])
    events = [("view", completion_id) for completion_id in served["python"]]
    for kind, completion_id in [*events, ("select", served["python"][0])]:
        event = {"type": kind, "completion_id": completion_id, "choice_index": 0}
        assert (await client.post("/v1/events", json=event)).status_code == 200
    primary, _ = backends
    primary.behave(Behaviour.error(400, {"error": {"message": "bad"}}), times=1)
    # the client's own request (a Tabby one is keel's: a backend's 400 falls back)
    refused = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
    assert refused.status_code == 400, refused.text
    for _ in range(5):  # the page's own polling is not traffic
        assert (await client.get("/v1/stats")).status_code == 200

    body = (await client.get("/v1/stats")).json()
    assert body["summary"]["requests"] == 5 and body["summary"]["errors"] == 0
    assert body["summary"]["completions"] == 4 and body["summary"]["p50_ms"] > 0
    assert len(body["series"]) == 60 and body["series"][-1]["requests"] == 5
    assert body["acceptance"] == [
        {
            "language": "python",
            "served": 3,
            "viewed": 3,
            "selected": 1,
            "dismissed": 0,
            "acceptance_rate": 0.3333,
        },
        {
            "language": "go",
            "served": 1,
            "viewed": 0,
            "selected": 0,
            "dismissed": 0,
            "acceptance_rate": None,
        },
    ]
    chain = body["providers"]["roles"]["completion"]["providers"]
    assert [p["name"] for p in chain] == [
        "completion/openai/completion",
        "completion/openai/completion#1",
    ]
    models = {m["provider"]: m for m in body["models"]}
    assert models["completion/openai/completion#1"]["roles"] == ["completion"]
    assert models["completion/openai/completion"]["model"] == "primary-coder"
    assert body["server"]["pid"] == os.getpid() and body["server"]["rss_bytes"] > 0
    assert body["worker_restarts"] == 0


async def test_the_page_is_public_and_its_figures_are_not(client: httpx.AsyncClient) -> None:
    for path in ("/", "/ui"):
        page = await client.get(path, headers={"Authorization": ""})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert '<script src="ui/keel.js"' in page.text  # relative: keel under a path too
    script = await client.get("/ui/keel.js", headers={"Authorization": ""})
    assert script.status_code == 200 and "Bearer" in script.text
    style = await client.get("/ui/keel.css", headers={"Authorization": ""})
    assert style.headers["content-type"].startswith("text/css")
    denied = await client.get("/v1/stats", headers={"Authorization": ""})
    assert denied.status_code == 401
