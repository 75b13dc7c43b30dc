"""Wire models of the probes: liveness, readiness, deep health.

Anyone may call these, so what everyone sees is only a status and a one-word
state per role; a caller with a valid key gets more fields (paths, PIDs,
errors), which the models allow but do not list.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from keel.config import Role


class Liveness(BaseModel):
    status: Literal["ok"]


class RoleReadiness(BaseModel):
    usable: bool
    state: str


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    roles: dict[Role, RoleReadiness]


class RoleHealth(BaseModel):
    ok: bool
    seconds: float
    age_seconds: float


class DeepHealthReport(BaseModel):
    status: Literal["ok", "failing"]
    ttl_seconds: float
    roles: dict[Role, RoleHealth]


# --- /v1/providers: each role's chain, as the router sees it (router/service.py) ---------


class _Open(BaseModel):
    """An answer's object that may carry more fields than it lists (a store's own, a
    worker's): the listed ones are always there."""

    model_config = ConfigDict(extra="allow")


class ProviderTimeouts(BaseModel):
    first_token: float = Field(description="Seconds to the first token, connecting included.")
    between_tokens: float = Field(description="Seconds of silence allowed between tokens.")


class ProviderState(BaseModel):
    """One provider endpoint of a role."""

    position: int = Field(description="Its place in the chain: 0 the primary, then fallbacks.")
    name: str
    kind: str
    model: str
    endpoint: str | None = Field(description="A backend's URL, secrets as `***`.")
    breaker: Literal["closed", "open", "half_open"]
    healthy: bool
    usable: bool
    auth_failed: bool
    outstanding: int = Field(description="Requests in flight.")
    last_error: str | None
    latency_p50_ms: float | None = Field(description="To the first token; null before any.")
    rate_limited_for: float = Field(description="Seconds it is held back for a 429.")
    prompts_shrunk: int
    retries: int
    fallbacks_to: int = Field(description="Requests moved to it from the provider before it.")
    timeouts: ProviderTimeouts
    worker: _Open = Field(
        description="The provider's own state: `state`; an HTTP backend's `rate_limit`, a "
        "local worker's process, restarts, engine and prompt-reuse statistics."
    )


class GateAdmission(BaseModel):
    max_concurrent: int
    active: int
    waiting: int
    queue_size: int
    rejected: int
    queued: int
    queue_wait_seconds: float
    degraded: int
    running_by_key: dict[str, int] | None = Field(
        None,
        description="The slots each key holds now, most first (with keys configured): who "
        "the others wait behind. A slot that frees goes to the waiting key running fewest.",
    )


class RoleAdmission(GateAdmission):
    gates: dict[str, GateAdmission] | None = Field(
        None, description="The narrower limit of a local model this role falls back to."
    )


class RoleProviders(BaseModel):
    providers: list[ProviderState]
    serving_fallback: bool = Field(description="The role's last request was a fallback's.")
    admission: RoleAdmission


class StoreStatus(_Open):
    store: str
    up: bool


class SharedState(BaseModel):
    rate_limits: StoreStatus
    keys: StoreStatus
    events: StoreStatus


class ProvidersSnapshot(BaseModel):
    """``GET /v1/providers``."""

    roles: dict[Role, RoleProviders]
    superseded: int = Field(description="Completions cancelled by a newer one from the editor.")
    shared_state: SharedState
    repositories: dict[str, _Open] = Field(description="Each indexed repository's state.")
