"""A repository's state in ``/v1/providers`` and ``keel_index_up`` follow what retrieval
finds, at once, and a build shows how far it is."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from keel.config import IndexConfig, Paths, RepositoryConfig
from keel.index.retrieve import RepositoryRetriever
from tests.conftest import niceness
from tests.index.test_retrieve import PREFIX


def ask(repo: Path) -> dict[str, str | None]:
    return {
        "prefix": PREFIX,
        "filepath": str(repo / "report.py"),
        "git_url": None,
        "language": "python",
    }


async def until(seen: Callable[[], bool], what: str) -> None:
    """Wait for ``seen()``, for at most 30 s (not a timing bound: a limit to a hang)."""
    for _ in range(600):
        if seen():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


@pytest.fixture
async def served(
    repo: Path, tmp_path: Path
) -> AsyncIterator[tuple[RepositoryRetriever, list[tuple[str, bool, int | None]]]]:
    """A retriever refreshing as the server's does (every 600 s), built once."""
    retriever = RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(refresh_seconds=600, min_score=0.0),
        Paths(tmp_path / "data"),
    )
    told: list[tuple[str, bool, int | None]] = []
    retriever.on_state = lambda *said: told.append(said)
    refresh = asyncio.create_task(retriever.refresh_forever())
    await until(lambda: retriever.status()["weather"]["state"] == "ready", "ready")
    assert await retriever.retrieve(**ask(repo))
    yield retriever, told
    retriever.stop()
    refresh.cancel()


async def test_an_index_deleted_under_keel_is_unavailable_at_once(
    served: tuple[RepositoryRetriever, list[tuple[str, bool, int | None]]], repo: Path
) -> None:
    """It said ``ready``, with ``keel_index_up`` 1, until the next refresh (up to 10
    minutes), and a log line named neither repository, directory nor fix."""
    retriever, told = served
    directory = retriever.repositories[0].index.directory
    shutil.rmtree(directory)
    assert await retriever.retrieve(**ask(repo)) == []
    shown = retriever.status()["weather"]
    assert shown["state"] == "unavailable", shown
    why = str(shown["last_error"])
    assert "'weather'" in why and str(directory) in why and "keel index weather" in why
    assert told[-1] == ("weather", False, None)

    await asyncio.to_thread(retriever.update, "weather")  # as `keel index` does
    assert await retriever.retrieve(**ask(repo))
    assert retriever.status()["weather"]["state"] == "ready"
    assert told[-1] == ("weather", True, None)


async def test_a_checkout_moved_is_missing_with_no_request_to_find_it(
    served: tuple[RepositoryRetriever, list[tuple[str, bool, int | None]]], repo: Path
) -> None:
    """``missing`` showed from the second look at /v1/providers only, and
    ``keel_index_up`` stayed 1: between refreshes keel looks at its checkouts."""
    retriever, told = served
    os.rename(repo, repo.with_name("moved"))
    await until(lambda: told[-1] == ("weather", False, None), "keel_index_up 0")
    assert retriever.status()["weather"]["state"] == "missing"
    os.rename(repo.with_name("moved"), repo)
    await until(lambda: told[-1] == ("weather", True, None), "keel_index_up 1 again")
    assert retriever.status()["weather"]["state"] == "ready"


def three_hundred_files(repo: Path, tmp_path: Path) -> RepositoryRetriever:
    """A retriever of ``repo`` with 300 more files (a build of a second or two), built
    once a refresh round, not again."""
    for n in range(300):
        (repo / "weather" / f"station_{n}.py").write_text(
            f"def station_{n}_reading(city_name):\n    return {n}\n"
        )
    return RepositoryRetriever.from_settings(
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(refresh_seconds=0),
        Paths(tmp_path / "data"),
    )


