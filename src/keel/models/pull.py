"""Download a model into ``<root>/models``: ``keel models pull`` and ``POST /v1/model/download``.

What can be pulled (a *spec*)::

    org/repo:file.gguf          one GGUF file of a Hugging Face repo
    org/repo  (+ quant Q8_0)    the repo's one GGUF file whose name holds the quant
    org/repo                    the repo's only GGUF file
    TabbyML/StarCoder-1B        a Tabby registry name (``tabby_registry``)

The hub is asked through ``huggingface_hub`` (``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``, the file's HEAD), the bytes by keel's own transfer
(:meth:`ModelPuller._download`: it resumes from the bytes on disk after a cut, a stall,
a transient hub error or an expired download link, and checks the size) into a staging
directory on the model directory's own file system (``<models>/.downloads``,
which listings skip). keel then checks the sha256 (the hub's LFS oid, or the
registry's) and the GGUF magic, and only then renames the file into place: a
cut, refused or corrupt download leaves nothing loadable, and the staging
directory goes whatever happens, but for a pull killed outright (``kill -9``, a machine
that went down), whose directory the next pull removes: a pull holds a lock on its own
while it runs (:func:`staging_for`), so that one that died is told from one under way
(they stayed for good; a download resumes within its pull, never one
a dead process left). Where each file came from (repo, file, sha256)
is written beside it in ``<models>/.pulled/<file>.json``: a pull replaces a file
only when keel pulled it from the same repo and file (an update of that model, with
a warning that a worker running it keeps the old one until it is loaded again); a
file from another repo, another folder of the repo, or put there by hand is never
replaced: the pull is refused (409) naming it. Before a byte is fetched, the file plus
``min_free_bytes`` must fit on the disk, and a model whose estimated need
(:func:`keel.models.manager.estimate_memory`) exceeds the memory available
now, next to what is loaded, is warned about.

The hub's errors become keel's in one place, :func:`_hub_errors`::

    huggingface_hub                          keel
    HfHubHTTPError 401 / 403 (private, gated) UpstreamAuthError  ("set HF_TOKEN")
    a 403 of the download link mid-transfer   UpstreamAuthError  ("pull again")
    RepositoryNotFoundError, Revision..., 404 NotFound
    RemoteEntryNotFoundError                  NotFound           (lists the GGUF files)
    other HfHubHTTPError                      UpstreamStatusError (the hub's status)
    OfflineModeIsEnabled                      Unavailable        (hub_offline)
    a timeout before any byte                 UpstreamTimeout    ("did not answer")
    a timeout after some bytes                UpstreamTimeout    ("stopped sending after N")
    httpx2 connection errors                  UpstreamConnectError ("cannot reach")
    another OSError during the transfer       UpstreamProtocolError

(after the download's own tries again, :meth:`ModelPuller._retry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from keel.config import EMBEDDED_MODEL_ID, LocalModelConfig, Paths, url_trouble
from keel.errors import (
    BadEnvironment,
    ClientDisconnected,
    Conflict,
    DataRootUnusable,
    InsufficientStorage,
    MissingDependency,
    NotFound,
    RateLimited,
    RequestError,
    Unavailable,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from keel.models import gguf
from keel.models.manager import estimate_memory, mem_available
from keel.models.tabby_registry import RegistryModel, lookup

log = logging.getLogger("keel.models")

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_MIN_FREE_BYTES = 512 * 2**20
"""Disk space a pull leaves free beyond the file itself."""
HUB_TIMEOUT = 10.0
"""Seconds the hub may take to answer a request (huggingface_hub's own for a download's
reads): a hub that takes the connection and says nothing is an error, not a hang."""
STAGING_DIR = ".downloads"
RETRIES = 4
"""Tries of a download again, in a row without a byte gained, after a transient failure."""
TRANSIENT = (500, 502, 503, 504)
"""The hub's statuses worth another try (with backoff: 1, 2, 4, 8 s)."""
RETRY_AFTER_CAP = 30.0
"""The longest Retry-After a download waits for; a longer one fails the pull, saying it."""
STAGING_LOCK = ".lock"
"""Held (``flock``) by the pull that downloads into a staging directory, for its life."""


def _hub_logs_through_keels() -> None:
    """huggingface_hub gives its logger a handler of its own, writing plain text to
    stderr: a cut download's "Trying to resume download..." came twice in keel's text
    logs, and broke `--log-format json`'s one JSON object a line. Its records go
    through keel's handler alone."""
    import huggingface_hub.utils.logging  # noqa: F401 - importing it adds the handler

    logging.getLogger("huggingface_hub").handlers.clear()


def _damaged(path: Path) -> bool:
    """Whether ``path`` is no usable GGUF file (a bad header, cut short)."""
    try:
        gguf.read_metadata(path)
    except MissingDependency:
        return True
    return False


def models_dir_trouble(models: Path, place: Path | None = None) -> str | None:
    """Why no directory can be at ``place`` (``models``, or one in it): it, or a part of
    its path, is something else (a file, a link to nothing); or None. Changes nothing
    (for ``keel doctor``)."""
    place = place or models
    for part in (place, *place.parents):
        try:
            if part.is_dir():
                return None
            there = part.exists() or part.is_symlink()
        except OSError:  # a root keel cannot enter: the data root's check says so
            return None
        if there:
            what = "the models directory " if part == models else ""
            into = "" if part == models else f", so no model can be pulled into {models}"
            return (
                f"{what}{part} is not a directory{into}: move it away (keel makes the "
                "directory), or set KEEL_ROOT to a directory"
            )
    return None


