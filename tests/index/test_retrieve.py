"""Retrieval for completions: repository matching, the query, exclusion, per-file limit."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
from pathlib import Path

import pytest
import tantivy

from keel.config import IndexConfig, Paths, RepositoryConfig
from keel.index.retrieve import (
    MAX_CHUNKS_PER_FILE,
    RepositoryRetriever,
    cursor_query,
    normalize_git_url,
    pick_hits,
)
from keel.index.store import Hit
from tests.index.conftest import git

PREFIX = (
    "from weather.client import WeatherClient\n\n\n"
    "def weekly_report(client, city_name):\n"
    "    forecast = client.fetch_forecast(city_name, days=7)\n"
    "    temps = [celsius_to_fahrenheit(day) for day in forecast]\n"
    "    return tem"
)


@pytest.fixture
def retriever(repo: Path, tmp_path: Path) -> RepositoryRetriever:
    built = RepositoryRetriever.from_settings(
        [
            RepositoryConfig(
                name="weather", path=str(repo), git_url="https://github.com/example/weather.git"
            ),
            RepositoryConfig(name="other", path=str(tmp_path / "other")),
        ],
        IndexConfig(min_score=0.0),
        Paths(tmp_path / "data"),
    )
    built.update("weather")
    return built


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/example/weather.git",
        "https://github.com/example/weather",
        "http://user:token@GitHub.com/example/weather/",
        "git@github.com:example/weather.git",
        "ssh://git@github.com:22/example/weather.git",
    ],
)
def test_git_urls_compare_without_scheme_user_and_suffix(url: str) -> None:
    assert normalize_git_url(url) == "github.com/example/weather"


def test_different_repositories_do_not_match() -> None:
    assert normalize_git_url("https://github.com/example/weather2") != normalize_git_url(
        "https://github.com/example/weather"
    )


def test_match_by_git_url_and_relative_filepath(retriever: RepositoryRetriever) -> None:
    matched = retriever.match("weather/client.py", "git@github.com:example/weather.git")
    assert matched is not None
    repo, relpath = matched
    assert repo.name == "weather" and relpath == "weather/client.py"


def test_match_by_absolute_filepath_under_the_path(
    retriever: RepositoryRetriever, repo: Path
) -> None:
    matched = retriever.match(str(repo / "weather" / "units.py"), None)
    assert matched is not None and matched[0].name == "weather"
    assert matched[1] == "weather/units.py"
    file_uri = retriever.match(f"file://{repo}/weather/units.py", None)
    assert file_uri is not None and file_uri[1] == "weather/units.py"
    # as an editor may name it: the edited file (left out of its own snippets) all the same
    roundabout = retriever.match(f"{repo}/weather/../weather/./units.py", None)
    assert roundabout is not None and roundabout[1] == "weather/units.py"
    relative = retriever.match(
        "./weather/../weather/units.py", "git@github.com:example/weather.git"
    )
    assert relative is not None and relative[1] == "weather/units.py"


def test_no_match_outside_every_repository(retriever: RepositoryRetriever, tmp_path: Path) -> None:
    assert retriever.match(str(tmp_path / "elsewhere" / "x.py"), None) is None
    assert retriever.match("weather/client.py", None) is None  # relative, no git_url
    assert retriever.match("x.py", "https://github.com/example/unknown") is None


def test_query_uses_the_lines_before_the_cursor_line() -> None:
    terms = cursor_query(PREFIX)
    assert "fetch_forecast" in terms and "celsius_to_fahrenheit" in terms
    assert "tem" not in terms  # the cursor's line changes with every keystroke
    assert cursor_query(PREFIX + "ps") == terms


def test_retrieval_finds_related_chunks_of_other_files(
    retriever: RepositoryRetriever, repo: Path
) -> None:
    snippets = retriever.search(
        prefix=PREFIX, filepath=str(repo / "report.py"), git_url=None, language="python"
    )
    paths = [s.filepath for s in snippets]
    assert "weather/client.py" in paths and "weather/units.py" in paths
    assert all(s.score is not None and s.score > 0 for s in snippets)
    assert any("def fetch_forecast" in s.body for s in snippets)


def test_retrieval_excludes_the_file_being_edited(
    retriever: RepositoryRetriever, repo: Path
) -> None:
    snippets = retriever.search(
        prefix=PREFIX,
        filepath="weather/units.py",
        git_url="https://github.com/example/weather",
        language="python",
    )
    assert snippets and "weather/units.py" not in [s.filepath for s in snippets]


def test_at_most_two_chunks_per_file(repo: Path, tmp_path: Path) -> None:
    big = "".join(
        f"def fetch_forecast_variant_{i}(city_name):\n"
        + "".join(f"    step_{j} = fetch_forecast(city_name, {j})\n" for j in range(20))
        + "    return step_0\n\n\n"
        for i in range(6)
    )
    (repo / "weather" / "variants.py").write_text(big)
    built = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(min_score=0.0, max_snippets=10),
        Paths(tmp_path / "data"),
    )
    built.update()
    hits = built.repositories[0].index.search(["fetch_forecast", "city_name"])
    assert sum(h.path == "weather/variants.py" for h in hits) > MAX_CHUNKS_PER_FILE
    snippets = built.search(
        prefix=PREFIX, filepath=str(repo / "report.py"), git_url=None, language="python"
    )
    assert [s.filepath for s in snippets].count("weather/variants.py") == MAX_CHUNKS_PER_FILE


def test_score_threshold_and_limit() -> None:
    hits = [Hit(f"f{i}.py", 0, 1, "x", score) for i, score in enumerate([9.0, 5.0, 3.0, 1.0])]
    assert [h.score for h in pick_hits(hits, min_score=2.5, limit=10)] == [9.0, 5.0, 3.0]
    assert [h.score for h in pick_hits(hits, min_score=0.0, limit=2)] == [9.0, 5.0]


def test_unmatched_request_and_zero_max_snippets_give_nothing(
    retriever: RepositoryRetriever, repo: Path, tmp_path: Path
) -> None:
    assert retriever.search(prefix=PREFIX, filepath=None, git_url=None, language="python") == []
    off = RepositoryRetriever(retriever.repositories, IndexConfig(max_snippets=0))
    assert (
        off.search(prefix=PREFIX, filepath=str(repo / "report.py"), git_url=None, language="python")
        == []
    )


def test_an_update_by_another_process_is_searched_at_once(
    retriever: RepositoryRetriever, repo: Path, tmp_path: Path
) -> None:
    """``keel index`` (another process: here another retriever on the same index) writes
    while the server has answers cached: the server's next search sees the new state,
    not what it cached before, for deleted code and for new code."""
    report = str(repo / "report.py")
    before = retriever.search(prefix=PREFIX, filepath=report, git_url=None, language="python")
    assert "weather/units.py" in [s.filepath for s in before]
    (repo / "weather" / "units.py").unlink()
    (repo / "weather" / "days.py").write_text("def weekly_report_days(forecast):\n    return 7\n")
    other = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(min_score=0.0),
        Paths(tmp_path / "data"),
    )
    assert other.update("weather")["weather"].changed
    after = retriever.search(prefix=PREFIX, filepath=report, git_url=None, language="python")
    paths = [s.filepath for s in after]
    assert "weather/units.py" not in paths, "a deleted file's code in the prompt"
    assert "weather/days.py" in paths
    assert retriever.state()[0] == other.state()[0] != 0  # the same committed state


@pytest.mark.parametrize("damage", ["deleted", "corrupted", "tantivy deleted"])
async def test_a_damaged_index_costs_its_snippets_only_and_is_rebuilt(
    retriever: RepositoryRetriever, damage: str
) -> None:
    """An index deleted or damaged under a running keel made every completion of its
    repository a 500, and every refresh failed ("being written by another process")
    until a restart. Tabby's completion goes on without snippets; so does keel's, and
    the next refresh rebuilds the index."""
    url = "https://github.com/example/weather.git"
    ask = {"prefix": PREFIX, "filepath": "report.py", "git_url": url, "language": "python"}
    assert await retriever.retrieve(**ask)
    directory = retriever.repositories[0].index.directory
    if damage == "deleted":
        shutil.rmtree(directory)
    elif damage == "corrupted":
        (directory / "tantivy" / "meta.json").write_text("{ not json")
    else:
        shutil.rmtree(directory / "tantivy")
    await retriever.retrieve(**{**ask, "prefix": PREFIX + "p"})  # no error, whatever it finds
    retriever.update("weather")
    found = await retriever.retrieve(**{**ask, "prefix": PREFIX + "pe"})
    assert {snippet.filepath for snippet in found} >= {"weather/client.py"}


def test_a_file_uri_filepath_is_percent_decoded(tmp_path: Path) -> None:
    """tabby-agent sends the document's URI as ``filepath`` where it has no workspace:
    a space in the path (``my%20repo``) matched no repository."""
    root = tmp_path / "my repo"
    (root / "src").mkdir(parents=True)
    built = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="mine", path=str(root))], IndexConfig(), Paths(tmp_path / "d")
    )
    matched = built.match(f"file://{tmp_path}/my%20repo/src/new.py", None)
    assert matched is not None and matched[1] == "src/new.py"


async def test_a_checkout_that_is_gone_gives_no_snippets_until_it_is_back(
    retriever: RepositoryRetriever, repo: Path, tmp_path: Path
) -> None:
    """A checkout moved or unmounted: its index served the old files' snippets on,
    while every refresh failed."""
    ask = {
        "prefix": PREFIX,
        "filepath": "report.py",
        "git_url": "https://github.com/example/weather.git",
        "language": "python",
    }
    assert await retriever.retrieve(**ask)
    there = retriever.state()
    os.rename(repo, tmp_path / "moved")
    assert await retriever.retrieve(**{**ask, "prefix": PREFIX + "p"}) == []
    # another state: the empty choice made meanwhile is not kept for the line
    assert retriever.state() != there
    os.rename(tmp_path / "moved", repo)
    assert await retriever.retrieve(**{**ask, "prefix": PREFIX + "pe"})
    assert retriever.state() == there


def test_every_remote_names_the_repository_whoever_owns_the_checkout(
    repo: Path, tmp_path: Path
) -> None:
    """tabby-agent sends origin's URL, else upstream's, else the first remote's; only
    origin was read. A checkout owned by another user (keel runs as its own) was
    refused by git: no request matched it by URL, and nothing said why."""
    git(repo, "init", "-q")
    git(repo, "remote", "add", "upstream", "https://github.com/acme/weather.git")
    git(repo, "remote", "add", "fork", "git@github.com:me/weather.git")
    if os.geteuid() == 0:  # another owner than the one reading it
        for path in [repo, *repo.rglob("*")]:
            os.chown(path, 65534, 65534, follow_symlinks=False)
    built = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))], IndexConfig(), Paths(tmp_path / "d")
    )
    assert built.repositories[0].git_urls == {
        "github.com/acme/weather",
        "github.com/me/weather",
    }


async def test_each_refresh_says_how_each_index_stands(repo: Path, tmp_path: Path) -> None:
    """Indexing showed only in a log line after a whole build, and a repository failing
    in a warning per round: its state is in /v1/providers and the metrics now."""
    built = RepositoryRetriever.from_settings(
        [
            RepositoryConfig(name="weather", path=str(repo)),
            RepositoryConfig(name="gone", path=str(tmp_path / "nowhere")),
        ],
        IndexConfig(refresh_seconds=0),
        Paths(tmp_path / "data"),
    )
    told: list[tuple[str, bool, int | None]] = []
    built.on_state = lambda *said: told.append(said)
    assert {name: state["state"] for name, state in built.states.items()} == {
        "weather": "waiting",
        "gone": "waiting",
    }
    await built.refresh_forever()
    weather, gone = built.states["weather"], built.states["gone"]
    assert weather["state"] == "ready" and weather["files"] == 4 and weather["chunks"]
    assert gone["state"] == "failed" and "is not a directory" in str(gone["last_error"])
    assert told == [("weather", True, weather["chunks"]), ("gone", False, None)]


async def test_an_index_another_process_writes_is_busy_then_ready_soon(
    repo: Path, tmp_path: Path
) -> None:
    """`keel index` writing while the server refreshes: the server called it "failed"
    (keel_index_up 0, an alert) for the 10 minutes to its next round, while it searched
    the other process's commit. It is "busy", and updated again soon."""
    built = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(refresh_seconds=600),
        Paths(tmp_path / "data"),
    )
    built.update("weather")  # there, as `keel index` made it
    told: list[tuple[str, bool, int | None]] = []
    built.on_state = lambda *said: told.append(said)
    built.busy_retry_seconds = 0.2
    index = built.repositories[0].index
    other = tantivy.Index.open(str(index.directory / "tantivy")).writer()  # another process
    units = repo / "weather" / "units.py"
    units.write_text(units.read_text() + "\n\ndef kelvin(k):\n    return k\n")  # to write
    refresh = asyncio.create_task(built.refresh_forever())
    try:
        for _ in range(100):
            if built.states["weather"]["state"] == "busy":
                break
            await asyncio.sleep(0.05)
        assert built.states["weather"]["state"] == "busy", built.states
        assert "another process" in str(built.states["weather"]["last_error"])
        assert told == [], "not reported down"
        del other  # its writer gone, its lock too
        gc.collect()
        for _ in range(100):
            if built.states["weather"]["state"] == "ready":
                break
            await asyncio.sleep(0.05)
        assert built.states["weather"]["state"] == "ready", built.states
        assert told and told[-1][:2] == ("weather", True)
    finally:
        refresh.cancel()
        built.stop()