async def test_a_build_shows_how_far_it_is(repo: Path, tmp_path: Path) -> None:
    """A first build showed ``{"state": "indexing"}`` alone, however long it took."""
    retriever = three_hundred_files(repo, tmp_path)
    seen: list[dict[str, object]] = []
    refresh = asyncio.create_task(retriever.refresh_forever())
    while not refresh.done():
        seen.append(dict(retriever.status()["weather"]))
        await asyncio.sleep(0.001)
    await refresh
    building = [s for s in seen if s["state"] == "indexing" and s.get("total")]
    assert building, seen[:3]
    assert all(s["total"] == 304 and isinstance(s["started_at"], float) for s in building)
    assert sorted(int(str(s["done"])) for s in building) == [int(str(s["done"])) for s in building]
    final = retriever.status()["weather"]
    assert final["state"] == "ready" and "total" not in final and "started_at" not in final


def builders() -> set[int]:
    """This process's children building an index (keel.index.child)."""
    found = set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmd:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                line = cmd.read()
        except (OSError, ValueError):
            continue
        if parent == os.getpid() and b"keel.index.child" in line:
            found.add(int(pid))
    return found


async def test_a_build_runs_in_a_process_of_its_own_whose_index_is_searched(
    served: tuple[RepositoryRetriever, list[tuple[str, bool, int | None]]], repo: Path
) -> None:
    """Built in a thread of keel's process, the chunking held Python's lock against every
    request: completions took 60 ms at p50 and 396 ms at p90 while a 36,500-chunk
    repository was indexed, 7 and 14 ms once it was ready. A child builds it now (the
    fixture's first build was one), and what it commits is searched here."""
    retriever, _ = served
    (repo / "weather" / "gauges.py").write_text(
        "def barometric_gauge_reading(city_name):\n    return 1013\n"
    )
    refresh = asyncio.create_task(retriever.refresh_forever())  # a round now, not in 600 s
    seen: set[int] = set()
    for _ in range(15_000):  # at most ~30 s: a limit to a hang, not a timing bound
        seen |= builders()
        if retriever.status()["weather"].get("files") == 5:
            break
        await asyncio.sleep(0.002)
    refresh.cancel()
    assert seen and os.getpid() not in seen
    snippets = await retriever.retrieve(
        **{**ask(repo), "prefix": "reading = barometric_gauge_reading(city_name)\n"}
    )
    assert any("barometric_gauge_reading" in snippet.body for snippet in snippets), snippets


@pytest.mark.parametrize("kill", [False, True])
async def test_a_build_child_is_apart_from_keels_signals_and_a_kill_is_said(
    repo: Path, tmp_path: Path, kill: bool
) -> None:
    """A terminal's Ctrl-C reaches its foreground process group: the child, in keel's,
    printed a traceback, and its build was logged as failed while keel stopped. It has
    a group of its own (keel ends it itself). One killed says so, and what to do (it
    said "keel's log has what it printed", and nothing had been printed)."""
    retriever = three_hundred_files(repo, tmp_path)
    refresh = asyncio.create_task(retriever.refresh_forever())
    while not (seen := builders()):
        assert not refresh.done(), "the round ended with no child seen building"
        await asyncio.sleep(0.002)
    groups = {os.getpgid(pid) for pid in seen}
    lowered = set()  # and below keel's requests: the lowest priority, its autogroup's too
    for _ in range(2_500):  # at most ~5 s: a limit to a hang, not a timing bound
        with contextlib.suppress(OSError):
            lowered = {pid for pid in seen if niceness(pid) in (({19}, 19), ({19}, None))}
        if lowered == seen or refresh.done():
            break
        await asyncio.sleep(0.002)
    if kill:
        for pid in seen:
            os.kill(pid, signal.SIGKILL)
    await refresh
    assert os.getpgid(0) not in groups, groups
    assert lowered == seen, "the build ran at keel's priority"
    state = retriever.status()["weather"]
    if not kill:
        assert state["state"] == "ready" and state["files"] == 304, state
    else:
        assert state["state"] == "failed", state
        assert "killed by signal 9 (out of memory?)" in str(state["last_error"]), state
        assert "keel index weather" in str(state["last_error"]), state
