"""A reload's routing keeps the endpoint (breaker, health) of a provider it kept, unless
what the endpoint enforces changed: a local model's worker is kept whatever its
first_token_timeout, and its endpoint kept the old one."""

from __future__ import annotations

import tomllib

from keel.config import parse_settings
from keel.providers.catalog import ProviderEntry, Providers
from keel.providers.local import LocalProvider
from keel.router.breaker import BreakerState
from keel.router.router import Endpoint
from keel.router.service import Routing
from keel.workers.supervisor import WorkerSpec, WorkerSupervisor

SPEC = WorkerSpec(model_path="/nonexistent/m.gguf")
PROVIDER = LocalProvider(
    WorkerSupervisor(SPEC, name="local/m"),
    name="local/m",
    model="m",
    ready_timeout=60,
    prompt_template=None,
)


def routing(first_token: int, previous: Routing | None = None, cooldown: int = 60) -> Routing:
    settings = parse_settings(
        tomllib.loads(
            f"[routing]\nbreaker_cooldown_seconds = {cooldown}\n"
            f'[model.completion.local]\nmodel_id = "m.gguf"\nfirst_token_timeout = {first_token}\n'
        ),
        "config.toml",
    )
    config = settings.model.completion.local
    assert config is not None
    entry = ProviderEntry(PROVIDER, config)
    chains = {role: [[entry]] for role in ("completion", "chat", "embedding")}
    return Routing(settings, Providers(chains), previous=previous)  # type: ignore[arg-type]


def endpoint_of(r: Routing) -> Endpoint:
    return r.routers["completion"].endpoints[0]


def test_a_kept_provider_keeps_its_endpoint_unless_its_timeouts_or_routing_changed() -> None:
    first = routing(10)
    for _ in range(5):  # breaker_consecutive_failures' default
        endpoint_of(first).breaker.record_failure()
    assert endpoint_of(first).breaker.state is BreakerState.OPEN
    same = routing(10, previous=first)
    assert endpoint_of(same) is endpoint_of(first)
    assert endpoint_of(same).breaker.state is BreakerState.OPEN  # what keel knew, kept
    longer = routing(99, previous=same)
    assert endpoint_of(longer).timeouts.first_token == 99  # the new limit is enforced
    assert endpoint_of(longer).breaker.state is BreakerState.CLOSED
    other_policy = routing(99, previous=longer, cooldown=5)
    assert endpoint_of(other_policy) is not endpoint_of(longer)


def test_a_reloads_admission_goes_on_counting() -> None:
    """/v1/providers' queued, waits, refusals and smaller completions began at 0 again
    after a reload, while their metrics went on."""
    first = routing(10)
    admission = first.admission["completion"]
    admission.queued, admission.queue_wait_seconds, admission.rejected = 4, 2.5, 3
    admission.note_degraded()
    after = routing(10, previous=first).admission["completion"].snapshot()
    assert (after["queued"], after["queue_wait_seconds"], after["rejected"]) == (4, 2.5, 3)
    assert after["degraded"] == 1
