"""Build every provider the config names, role by role, chain by chain.

Local models that several roles or chains share run in one worker
(completion and chat on the embedded model); embeddings need a context
loaded for embeddings and get their own. An HTTP provider with several
``api_endpoints`` becomes one provider per replica, grouped.

:func:`build_local_provider` is the one way keel makes a local model's
provider: at startup, on a config reload, on ``POST /v1/model/load`` and for
``keel eval``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from keel.config import (
    EMBEDDED_MODEL_ID,
    EMBEDDING_CONTEXT,
    ROLES,
    HttpModelConfig,
    LocalModelConfig,
    Paths,
    ProviderConfig,
    Role,
    Settings,
    local_tables,
    masked_url,
)
from keel.errors import ConfigError, ConfigIssue, MissingDependency
from keel.models import gguf
from keel.models.registry import embedded_model_path, resolve_model, tabby_prompt_template
from keel.pipeline.prompt import (
    FIM_TEMPLATES,
    TEMPLATE_OF_MARKERS,
    template_for_model,
)
from keel.providers.base import Provider
from keel.providers.local import LocalProvider
from keel.router.router import DEFAULT_TIMEOUTS, with_overrides
from keel.workers.supervisor import WorkerSpec, WorkerState, WorkerSupervisor


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """One provider in a role's chain, with the config it came from."""

    provider: Provider
    config: ProviderConfig


@dataclass(frozen=True, slots=True)
class Providers:
    chains: dict[Role, list[list[ProviderEntry]]]
    """Per role: the groups in fallback order; each group holds a provider's replicas."""
    pending: list[Callable[[], None]] = field(default_factory=list)
    """Changes to providers serving already (a running worker's completion settings),
    made by :meth:`commit` once a reload is sure to take this config."""

    def commit(self) -> None:
        for change in self.pending:
            change()
        self.pending.clear()

    def unique(self) -> list[Provider]:
        seen: dict[int, Provider] = {}
        for role in ROLES:
            for group in self.chains[role]:
                for entry in group:
                    seen.setdefault(id(entry.provider), entry.provider)
        return list(seen.values())

    def for_role(self, role: Role) -> Provider:
        """The role's primary provider."""
        return self.chains[role][0][0].provider


def wants_embedded_last_resort(role: Role, chain: list[ProviderConfig], flag: bool | None) -> bool:
    """Whether the embedded model goes last in ``role``'s chain: enabled (``flag``;
    by default for completion only), and not in the chain already, by its name or by
    its file's path (a load by path put the same worker in the chain twice)."""
    enabled = role == "completion" if flag is None else flag
    already = any(
        isinstance(config, LocalModelConfig) and _is_embedded(config.model_id) for config in chain
    )
    return enabled and not already


def _is_embedded(model_id: str) -> bool:
    """``model_id`` names the embedded model: its id, or its file's path however it is
    written (relative, with ``~``, ``..``). A copy or a link elsewhere is another file,
    which runs in a worker of its own."""
    if model_id == EMBEDDED_MODEL_ID:
        return True
    if not model_id.lower().endswith(".gguf"):
        return False
    try:
        embedded = embedded_model_path()
        given = Path(model_id).expanduser()
    except (MissingDependency, RuntimeError):  # no embedded package; "~user" unknown
        return False
    return os.path.normpath(given.absolute()) == os.path.normpath(embedded.absolute())


def read_timeout(role: Role, config: HttpModelConfig) -> float:
    """How long one read of a backend's answer may wait: the provider's first-token or
    between-tokens limit, whichever is longer (the router holds each request to them).
    ``[server] completion_timeout`` bounded every read, so a lowered one cut off slow
    chat and embedding backends, whatever their own limits said."""
    limits = with_overrides(config, DEFAULT_TIMEOUTS[role])
    return max(limits.first_token, limits.between_tokens)


_GPU_PROBE = (
    "import sys, xllamacpp as x; t = x.ggml_backend_dev_type; gpus = "
    "(t.GGML_BACKEND_DEVICE_TYPE_GPU, t.GGML_BACKEND_DEVICE_TYPE_IGPU); "
    "sys.stdout.write(str(any(d['type'] in gpus for d in x.get_device_info())))"
)