@pytest.mark.parametrize(
    ("language", "found"),
    [
        ("python", {"weather/client.py", "weather/units.py"}),
        ("typescriptreact", {"web/forecast.ts"}),  # one language with JavaScript
        ("cpp", {"native/forecast.h"}),  # a C++ file's headers
        ("yaml", {"config/forecast.yml"}),
        ("plaintext", set()),
    ],
)
def test_snippets_come_from_files_of_the_requests_language(
    repo: Path, tmp_path: Path, language: str, found: set[str]
) -> None:
    """As Tabby's code search: retrieved from every file, a Python completion's prompt
    got the passwords of ``terraform.tfvars`` and ``database.yml`` (a reviewer's
    finding)."""
    words = "fetch_forecast city_name celsius_to_fahrenheit WeatherClient weekly_report"
    for relpath, text in {
        "config/forecast.yml": f"# {words}\nforecast_password: hunter2\n",
        "deploy/forecast.tfvars": f'# {words}\nforecast_password = "hunter2"\n',
        "web/forecast.ts": f"// {words}\nexport function fetch_forecast() {{}}\n",
        "native/forecast.h": f"// {words}\nint fetch_forecast(int city_name);\n",
    }.items():
        (repo / relpath).parent.mkdir(parents=True, exist_ok=True)
        (repo / relpath).write_text(text)
    built = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(min_score=0.0, max_snippets=20),
        Paths(tmp_path / "data"),
    )
    built.update()
    snippets = built.search(
        prefix=PREFIX, filepath=str(repo / "report.py"), git_url=None, language=language
    )
    assert {s.filepath for s in snippets} == found


