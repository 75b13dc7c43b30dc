"""Wire models of the control plane: TabbyAPI's model management, config reload.

The model management routes are TabbyAPI's contract, and TabbyAPI reads them in
pydantic's default lax mode: its own loader (ST-tabbyAPI-loader) sends
``"max_seq_len": "4096"`` and the model as ``name``. So these models are lax (the
OpenAI and Tabby bodies are strict): what lax mode takes is converted (``"4096"``,
``4096.0``, ``"true"``); anything else is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from keel.config import Role

UNKNOWN_FIELD = "unknown_field"
"""The error type of a field a body does not take; its ``field`` is the error's param."""


class _Wire(BaseModel):
    """A field the route does not know is a 400 naming it: ignored, ``{"rol": "chat"}``
    unloaded the completion model, and ``{"model_name": "m", "roel": "chat"}`` swapped
    completion's. What TabbyAPI's own clients send and keel has no use for
    (``taken``) is taken and not used."""

    model_config = ConfigDict(extra="ignore")
    taken: ClassVar[frozenset[str]] = frozenset()
    also: ClassVar[str] = ""
    """What the refusal adds after the fields it names (those ``taken``)."""

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            names = {name: _names(name, field) for name, field in cls.model_fields.items()}
            known = {name for aliases in names.values() for name in aliases} | cls.taken
            unknown = sorted(str(key) for key in data if key not in known)
            if unknown:
                fields = [
                    f"{aliases[0]} (or {', '.join(aliases[1:])})" if len(aliases) > 1 else name
                    for name, aliases in names.items()
                ]
                takes = ", ".join(fields) or "no fields"
                said = f"unknown field {unknown[0]!r}: this takes {takes}{cls.also}"
                # its name is the error's param (it was "body")
                raise PydanticCustomError(
                    UNKNOWN_FIELD, "{said}", {"said": said, "field": unknown[0]}
                )
        return data


def _names(name: str, field: Any) -> list[str]:
    """A field's names in a body: its own, first, and its aliases."""
    alias = field.validation_alias
    others = [str(choice) for choice in alias.choices] if isinstance(alias, AliasChoices) else []
    return [name, *(other for other in others if other != name)]


TABBYAPI_LOAD_SETTINGS = frozenset(
    {
        "override_base_seq_len",
        "cache_size",
        "tensor_parallel",
        "gpu_split_auto",
        "autosplit_reserve",
        "gpu_split",
        "rope_scale",
        "rope_alpha",
        "cache_mode",
        "chunk_size",
        "prompt_template",
        "num_experts_per_token",
        "fasttensors",
        "draft",
        "skip_queue",
    }
)
"""TabbyAPI's load settings for its ExLlama engine, which its clients send: taken, not used."""


class LoadRequest(_Wire):
    """``POST /v1/model/load``: swap a role to another local model."""

    taken = TABBYAPI_LOAD_SETTINGS
    also = " (TabbyAPI's other load settings are taken and not used)"

    model_name: str = Field(
        min_length=1,
        max_length=512,
        validation_alias=AliasChoices("model_name", "name"),
        description="A model from GET /v1/model/list (its id), or a .gguf file's path. "
        "``name`` is taken too, as TabbyAPI takes it (its loader sends that).",
    )
    role: Role = "completion"
    max_seq_len: int | None = Field(
        None,
        ge=128,
        le=1_048_576,  # as context_size: beyond, a 507 needing zettabytes of memory
        description="Context window in tokens per slot (TabbyAPI's name), at most "
        "1,048,576; default: the role's [model.<role>.local] context_size.",
    )
    stream: bool = Field(
        True, description="Stream progress as server-sent events; false answers once at the end."
    )


class UnloadRequest(_Wire):
    """``POST /v1/model/unload``: stop a role's primary model (its fallback then serves).
    No body, as TabbyAPI's clients send it: the completion model."""

    role: Role = "completion"


class ReloadRequest(_Wire):
    """``POST /v1/admin/reload`` takes no parameters: the config file keel was started
    with is read again. A body, if sent, is an empty JSON object."""


class LoadProgress(BaseModel):
    """One step of a load: an SSE event's data, or the whole answer with ``"stream": false``.
    TabbyAPI's fields (``model_type``, ``module``, ``modules``, ``status``) and keel's."""

    model_type: Literal["model", "embedding"]
    module: int = Field(description="This step's number, of ``modules``.")
    modules: int
    status: Literal["processing", "finished"] = Field(
        description="As TabbyAPI's: ``finished`` once the model serves (an error event has "
        "``error`` and ``status: error`` instead)."
    )
    step: str = Field(
        description="queued | checking_memory | starting_worker | loading | switching | ready"
    )
    role: Role
    model_name: str
    message: str


class UnloadResult(BaseModel):
    role: Role
    unloaded: list[str]
    """The models the role no longer runs."""
    still_serving: dict[str, list[Role]]
    """Of those, the ones still running for other roles (a worker shared by roles): their
    worker was not stopped."""


class ReloadResult(BaseModel):
    status: Literal["reloaded"]
    chains: dict[Role, list[str]]
    started: list[str]
    stopping: list[str]


class DownloadRequest(_Wire):
    """``POST /v1/model/download``: pull a GGUF model into the model directory."""

    model: str = Field(
        min_length=1,
        max_length=512,
        description="A Hugging Face file (org/repo:file.gguf), a repo (org/repo, with quant "
        "when it has several GGUF files), or a Tabby registry name (TabbyML/StarCoder-1B).",
    )
    quant: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="With a repo: the GGUF file whose name holds this, e.g. Q8_0.",
    )
    stream: bool = Field(
        True, description="Stream progress as server-sent events; false answers once at the end."
    )


class DownloadProgress(BaseModel):
    """One step of a download: an SSE event's data, or the last one with ``"stream": false``."""

    model: str
    status: str = Field(description="resolving | warning | downloading | verifying | ready")
    message: str
    downloaded_bytes: int | None = None
    total_bytes: int | None = None
    model_name: str | None = Field(None, description="On ready: the name to load it by.")
    size_bytes: int | None = None
    sha256: str | None = None
    already_present: bool | None = None
