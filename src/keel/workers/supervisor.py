"""Start, watch, restart and give up on one worker process.

The supervisor owns the worker's lifecycle and its pipe. Requests are
multiplexed over the pipe by id; when the process dies every request in
flight fails at once with :class:`WorkerCrashed` (nothing hangs), and the
supervisor starts a new process after an exponential backoff. It gives up
after ``start_limit`` starts within ``start_window`` seconds, and at once on
an unfixable start error (the worker exits with 69: library or model file
unusable), reporting the reason once instead of looping. A ready worker that
stops answering (frozen, stopped by a signal, stuck in native code) is killed
and restarted like one that crashed (:class:`Liveness`).

Clock and sleep are parameters so that tests drive time.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import os
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel import jsoncodec
from keel.errors import (
    ExitCode,
    KeelError,
    UpstreamStatusError,
    WorkerCrashed,
    WorkerUnavailable,
)
from keel.models import gguf
from keel.providers.base import SLOT_WAIT, Joined
from keel.restart import RestartPolicy
from keel.router.admission import CALLER

if TYPE_CHECKING:
    from keel.providers.base import Reported

log = logging.getLogger("keel.worker")

GIVEN_UP_FIX = (
    "keel tries no more: once its cause is fixed, reload (SIGHUP, POST /v1/admin/reload) "
    "or restart keel to start it again"
)
"""What a worker keel gave up on needs, said where that is told (the message named no
fix; a reload starts it again)."""


NOT_RUNNABLE = frozenset({errno.EACCES, errno.ENOENT})
"""A worker start's errors no restart mends: its interpreter is gone (replaced by an
upgrade under a running keel) or not executable by keel's user. keel gives up at once,
as on an unusable model (it tried five times, with backoff)."""


def _start_failure(exc: OSError, program: str) -> str:
    """Why a worker process could not be started: keel's own open-file limit, where it
    is at it (uvloop said "[Errno -1] Unknown error -1" for it), ``program`` (the
    worker's interpreter, keel's own Python) gone or not executable (uvloop drops the
    file's name: "[Errno 13] Permission denied"), else ``exc``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        at_limit = len(os.listdir("/proc/self/fd")) >= soft - 4
    except OSError:  # listing needs a file descriptor too
        at_limit = True
    if exc.errno in (errno.EMFILE, errno.ENFILE) or at_limit:
        return (
            f"keel has as many files open as its open-file limit ({soft}) allows: raise it "
            "(ulimit -n; systemd LimitNOFILE=; docker --ulimit nofile=) and restart keel"
        )
    if exc.errno in NOT_RUNNABLE:
        return (
            f"{program}, the Python keel runs on and starts its workers with, cannot be run "
            f"({exc.strerror}): make it executable by keel's user, or reinstall keel and "
            "restart it (an upgrade that replaced that Python under a running keel removes it)"
        )
    return str(exc)


worker_log = logging.getLogger("keel.worker.output")
"""What a worker process prints (the engine's warnings, a traceback)."""

_PIPE_LIMIT = 64 * 1024 * 1024  # one line can carry a batch of embeddings

ENGINE_ENVIRONMENT = {"GOMP_SPINCOUNT": "1000"}
"""What a local engine's process gets unless keel's own environment sets it.

After each of a token's hundreds of operations the engine's threads meet at a barrier
(llama.cpp's CPU backend, built with OpenMP), and one that arrives first spins before
it sleeps: ~300,000 times by libgomp's default. When another process holds a core one
of them needs, the others spin through whole scheduler slices at every barrier.
Measured on 2 cores, the embedded model at keel's default 2 threads, one busy-loop
process beside it: 0.6-1.2 tok/s where it decodes 100 alone, and a core burnt for
nothing. Spinning 1,000 times: 27-29 tok/s beside the busy process, and alone 102
against 108 tok/s (twelve 200-token answers each, alternating). An engine on one
thread has no barrier to wait at (74 tok/s alone and beside the busy process)."""


def engine_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with :data:`ENGINE_ENVIRONMENT` under it: a value set there wins."""
    return {**ENGINE_ENVIRONMENT, **environ}


@dataclass(frozen=True, slots=True)
class Liveness:
    """How a ready worker is asked whether it still answers: a tokenize every
    ``interval`` seconds, which it answers at once even while every slot generates (and
    then for its engine's slot table: see ``stall_grace``); no
    answer within ``timeout``, ``misses`` times running (asked again at once after each),
    and it is killed and restarted.

    Without it a frozen worker stayed ``ready``: the router's pings route traffic around
    it (after two failed checks, 79 s with the default config), but nothing restarted
    it, and a request already on it waited out the completion's whole 30 s budget. With
    the defaults a worker frozen under a request is killed within 15 s, and that
    request ends as a crash, which falls back."""

    interval: float = 5.0
    timeout: float = 5.0
    misses: int = 2
    stall_grace: float = 30.0
    """Seconds the engine may stay busy in a slot with no live request on it (its
    request cancelled or ended), or too busy to answer its slot table: it takes a cancel
    between steps (one prompt batch, or one token), so past this it is stuck in one
    step, and the worker is killed and restarted as a frozen one is. A schema pattern
    the engine's grammar could not follow (``((a{0,30}){0,30}){0,30}``, refused now)
    held the shared worker's engine at full CPU for minutes after its request was
    cancelled, while the worker answered every ping and every completion timed out
    behind it."""


class WorkerState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    model_path: str
    """The file as configured: what the worker loads (a split model's parts are found
    beside it by name, which a link's target may not have)."""
    context_size: int = 2048
    threads: int | None = None
    gpu_layers: int = 0
    embedding: bool = False
    slots: int = 1
    prefill_batch: int | None = None
    """Prompt tokens per engine batch (default: the worker's ``PREFILL_BATCH``)."""
    file: str = ""
    """The file ``model_path`` named when the spec was made (links resolved): a link
    pointed at another file (``current.gguf``) kept the old model through a reload, its
    path unchanged and so its worker kept."""
    version: tuple[int, ...] = ()
    """That file's inode and size then: a file replaced in its place (``keel models
    pull`` of a newer one) is another model, whose load was answered "runs already" by
    the worker still reading the deleted old one (its time is not: a file touched is the
    same model, and its worker is kept through a reload)."""

    def __post_init__(self) -> None:
        if not self.file:
            object.__setattr__(self, "file", os.path.realpath(self.model_path))
        if not self.version:
            try:
                found = os.stat(self.file)
            except OSError:  # the worker's load says why
                return
            object.__setattr__(self, "version", (found.st_ino, found.st_size))

    def header(self) -> dict[str, object]:
        """The model file's header values, read once for a file in keel's process, or
        nothing where unreadable (the worker's load says why). The worker is given what
        it needs of them: reading them itself again took ~35 ms of CPU a start."""
        try:
            return gguf.read_metadata(Path(self.model_path))
        except Exception:
            return {}

    def command(self, header: dict[str, object] | None = None) -> list[str]:
        """The worker's command line, with what it needs of ``header`` (read if not given)."""
        argv = [sys.executable, "-m", "keel.workers.worker", "--model", self.model_path]
        argv += ["--context-size", str(self.context_size), "--gpu-layers", str(self.gpu_layers)]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        header = self.header() if header is None else header
        if self.embedding:
            argv.append("--embedding")
            if f"{header.get('general.architecture')}.pooling_type" not in header:
                argv.append("--mean-pooling")  # no pooling in the GGUF: average the tokens
        else:
            argv += ["--prompt-cache-mib", str(self._prompt_cache_mib(header))]
        if self.slots > 1:
            argv += ["--slots", str(self.slots)]
        if self.prefill_batch:
            argv += ["--prefill-batch", str(self.prefill_batch)]
        return argv

    def _prompt_cache_mib(self, header: dict[str, object]) -> int:
        """The engine's host memory for slot states it sets aside when another prompt
        takes a slot (:func:`keel.models.gguf.prompt_cache_bytes`), sized as keel's
        memory estimate counts it."""
        path = Path(self.model_path)
        weights = gguf.weights_bytes(path) if path.is_file() else 0  # the worker says why
        kv = gguf.context_kv_bytes(header, self.context_size, weights)
        return max(1, gguf.prompt_cache_bytes(kv) >> 20)


@dataclass(slots=True)
class GenerationStats:
    """Running totals of what the worker evaluated: prefix reuse made visible."""

    requests: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    slot_waits: int = 0
    """Requests that waited in the worker for a slot (all busy, or the one holding their
    prompt about to be freed by a cancel): a wait keel adds, so it is counted."""
    slot_wait_seconds: float = 0.0
    chats_held: int = 0
    """Chats that waited because the free slot was kept for completions."""
    last: dict[str, Any] = field(default_factory=dict)

    def add(self, done: dict[str, Any]) -> None:
        self.requests += 1
        self.cancelled += done.get("finish_reason") == "cancelled"
        self.prompt_tokens += int(done.get("prompt_tokens") or 0)
        self.reused_tokens += int(done.get("reused_tokens") or 0)
        waited = float(done.get("slot_wait_ms") or 0) / 1000
        self.slot_waits += waited > 0
        self.slot_wait_seconds += waited
        self.chats_held += bool(done.get("slot_held"))
        self.last = {k: v for k, v in done.items() if k not in {"id", "done"}}

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "cancelled": self.cancelled,
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "evaluated_tokens": self.prompt_tokens - self.reused_tokens,
            "slot_waits": self.slot_waits,
            "slot_wait_seconds": round(self.slot_wait_seconds, 3),
            "chats_held": self.chats_held,
            "last": self.last,
        }


@dataclass(slots=True)
class _Pending:
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


def _note_prompt(reported: Reported, message: dict[str, Any]) -> None:
    """The worker's figures of a request (its first piece's, then its end's)."""
    reported.note_usage(message)
    reported.cached_tokens = message.get("reused_tokens")
    reported.prompt_ms = message.get("prompt_ms")


def _tokens(message: dict[str, Any]) -> str:
    """A piece's text, holding the count of the tokens joined in it (the token metrics
    counted each piece one token: a third of a fast model's)."""
    tokens = message.get("tokens", 1)
    if tokens == 1:
        return str(message["text"])
    piece = Joined(message["text"])
    piece.pieces = int(tokens)
    return piece


def _cpu_ticks(pid: int) -> int | None:
    """The CPU time ``pid`` has used (user and system, in clock ticks), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime and stime: the stat file's 14 and 15


def _oom_kill_count(path: Path) -> int | None:
    """The ``oom_kill`` line of a kernel counter file (``/proc/vmstat``, a cgroup's
    ``memory.events`` or ``memory.oom_control``), or None."""
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def kernel_oom_kills(vmstat: str = "/proc/vmstat") -> int | None:
    """How many processes the kernel's OOM killer has killed since boot, on the whole
    host."""
    return _oom_kill_count(Path(vmstat))


def memory_group(
    cgroups: str | Path = "/proc/self/cgroup", mount: str | Path = "/sys/fs/cgroup"
) -> tuple[Path, Path, bool] | None:
    """Where keel's memory control group is, as mounted here: its hierarchy's root, the
    group, and whether that is cgroup v1's memory controller (else v2's unified tree); a
    container sees its own group as the root. None where ``cgroups`` cannot be read."""
    try:
        lines = Path(cgroups).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    fields = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    v1 = [group for _, controllers, group in fields if "memory" in controllers.split(",")]
    v2 = [group for _, controllers, group in fields if controllers == ""]
    if not v1 and not v2:
        return None
    base = Path(mount, "memory") if v1 else Path(mount)
    return base, base / (v1 or v2)[0].strip("/"), bool(v1)


def cgroup_oom_kills(
    cgroups: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup"
) -> int | None:
    """How many processes of keel's own control group (where its workers run) the OOM
    killer has killed, by any OOM: cgroup v2's ``memory.events``, else v1's
    ``memory.oom_control`` (where a container sees its own group as the mount's root);
    None where neither is readable, or keel runs in the root group."""
    found = memory_group(cgroups, mount)
    if found is None:
        return None
    base, group, v1 = found
    if v1:  # keel's group, else the mount's root: a container's own
        candidates = [group / "memory.oom_control", base / "memory.oom_control"]
    else:
        candidates = [group / "memory.events"] if group != base else []
    for candidate in candidates:
        if (count := _oom_kill_count(candidate)) is not None:
            return count
    return None


def worker_oom_kills() -> int | None:
    """The OOM kills that can tell whether a worker killed by SIGKILL was killed for
    memory: its control group's (keel's own), else the host's. The host's alone called a
    worker ``kill -9``-ed by hand, or by keel's own watch, an OOM kill, never to be
    restarted, whenever any process on the host had been OOM-killed meanwhile."""
    found = cgroup_oom_kills()
    return found if found is not None else kernel_oom_kills()


class WorkerSupervisor:
    def __init__(
        self,
        spec: WorkerSpec,
        *,
        name: str,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        oom_kills: Callable[[], int | None] = worker_oom_kills,
        liveness: Liveness | None = None,
    ) -> None:
        self.spec = spec
        self.name = name
        self.policy = policy or RestartPolicy()
        self._clock = clock
        self._sleep = sleep
        self.state = WorkerState.STOPPED
        self.last_error: str | None = None
        self.killed_for_memory = False
        """Whether its last worker was killed by the kernel for lack of memory."""
        self.restarts = 0
        self.pid: int | None = None
        self.model_info: dict[str, Any] = {}
        self._header: dict[str, object] = {}  # the model file's, as this start read it
        self.stats = GenerationStats()
        self._starts: deque[float] = deque()
        self._process: asyncio.subprocess.Process | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._oom_kills = oom_kills
        self.liveness = liveness or Liveness()
        self._completion_at: float | None = None
        """When (Unix time) the last completion was sent to a worker of this supervisor."""
        self._unanswered: str | None = None
        """Why the watch killed the worker (it stopped answering), until it is restarted."""

    # lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._set_state(WorkerState.STARTING)
            # A context of its own: a worker started by a request (a model load) logged its
            # crashes and restarts, days later, under that request's id.
            self._task = asyncio.create_task(
                self._run(), name=f"worker:{self.name}", context=contextvars.Context()
            )

    async def stop(self) -> None:
        """End the worker (a loading one killed at once; a ready one: stdin closed, then
        killed after 5 s) and stop restarting it."""
        task, self._task = self._task, None
        self._stopping = True
        await self._terminate()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_state(WorkerState.STOPPED)

    def control_tokens(self) -> frozenset[str]:
        """The texts of the model's control tokens, from its file's header as the worker's
        start read it (:data:`keel.models.gguf.CONTROL_TOKENS`; none before that)."""
        tokens = self._header.get(gguf.CONTROL_TOKENS)
        return tokens if isinstance(tokens, frozenset) else frozenset()

    def longest_token(self) -> int | None:
        """The bytes of the vocabulary's longest token, from the file's header as the
        worker's start read it (None before that)."""
        longest = self._header.get(gguf.LONGEST_TOKEN)
        return longest if isinstance(longest, int) and longest > 0 else None

    def status(self) -> dict[str, object]:
        return {
            "state": str(self.state),
            "pid": self.pid,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "model": self.spec.model_path,
            "generation": self.stats.snapshot(),
            "engine": self.model_info,  # engine version, slots, context per slot, model name
        }

    async def wait_ready(self, timeout: float) -> None:
        """Wait until a worker is ready, or raise why none will be."""
        deadline = self._clock() + timeout
        while not self._ready.is_set():
            if self.state is WorkerState.FAILED:
                raise WorkerUnavailable(f"{self.name}: worker gave up: {self.last_error}")
            if self.state is WorkerState.STOPPED:
                raise WorkerUnavailable(f"{self.name}: worker is not running")
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WorkerUnavailable(
                    f"{self.name}: worker not ready after {timeout:.0f}s (state {self.state})",
                    retry_after=5,
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _set_state(self, state: WorkerState) -> None:
        self.state = state
        if state is WorkerState.READY:
            self._ready.set()
        else:
            self._ready.clear()
        self._changed.set()

    async def _run(self) -> None:
        while True:
            self._starts.append(self._clock())
            oom_before = self._oom_kills()
            exit_code = await self._run_once()
            killed = exit_code is not None and exit_code < 0 and -exit_code == signal.SIGKILL
            oom_after = self._oom_kills() if killed else None
            killed_for_memory = (
                self._unanswered is None  # not keel's own watch's kill
                and oom_before is not None
                and oom_after is not None
                and oom_after > oom_before
            )
            self.killed_for_memory = killed_for_memory
            if killed_for_memory:
                self.last_error = (
                    "worker was killed by the kernel for lack of memory (OOM kill); not "
                    "restarting into the same out-of-memory: free memory or load a smaller "
                    "model, lower context_size or parallelism"
                )
            self._fail_pending(exit_code, restarting=not killed_for_memory)
            if self._stopping:
                return
            if exit_code == ExitCode.DEPENDENCY or killed_for_memory:
                self._give_up(self.last_error or "worker reported an unusable model or library")
                return
            said = killed and self._unanswered is not None  # the watch logged its kill
            if killed:
                self.last_error = self._unanswered or (
                    "worker was killed (SIGKILL: killed by hand or by a supervisor)"
                )
                self._unanswered = None
            else:
                self.last_error = self.last_error or f"worker exited with code {exit_code}"
            if self.policy.exhausted(self._starts, self._clock()):
                # Before the count: the restart it would be never happens (keel said 8
                # restarts of 7, with the dead worker's pid).
                self._give_up(
                    f"failed {len(self._starts)} times within {self.policy.start_window:.0f}s; "
                    f"last error: {self.last_error}"
                )
                return
            self.restarts += 1
            self._set_state(WorkerState.RESTARTING)
            # Backs off by the starts within the window, ready or not: a worker that dies
            # soon after each load (a request that crashes it, sent again) crashed in a
            # loop restarted every 0.5 s, while one that ran for the window starts afresh.
            delay = self.policy.backoff(len(self._starts))
            if said:  # not the same line twice, an ERROR then a WARNING
                log.info("%s: restarting in %.1fs", self.name, delay)
            else:
                log.warning("%s: %s; restarting in %.1fs", self.name, self.last_error, delay)
            await self._sleep(delay)

    def _give_up(self, reason: str) -> None:
        # what brings it back, where it is shown: /v1/providers and the status page too
        self.last_error = f"{reason}; {GIVEN_UP_FIX}"
        self.pid = None  # no worker runs
        self._set_state(WorkerState.FAILED)
        log.error("%s: giving up on the worker: %s", self.name, self.last_error)

    async def _run_once(self) -> int | None:
        self._set_state(WorkerState.STARTING)
        # Read once a start, off the event loop (a file keel has not read yet takes ~35 ms,
        # more with a larger vocabulary): the worker's arguments, then its model's name.
        self._header = await asyncio.to_thread(self.spec.header)
        command = self.spec.command(self._header)
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # What the engine and the worker print (a schema llama.cpp converted only
                # in part, a traceback): keel's log records, not raw lines between them
                # (--log-format json had plain text among its objects)
                stderr=asyncio.subprocess.PIPE,
                limit=_PIPE_LIMIT,
                # A terminal's Ctrl-C must reach keel only: keel drains streams in flight,
                # then stops the worker (end of stdin); a worker dead first would cut them.
                start_new_session=True,
                env=engine_environment(os.environ),
            )
        except OSError as exc:
            self.last_error = f"cannot start worker: {_start_failure(exc, command[0])}"
            # given up on at once, as a worker's exit for an unusable model or library
            return ExitCode.DEPENDENCY if exc.errno in NOT_RUNNABLE else None
        self._process = process
        self.pid = process.pid
        assert process.stdout is not None and process.stdin is not None
        if self._completion_at is not None:
            # A new worker knows nothing of the completions its predecessor served, so
            # chats took every slot and completions waited behind whole answers after a
            # restart (12 s, or the 30 s budget's 504). Read once its engine is up.
            seen = {"op": "completions_seen", "at": self._completion_at}
            process.stdin.write(jsoncodec.dumps(seen) + b"\n")
        watch = asyncio.create_task(self._watch(process), name=f"watch:{self.name}")
        assert process.stderr is not None
        printed = asyncio.create_task(self._log_lines(process.stderr), name=f"log:{self.name}")
        try:
            async for raw in process.stdout:
                self._dispatch(jsoncodec.loads(raw))
        except (ValueError, asyncio.LimitOverrunError) as exc:
            self.last_error = f"worker sent an unreadable line: {exc}"
            with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                process.kill()
        finally:
            watch.cancel()
            exit_code = await process.wait()
            with contextlib.suppress(TimeoutError):  # the lines it printed as it ended
                await asyncio.wait_for(printed, 1)
            printed.cancel()
            self._process = None
        return exit_code

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill ``process`` once it is ready and stops answering (see :class:`Liveness`)."""
        liveness, missed, stalled_since = self.liveness, 0, None
        cpu: int | None = None
        while missed < liveness.misses:
            if not missed:  # after a miss, asked again at once
                await asyncio.sleep(liveness.interval)
            if self.state is WorkerState.READY:
                cpu = None
                try:
                    async with asyncio.timeout(liveness.timeout):
                        await self.ping(ready_timeout=0)
                    missed = 0
                except TimeoutError:
                    missed += 1
                    continue
                except KeelError:  # it answered (or is ending, which the crash path has)
                    missed = 0
                    continue
                asked = time.monotonic()
                stalled = await self._engine_stalled()
                why = f"its engine spent over {liveness.stall_grace:g}s in one step"
            else:
                # Starting or loading: no answers to ask for, but a worker that uses no CPU
                # is stopped or hung (one stopped as it started held every request to the
                # 30 s budget, a model load and every reload for minutes).
                asked, missed, before, cpu = time.monotonic(), 0, cpu, _cpu_ticks(process.pid)
                stalled = self.state in (WorkerState.STARTING, WorkerState.LOADING)
                stalled = stalled and cpu is not None and cpu == before
                why = f"it used no CPU for over {liveness.stall_grace:g}s while it started"
            # Stalled since it was asked at the latest: a slot table that took the whole
            # timeout was not answered in that time (counted from the answer, a stuck
            # engine spun a core for one timeout more before it was killed).
            stalled_since = (stalled_since or asked) if stalled else None
            if (
                stalled_since is not None
                and time.monotonic() - stalled_since > liveness.stall_grace
            ):
                self._unanswered = f"{why}; killed to restart it"
                break
        else:
            self._unanswered = (
                f"worker stopped answering (no reply within {liveness.timeout:g}s, "
                f"{missed} times running); killed to restart it"
            )
        log.error("%s: %s", self.name, self._unanswered)
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    async def _log_lines(self, stream: asyncio.StreamReader) -> None:
        """Each line the worker prints, as a record of keel's log."""
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the pipe's limit: its start, then on
                line = await stream.read(_PIPE_LIMIT)
            if not line:
                return
            if text := line.decode("utf-8", errors="replace").rstrip():
                worker_log.info("%s (pid %s): %s", self.name, self.pid, text)

    async def _engine_stalled(self) -> bool:
        """Whether the engine is busy with no live request in a slot (its request ended
        or was cancelled: the engine has not reached the end of its step), or too busy in
        one step to answer its slot table (which it does between steps)."""
        try:
            async with asyncio.timeout(self.liveness.timeout):
                table = await self.call({"op": "slots"}, ready_timeout=0)
        except TimeoutError:
            return True
        except KeelError:
            return False
        return any(slot.get("stray") for slot in table["slots"])

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("event") == "status":
            state = message.get("state")
            if state == "loading":
                self._set_state(WorkerState.LOADING)
            elif state == "ready":
                self.model_info = {k: v for k, v in message.items() if k not in {"event", "state"}}
                self.model_info["name"] = self._header.get("general.name")
                self.model_info["architecture"] = self._header.get("general.architecture")
                self.last_error = None
                self._set_state(WorkerState.READY)
                log.info("%s: worker ready (pid %s)", self.name, self.pid)
            elif state == "error":
                self.last_error = str(message.get("message"))
            return
        pending = self._pending.get(message.get("id", -1))
        if pending is not None:
            pending.queue.put_nowait(message)
        elif message.get("done"):
            self.stats.add(message)  # the end of a request its client abandoned

    def _fail_pending(self, exit_code: int | None, *, restarting: bool) -> None:
        for request_id, pending in list(self._pending.items()):
            pending.queue.put_nowait(
                {
                    "id": request_id,
                    "crashed": True,
                    "error": f"exit code {exit_code}",
                    "restarting": restarting,
                    "stopped": self._stopping,
                    "worker": self.pid,
                }
            )

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        if self.state is WorkerState.READY and process.stdin is not None:
            process.stdin.close()  # a ready worker ends when its stdin does
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
                return
        # Past the 5 s, or still loading: a worker reads stdin only once the engine is
        # up (a large model takes seconds from disk), and nothing runs in it yet; a stop,
        # a reload or a swap waited out the load.
        with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
            process.kill()
        await process.wait()

    # requests ------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise WorkerCrashed("worker is not running", provider=self.name, worker=self.pid)
        try:
            process.stdin.write(jsoncodec.dumps(message) + b"\n")
            await process.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise WorkerCrashed(
                f"worker pipe closed: {exc}", provider=self.name, worker=process.pid
            ) from exc

    def _raise_for(self, message: dict[str, Any]) -> None:
        if message.get("stopped"):  # nothing crashed: it was told to stop
            raise WorkerUnavailable(
                f"{self.name}: its model was unloaded or replaced while the request ran; retry"
            )
        if message.get("crashed"):
            then = (
                "it is being restarted, retry shortly"
                if message.get("restarting")
                else ("it will not be restarted")
            )
            raise WorkerCrashed(
                f"worker died during the request ({self.last_error or message['error']}); {then}",
                provider=self.name,
                worker=message["worker"],
            )
        code = message.get("code")
        if code in ("bad_request", "context_length_exceeded"):
            raise UpstreamStatusError(
                str(message["error"]),
                provider=self.name,
                code=str(code),
                upstream_status=400,
                details={k: message[k] for k in ("n_prompt_tokens", "n_ctx") if k in message},
            )
        # anything else failed in the worker or its engine: the provider's failure, a 502
        raise UpstreamStatusError(str(message["error"]), provider=self.name, upstream_status=500)

    async def stream(
        self, op: dict[str, Any], *, ready_timeout: float, reported: Reported | None = None
    ) -> AsyncIterator[str]:
        """Run a generating op; yields text pieces. Closing the iterator cancels it.
        ``reported`` gets, at the end, the tokens the engine counted and why it stopped."""
        await self.wait_ready(ready_timeout)
        if reported is not None:
            reported.clear()
        if op.get("op") == "complete":
            self._completion_at = time.monotonic()  # Linux's: the same in every process
        request_id = self._next_id = self._next_id + 1
        pending = self._pending[request_id] = _Pending()
        finished = False
        try:
            # the caller, for the engine's slots to go to the one holding fewest
            await self._send({**op, "id": request_id, "caller": CALLER.get()})
            while True:
                message = await pending.queue.get()
                if "text" in message:
                    if reported is not None and "prompt_tokens" in message:
                        # the first piece: a caller that stops early still has them
                        _note_prompt(reported, message)
                    yield _tokens(message)
                elif "queued" in message:
                    told = SLOT_WAIT.get()
                    if told is not None:
                        told(bool(message["queued"]))
                elif message.get("done"):
                    finished = True
                    self.stats.add(message)
                    if reported is not None:
                        _note_prompt(reported, message)
                        reported.finish_reason = message.get("finish_reason")
                    return
                else:
                    finished = True
                    self._raise_for(message)
        finally:
            del self._pending[request_id]
            if not finished and self._process is not None:
                with contextlib.suppress(KeelError):
                    await self._send({"op": "cancel", "target": request_id})

    async def ping(self, *, ready_timeout: float) -> None:
        """A tokenize, which the worker answers at once even while its slots generate."""
        await self.call({"op": "tokenize", "texts": ["ping"]}, ready_timeout=ready_timeout)

    async def call(self, op: dict[str, Any], *, ready_timeout: float) -> dict[str, Any]:
        """Run a one-reply op (tokenize, embed). A caller that gives up (its deadline,
        its client leaving) cancels it, as closing a stream does."""
        await self.wait_ready(ready_timeout)
        request_id = self._next_id = self._next_id + 1
        pending = self._pending[request_id] = _Pending()
        message = None
        try:
            await self._send({**op, "id": request_id})
            message = await pending.queue.get()
        finally:
            del self._pending[request_id]
            if message is None and self._process is not None:
                with contextlib.suppress(KeelError):
                    await self._send({"op": "cancel", "target": request_id})
        if "error" in message:
            self._raise_for(message)
        return message