def models_dir_error(models: Path, exc: OSError) -> DataRootUnusable:
    """What a pull says of a models directory it cannot write into (``exc``): it was a
    traceback (exit 1), and the API's 500 internal_error, with no audit entry."""
    fix = "make it writable, or set KEEL_ROOT to a writable directory"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        place = Path(exc.filename) if exc.filename else None
        said = models_dir_trouble(models, place) or f"{models}: {exc.strerror}: {fix}"
    elif exc.errno == errno.EROFS:
        said = f"the models directory {models} is read-only: {fix}"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        said = f"keel's user (uid {os.geteuid()}) cannot write the models directory {models}: {fix}"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        said = f"the disk of the models directory {models} is full: free some space there"
    else:
        said = f"the models directory {models} cannot be written ({exc.strerror or exc}): {fix}"
    return DataRootUnusable(f"{said} (nothing was downloaded)")


def check_models_dir(models: Path) -> None:
    """Make ``models`` and its staging directory, and a trial directory in it, or raise
    :func:`models_dir_error`: a read-only one was found only as the download began (a
    traceback), and a small one was said to lack disk space."""
    staging_root = models / STAGING_DIR
    try:
        staging_root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix="check-", dir=staging_root))
    except OSError as exc:
        raise models_dir_error(models, exc) from None


def staging_for(root: Path, file: HubFile) -> tuple[Path, int]:
    """A new staging directory for ``file`` in ``root`` (``<models>/.downloads``), and
    the descriptor of its lock, held for the pull's life (:func:`abandoned_pulls` tells
    it from one a dead pull left)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="pull-", dir=root))
    except OSError as exc:
        raise models_dir_error(root.parent, exc) from None
    held = _lock(path)
    assert held is not None, "a new directory's lock is free"
    (path / ".pull.json").write_text(json.dumps({"repo": file.repo, "file": file.filename}))
    return path, held


def _lock(path: Path) -> int | None:
    """The lock of the staging directory ``path``, taken (its descriptor), or None where
    a running pull holds it."""
    held = os.open(path / STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(held)
        return None
    return held


def abandoned_pulls(root: Path) -> list[tuple[Path, str]]:
    """Staging directories no running pull holds (a pull killed outright left them), with
    what each was downloading (``repo:file``, or "" where it does not say)."""
    found = []
    for path in sorted(root.glob("pull-*")) if root.is_dir() else []:
        try:
            held = _lock(path)
        except OSError:
            continue
        if held is None:
            continue  # a pull under way
        os.close(held)
        try:
            said = json.loads((path / ".pull.json").read_text())
            what = f"{said['repo']}:{said['file']}"
        except (OSError, ValueError, KeyError, TypeError):
            what = ""
        found.append((path, what))
    return found


SOURCES_DIR = ".pulled"
"""Where a pulled file's source is recorded: ``<models>/.pulled/<file>.json``."""

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class HubFile:
    repo: str
    filename: str
    size: int | None
    sha256: str | None
    """The LFS oid the hub gives (or the registry's), checked after the download."""
    listed_sha256: str | None = None
    """The hub's own LFS oid, where ``sha256`` is a registry's."""


@dataclass(frozen=True, slots=True)
class PullPlan:
    file: HubFile
    target: PurePosixPath
    """Where it lands, relative to the model directory."""

    @property
    def name(self) -> str:
        """The model id to load it by."""
        return self.target.with_suffix("").as_posix()

    @property
    def source(self) -> str:
        return f"{self.file.repo}:{self.file.filename}"


@dataclass(frozen=True, slots=True)
class PulledModel:
    name: str
    path: Path
    size_bytes: int
    sha256: str
    already_present: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "model_name": self.name,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "already_present": self.already_present,
        }


@dataclass(frozen=True, slots=True)
class PullProgress:
    status: str  # resolving | warning | downloading | verifying | ready
    message: str
    downloaded: int | None = None
    total: int | None = None
    result: PulledModel | None = None
    """Set on the last step, ``ready``."""

    def to_dict(self, spec: str) -> dict[str, object]:
        data: dict[str, object] = {"model": spec, "status": self.status, "message": self.message}
        if self.downloaded is not None:
            data["downloaded_bytes"] = self.downloaded
            data["total_bytes"] = self.total
        if self.result is not None:
            data |= self.result.to_dict()
        return data


Report = Callable[[PullProgress], None]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def parse_spec(
    spec: str, quant: str | None, registry: dict[str, RegistryModel] | None = None
) -> tuple[str, str | None, RegistryModel | None]:
    """``(repo, file or None, registry entry or None)``; RequestError on a bad spec."""
    spec = spec.strip()
    entry = lookup(spec, registry) if ":" not in spec else None
    if entry is not None:
        if quant is not None:
            raise RequestError(
                f"{spec} is a Tabby registry model with one file ({entry.filename}); "
                "quant applies to a Hugging Face repo: leave it out",
                param="quant",
            )
        return entry.repo, entry.filename, entry
    repo, _, filename = spec.partition(":")
    if not _REPO.match(repo) or ".." in repo:
        raise RequestError(
            f"cannot pull {spec!r}: give a Hugging Face repo and file (org/repo:file.gguf), "
            "a repo and a quant (org/repo with quant Q8_0), or a Tabby registry name "
            "(TabbyML/StarCoder-1B)",
            param="model",
        )
    if filename and quant is not None:
        raise RequestError(
            f"give a file ({filename}) or a quant ({quant}), not both", param="quant"
        )
    if filename and not filename.lower().endswith(".gguf"):
        raise RequestError(
            f"{filename!r} is not a .gguf file: keel loads GGUF models; name a .gguf file "
            "of the repo",
            param="model",
        )
    return repo, filename or None, None