def monorepo(root: Path) -> Path:
    """One checkout, two services, each configured as a repository of its own."""
    (root / "svc_a").mkdir(parents=True)
    (root / "svc_a" / "app.py").write_text(
        "def place_order(customer_id, cart_items):\n    return order_total(cart_items)\n"
    )
    (root / "svc_b").mkdir()
    (root / "svc_b" / "shipping.py").write_text(
        "def ship_order_to_customer(customer_id, cart_items):\n    return label(customer_id)\n"
    )
    git(root, "init", "-q")
    git(root, "remote", "add", "origin", "https://github.com/acme/mono.git")
    return root


MONO = "https://github.com/acme/mono.git"
ORDER = "def f(customer_id, cart_items):\n    ship_order_to_customer(customer_id, cart_items)\n"


async def test_each_part_of_one_checkout_gets_its_own_files(tmp_path: Path) -> None:
    """A monorepo's services, each its own repository with the checkout's one URL:
    tabby-agent names the file from the checkout's top (``svc_b/new.py``). Every
    request searched the first service, and the edited file, not found as ``app.py``,
    came back as a snippet of itself."""
    root = monorepo(tmp_path / "mono")
    built = RepositoryRetriever.from_settings(
        [
            RepositoryConfig(name="svc_a", path=str(root / "svc_a")),
            RepositoryConfig(name="svc_b", path=str(root / "svc_b")),
        ],
        IndexConfig(min_score=0.0),
        Paths(tmp_path / "data"),
    )
    built.update()
    assert [(repo.name, repo.prefix) for repo in built.repositories] == [
        ("svc_a", "svc_a/"),
        ("svc_b", "svc_b/"),
    ]
    ask = {"prefix": ORDER, "git_url": MONO, "language": "python"}
    snippets = await built.retrieve(**ask, filepath="svc_b/new.py")
    assert [s.filepath for s in snippets] == ["shipping.py"], snippets
    own = await built.retrieve(**ask, filepath="svc_a/app.py")
    assert "app.py" not in [s.filepath for s in own], "the edited file is not its own snippet"


