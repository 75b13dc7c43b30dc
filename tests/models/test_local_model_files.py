"""Where keel finds a local model's file, and what it says when it finds none: Tabby's
model directories of every version, its registry's single-file models, and a
``model_id`` naming a directory that is no model."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import Paths
from keel.models.registry import list_model_files, resolve_model


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
