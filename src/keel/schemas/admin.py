"""Wire models of the control plane: TabbyAPI's model management, config reload."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from keel.config import Role


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoadRequest(_Wire):
    """``POST /v1/model/load``: swap a role to another local model."""

    model_name: str = Field(
        min_length=1,
        max_length=512,
        description="A model from GET /v1/model/list (its id), or a .gguf file's path.",
    )
    role: Role = "completion"
    stream: bool = Field(
        True, description="Stream progress as server-sent events; false answers once at the end."
    )


class UnloadRequest(_Wire):
    """``POST /v1/model/unload``: stop a role's primary model (its fallback then serves)."""

    role: Role = "completion"


class ReloadRequest(_Wire):
    """``POST /v1/admin/reload`` takes no parameters: the config file keel was started
    with is read again. A body, if sent, is an empty JSON object."""


class LoadProgress(BaseModel):
    """One step of a load: an SSE event's data, or the whole answer with ``"stream": false``."""

    role: Role
    model_name: str
    status: str = Field(
        description="queued | checking_memory | starting_worker | loading | ready | error"
    )
    message: str


class UnloadResult(BaseModel):
    role: Role
    unloaded: list[str]


class ReloadResult(BaseModel):
    status: Literal["reloaded"]
    chains: dict[Role, list[str]]
    started: list[str]
    stopping: list[str]
