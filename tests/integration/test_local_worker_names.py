"""A worker of the same model as another keeps a name of its own (``...#1``) however it
came to be: at start, or by a reload that split a worker two roles shared (both were
named alike, /metrics had each series twice, the log said it started and stopped the
same name)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_keel

pytestmark = pytest.mark.integration

SHARED = '[model.completion.local]\nmodel_id = "SmolLM2-135M-Instruct"\n'
NAME = "local/SmolLM2-135M-Instruct"


def local_workers(url: str) -> dict[str, int]:
    """The local providers /v1/providers lists, name to worker pid, each name once."""
    roles = httpx.get(f"{url}/v1/providers", timeout=10).json()["roles"]
    pids = {}
    for role in ("completion", "chat"):
        for provider in roles[role]["providers"]:
            pid = provider["worker"]["pid"]
            assert pids.setdefault(provider["name"], pid) == pid, (provider["name"], roles)
    return pids


def test_a_reload_splitting_a_shared_worker_names_the_new_one_apart(tmp_path: Path) -> None:
    with running_keel(tmp_path, SHARED) as server:
        assert list(local_workers(server.url)) == [NAME]
        (tmp_path / "config.toml").write_text(SHARED + "parallelism = 3\n")
        reloaded = httpx.post(f"{server.url}/v1/admin/reload", timeout=120)
        assert reloaded.status_code == 200, reloaded.text

        workers = local_workers(server.url)
        assert set(workers) == {NAME, f"{NAME}#1"}, workers
        assert len(set(workers.values())) == 2, workers  # two workers, two names
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        series = re.findall(r"^keel_worker_restarts_total\{[^}]*\}", metrics, re.MULTILINE)
        assert len(series) == len(set(series)), series
        assert f'keel_worker_restarts_total{{provider="{NAME}#1"}}' in series
