"""Where keel finds a local model's file, and what it says when it finds none: Tabby's
model directories of every version, its registry's single-file models, and a
``model_id`` naming a directory that is no model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keel.config import Paths
from keel.errors import MissingDependency
from keel.models.registry import list_model_files, resolve_model
from keel.models.tabby_registry import lookup
from tests.forked import run_keel
from tests.models.fake_hub import FakeHub

QWEN2 = "Qwen/Qwen2-1.5B-Instruct-GGUF"
QWEN2_FILE = "qwen2-1_5b-instruct-q8_0.gguf"
QWEN2_SHA256 = "1fabf28bda17e96824bacc29e43b09ec4ba8a82d190f700cbdd1286586a05311"
"""registry-tabby's models.json: Qwen2-1.5B-Instruct, Tabby's quickstart chat model."""


def test_a_tabby_model_stored_as_model_gguf_is_found_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tabby versions whose GGML_MODEL_RELATIVE_PATH is ``ggml/model.gguf``: its models
    were "not found", and ``keel models list`` left them out."""
    monkeypatch.setenv("TABBY_MODEL_CACHE_ROOT", str(tmp_path / "tabby"))
    weights = tmp_path / "tabby/TabbyML/StarCoder-1B/ggml/model.gguf"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"GGUF")
    paths = Paths(tmp_path / "keel")
    assert resolve_model("TabbyML/StarCoder-1B", paths) == weights
    assert resolve_model(str(weights.parent.parent), paths) == weights  # the directory
    listed = [(m.name, m.path) for m in list_model_files(paths) if not m.embedded]
    assert listed == [("TabbyML/StarCoder-1B", weights)]


@pytest.mark.parametrize("spec", ["Qwen2-1.5B-Instruct", "TabbyML/Qwen2-1.5B-Instruct"])
def test_tabbys_quickstart_chat_model_pulls_the_registrys_file(
    spec: str, header_bytes: bytes, tmp_path: Path
) -> None:
    """Every single-file model of registry-tabby is pullable by its Tabby name; the
    quickstart's chat model, Qwen2-1.5B-Instruct, was "not a repo". The stand-in hub
    serves other bytes under the registry's file, so the registry's sha256 refuses them:
    the file asked for and the checksum held to are the registry's."""
    with FakeHub({QWEN2: {QWEN2_FILE: header_bytes}}) as hub:
        env = {
            **os.environ,
            "KEEL_ROOT": str(tmp_path),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        env.pop("HF_TOKEN", None)
        env.pop("HF_HUB_OFFLINE", None)
        pulled = run_keel(["models", "pull", spec], env, timeout=120)
        downloads = [seen.path for seen in hub.downloads()]
    assert downloads == [f"/{QWEN2}/resolve/main/{QWEN2_FILE}"], pulled.stderr
    assert pulled.returncode != 0 and QWEN2_SHA256 in pulled.stderr, pulled.stderr
    assert "failed its checksum" in pulled.stderr


def test_the_registrys_chat_and_embedding_models_are_known_by_name() -> None:
    for name in (
        "Mistral-7B",
        "CodeGemma-7B-Instruct",
        "CodeQwen-7B",
        "CodeQwen-7B-Chat",
        "Jina-Embeddings-V2-Code",
        "Yi-Coder-9B-Chat",
    ):
        entry = lookup(f"TabbyML/{name}")
        assert entry is not None and entry.name == name, name
        assert entry.filename.endswith(".gguf") and len(entry.sha256) == 64, entry


def test_a_directory_or_a_file_url_says_what_model_id_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model_id = "root/models"`` (a directory) said "or pull it: keel models pull
    root/models"; a file:// URL, only "not found"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "root/models").mkdir(parents=True)
    paths = Paths(tmp_path / "keel")
    with pytest.raises(MissingDependency) as directory:
        resolve_model("root/models", paths)
    said = directory.value.message
    assert said.startswith(f"model 'root/models' is a directory ({tmp_path / 'root/models'})")
    assert "a .gguf file, or a Tabby model directory with its weights in ggml/" in said
    assert "keel models pull" not in said
    model = tmp_path / "root/models/a b.gguf"
    url = "file://" + str(model).replace(" ", "%20")
    with pytest.raises(MissingDependency) as as_url:
        resolve_model(url, paths)
    assert as_url.value.message == (
        f"model {url!r} is a URL, where model_id takes a path: write {str(model)!r}"
    )
