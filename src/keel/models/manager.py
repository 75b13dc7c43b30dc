"""Load, swap and unload local models while keel serves.

A load is a swap without downtime: the new worker starts and loads beside
the old one, traffic switches only once it is ready, and the old worker
stops after its in-flight requests finish. Loads are serialised. Before
starting anything the model's memory need (file size plus KV cache per slot,
from the GGUF header) is compared with what the machine has available: a
model that cannot fit is refused with both numbers, or, when the config lists
``fallback_models`` for the role, the next one that fits is loaded instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from keel.audit import AuditLog
from keel.background import Background
from keel.config import LocalModelConfig, Paths, Role, Settings
from keel.errors import (
    Conflict,
    InsufficientMemory,
    KeelError,
    MissingDependency,
    NotFound,
    RequestError,
)
from keel.models import gguf
from keel.models.registry import (
    list_model_files,
    read_facts,
    resolve_model,
    tabby_prompt_template,
)
from keel.providers.base import Provider
from keel.providers.catalog import (
    ProviderEntry,
    build_local_provider,
    local_worker_spec,
    wants_embedded_last_resort,
)
from keel.providers.local import LocalProvider
from keel.router.service import DRAIN_LIMIT, Routing
from keel.workers.supervisor import GIVEN_UP_FIX, WorkerSpec, WorkerState, memory_group

log = logging.getLogger("keel.models")

OVERHEAD_BYTES = 128 * 1024 * 1024
"""Per worker beyond weights and KV cache: the interpreter, llama.cpp's buffers."""


def mem_available(
    meminfo: Path = Path("/proc/meminfo"),
    cgroups: Path = Path("/proc/self/cgroup"),
    mount: Path = Path("/sys/fs/cgroup"),
) -> int | None:
    """Bytes a model loaded now may take: the host's available memory, or what keel's
    memory control group has left where less (a container's limit: the host's 22,520 MiB
    were counted inside a 1,200 MiB one, and a load that would need 4,126 MiB started a
    worker the kernel killed)."""
    host, group = host_memory_available(meminfo), cgroup_memory_left(cgroups, mount)
    return group if host is None else host if group is None else min(host, group)


def host_memory_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's ``MemAvailable``, in bytes."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


UNLIMITED = 2**60
"""Past this, a cgroup v1 memory limit is none (the kernel's "unlimited" is 2^63 less a page)."""


def cgroup_memory_left(cgroups: Path, mount: Path) -> int | None:
    """What keel's memory control group, and each above it that is mounted here, has left
    under its limit (the least of them), counting the page cache the kernel would drop
    first as free; None without a limit. cgroup v2 (``memory.max``), else v1
    (``memory.limit_in_bytes``), where a container sees its own group as the mount's
    root."""
    found = memory_group(cgroups, mount)
    if found is None:
        return None
    base, group, v1 = found
    limit, usage, cache = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_")
        if v1
        else ("memory.max", "memory.current", "")
    )
    places = [group, *group.parents]
    left = [
        room
        for place in places
        if place.is_relative_to(base) and (room := _room(place, limit, usage, cache)) is not None
    ]
    return min(left, default=None)


def _room(place: Path, limit: str, usage: str, prefix: str) -> int | None:
    """Bytes ``place``'s group has left under its limit, its page cache (``active_file``,
    ``inactive_file``, named with ``prefix``), which the kernel drops before it kills,
    counted as free (a file read twice, the model file among them, was counted used);
    None without a limit or where unreadable."""
    try:
        most = (place / limit).read_text().strip()
        if most == "max" or int(most) >= UNLIMITED:
            return None
        used = int((place / usage).read_text())
        stat = dict(line.split() for line in (place / "memory.stat").read_text().splitlines())
        cached = sum(int(stat.get(f"{prefix}{kind}_file", 0)) for kind in ("active", "inactive"))
        return max(0, int(most) - used + cached)
    except (OSError, ValueError):
        return None


