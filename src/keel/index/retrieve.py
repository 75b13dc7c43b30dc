"""Repository snippets for a completion: which repository, which query, which chunks.

A request belongs to a configured repository when its ``segments.git_url``
names the repository's remote (compared without scheme, user, ``.git`` and
case of the host) or its ``segments.filepath`` lies under the repository's
path. The query is made of the identifiers of the lines *before* the
cursor's line: they do not change while the user types on one line, so the
snippets, which go at the head of the prompt, stay the same and a local
model reuses its cached prompt (DESIGN.md, "Latency on a CPU"). Results are
cached per query until the index changes.

Chunks of the file being edited are excluded (the prefix already shows that
file), at most :data:`MAX_CHUNKS_PER_FILE` come from one file, and a chunk
must score at least ``min_score``; the prompt builder then keeps those that
fit the snippet budget, after the client's own snippets.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import posixpath
import subprocess
import threading
import time
from asyncio.subprocess import DEVNULL, PIPE
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from keel.config import IndexConfig, Paths, RepositoryConfig, normalize_git_url
from keel.errors import KeelError, Unavailable
from keel.index import child
from keel.index.store import Hit, Progress, RepositoryIndex, UpdateStats
from keel.index.tokens import query_terms
from keel.index.walk import is_directory, run_git, snippet_language
from keel.pipeline.languages import UNKNOWN, find_language
from keel.pipeline.prompt import Snippet

log = logging.getLogger("keel.index")

MAX_CHUNKS_PER_FILE = 2
QUERY_LINES = 24
"""Lines before the cursor's line whose identifiers make the query."""
QUERY_CHARS = 16_384
"""At most this much of them: the query of a 3.6 MB prefix took 1.4 s of CPU, and two
such requests held both search threads (a completion took 2.9 s instead of 0.3-0.5)."""
CACHE_SIZE = 512
SEARCH_DEPTH = 32
"""Hits fetched per search before the per-file limit and the threshold are applied."""
SEARCH_THREADS = 2
"""Searches at once, on threads of their own (:meth:`RepositoryRetriever.retrieve`)."""


LOOK_SECONDS = 1.0
"""How long whether a checkout is there is taken as known (:class:`Checkout`)."""
HUNG_SECONDS = 2.0
"""A look at a checkout unanswered this long: a hung mount, taken as not there."""