def _normalise(text: str) -> str:
    return re.sub(r"[-_.]", "", text.lower())


def _whole_quant(quant: str) -> re.Pattern[str]:
    """``quant`` as a whole part of a file name: not followed by more of a quant's name
    (``_L``, ``_4_4``) nor preceded by a letter or digit (``BF16``), separators as any."""
    parts = [re.escape(part) for part in re.split(r"[-_.]", quant) if part]
    return re.compile(rf"(?<![a-z0-9]){'[-_.]'.join(parts)}(?![a-z0-9_])", re.IGNORECASE)


def choose_file(
    files: list[HubFile], repo: str, filename: str | None, quant: str | None
) -> HubFile:
    """The file to pull among a repo's GGUF files; NotFound lists them."""
    names = ", ".join(file.filename for file in files) or "none"
    if filename is not None:
        chosen = [file for file in files if file.filename == filename]
        if not chosen:
            raise NotFound(
                f"{repo} has no file {filename!r}; its GGUF files: {names}", param="model"
            )
    elif quant is not None:
        chosen = _quant_files(files, repo, quant, names)
    else:
        chosen = [file for file in files if _first_part(file)]
        if not chosen:
            raise NotFound(f"{repo}: no GGUF file to pull; it has none", param="model")
        if len(chosen) > 1:  # the spec is the client's to complete: a 400, as a bad spec
            raise RequestError(
                f"{repo} has several GGUF files: choose one with a quant or repo:file: {names}",
                param="quant",
            )
    file = chosen[0]
    split = _SPLIT.search(file.filename)
    if split and split.group(2) != "00001":
        raise RequestError(
            f"{file.filename} is one part of a model split into {int(split.group(2))} files; "
            "keel loads single-file models: choose another quant"
        )
    return file


def _quant_files(files: list[HubFile], repo: str, quant: str, names: str) -> list[HubFile]:
    """The files whose name holds ``quant`` whole (Q6_K is in Q6_K_L's name too, F16 in
    BF16's: neither is taken for it); NotFound or RequestError unless there is one."""
    chosen = [file for file in files if _first_part(file)]
    whole = [file for file in chosen if _whole_quant(quant).search(file.filename)]
    if len(whole) == 1:
        return whole
    within = whole or [file for file in chosen if _normalise(quant) in _normalise(file.filename)]
    if len(within) > 1:
        which = ", ".join(file.filename for file in within)
        raise RequestError(
            f"quant {quant!r} matches several files of {repo}: {which}; name the file "
            f"instead: {repo}:{within[0].filename}",
            param="quant",
        )
    part = f"; it is only part of {within[0].filename}'s quant" if within else ""
    raise NotFound(
        f"{repo} has no GGUF file for quant {quant!r}{part}; its GGUF files: {names}: give "
        "the quant as a file names it, or the file (repo:file)",
        param="quant",
    )


def _same_source(recorded: str | None, source: str) -> bool:
    """Whether ``recorded`` (``repo:file``) is ``source``: the hub finds a repo id in any
    case, a file by its exact name."""
    if recorded is None:
        return False
    repo, _, filename = recorded.partition(":")
    other, _, other_filename = source.partition(":")
    return repo.lower() == other.lower() and filename == other_filename


def _first_part(file: HubFile) -> bool:
    split = _SPLIT.search(file.filename)
    return split is None or split.group(1) == "00001"