def memory_needed(spec: WorkerSpec) -> int:
    """Bytes the worker for ``spec`` needs: weights, KV cache per slot, overhead, and a
    generating engine's prompt cache or an embedding engine's buffers for an input of its
    whole context."""
    path = Path(spec.model_path)
    metadata = gguf.read_metadata(path)
    size, context, slots = gguf.weights_bytes(path), spec.context_size, spec.slots
    if spec.embedding:
        needed = estimate_memory(size, metadata, context, slots, prompt_cache=False)
        return needed + (gguf.embedding_batch_bytes(metadata, spec.context_size) or 0)
    return estimate_memory(size, metadata, context, slots)


def estimate_memory(
    weights: int,
    metadata: dict[str, object] | None,
    context_size: int,
    slots: int,
    *,
    prompt_cache: bool = True,
) -> int:
    """:func:`memory_needed` from a file's size and header; without the header (a
    model not downloaded yet) the KV cache is guessed as a quarter of the weights."""
    kv = gguf.context_kv_bytes(metadata, context_size, weights)
    cache = gguf.prompt_cache_bytes(kv) if prompt_cache else 0
    return weights + kv * max(1, slots) + cache + OVERHEAD_BYTES


def _unusable(model_name: str, exc: Exception) -> RequestError:
    reason = exc.message if isinstance(exc, KeelError) else str(exc)
    return RequestError(
        f"{model_name} cannot be loaded: {reason}", param="model_name", code="invalid_model"
    )


LOAD_STEPS = ("queued", "checking_memory", "starting_worker", "loading", "switching", "ready")