def _git(root: Path, *args: str) -> str:
    """What git says of the checkout at ``root`` ("" where it says nothing: no checkout,
    no git, a hung mount past the time limit), read whoever owns it: run as another
    user (the shipped unit's ``keel``), git refused it, and no request matched by its
    URL. Its config runs no program (:func:`~keel.index.walk.run_git`)."""
    try:
        result = run_git(root, *args, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.decode("utf-8", "replace") if result.returncode == 0 else ""


def _git_facts(root: Path) -> tuple[list[str], str]:
    """The URLs of every remote of the checkout at ``root`` (tabby-agent sends origin's,
    else upstream's, else the first's, and only origin's was read), and where ``root``
    is inside it (``svc_a/``; "" at its top): tabby-agent names a file from the top."""
    remotes = _git(root, "config", "--get-regexp", r"^remote\..*\.url$")
    urls = [line.split(None, 1)[1] for line in remotes.splitlines() if " " in line]
    prefix = _git(root, "rev-parse", "--show-prefix").strip() if urls else ""
    return urls, prefix


class Checkout:
    """Whether a repository's checkout is there, asked by every completion: looked at on
    a thread of its own, one look at a time. Looked at on the event loop, a dead mount
    (``ENOTCONN``) made every completion a 500, and a hung one (an NFS server that
    stopped answering) froze every route of the server; a look unanswered for
    :data:`HUNG_SECONDS` says "not there" until one answers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.there = True
        self._looked = -math.inf
        self._look: tuple[float, threading.Event] | None = None
        self._lock = threading.Lock()

    def seen(self, *, fresh: float = LOOK_SECONDS, wait: float = 0.0) -> bool:
        """As last seen within ``fresh`` seconds; else looked at anew (or the look under
        way joined), waiting at most ``wait`` seconds for it (without, as last seen)."""
        with self._lock:
            if self._look is None:
                if time.monotonic() - self._looked < fresh:
                    return self.there
                self._look = (time.monotonic(), threading.Event())
                threading.Thread(
                    target=self._run, args=(self._look[1],), name="keel-checkout", daemon=True
                ).start()
            started, done = self._look
        if done.wait(max(0.0, min(wait, started + HUNG_SECONDS - time.monotonic()))):
            return self.there
        return self.there and time.monotonic() - started < HUNG_SECONDS

    def look(self) -> None:
        """Blocking: look now."""
        there = is_directory(self.root)
        with self._lock:
            self.there, self._looked = there, time.monotonic()

    def _run(self, done: threading.Event) -> None:
        self.look()
        with self._lock:
            self._look = None
        done.set()


def _look_at_checkout(repo: RepositoryConfig) -> Checkout:
    """A checkout, first looked at. On a hung mount `keel serve` waited for it to start:
    a path not resolved in :data:`HUNG_SECONDS` is taken as written, and not there."""
    written = Path(repo.path or ".").expanduser().absolute()
    seen: list[Checkout] = []

    def look() -> None:
        checkout = Checkout(written.resolve())
        checkout.look()
        seen.append(checkout)

    looking = threading.Thread(target=look, name="keel-checkout", daemon=True)
    looking.start()
    looking.join(HUNG_SECONDS)
    if not seen:
        log.warning(
            "repository %r: %s did not answer in %.0f s (a hung mount?): requests are "
            "matched by its path as written and its git_url only",
            repo.name,
            written,
            HUNG_SECONDS,
        )
        checkout = Checkout(written)
        checkout.there = False
        return checkout
    return seen[0]


@dataclass(slots=True)
class Repository:
    """A configured repository with a local checkout and its index."""

    config: RepositoryConfig
    root: Path
    index: RepositoryIndex
    checkout: Checkout
    git_urls: frozenset[str] = frozenset()
    """Its configured ``git_url`` and its checkout's remotes', normalized."""
    prefix: str = ""
    """Where its root is inside its git checkout (``svc_a/``; "" at the top)."""

    @property
    def name(self) -> str:
        return self.config.name

    def read_git(self) -> None:
        """Read the checkout's remotes and place again (blocking): at the start, and each
        refresh, for a checkout cloned, or given a new remote, after keel started (its
        requests matched no repository until a restart)."""
        remotes, prefix = _git_facts(self.root) if self.checkout.there else ([], "")
        if not remotes and self.git_urls - {normalize_git_url(self.config.git_url or "")}:
            return  # git said nothing now (gone, a hung mount): what it said last stands
        urls = {normalize_git_url(u) for u in (self.config.git_url, *remotes) if u}
        self.git_urls, self.prefix = frozenset(urls), prefix


def _filepath(value: str) -> str:
    """A request's ``filepath``: a path, or a ``file://`` URI (tabby-agent sends the
    document's URI where it has no workspace), percent-decoded as URIs are."""
    if value.startswith("file://"):
        return unquote(value.removeprefix("file://"))
    return value


def cursor_query(prefix: str) -> list[str]:
    """Query terms from the :data:`QUERY_LINES` lines before the cursor's line (of its
    last :data:`QUERY_CHARS` characters)."""
    before = prefix[-QUERY_CHARS:].rpartition("\n")[0]
    lines = before.split("\n")[-QUERY_LINES:] if before else []
    return query_terms(lines)


def pick_hits(hits: Sequence[Hit], *, min_score: float, limit: int) -> list[Hit]:
    """Best hits first, at most :data:`MAX_CHUNKS_PER_FILE` per file, at or above ``min_score``."""
    per_file: dict[str, int] = {}
    picked: list[Hit] = []
    for hit in sorted(hits, key=lambda h: -h.score):
        if hit.score < min_score or len(picked) >= limit:
            break
        if per_file.get(hit.path, 0) >= MAX_CHUNKS_PER_FILE:
            continue
        per_file[hit.path] = per_file.get(hit.path, 0) + 1
        picked.append(hit)
    return picked


class _RefreshCancelled(Exception):
    pass


class RepositoryRetriever:
    """The configured repositories' indexes, searched for completions and kept fresh."""

    def __init__(self, repositories: Sequence[Repository], config: IndexConfig) -> None:
        self.repositories = list(repositories)
        self.config = config
        self._cache: OrderedDict[
            tuple[str, int, str | None, str | None, tuple[str, ...]], list[Snippet]
        ] = OrderedDict()
        """Search results by the index's state (its stamp) and the query."""
        self._cache_lock = threading.Lock()
        self.searches = ThreadPoolExecutor(
            max_workers=SEARCH_THREADS, thread_name_prefix="keel-retrieve"
        )
        """Where searches run (its threads start with the first search)."""
        self._stopping = threading.Event()
        self._children: set[asyncio.subprocess.Process] = set()
        """The processes building an index now (:meth:`_built_apart`)."""
        self._last_failure: str | None = None
        self.states: dict[str, dict[str, object]] = {
            repo.name: {"state": "waiting", "path": str(repo.root)} for repo in self.repositories
        }
        """Each repository's index as ``/v1/providers`` shows it (``refresh_forever``
        keeps it): waiting, indexing, ready, busy or failed, with the last update's
        figures."""
        self.on_state: Callable[[str, bool, int | None], None] | None = None
        """Told each refresh's outcome (repository, whether it worked, its chunks), and
        each change of whether its snippets can be served (``keel_index_up``)."""
        self._worked: dict[str, bool] = {}
        """Whether each repository's last refresh worked."""
        self._told: dict[str, bool] = {}
        """What :attr:`on_state` was last told of each: up or not."""
        self.busy_retry_seconds = 5.0
        """How soon an index another process was writing is updated again."""

    @classmethod
    def from_settings(
        cls, repositories: Sequence[RepositoryConfig], config: IndexConfig, paths: Paths
    ) -> RepositoryRetriever:
        built = []
        for repo in repositories:
            if repo.path is None:  # keel does not clone (config check and serve say so)
                continue
            checkout = _look_at_checkout(repo)
            root = checkout.root
            index = RepositoryIndex(
                repo.name,
                root,
                paths.index_dir / repo.directory_name,
                max_file_bytes=config.max_file_bytes,
            )
            built.append(Repository(repo, root, index, checkout))
            built[-1].read_git()
        return cls(built, config)

    def match(
        self, filepath: str | None, git_url: str | None
    ) -> tuple[Repository, str | None] | None:
        """The repository a request belongs to and the edited file's path inside it.

        Several repositories may be parts of one checkout (a monorepo's services), with
        one URL: tabby-agent names the file from the checkout's top (``svc_b/new.py``), so
        the part whose place begins it is the one (every request went to the first part,
        and the edited file, not found as ``app.py``, came back as a snippet of itself)."""
        path = _filepath(filepath) if filepath else None
        named = self.repositories
        if git_url:
            wanted = normalize_git_url(git_url)
            named = [repo for repo in self.repositories if wanted in repo.git_urls]
            if path is not None and not Path(path).is_absolute():
                within = posixpath.normpath(path.replace("\\", "/"))
                parts = [repo for repo in named if within.startswith(repo.prefix)]
                if parts:
                    repo = max(parts, key=lambda repo: len(repo.prefix))
                    return repo, within[len(repo.prefix) :]
        if path and Path(path).is_absolute():
            for repo in named:
                relative = self._relative(repo, path)
                if relative is not None and not relative.startswith("../"):
                    return repo, relative
        if git_url and named:
            return named[0], self._relative(named[0], path)
        return None

    @staticmethod
    def _relative(repo: Repository, path: str | None) -> str | None:
        if path is None:
            return None
        # normalized: the edited file named as "pkg/../pkg/app.py" was not the excluded
        # "pkg/app.py", and came back as a snippet of itself
        candidate = Path(os.path.normpath(path))
        if not candidate.is_absolute():
            return posixpath.normpath(path.replace("\\", "/"))
        for base in (repo.root, Path(repo.config.path or repo.root).expanduser()):
            try:
                return candidate.relative_to(base).as_posix()
            except ValueError:
                continue
        try:
            return candidate.resolve().relative_to(repo.root).as_posix()
        except (ValueError, OSError):
            return None

    def search(
        self, *, prefix: str, filepath: str | None, git_url: str | None, language: str | None
    ) -> list[Snippet]:
        """Blocking search; :meth:`retrieve` runs it off the event loop. ``language``: the
        request's language id, whose files' snippets alone are searched (any, when None)."""
        matched = self.match(filepath, git_url)
        if matched is None or self.config.max_snippets == 0:
            return []
        repo, relpath = matched
        family = None
        if language is not None:
            known = find_language(language)
            if known is None or known is UNKNOWN:
                return []  # no file of the index is in it
            family = snippet_language(known)
        terms = cursor_query(prefix)
        if not terms:
            return []
        if not repo.checkout.seen(fresh=0, wait=HUNG_SECONDS):
            # a checkout moved, deleted or unmounted: its snippets are of files no longer
            # there (they were served on, while every refresh failed)
            self._judge(repo)
            return []
        key = (repo.name, repo.index.stamp(), relpath, family, tuple(terms))
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        try:
            hits = repo.index.search(
                terms, exclude_path=relpath, language=family, limit=SEARCH_DEPTH
            )
        except ValueError:  # deleted or damaged under keel: said by _judge, as status
            hits = []
        self._judge(repo)
        picked = pick_hits(hits, min_score=self.config.min_score, limit=self.config.max_snippets)
        snippets = [Snippet(hit.path, hit.body, round(hit.score, 3)) for hit in picked]
        with self._cache_lock:
            self._cache[key] = snippets
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return snippets

    def status(self) -> dict[str, dict[str, object]]:
        """Each index's state for ``/v1/providers``, as retrieval finds it now: a
        checkout not there is ``missing`` (it said ``ready`` while its completions got
        no snippets), an index that cannot be read ``unavailable`` (``ready``, with
        ``keel_index_up`` 1, until the next refresh, up to 10 minutes)."""
        shown = dict(self.states)
        for repo in self.repositories:
            if (trouble := self._judge(repo)) is not None:
                state, why = trouble
                shown[repo.name] = {**self.states[repo.name], "state": state, "last_error": why}
        return shown

    def _trouble(self, repo: Repository) -> tuple[str, str] | None:
        """Why ``repo``'s snippets cannot be served now (a state and its reason), or None."""
        if not repo.checkout.seen():
            return "missing", (
                f"{repo.root} is not there (moved, deleted, unmounted?): "
                "its completions get no snippets until it is back"
            )
        if self.states[repo.name]["state"] == "ready" and (lost := repo.index.lost()):
            return "unavailable", (
                f"repository {repo.name!r}: its index in {repo.index.directory} cannot be "
                f"read ({lost}): its completions get no snippets until `keel index "
                f"{repo.name}` or the next refresh builds it again"
            )
        return None

    def _judge(self, repo: Repository) -> tuple[str, str] | None:
        """:meth:`_trouble`, told to :attr:`on_state` (and the log) when it changes
        whether the repository is up."""
        trouble = self._trouble(repo)
        if repo.name in self._worked:  # not before its first refresh's outcome
            up = trouble is None and self._worked[repo.name]
            if self._told.get(repo.name) != up:
                if trouble is not None:
                    log.warning("%s", trouble[1])
                self._tell(repo.name, up, None)
        return trouble

    def _tell(self, name: str, up: bool, chunks: int | None) -> None:
        self._told[name] = up
        if self.on_state is not None:
            self.on_state(name, up, chunks)

    def _judge_all(self) -> None:
        """Look at every checkout and index (blocking): between refreshes, so a gone one
        shows in ``/v1/providers`` and ``keel_index_up`` with no request to find it."""
        for repo in self.repositories:
            repo.checkout.seen(wait=HUNG_SECONDS)
            self._judge(repo)

    def state(self) -> tuple[object, ...]:
        """The indexes' states, whether each failed (not each refresh's passing
        "indexing", which would choose afresh mid-line) and whether each checkout is
        there: a choice of snippets made in another is stale (the empty choice made while
        a checkout was gone stuck to its line once the checkout was back)."""
        return tuple(
            (
                repo.index.stamp(),
                self.states[repo.name]["state"] == "failed",
                repo.checkout.seen(),
            )
            for repo in self.repositories
        )

    async def retrieve(
        self, *, prefix: str, filepath: str | None, git_url: str | None, language: str | None
    ) -> list[Snippet]:
        if not self.repositories:
            return []
        search = functools.partial(
            self.search, prefix=prefix, filepath=filepath, git_url=git_url, language=language
        )
        try:
            # Threads of its own: on the loop's shared executor it queued behind whatever
            # blocked there (reads of a frozen events database held all 6 threads of a
            # 2-core machine, and completions with repository context took 13 s).
            return await asyncio.get_running_loop().run_in_executor(self.searches, search)
        except Exception as exc:  # noqa: BLE001 - a damaged index costs its snippets only
            # As Tabby's collect_snippets: an index deleted or damaged under keel made
            # every completion of its repository a 500 until a restart. The refresh
            # rebuilds it.
            message = f"repository context unavailable: {exc}"
            if message != self._last_failure:
                log.warning("%s; completions go on without it", message)
                self._last_failure = message
            return []

    def update(
        self, name: str | None = None, progress: Progress | None = None
    ) -> dict[str, UpdateStats]:
        """Update the indexes (or the one named ``name``); blocking, for a thread or the CLI."""
        results: dict[str, UpdateStats] = {}
        for repo in self.repositories:
            if name is not None and repo.name != name:
                continue

            def checked(done: int, total: int, relpath: str) -> None:
                if self._stopping.is_set():
                    raise _RefreshCancelled
                if progress is not None:
                    progress(done, total, relpath)

            results[repo.name] = repo.index.update(checked)
            if results[repo.name].changed:
                with self._cache_lock:
                    self._cache.clear()
        return results

    async def _built_apart(self, repo: Repository, progress: Progress) -> UpdateStats:
        """``repo``'s index brought up to date by a process of its own
        (:mod:`keel.index.child`: a thread of this one held Python's lock against every
        request), then read here. Its output ended, it is waited for; cancelled (keel
        stopping), it is killed, committing nothing."""
        # In a session and process group of its own: a terminal's Ctrl-C, or a signal
        # sent to keel's group, reached it too; it printed a traceback, and its build was
        # logged as failed while keel stopped (keel ends it itself: a kill, which commits
        # nothing).
        process = await asyncio.create_subprocess_exec(
            *child.command(repo.index),
            stdin=DEVNULL,
            stdout=PIPE,
            stderr=None,
            start_new_session=True,
        )
        self._children.add(process)
        said: dict[str, Any] = {}
        try:
            assert process.stdout is not None
            async for line in process.stdout:
                said = json.loads(line)
                if "done" in said:
                    progress(said["done"], said["total"], "")
            await process.wait()
        finally:
            self._children.discard(process)
            if process.returncode is None:
                process.kill()
                await process.wait()
        if self._stopping.is_set():
            raise _RefreshCancelled
        if "error" in said:
            raise Unavailable(said["error"], code=said.get("code") or "index_failed")
        if "stats" not in said:
            code = process.returncode or 0
            how = (
                f"was killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
                if code < 0
                else f"ended with exit status {code} (keel's log has what it printed)"
            )
            raise Unavailable(
                f"indexing {repo.name!r} {how}; it is tried again at the next refresh, or "
                f"now with `keel index {repo.name}`",
                code="index_failed",
            )
        stats = UpdateStats(**said["stats"])
        repo.index.reload()
        if stats.changed:
            with self._cache_lock:
                self._cache.clear()
        return stats

    def reload(self) -> None:
        """Pick up what another process (``keel index``) committed."""
        for repo in self.repositories:
            repo.index.reload()
        with self._cache_lock:
            self._cache.clear()

    async def refresh_forever(self) -> None:
        """Update every index now and then every ``refresh_seconds``, in a thread.

        Failures are logged and retried at the next round: a repository that
        cannot be indexed must not stop completions.
        """
        while self.repositories:
            busy = False
            for repo in self.repositories:
                state = self.states[repo.name]
                if state["state"] == "waiting":
                    log.info("indexing repository %r (%s)", repo.name, repo.root)
                state.update(state="indexing", started_at=time.time(), done=0, total=None)

                def progress(
                    done: int, total: int, relpath: str, state: dict[str, object] = state
                ) -> None:
                    state.update(done=done, total=total)  # a first build's progress

                try:
                    await asyncio.to_thread(repo.checkout.look)
                    await asyncio.to_thread(repo.read_git)
                    stats = await self._built_apart(repo, progress)
                except _RefreshCancelled:
                    return
                except Exception as exc:  # noqa: BLE001 - reported and retried next round
                    message = exc.message if isinstance(exc, KeelError) else str(exc)
                    if isinstance(exc, KeelError) and exc.code == "index_busy":
                        # `keel index` writes it: its commit is searched as it lands; not
                        # "failed" (with keel_index_up 0) for the 10 minutes to the next
                        # round, but tried again soon
                        state.update(state="busy", last_error=message, at=time.time())
                        busy = True
                        continue
                    log.warning("indexing repository %r failed: %s", repo.name, exc)
                    state.update(state="failed", last_error=message, at=time.time())
                    self._worked[repo.name] = False
                    self._tell(repo.name, False, None)
                    continue
                finally:
                    for key in ("started_at", "done", "total"):
                        state.pop(key, None)
                state.update(
                    state="ready",
                    last_error=None,
                    at=time.time(),
                    files=stats.files,
                    chunks=stats.chunks,
                    seconds=round(stats.seconds, 2),
                )
                self._worked[repo.name] = True
                self._tell(repo.name, True, stats.chunks)
                if stats.changed:
                    log.info(
                        "index %s: %d files, %d chunks; %d re-indexed, %d removed in %.1fs",
                        repo.name,
                        stats.files,
                        stats.chunks,
                        len(stats.reindexed),
                        len(stats.removed),
                        stats.seconds,
                    )
            if busy:
                await asyncio.sleep(self.busy_retry_seconds)
                continue
            if self.config.refresh_seconds <= 0:
                return
            await self._watch(self.config.refresh_seconds)

    async def _watch(self, seconds: float) -> None:
        """Wait ``seconds``, judging every checkout and index each :data:`LOOK_SECONDS`:
        an index deleted under keel, or a checkout moved, said ``ready`` (and
        ``keel_index_up`` 1) until the next refresh, up to 10 minutes later."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(LOOK_SECONDS, left))
            await asyncio.to_thread(self._judge_all)

    def stop(self) -> None:
        """Make a running update give up at its next file (a child building one is
        killed: either commits nothing), and let the search threads end once their
        search does."""
        self._stopping.set()
        for process in self._children:
            if process.returncode is None:
                process.kill()
        self.searches.shutdown(wait=False, cancel_futures=True)