@functools.cache
def engine_has_gpu() -> bool | None:
    """Whether keel's engine has a GPU to put layers on here (a GPU build of xllamacpp
    that sees a GPU device), asked of the engine in a child process as ``keel doctor``
    asks it (the server never loads the native library itself); None when it cannot say
    (not installed, crashed). Asked once, and only for a config that sets
    ``num_gpu_layers``."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    answer = result.stdout.strip()
    return answer == "True" if result.returncode == 0 and answer in ("True", "False") else None


def _gpu_layers(config: LocalModelConfig) -> int:
    """The layers a worker offloads: none where the engine has no GPU, whatever is set (the
    setting did nothing there, yet told two workers of one model apart)."""
    if config.num_gpu_layers and engine_has_gpu() is False:
        return 0
    return config.num_gpu_layers


def gpu_layers_trouble(settings: Settings) -> str | None:
    """``num_gpu_layers`` set where the engine has no GPU, said once for every table that
    sets it (``keel serve``, ``keel config check``); None when none does, or it works."""
    keys = [f"{w}.num_gpu_layers" for w, t in local_tables(settings) if t.num_gpu_layers]
    if not keys or engine_has_gpu() is not False:
        return None
    return (
        f"{', '.join(keys)} does nothing: keel's engine has no GPU here (a CPU build of "
        "xllamacpp, or no GPU device it can see), so every layer runs on the CPU and the "
        "roles sharing a model share its worker whatever each sets; remove it, or install "
        "a GPU build of the engine (README: GPU)"
    )


def local_worker_spec(role: Role, config: LocalModelConfig, model_path: Path) -> WorkerSpec:
    """The worker a local model needs to serve ``role``: embeddings get a context
    loaded for embeddings (:data:`EMBEDDING_CONTEXT` unless configured), with one slot."""
    embedding = role == "embedding"
    context = config.context_size
    if embedding and "context_size" not in config.model_fields_set:
        context = EMBEDDING_CONTEXT
    return WorkerSpec(
        model_path=str(model_path),
        context_size=context,
        threads=config.threads,
        gpu_layers=_gpu_layers(config),
        embedding=embedding,
        slots=1 if embedding else config.parallelism,
    )


def build_local_provider(
    role: Role,
    config: LocalModelConfig,
    model_path: Path,
    *,
    ready_timeout: float,
    running: dict[WorkerSpec, LocalProvider] | None = None,
    taken: Collection[str] = (),
    pending: list[Callable[[], None]] | None = None,
) -> LocalProvider:
    """A provider over a supervised worker for ``model_path`` (not started yet).

    ``running`` holds the providers already made, by worker spec: one whose
    spec matches is returned instead of a new one (roles sharing a model share
    its worker; a reload keeps an unchanged worker), and a new one is added.
    ``taken``: the names of the providers that will serve beside it. A second worker
    of one model (other settings for another role) is ``#1``: both were named alike,
    so their metrics were one series twice over (Prometheus kept one worker's restarts
    and dropped the other's) and messages named one provider for two. ``pending``: where
    a change to a running provider waits for the caller's commit (a reload refused later
    changed the serving model's template and stop words all the same); without, it is
    made at once."""
    spec = local_worker_spec(role, config, model_path)
    template = config.prompt_template or _tabby_template(role, model_path)
    template = template or template_for_model(config.model_id)
    if template is None and not spec.embedding and config.model_id != EMBEDDED_MODEL_ID:
        template = _template_of_file(model_path)
    stop_words = tuple(config.additional_stop_words)
    if running is not None and spec in running:
        provider = running[spec]
        if role == "completion":  # completion's own settings (a reload's, a load's)
            change = functools.partial(provider.configure, template, stop_words)
            if pending is None:
                change()
            else:
                pending.append(change)
        return provider
    base = f"local/{config.model_id}" + ("/embedding" if spec.embedding else "")
    name, number = base, 0
    while name in taken:
        number += 1
        name = f"{base}#{number}"
    provider = LocalProvider(
        WorkerSupervisor(spec, name=name),
        name=name,
        model=config.model_id,
        ready_timeout=ready_timeout,
        prompt_template=template,
        stop_words=stop_words,
    )
    if running is not None:
        running[spec] = provider
    return provider


def _tabby_template(role: Role, model_path: Path) -> str | None:
    """A Tabby model directory's own ``prompt_template`` (``tabby.json``), checked as a
    configured one is: Tabby refuses to start on a file it cannot read."""
    try:
        template = tabby_prompt_template(model_path)
    except ValueError as exc:
        key = f"model.{role}.local.model_id"
        raise ConfigError(str(model_path), [ConfigIssue(key, str(exc))]) from None
    return template


def _template_of_file(model_path: Path) -> str | None:
    """The FIM template of the markers the model's vocabulary holds: a file whose name
    tells no family (renamed, or a fine-tune) was prompted with its prefix alone, while
    `keel models list` showed its FIM tokens. Unreadable: the worker will say why."""
    try:
        _, vocabulary = gguf.read_header(model_path)
    except (MissingDependency, OSError):
        return None
    family = gguf.fim_family(vocabulary)
    return None if family is None else FIM_TEMPLATES[TEMPLATE_OF_MARKERS[family]]


def _chain_configs(settings: Settings, role: Role) -> list[ProviderConfig]:
    """The providers ``role`` is served by, in order: its chain, and the embedded model
    last where wanted."""
    role_config = settings.model.role(role)
    configs = role_config.chain()
    if wants_embedded_last_resort(role, configs, role_config.embedded_last_resort):
        configs.append(LocalModelConfig())
    return configs


def build_providers(
    settings: Settings, paths: Paths, previous: Providers | None = None
) -> Providers:
    """Raises MissingDependency for a model file that cannot be found, ConfigError for
    an HTTP table that cannot work (no endpoint, no model where one is required).

    ``previous``: the providers a config reload replaces. A local worker whose spec is
    unchanged keeps running instead of loading its model again; an HTTP provider whose
    table is unchanged is kept, with its
    connections and rate limit.
    """
    timeout = settings.server.completion_timeout
    workers: dict[WorkerSpec, LocalProvider] = {}
    kept_http: dict[str, ProviderEntry] = {}
    if previous is not None:
        # A worker given up on (its start limit, an unloadable file) is started afresh: a
        # reload kept it failed, and every request of its roles a 503 until keel restarted
        workers = {
            p.supervisor.spec: p
            for p in previous.unique()
            if isinstance(p, LocalProvider) and p.supervisor.state is not WorkerState.FAILED
        }
        kept_http = {
            entry.provider.name: entry
            for groups in previous.chains.values()
            for group in groups
            for entry in group
            if not isinstance(entry.provider, LocalProvider)
        }

    configs_of = {role: _chain_configs(settings, role) for role in ROLES}
    resolved: dict[str, Path] = {}

    def path_of(model_id: str) -> Path:
        if model_id not in resolved:
            resolved[model_id] = resolve_model(model_id, paths)
        return resolved[model_id]

    # The workers a reload keeps keep their names, taken before a new worker is named: a
    # new one of the same model (one role's settings changed, splitting a shared worker)
    # was given the kept one's name, two providers under one name, their metrics one
    # series twice over.
    names = (
        {
            workers[spec].name
            for role, configs in configs_of.items()
            for config in configs
            if isinstance(config, LocalModelConfig)
            and (spec := local_worker_spec(role, config, path_of(config.model_id))) in workers
        }
        if workers
        else set()
    )
    pending: list[Callable[[], None]] = []

    def local(role: Role, config: LocalModelConfig) -> LocalProvider:
        path = path_of(config.model_id)
        provider = build_local_provider(
            role,
            config,
            path,
            ready_timeout=max(timeout, 60.0),
            running=workers,
            taken=names,
            pending=pending if previous is not None else None,
        )
        names.add(provider.name)
        return provider

    chains: dict[Role, list[list[ProviderEntry]]] = {}
    for role, configs in configs_of.items():
        groups: list[list[ProviderEntry]] = []
        for index, config in enumerate(configs):
            if isinstance(config, LocalModelConfig):
                groups.append([ProviderEntry(local(role, config), config)])
                continue
            label = "" if index == 0 else f"#{index}"
            replicas = config.replicas()
            group = []
            for replica in replicas:
                name = f"{role}/{config.kind}{label}"
                if len(replicas) > 1:
                    name += f"@{masked_url(replica.api_endpoint or '')}"  # names are shown
                old = kept_http.get(name)
                if old is not None and old.config == replica:
                    group.append(old)
                    continue
                # aiohttp and the adapters (~0.12 s to import) only for a keel that has
                # an HTTP provider: a local-only one, and every worker, start without them
                from keel.providers.http import build_http_provider

                read = read_timeout(role, replica)
                provider = build_http_provider(role, replica, name=name, timeout=read)
                group.append(ProviderEntry(provider, replica))
            groups.append(group)
        chains[role] = groups
    return Providers(chains, pending)
