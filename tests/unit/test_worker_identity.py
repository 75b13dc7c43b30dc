"""A worker is also told apart by the file its model path named when the config was read,
links resolved: a link pointed at another file (``current.gguf``) kept the old model
through a reload, its path unchanged and so its worker kept. Providers are built here,
not started: no engine runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from keel.config import Paths, load_settings
from keel.models.registry import embedded_model_path
from keel.providers.base import Provider
from keel.providers.catalog import Providers, build_providers
from keel.workers.supervisor import WorkerSpec


def providers_for(root: Path, model: Path, previous: Providers | None = None) -> Providers:
    config = root / "config.toml"
    config.write_text(f'[model.completion.local]\nmodel_id = "{model}"\n')
    settings = load_settings(config, Paths(root), {})
    return build_providers(settings, Paths(root), previous)


def completion_of(providers: Providers) -> Provider:
    return providers.chains["completion"][0][0].provider


def test_a_reload_after_a_link_is_repointed_loads_the_new_file(
    tmp_path: Path,
) -> None:
    embedded = embedded_model_path()
    other = tmp_path / "other.gguf"  # the same weights under another name: another file
    try:
        os.link(embedded, other)
    except OSError:  # another file system
        shutil.copyfile(embedded, other)
    link = tmp_path / "current.gguf"
    link.symlink_to(embedded)

    first = providers_for(tmp_path, link)
    chat = first.chains["chat"][0][0].provider
    spec = completion_of(first).supervisor.spec  # type: ignore[attr-defined]
    assert spec.model_path == str(link)  # loaded as configured (split parts sit beside it)

    again = providers_for(tmp_path, link, previous=first)
    assert completion_of(again) is completion_of(first), "an unchanged file keeps its worker"

    link.unlink()
    link.symlink_to(other)
    repointed = providers_for(tmp_path, link, previous=again)
    assert completion_of(repointed) is not completion_of(again), "the link's new file loads"
    assert repointed.chains["chat"][0][0].provider is chat

    assert WorkerSpec(str(link)) != spec, "the same path, another file"
    assert WorkerSpec(str(link)) == WorkerSpec(str(link))
