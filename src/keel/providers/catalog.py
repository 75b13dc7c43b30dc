"""Build the providers each role uses from the settings.

Local models that several roles share run in one worker (completion and chat
on the embedded model); embeddings need a context loaded for embeddings and
get their own. Fallback entries are validated by the config and used by the
router; this module builds the primaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.config import (
    ROLES,
    HttpModelConfig,
    LocalModelConfig,
    Paths,
    ProviderConfig,
    Role,
    Settings,
)
from keel.models.registry import resolve_model
from keel.providers.base import ChatProvider, CompletionProvider, EmbeddingProvider, Provider
from keel.providers.http import build_http_provider
from keel.providers.local import LocalProvider
from keel.workers.supervisor import WorkerSpec, WorkerSupervisor


@dataclass(frozen=True, slots=True)
class Providers:
    completion: CompletionProvider
    chat: ChatProvider
    embedding: EmbeddingProvider

    def for_role(self, role: Role) -> Provider:
        provider: Provider = getattr(self, role)
        return provider

    def unique(self) -> list[Provider]:
        seen: dict[int, Provider] = {}
        for role in ROLES:
            provider = self.for_role(role)
            seen.setdefault(id(provider), provider)
        return list(seen.values())


def build_providers(settings: Settings, paths: Paths) -> Providers:
    workers: dict[WorkerSpec, LocalProvider] = {}
    built: dict[Role, Provider] = {}
    timeout = settings.server.completion_timeout
    for role in ROLES:
        config: ProviderConfig = settings.model.role(role).primary()
        if isinstance(config, HttpModelConfig):
            built[role] = build_http_provider(
                role, config, name=f"{role}/{config.kind}", timeout=timeout
            )
            continue
        assert isinstance(config, LocalModelConfig)
        path = resolve_model(config.model_id, paths)
        spec = WorkerSpec(
            model_path=str(path),
            context_size=config.context_size,
            threads=config.threads,
            gpu_layers=config.num_gpu_layers,
            embedding=role == "embedding",
        )
        if spec not in workers:
            suffix = "/embedding" if spec.embedding else ""
            name = f"local/{config.model_id}{suffix}"
            workers[spec] = LocalProvider(
                WorkerSupervisor(spec, name=name),
                name=name,
                model=config.model_id,
                ready_timeout=max(timeout, 60.0),
                prompt_template=config.prompt_template,
            )
        built[role] = workers[spec]
    completion, chat, embedding = built["completion"], built["chat"], built["embedding"]
    assert isinstance(completion, CompletionProvider)
    assert isinstance(chat, ChatProvider)
    assert isinstance(embedding, EmbeddingProvider)
    return Providers(completion, chat, embedding)