class ModelPuller:
    """Pulls models into ``paths.models_dir``; one instance per pull or per process.

    ``endpoint`` and ``token`` default to ``HF_ENDPOINT`` and ``HF_TOKEN`` read when
    the puller is made (huggingface_hub reads them only when it is imported).
    ``free_bytes`` and ``available_memory`` say how much disk and memory there is;
    ``local`` gives the context size and slots a load will use.
    """

    def __init__(
        self,
        paths: Paths,
        *,
        local: LocalModelConfig | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        environ: dict[str, str] | None = None,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        free_bytes: Callable[[Path], int] = disk_free,
        available_memory: Callable[[], int | None] = mem_available,
        registry: dict[str, RegistryModel] | None = None,
        hub_timeout: float = HUB_TIMEOUT,
    ) -> None:
        env = dict(os.environ) if environ is None else environ
        self.paths = paths
        self.local = local or LocalModelConfig()
        self.endpoint = (endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        _check_endpoint(self.endpoint)
        # cleaned as huggingface_hub cleans it (utils/_auth.py): a token file's newline made
        # every pull fail with "Illegal header value", filed under "cannot reach"
        given = token or env.get("HF_TOKEN") or ""
        self.token = given.replace("\r", "").replace("\n", "").strip() or None
        if self.token is not None and not all(" " <= char <= "~" for char in self.token):
            # It cannot go in a header: every pull ended in a UnicodeEncodeError traceback.
            raise BadEnvironment(
                "HF_TOKEN holds characters a token cannot have (outside printable ASCII: "
                "smart quotes pasted with it, or a tab?): set it to the token alone, as the "
                "hub shows it (hf_...)"
            )
        self.offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        self.min_free_bytes = min_free_bytes
        self.free_bytes = free_bytes
        self.available_memory = available_memory
        self.registry = registry
        self.hub_timeout = hub_timeout
        self._digests: dict[tuple[str, int, int, int], str] = {}

    @property
    def hub(self) -> str:
        return urlsplit(self.endpoint).netloc or self.endpoint

    def plan(self, spec: str, quant: str | None = None) -> PullPlan:
        """What ``spec`` names and where it would land; asks the hub for the repo's files."""
        repo, filename, entry = parse_spec(spec, quant, self.registry)
        if self.offline:
            raise Unavailable(
                "HF_HUB_OFFLINE is set: pulling needs the hub; unset it to download "
                f"(models already in {self.paths.models_dir} load without it)",
                code="hub_offline",
            )
        files = self._gguf_files(repo)
        file = choose_file(files, repo, filename, quant)
        if entry is not None:
            file = HubFile(file.repo, file.filename, file.size, entry.sha256, file.sha256)
            return PullPlan(file, PurePosixPath(f"{entry.model_id}.gguf"))
        # as ".gguf" whatever the hub's case: "X.GGUF" was loaded by no name keel gave
        # (a load looks for "<name>.gguf") and listed nowhere
        stem = PurePosixPath(file.filename).name[: -len(".gguf")]
        return PullPlan(file, PurePosixPath(f"{stem}.gguf"))

    def preflight(self, spec: str, quant: str | None = None) -> PullPlan:
        """What :meth:`pull` refuses before fetching a byte: a bad spec, offline mode, a
        repo or file that does not exist, a hub that refuses us, a full disk."""
        plan = self.plan(spec, quant)
        if self._existing(plan, self.paths.models_dir / plan.target) != "same":
            self._check_disk(plan)
        return plan

    def pull(
        self,
        spec: str,
        *,
        quant: str | None = None,
        report: Report | None = None,
        show_bar: bool = False,
        cancelled: threading.Event | None = None,
        staged: list[Path] | None = None,
    ) -> PulledModel:
        """Pull ``spec`` and return where it landed; raises a KeelError on any failure,
        leaving no file behind. Blocking: the API runs it in a thread. The staging
        directory is added to ``staged`` as it is made: for a caller that must remove
        it itself if the process may end before this thread sees ``cancelled``."""
        emit = _Emitter(report, log_downloading=not show_bar)
        _hub_logs_through_keels()
        parse_spec(spec, quant, self.registry)  # a malformed spec is refused before a word
        emit(PullProgress("resolving", f"looking up {spec} on {self.hub}"))
        plan = self.plan(spec, quant)
        file = plan.file
        dest = self.paths.models_dir / plan.target
        # The embedded model's name loads the embedded model: a file pulled under it loads
        # by its path (told to load it by the name, a user got the embedded model)
        name = str(dest) if plan.name == EMBEDDED_MODEL_ID else plan.name
        existing = self._existing(plan, dest)
        if existing == "same":
            pulled = PulledModel(
                name, dest, dest.stat().st_size, self._digest(dest), already_present=True
            )
            emit(PullProgress("ready", f"{name} is already in {dest}", result=pulled))
            return pulled
        if existing == "repair":
            emit(
                PullProgress(
                    "warning",
                    f"{dest}, pulled from {plan.source}, is damaged: replacing it with the "
                    "hub's file",
                )
            )
        if existing == "update":
            emit(
                PullProgress(
                    "warning",
                    f"{dest} came from {plan.source}, whose file has changed on {self.hub}: "
                    f"replacing it with the new one; a worker running {plan.name} now keeps "
                    f"the old file until {plan.name} is loaded again",
                )
            )
        self._check_disk(plan)
        self._check_memory(plan, emit)
        staging_root = self.paths.models_dir / STAGING_DIR
        for left, what in abandoned_pulls(staging_root):
            shutil.rmtree(left, ignore_errors=True)
            log.info("removed %s, left by a pull that was killed (%s)", left, what or "unnamed")
        staging, held = staging_for(staging_root, file)
        if staged is not None:
            staged.append(staging)
        try:
            size = f" ({_mib(file.size)})" if file.size else ""
            emit(PullProgress("downloading", f"downloading {file.repo}:{file.filename}{size}"))
            blob = self._download(file, staging, emit, show_bar, cancelled)
            emit(PullProgress("verifying", f"checking the sha256 of {file.filename}"))
            digest = self._verify(file, blob)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self._placing():
                # Looked at again: another pull (a process of its own) may have put a file
                # of that name there meanwhile, of another repo, which was replaced and its
                # client told to load what was gone.
                if self._existing(plan, dest) == "same":
                    pulled = PulledModel(
                        name, dest, dest.stat().st_size, digest, already_present=True
                    )
                    emit(PullProgress("ready", f"{name} is in {dest}", result=pulled))
                    return pulled
                os.replace(blob, dest)
                self._record_source(plan, dest, digest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(held)
        pulled = PulledModel(name, dest, dest.stat().st_size, digest)
        emit(PullProgress("ready", f"{plan.name} is in {dest}; load it as {name}", result=pulled))
        return pulled

    async def stream(self, spec: str, *, quant: str | None = None) -> AsyncIterator[PullProgress]:
        """:meth:`pull` in a thread, its steps as they come; the last is ``ready`` (with
        the result) or the pull's KeelError is raised. Closing the iterator early (the
        client went away) stops the transfer at its next chunk.

        keel asked to stop (SIGTERM, Ctrl-C) ends the pull at once with Unavailable
        (:data:`~keel.serving.streaming.STOPPING`) and removes its staging directory
        here: the thread would only see it at its next chunk (or a stalled hub's read
        timeout), and the server ends its process by the signal once it has stopped,
        threads and all (uvicorn raises the signal again), which left the partial file
        in ``.downloads``."""
        from keel.ops.server import on_stop  # the server's; `keel models pull` has its own
        from keel.serving.streaming import STOPPING

        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[PullProgress | None] = asyncio.Queue()
        cancelled = threading.Event()
        staged: list[Path] = []
        stopping = False

        def report(step: PullProgress) -> None:
            loop.call_soon_threadsafe(steps.put_nowait, step)

        def stop() -> None:
            nonlocal stopping
            stopping = True
            cancelled.set()
            steps.put_nowait(None)

        work = asyncio.ensure_future(
            asyncio.to_thread(
                self.pull, spec, quant=quant, report=report, cancelled=cancelled, staged=staged
            )
        )
        work.add_done_callback(lambda _: steps.put_nowait(None))
        try:
            with on_stop(stop):
                while (step := await steps.get()) is not None:
                    yield step
            finished = work.done() and not work.cancelled() and work.exception() is None
            if stopping and not finished:
                raise Unavailable(
                    f"{STOPPING} (it was asked to shut down): the download of {spec} was "
                    "stopped and nothing of it kept; pull it again once keel is back"
                )
            work.result()
        finally:
            cancelled.set()
            if not work.done():  # its own cleanup may come too late: the staging goes now
                for staging in staged:
                    shutil.rmtree(staging, ignore_errors=True)
            work.add_done_callback(lambda done: done.cancelled() or done.exception())

    # the steps ------------------------------------------------------------------

    def _gguf_files(self, repo: str) -> list[HubFile]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        with self._hub_errors(repo):
            info = api.model_info(repo, files_metadata=True, timeout=self.hub_timeout)
        # the hub's spelling of the id, which it finds in any case (acme/TINY-gguf is
        # acme/tiny-GGUF): recorded as such, a pull by the other was "another model"
        repo = info.id if isinstance(info.id, str) and info.id.lower() == repo.lower() else repo
        files = []
        for sibling in info.siblings or []:
            if sibling.rfilename.lower().endswith(".gguf"):
                lfs = sibling.lfs
                size = lfs.size if lfs is not None else sibling.size
                files.append(
                    HubFile(repo, sibling.rfilename, size, lfs.sha256 if lfs is not None else None)
                )
        return files

    def _rate_limited(self, where: str, response: Any) -> RateLimited:
        """The hub's 429: when to pull again, and what raises its limit."""
        said = response.headers.get("Retry-After", "") if response is not None else ""
        after = float(said) if said.strip().isdigit() else None
        when = f"in {after:g} s" if after is not None else "later"
        token = "" if self.token else "; a token (HF_TOKEN) raises the hub's limits"
        return RateLimited(
            f"the hub is limiting requests ({where}: 429): pull again {when}{token}",
            retry_after=after,
        )

    @contextlib.contextmanager
    def _placing(self) -> Iterator[None]:
        """Held while a pulled file is checked against what is there and put in place:
        one pull at a time, across processes (the server's and `keel models pull`)."""
        lock = self.paths.models_dir / SOURCES_DIR / ".place.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            yield

    def _existing(self, plan: PullPlan, dest: Path) -> str | None:
        """What is at ``dest`` already: None (nothing), ``"same"`` (the hub's file),
        ``"update"`` (an older version keel pulled from the same repo and file),
        ``"repair"`` (a file keel pulled from them that is no usable GGUF file now: cut
        short, overwritten; `keel doctor` said to pull it again, and the pull refused it
        as one put there by hand). Anything else, a file of another repo or folder or one
        put there by hand, is never replaced: Conflict, naming it."""
        if not dest.is_file():
            return None
        source = self._recorded_source(dest)
        file = plan.file
        if file.sha256:
            same = self._digest(dest) == file.sha256.lower()
        else:
            same = dest.stat().st_size == file.size
        if same:
            if source is None:  # the same bytes: keel's now, as if it had pulled them
                self._record_source(plan, dest, self._digest(dest))
            return "same"
        if _same_source(source, plan.source):
            return "update"
        recorded = self._recorded_source(dest, any_digest=True)
        if _same_source(recorded, plan.source) and _damaged(dest):
            return "repair"
        # Without a record it may be this very file, pulled by a keel from before
        # 2026-12-04, which kept none: "another model" was untrue for those.
        what = (
            f"is another model than {plan.source} (keel pulled it from {source})"
            if source is not None
            else f"is not {plan.source}'s file as the hub has it now, and keel has no record "
            "of pulling it (put there by hand, or pulled by a keel from before 2026-12-04: "
            "then an older version of it)"
        )
        raise Conflict(
            f"{dest} is already there and {what}; "
            f"keel does not replace it, since a worker may be running it: to keep both, "
            f"rename it (e.g. mv {dest} {dest.with_stem(dest.stem + '-old')}) and pull "
            "again; to replace it, remove it and pull again",
            code="model_exists",
            param="model",
        )

    def _digest(self, path: Path) -> str:
        """The sha256 of ``path``, once per version of the file (a preflight and the pull
        that follows read a multi-GB file once)."""
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = _sha256(path)
        return self._digests[key]

    def _source_record(self, dest: Path) -> Path:
        relative = dest.relative_to(self.paths.models_dir)
        return self.paths.models_dir / SOURCES_DIR / f"{relative.as_posix()}.json"

    def _recorded_source(self, dest: Path, *, any_digest: bool = False) -> str | None:
        """``repo:file`` keel pulled ``dest`` from, or None: no record, or one of
        another file (the record outlived a file removed and put back by hand), unless
        ``any_digest``."""
        try:
            record = json.loads(self._source_record(dest).read_text(encoding="utf-8"))
            if not any_digest and record["sha256"] != self._digest(dest):
                return None
            return f"{record['repo']}:{record['filename']}"
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _record_source(self, plan: PullPlan, dest: Path, digest: str) -> None:
        record = self._source_record(dest)
        data = {
            "repo": plan.file.repo,
            "filename": plan.file.filename,
            "sha256": digest,
            "endpoint": self.endpoint,
        }
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            staged = record.with_name(f".{record.name}.{os.getpid()}.tmp")
            staged.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            os.replace(staged, record)
        except OSError as exc:  # the model is in place; only a later pull's check is weaker
            log.warning("could not record where %s came from (%s): %s", dest, record, exc)

    def _check_disk(self, plan: PullPlan) -> None:
        check_models_dir(self.paths.models_dir)  # read-only first: it has little space too
        size = plan.file.size
        if size is None:
            return
        free = self.free_bytes(self.paths.models_dir)
        if size + self.min_free_bytes > free:
            raise InsufficientStorage(
                f"not enough disk space to pull {plan.file.filename}: it is {_mib(size)}, "
                f"keel keeps {_mib(self.min_free_bytes)} free (`keel models pull "
                f"--min-free-mib` sets how much), and {self.paths.models_dir} has "
                f"{_mib(free)} free; free some space (nothing was downloaded)"
            )

    def _check_memory(self, plan: PullPlan, emit: _Emitter) -> None:
        size = plan.file.size
        available = self.available_memory()
        if size is None or available is None:
            return
        needed = estimate_memory(size, None, self.local.context_size, self.local.parallelism)
        if needed > available:
            emit(
                PullProgress(
                    "warning",
                    f"{plan.name} will need about {_mib(needed)} to load, and "
                    f"{_mib(available)} is available next to what is loaded now: loading it "
                    "will be refused unless memory is freed",
                )
            )

    def _download(
        self,
        file: HubFile,
        staging: Path,
        emit: _Emitter,
        show_bar: bool,
        cancelled: threading.Event | None,
    ) -> Path:
        """The file's bytes into ``staging``: keel's own transfer, which resumes from the
        bytes on disk after a cut, a stall, a transient hub error (500, 502, 503, 504, a
        429 with Retry-After) or a refused download link, :data:`RETRIES` times in a row
        without a byte gained (:meth:`_retry`)."""
        part = staging / f"{PurePosixPath(file.filename).name}.incomplete"
        bar_class = _bar_class(file, emit, show_bar, cancelled)
        failures, have, relinked = 0, 0, False
        with (
            bar_class(total=file.size, unit="B", unit_scale=True, unit_divisor=1024) as bar,
            self._hub_errors(file.repo, file.filename, lambda: _on_disk(part)),
        ):
            while True:
                getting = False
                try:
                    url, headers, size = self._locate(file)
                    getting = True
                    self._transfer(url, headers, size, part, bar, f"{file.repo}:{file.filename}")
                    return part
                except Exception as exc:
                    if _on_disk(part) > have:  # some came: the count starts again
                        failures, have = 0, _on_disk(part)
                    failures += 1
                    retry = self._retry(exc, failures, have, getting=getting, relinked=relinked)
                    if retry is None:
                        raise
                    relinked = relinked or _status(exc) == 403
                wait, why = retry
                from_ = f", resuming from {_size(have)}" if have else ""
                emit(
                    PullProgress(
                        "warning",
                        f"{file.filename}: {why}; trying again in {wait:g} s{from_} "
                        f"(try {failures} of {RETRIES})",
                    )
                )
                if cancelled is not None and cancelled.wait(wait):
                    raise ClientDisconnected(f"the download of {file.filename} was cancelled")
                if cancelled is None:
                    time.sleep(wait)

    def _locate(self, file: HubFile) -> tuple[str, dict[str, str], int | None]:
        """Where the file's bytes are (the hub's redirect, a signed CDN link for an LFS
        file: asked again at each try, as such a link expires), the headers to send
        there, and the size the hub gives."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import FileMetadataError
        from huggingface_hub.utils._headers import build_hf_headers

        url = hf_hub_url(file.repo, file.filename, endpoint=self.endpoint)
        meta = get_hf_file_metadata(
            url, token=self.token, timeout=self.hub_timeout, endpoint=self.endpoint
        )
        if meta.commit_hash is None or meta.etag is None:
            raise FileMetadataError("its answer has no X-Repo-Commit or ETag header")
        headers = build_hf_headers(token=self.token)
        if urlsplit(meta.location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # the token is the hub's, not a CDN's
        return meta.location, headers, meta.size if meta.size is not None else file.size

    def _transfer(
        self,
        url: str,
        headers: dict[str, str],
        size: int | None,
        part: Path,
        bar: Any,
        where: str,
    ) -> None:
        """GET the bytes ``part`` lacks (``Range``), appended as they arrive."""
        from huggingface_hub import constants
        from huggingface_hub.utils._http import hf_raise_for_status, http_stream_backoff

        have = _on_disk(part)
        if size is None or have < size:
            if have:
                headers = {**headers, "Range": f"bytes={have}-"}
            with http_stream_backoff(
                "GET",
                url,
                headers=headers,
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                max_retries=0,
                retry_on_exceptions=(),
                retry_on_status_codes=(),
            ) as response:
                hf_raise_for_status(response)
                if have and response.status_code != 206:  # the range ignored: all again
                    bar.update(-have)
                    have = 0
                with part.open("ab" if have else "wb", buffering=0) as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        bar.update(len(chunk))
        got = _on_disk(part)
        if size is not None and got != size:
            came, said = _sizes(got, size)
            raise UpstreamProtocolError(
                f"the download of {where} came to {came} where the hub said {said}: the "
                "connection broke off, or the file changed on the hub meanwhile; nothing was "
                "kept, pull again",
                provider=self.hub,
                code="size_mismatch",
            )

    def _retry(
        self, exc: BaseException, failures: int, have: int, *, getting: bool, relinked: bool
    ) -> tuple[float, str] | None:
        """How long to wait before trying ``exc``'s request again, and why; None where
        it is not worth another try, or after :data:`RETRIES` in a row."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        if failures > RETRIES:
            return None
        if isinstance(exc, httpx2.TransportError) and getting:
            return 1.0, f"the connection broke off ({_root_cause(exc)})"
        if not isinstance(exc, HfHubHTTPError) or exc.response is None:
            return None
        status = exc.response.status_code
        if status == 403 and not relinked and self._link_refused(exc, have):
            return 1.0, f"the download link was refused ({status}); asking the hub for a new link"
        said = exc.response.headers.get("Retry-After", "").strip()
        after = float(said) if said.isdigit() else None
        if status not in (*TRANSIENT, 429) or (status == 429 and after is None):
            return None
        if after is None:
            return float(min(2 ** (failures - 1), 8)), f"the hub answered {status}"
        if after > RETRY_AFTER_CAP:
            return None
        return after, f"the hub answered {status} and asked to wait {after:g} s"

    def _link_refused(self, exc: Any, have: int) -> bool:
        """Whether a 403 is the download link's (a signed CDN link that expired), not
        the repo's: bytes of the file had come, or the host is not the hub's."""
        try:
            host = urlsplit(str(exc.response.request.url)).netloc
        except (AttributeError, RuntimeError):
            host = self.hub
        return have > 0 or host != self.hub

    def _verify(self, file: HubFile, blob: Path) -> str:
        digest = _sha256(blob)
        if file.listed_sha256 is not None and digest == file.listed_sha256.lower() != (
            (file.sha256 or "").lower()
        ):
            raise UpstreamError(
                f"{file.filename} failed its checksum against Tabby's registry (sha256 "
                f"{digest}, the registry's {file.sha256}), though it is the file {self.hub} "
                "lists: it changed on the hub since the registry entry was written; it was "
                "discarded. Pulling again brings the same file: pull it as a Hugging Face "
                f"file ({file.repo}:{file.filename}) to take the hub's, or another model",
                provider=self.hub,
                code="checksum_mismatch",
            )
        if file.sha256 is not None and digest != file.sha256.lower():
            raise UpstreamError(
                f"{file.filename} failed its checksum (sha256 {digest}, expected "
                f"{file.sha256}); the file was discarded: pull again, and if it fails again, "
                f"the server at {self.endpoint} (HF_ENDPOINT) serves another file than the "
                "one it lists",
                provider=self.hub,
                code="checksum_mismatch",
            )
        try:
            gguf.read_metadata(blob)  # a header, and as long as its tensor table says
        except MissingDependency as exc:  # (the file was just read whole: readable)
            raise UpstreamProtocolError(
                f"{file.filename} is not a usable GGUF file ({exc.message}); it was discarded",
                provider=self.hub,
            ) from None
        return digest

    @contextlib.contextmanager
    def _hub_errors(
        self, repo: str, filename: str | None = None, received: Callable[[], int] | None = None
    ) -> Iterator[None]:
        """The one place huggingface_hub's errors become keel's (the table above).
        ``received``: the bytes of the file received so far (a stall says how many)."""
        from huggingface_hub import errors as hub

        where = f"{repo}:{filename}" if filename else repo
        try:
            yield
        except hub.OfflineModeIsEnabled:
            raise Unavailable(
                "HF_HUB_OFFLINE is set: pulling needs the hub", code="hub_offline"
            ) from None
        except Exception as exc:
            raise self._hub_error(exc, where, repo, filename, received) from None

    def _hub_error(
        self,
        exc: BaseException,
        where: str,
        repo: str,
        filename: str | None,
        received: Callable[[], int] | None,
    ) -> BaseException:
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub import errors as hub

        if isinstance(exc, hub.RemoteEntryNotFoundError):
            listed = ", ".join(f.filename for f in self._gguf_files(repo)) or "none"
            return NotFound(
                f"{repo} has no file {filename!r}; its GGUF files: {listed}", param="model"
            )
        if isinstance(exc, hub.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if status == 403 and received is not None and self._link_refused(exc, received()):
                return UpstreamAuthError(
                    f"the download link of {where} was refused mid-transfer ({status}, "
                    f"{_size(received())} in hand), again with a new link: a signed link that "
                    "expired, or a CDN refusing it; it is not the repo's access (HF_TOKEN): "
                    "nothing was kept, pull again",
                    provider=self.hub,
                    upstream_status=status,
                )
            if status in (401, 403):
                token = "your HF_TOKEN has no access to it" if self.token else "set HF_TOKEN"
                return UpstreamAuthError(
                    f"the hub refused {where} ({status}): it is private or gated, or does not "
                    f"exist; {token} (a token from https://huggingface.co/settings/tokens, with "
                    "the model's terms accepted on its page)",
                    provider=self.hub,
                    upstream_status=status,
                )
            if status == 404 or isinstance(
                exc, hub.RepositoryNotFoundError | hub.RevisionNotFoundError
            ):
                return NotFound(f"{where} not found on {self.hub} (it answered 404)", param="model")
            if status == 429:  # it was "the hub failed, not keel", a 502
                return self._rate_limited(where, exc.response)
            reason = exc.response.reason_phrase if exc.response is not None else ""
            again = f", again after {RETRIES} tries" if received and status in TRANSIENT else ""
            return UpstreamStatusError(
                f"the hub answered {status} {reason}".rstrip() + f" for {where}{again}: the "
                "hub failed, not keel; nothing was kept, pull again later",
                provider=self.hub,
                upstream_status=status,
            )
        if isinstance(exc, hub.FileMetadataError):
            return UpstreamProtocolError(
                f"the hub's answer for {where} lacks what a download needs: {exc}",
                provider=self.hub,
            )
        got = received() if received is not None else 0
        if isinstance(exc, httpx2.TimeoutException):
            if got:
                return UpstreamTimeout(
                    f"{self.endpoint} stopped sending {where} after {_size(got)}: nothing came "
                    f"for {constants.HF_HUB_DOWNLOAD_TIMEOUT:g}s, again after each resume; "
                    "nothing was kept, pull again",
                    provider=self.hub,
                )
            if received is not None:  # a download: it may have answered, and stalled
                return UpstreamTimeout(
                    f"{self.endpoint} sent nothing of {where} for {self.hub_timeout:g}s, "
                    "again after each try; nothing was kept, pull again",
                    provider=self.hub,
                )
            return UpstreamTimeout(
                f"{self.endpoint} did not answer for {where} within {self.hub_timeout:g}s",
                provider=self.hub,
            )
        if isinstance(exc, httpx2.TransportError) and not isinstance(exc, httpx2.ConnectError):
            after = f" after {_size(got)}" if got else ""  # reached: it broke off
            return UpstreamProtocolError(
                f"{self.endpoint} broke off {where}{after} ({_root_cause(exc)}), again after "
                "each resume; nothing was kept, pull again",
                provider=self.hub,
            )
        if isinstance(exc, httpx2.TransportError):
            return UpstreamConnectError(
                f"cannot reach {self.endpoint} for {where}: {_root_cause(exc)}", provider=self.hub
            )
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOSPC:  # another pull or a log filled it meanwhile
                return InsufficientStorage(
                    f"the disk of {self.paths.models_dir} filled up during the download of "
                    f"{where}; nothing was kept: free some space, then pull again"
                )
            return UpstreamProtocolError(
                f"the download of {where} broke off: {exc}; nothing was kept, pull again",
                provider=self.hub,
            )
        if isinstance(exc, ValueError | KeyError | TypeError):  # JSONDecodeError included
            # an answer that is not the hub's (a proxy's page, a captive portal): it was a
            # traceback, and the server's 500
            return UpstreamProtocolError(
                f"{self.endpoint} answered {where} with what is not the Hugging Face hub's API "
                f"({type(exc).__name__}: {str(exc)[:200]}); check HF_ENDPOINT, or a proxy "
                "answering in the hub's place",
                provider=self.hub,
            )
        return exc


def _check_endpoint(endpoint: str) -> None:
    """``HF_ENDPOINT`` must be a URL, checked before any request: ``127.0.0.1:9`` (no
    scheme) was tried, resumed and given up as "broke off ... (Request URL is missing an
    'http://' or 'https://' protocol.)", as if the hub had cut the connection."""
    scheme, sep, rest = endpoint.partition("://")
    if url_trouble(scheme.lower() + sep + rest) is None:  # HTTP:// works as http://
        return
    said, example = repr(endpoint), "http://HOST:PORT"
    if not sep or scheme.lower() not in ("http", "https"):
        said += " has no http:// or https://"
        if re.fullmatch(r"[\w.-]+(:\d+)?", endpoint):  # a host and port alone
            example = f"http://{endpoint}"
    raise BadEnvironment(
        f"HF_ENDPOINT is not a URL ({said}): write it with its scheme and host, e.g. "
        f"HF_ENDPOINT={example}, or unset it to pull from {DEFAULT_ENDPOINT}"
    )


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 2**20 else _mib(n)


def _sizes(a: int, b: int) -> tuple[str, str]:
    """``a`` and ``b`` told apart: in bytes where their MiB are the same."""
    if a != b and _size(a) == _size(b):
        return f"{a:,} bytes", f"{b:,} bytes"
    return _size(a), _size(b)


def _on_disk(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _status(exc: BaseException) -> int | None:
    """The HTTP status of the hub's answer ``exc`` carries, if any."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


class _Emitter:
    """Sends progress to the caller's ``report`` and to the log as plain lines (the
    byte counts only when no progress bar shows them)."""

    def __init__(self, report: Report | None, *, log_downloading: bool) -> None:
        self.report = report
        self.log_downloading = log_downloading

    def __call__(self, step: PullProgress) -> None:
        level = logging.WARNING if step.status == "warning" else logging.INFO
        if step.downloaded is None or self.log_downloading:
            log.log(level, "%s", step.message)
        if self.report is not None:
            self.report(step)


def _bar_class(
    file: HubFile,
    emit: _Emitter,
    show_bar: bool,
    cancelled: threading.Event | None,
) -> type[Any]:
    """A tqdm class for huggingface_hub: a bar on a terminal (``show_bar``), and a
    ``downloading`` step every 5% for logs and SSE. A set ``cancelled`` stops the
    transfer at its next chunk (the staging file is then removed)."""
    from huggingface_hub.utils.tqdm import tqdm

    class _Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = not show_bar
            kwargs["desc"] = file.filename
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self.done = int(kwargs.get("initial") or 0)
            self.size = kwargs.get("total") or file.size
            self.step = -1

        def update(self, n: float | None = 1) -> bool | None:
            if cancelled is not None and cancelled.is_set():
                raise ClientDisconnected(f"the download of {file.filename} was cancelled")
            self.done += int(n or 0)
            if self.size:
                step = min(100, self.done * 100 // self.size) // 5
                if step != self.step:
                    self.step = step
                    emit(
                        PullProgress(
                            "downloading",
                            f"{file.filename}: {step * 5}% of {_mib(self.size)}",
                            self.done,
                            self.size,
                        )
                    )
            result: bool | None = super().update(n)
            return result

    return _Bar
