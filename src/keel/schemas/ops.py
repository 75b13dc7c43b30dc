"""Wire models of the probes: liveness, readiness, deep health.

Anyone may call these, so what everyone sees is only a status and a one-word
state per role; a caller with a valid key gets more fields (paths, PIDs,
errors), which the models allow but do not list.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

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