async def test_a_checkout_cloned_after_the_start_is_matched_by_its_url(tmp_path: Path) -> None:
    """The remotes were read once, at the start: a checkout cloned (or given a new
    remote) later matched no request by URL as long as keel ran."""
    late = tmp_path / "late"
    built = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="late", path=str(late))],
        IndexConfig(min_score=0.0, refresh_seconds=0),
        Paths(tmp_path / "data"),
    )
    assert built.match("svc_b/new.py", MONO) is None
    monorepo(late)
    await built.refresh_forever()
    assert built.status()["late"]["state"] == "ready"
    matched = built.match("svc_b/new.py", MONO)
    assert matched is not None and matched[1] == "svc_b/new.py"
    snippets = await built.retrieve(
        prefix=ORDER, filepath="svc_b/new.py", git_url=MONO, language=None
    )
    assert snippets and snippets[0].filepath == "svc_b/shipping.py", snippets


async def test_a_checkout_gone_is_missing_in_the_status(
    retriever: RepositoryRetriever, repo: Path, tmp_path: Path
) -> None:
    """It said ``ready`` while its completions got no snippets."""
    await asyncio.to_thread(retriever.repositories[0].checkout.look)
    assert retriever.status()["weather"]["state"] == "waiting"
    os.rename(repo, tmp_path / "moved")
    await asyncio.to_thread(retriever.repositories[0].checkout.look)
    shown = retriever.status()["weather"]
    assert shown["state"] == "missing" and str(repo) in str(shown["last_error"])
    os.rename(tmp_path / "moved", repo)
    await asyncio.to_thread(retriever.repositories[0].checkout.look)
    assert retriever.status()["weather"]["state"] == "waiting"


