"""``num_gpu_layers`` on an engine with no GPU (the CPU wheel keel installs): it does
nothing there, so it is said once and kept out of the worker's identity. Set for one
role only, it split completion and chat on one file into two workers (``--gpu-layers
9999`` and ``0``), and a load of the same file by path started a third."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from keel.models.registry import embedded_model_path
from keel.providers.catalog import engine_has_gpu
from tests.conftest import keel_cli, running_keel

pytestmark = pytest.mark.integration


def test_gpu_layers_on_a_cpu_engine_are_said_once_and_split_no_worker(tmp_path: Path) -> None:
    assert engine_has_gpu() is False, "the test runs on keel's CPU build of the engine"
    model = embedded_model_path()
    config = (
        f'[model.completion.local]\nmodel_id = "{model}"\nnum_gpu_layers = 9999\n'
        f'[model.chat.local]\nmodel_id = "{model}"\n'
    )
    warning = "model.completion.local.num_gpu_layers does nothing: keel's engine has no GPU"
    (tmp_path / "config.toml").write_text(config)
    checked = keel_cli("config", "check", str(tmp_path / "config.toml"), env=dict(os.environ))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.count(warning) == 1, checked.stderr

    with running_keel(tmp_path, config) as server:
        roles = httpx.get(f"{server.url}/v1/providers", timeout=10).json()["roles"]
        completion, chat = roles["completion"]["providers"][0], roles["chat"]["providers"][0]
        assert completion["name"] == chat["name"], roles
        assert completion["worker"]["pid"] == chat["worker"]["pid"]
        assert server.log.read_text().count(warning) == 1

        loaded = httpx.post(
            f"{server.url}/v1/model/load",
            json={"model_name": str(model), "role": "completion", "stream": False},
            timeout=120,
        )
        assert loaded.status_code == 200, loaded.text
        roles = httpx.get(f"{server.url}/v1/providers", timeout=10).json()["roles"]
        assert roles["completion"]["providers"][0]["worker"]["pid"] == chat["worker"]["pid"]