@dataclass(frozen=True, slots=True)
class Progress:
    step: str  # one of LOAD_STEPS
    message: str

    def to_dict(self, role: Role, model: str) -> dict[str, object]:
        """An event as TabbyAPI sends one (``ModelLoadResponse``: ``model_type``,
        ``module`` of ``modules``, ``status`` processing until finished; its clients wait
        for ``finished``), with keel's own step, role, model and message beside."""
        return {
            "model_type": "embedding" if role == "embedding" else "model",
            "module": LOAD_STEPS.index(self.step) + 1,
            "modules": len(LOAD_STEPS),
            "status": "finished" if self.step == "ready" else "processing",
            "step": self.step,
            "role": role,
            "model_name": model,
            "message": self.message,
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        routing: Routing,
        audit: AuditLog,
        background: Background,
        *,
        available: Callable[[], int | None] = mem_available,
        drain_timeout: float = DRAIN_LIMIT,
        lock: asyncio.Lock | None = None,
    ) -> None:
        """``lock``: shared with config reloads (they replace the routing a load
        switches)."""
        self.settings = settings
        self.paths = paths
        self.routing = routing
        self.audit = audit
        self.background = background
        self.available = available
        self.drain_timeout = drain_timeout
        self._lock = lock or asyncio.Lock()
        self.successor: ModelManager | None = None
        """The manager a config reload put in this one's place. A load or unload that
        waited for the lock behind that reload acts on the routing in force: on this
        replaced one it stopped a worker the new routing still served a role with (that
        role 503 until a restart), or left its new worker in no chain."""

    def _in_force(self) -> ModelManager:
        """The manager of the routing in force (called with the lock held)."""
        manager = self
        while manager.successor is not None:
            manager = manager.successor
        return manager

    def current(self, role: Role) -> dict[str, object]:
        chain = self.routing.providers.chains[role]
        if not chain:
            raise NotFound(f"no model is loaded for {role}; POST /v1/model/load")
        provider = chain[0][0].provider
        parameters: dict[str, object] = {"role": role, "kind": provider.info.kind}
        if isinstance(provider, LocalProvider):
            spec = provider.supervisor.spec
            parameters |= {
                "path": spec.model_path,
                "max_seq_len": spec.context_size,
                "slots": spec.slots,
                "state": str(provider.supervisor.state),
            }
        else:
            parameters["endpoint"] = provider.info.endpoint
        return self._card(provider.info.model, parameters)

    def _card(self, name: str, parameters: dict[str, object]) -> dict[str, object]:
        return {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "keel",
            "parameters": parameters,
        }

    def available_models(self) -> list[dict[str, object]]:
        cards = []
        for file in list_model_files(self.paths):
            parameters: dict[str, object] = {
                "path": str(file.path),
                "size_bytes": file.size_bytes,
                "embedded": file.embedded,
                **read_facts(file.path).to_dict(),
            }
            cards.append(self._card(file.name, parameters))
        return cards

    def require_model(self, model_name: str) -> None:
        """Raise NotFound unless ``model_name`` is a model file, RequestError unless it is
        a usable GGUF file, with a readable ``tabby.json`` in a Tabby model directory
        (read before any work, or any streamed event: a bad one was a 422 naming a config
        key never written, or an error after three progress events)."""
        try:
            path = resolve_model(model_name, self.paths)
        except MissingDependency as exc:
            raise NotFound(exc.message, param="model_name") from None
        try:
            gguf.read_metadata(path)
            tabby_prompt_template(path)
        except (MissingDependency, OSError, ValueError) as exc:
            raise _unusable(model_name, exc) from None

    def _candidates(self, role: Role, model_name: str) -> list[str]:
        config = self.settings.model.role(role).local
        fallbacks = list(config.fallback_models) if config is not None else []
        return [model_name, *[m for m in fallbacks if m != model_name]]

    def _plan(
        self, role: Role, model_name: str, config: LocalModelConfig, sized_by: str
    ) -> tuple[str, Path, str]:
        """The model to load (the asked one, or the next fallback that fits) and why;
        ``sized_by``: what set its context, named in a refusal's advice."""
        available = self.available()
        refusals: list[str] = []
        running = self._running()
        for candidate in self._candidates(role, model_name):
            try:
                path = resolve_model(candidate, self.paths)
            except MissingDependency as exc:
                if candidate == model_name:
                    raise NotFound(exc.message, param="model_name") from None
                continue
            if local_worker_spec(role, config, path) in running:
                return candidate, path, f"{candidate} runs already with these settings: shared"
            try:
                needed = memory_needed(local_worker_spec(role, config, path))
            except MissingDependency as exc:  # not a GGUF file, or a damaged one
                if candidate == model_name:
                    raise _unusable(model_name, exc) from None
                refusals.append(f"{candidate}: {exc.message}")
                continue
            if available is None or needed <= available:
                note = (
                    f"{_mib(needed)} needed, {_mib(available)} available"
                    if available is not None
                    else f"{_mib(needed)} needed; available memory unknown"
                )
                if candidate != model_name:
                    note = f"{model_name} does not fit ({refusals[0]}); loading {candidate}: {note}"
                return candidate, path, note
            refusals.append(f"{candidate} needs {_mib(needed)}, {_mib(available)} available")
        raise InsufficientMemory(
            f"not enough memory to load {model_name}: {'; '.join(refusals)}; free memory, "
            f"lower {sized_by} or parallelism, or list smaller [model.{role}.local] "
            "fallback_models"
        )

    async def load(
        self, role: Role, model_name: str, *, key_id: str | None, context_size: int | None = None
    ) -> AsyncIterator[Progress]:
        """Swap ``role`` to ``model_name`` (``context_size``: per slot, instead of the
        role's configured one); yields progress, ends with ready or raises."""
        yield Progress(
            "queued", "waiting for the previous load to finish" if self._lock.locked() else "queued"
        )
        async with self._lock:
            try:
                async for step in self._in_force()._swap(role, model_name, context_size):
                    yield step
            except KeelError as exc:
                self.audit.record(
                    "model_load",
                    key_id=key_id,
                    result="error",
                    target=f"{role}:{model_name}",
                    detail=exc.message,
                )
                raise
            except asyncio.CancelledError:
                self.audit.record(
                    "model_load",
                    key_id=key_id,
                    result="stopped",
                    target=f"{role}:{model_name}",
                    detail="keel stopped before the load finished",
                )
                raise
            self.audit.record(
                "model_load", key_id=key_id, result="ok", target=f"{role}:{model_name}"
            )

    async def _swap(
        self, role: Role, model_name: str, context_size: int | None
    ) -> AsyncIterator[Progress]:
        base = self.settings.model.role(role).local or LocalModelConfig()
        if context_size is not None:
            base = base.model_copy(update={"context_size": context_size})
        yield Progress("checking_memory", "estimating weights + KV cache against free memory")
        sized_by = "context_size" if context_size is None else "max_seq_len"
        chosen, path, note = self._plan(role, model_name, base, sized_by)
        yield Progress("checking_memory", note)
        config = base.model_copy(update={"model_id": chosen})
        # The worker of the same model and settings another role runs is shared, as at
        # start (a second engine of one model doubled the memory and split the cores).
        serving = self._names()
        provider = build_local_provider(
            role, config, path, ready_timeout=60.0, running=self._running(), taken=serving
        )
        supervisor, name = provider.supervisor, provider.name
        if name in serving:
            yield Progress("starting_worker", f"sharing {name}, running already")
        else:
            yield Progress("starting_worker", f"starting a worker for {path.name}")
        await provider.start()
        last_state = None
        deadline = time.monotonic() + 300
        switched = False
        try:
            while supervisor.state is not WorkerState.READY:
                failed = supervisor.state is WorkerState.FAILED
                if failed or time.monotonic() > deadline:
                    error = supervisor.last_error or "the worker did not become ready"
                    # the role keeps what it ran: nothing to reload or restart for
                    error = error.removesuffix(f"; {GIVEN_UP_FIX}")
                    if failed and supervisor.killed_for_memory:  # no fault of the file's
                        raise InsufficientMemory(f"{chosen} cannot be loaded: {error}")
                    if failed:  # the engine refused the file: the request's, not the server's
                        raise _unusable(chosen, MissingDependency(error))
                    raise MissingDependency(f"cannot load {chosen}: {error}")
                if supervisor.state != last_state:
                    last_state = supervisor.state
                    if last_state is WorkerState.LOADING:  # "starting" is starting_worker's
                        yield Progress("loading", "the worker is reading the model")
                await asyncio.sleep(0.05)
            yield Progress("switching", "model loaded; switching traffic")
            chain = self._chain(
                [[ProviderEntry(provider, config)], *self._chain_of(role)[1:]], role
            )
            await self._switch(role, chain)
            switched = True
            await self._replace_given_up(provider)
        finally:
            # A load that failed, or was cut short (keel stopping: its worker was left
            # running, orphaned, after keel exited), stops the worker it started.
            if not switched and not self._in_use(provider):
                await provider.aclose()
        log.info("%s now served by %s", role, name)
        served = provider.info.model  # a worker shared keeps the name it runs under
        same = "" if served == chosen else f" (running already: the same file as {chosen})"
        yield Progress("ready", f"{role} is served by {served}{same}")

    async def _replace_given_up(self, provider: LocalProvider) -> None:
        """The roles a worker of the same model and settings served until it was given up
        on are served by ``provider``, the one a load started afresh: only the role loaded
        was, and the others stayed failed (503 on ``/ready``) until a load for each."""
        spec = provider.supervisor.spec

        def given_up(other: Provider) -> bool:
            return (
                isinstance(other, LocalProvider)
                and other.supervisor.spec == spec
                and other.supervisor.state is WorkerState.FAILED
            )

        for role, chain in list(self.routing.providers.chains.items()):
            if any(given_up(entry.provider) for group in chain for entry in group):
                groups = [
                    [ProviderEntry(provider, e.config) if given_up(e.provider) else e for e in g]
                    for g in chain
                ]
                await self._switch(role, self._chain(groups, role))
                log.info("%s now served by %s, started afresh", role, provider.name)

    def _running(self) -> dict[WorkerSpec, LocalProvider]:
        """The local providers serving now, by worker spec (not one given up on: a load
        of its model starts it afresh, where it was refused as the model's fault)."""
        return {
            p.supervisor.spec: p
            for p in self.routing.providers.unique()
            if isinstance(p, LocalProvider) and p.supervisor.state is not WorkerState.FAILED
        }

    def _names(self) -> set[str]:
        """The names of the providers serving now: a new worker's is not one of them."""
        return {p.name for p in self.routing.providers.unique()}

    def _chain_of(self, role: Role) -> list[list[ProviderEntry]]:
        return self.routing.providers.chains[role]

    def _chain(self, groups: list[list[ProviderEntry]], role: Role) -> list[list[ProviderEntry]]:
        """``groups`` as config loading would make the chain: a provider once (a group
        of one already served before it goes), and the embedded model last where the
        role's ``embedded_last_resort`` wants it. A load left completion without it, so
        a crash of the loaded model's worker failed the request instead of falling back."""
        seen: set[int] = set()
        chain = []
        for group in groups:
            if all(id(entry.provider) in seen for entry in group):
                continue
            seen.update(id(entry.provider) for entry in group)
            chain.append(group)
        configs = [entry.config for group in chain for entry in group]
        if wants_embedded_last_resort(
            role, configs, self.settings.model.role(role).embedded_last_resort
        ):
            last = LocalModelConfig()
            path = resolve_model(last.model_id, self.paths)
            resort = build_local_provider(
                role, last, path, ready_timeout=60.0, running=self._running(), taken=self._names()
            )
            chain.append([ProviderEntry(resort, last)])
        return chain

    async def _switch(self, role: Role, chain: list[list[ProviderEntry]]) -> list[Provider]:
        """Serve ``role`` from ``chain``: providers in it start (the last resort, if it
        is new), and those no role uses any more are stopped in the background once
        their requests end."""
        for group in chain:
            for entry in group:
                await entry.provider.start()
        retired = self.routing.set_chain(role, chain)
        if idle := [old for old in retired if not self._in_use(old)]:
            self.background.spawn(self.routing.close_when_idle(idle, self.drain_timeout))
        return retired

    def _in_use(self, provider: object) -> bool:
        return any(
            entry.provider is provider
            for chain in self.routing.providers.chains.values()
            for group in chain
            for entry in group
        )

    async def unload(self, role: Role, *, key_id: str | None) -> dict[str, object]:
        async with self._lock:
            return await self._in_force()._unload(role, key_id=key_id)

    async def _unload(self, role: Role, *, key_id: str | None) -> dict[str, object]:
        chain = self.routing.providers.chains[role]
        if len(chain) <= 1:
            self.audit.record(
                "model_unload",
                key_id=key_id,
                result="refused",
                target=role,
                detail="it is the role's only provider",
            )
            raise Conflict(
                f"{role} has no other provider: unloading would leave it unserved; "
                "load another model instead (a swap) or configure a fallback"
            )
        # Its requests end in the background, as a swap's do: waited for here, under the
        # lock reloads take, an answer streaming held up every reload (a key's
        # revocation too) for as long as it ran, up to the 30-minute drain limit.
        retired = await self._switch(role, self._chain(chain[1:], role))
        self.audit.record("model_unload", key_id=key_id, result="ok", target=role)
        serving = {
            provider.name: [
                other
                for other, chain in self.routing.providers.chains.items()
                if any(entry.provider is provider for group in chain for entry in group)
            ]
            for provider in retired
            if self._in_use(provider)
        }
        return {
            "role": role,
            "unloaded": [p.name for p in retired],
            "still_serving": serving,
        }