def test_the_query_reads_the_end_of_a_huge_prefix_only() -> None:
    """A 3.6 MB prefix's query took 1.4 s of CPU; the lines it uses are at the end."""
    huge = "aa_bb " * 600_000 + "\n" + "total = compute_invoice_total(items)\n" + "x = "
    assert cursor_query(huge) == cursor_query(huge[-20_000:])
    assert "compute_invoice_total" in cursor_query(huge)


async def test_a_line_typed_while_the_checkout_was_gone_gets_snippets_once_it_is_back(
    retriever: RepositoryRetriever, repo: Path, tmp_path: Path
) -> None:
    """The choice made while the checkout was gone (none) was kept for its line under
    the state seen before the search (the checkout there, as last seen), so the line got
    no snippets after the checkout was back, for as long as it was typed on."""
    from keel.pipeline.completion import TabbyPrompts
    from keel.schemas.tabby import TabbyCompletionRequest

    prompts = TabbyPrompts(max_input_length=None, max_decoding_tokens=None, retriever=retriever)
    checkout = retriever.repositories[0].checkout

    async def snippets(prefix: str) -> list[str]:
        segments = {"prefix": prefix, "filepath": "report.py", "git_url": MONO_WEATHER}
        request = TabbyCompletionRequest.model_validate(
            {"language": "python", "segments": segments}
        )
        task = await prompts.read(request, None, editor="e")
        return [s.filepath for s in task.snippets]

    await asyncio.to_thread(checkout.look)
    assert await snippets(PREFIX)
    os.rename(repo, tmp_path / "moved")
    line = PREFIX + "\n    return weekly_total(temps)\n"
    assert await snippets(line) == []  # the search looks afresh: gone
    os.rename(tmp_path / "moved", repo)
    await asyncio.to_thread(checkout.look)
    assert await snippets(line), "the line chooses again once the checkout is back"


MONO_WEATHER = "https://github.com/example/weather.git"
