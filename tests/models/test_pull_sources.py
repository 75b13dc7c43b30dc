"""A pull never replaces a model it did not pull from the same repo and file.

A pull of ``other/x-GGUF:tiny.gguf`` replaced ``models/tiny.gguf`` pulled from
another repo (one event: "differs from the hub's file: replacing it"), even while
a worker ran it; ``repo:sub/a/deep.gguf`` and ``repo:sub/b/deep.gguf`` both landed
as ``models/deep.gguf``, the second over the first."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import EMBEDDED_MODEL_ID, Paths
from keel.errors import Conflict
from keel.models.pull import STAGING_DIR, ModelPuller, PullProgress
from tests.models.fake_hub import FakeHub

FIRST = "keel-test/first-GGUF"
OTHER = "keel-test/other-GGUF"
FOLDERS = "keel-test/folders-GGUF"
SAME_NAME = "keel-test/smol-GGUF"


@pytest.fixture
def newer(model_bytes: bytes) -> bytes:
    """Another valid GGUF file: the same model with bytes after its tensors."""
    return model_bytes + b"\0" * 64


@pytest.fixture
def hub(model_bytes: bytes, newer: bytes, tmp_path: Path) -> Iterator[FakeHub]:
    repos = {
        FIRST: {"tiny.gguf": model_bytes},
        OTHER: {"tiny.gguf": newer},
        FOLDERS: {"sub/a/deep.gguf": model_bytes, "sub/b/deep.gguf": newer},
        SAME_NAME: {f"{EMBEDDED_MODEL_ID}.gguf": newer},
    }
    with FakeHub(repos) as fake:
        yield fake


def puller(hub: FakeHub, paths: Paths) -> ModelPuller:
    return ModelPuller(paths, endpoint=hub.url, environ={"HF_HOME": str(paths.root / "hf")})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_staging_left(paths: Paths) -> bool:
    staging = paths.models_dir / STAGING_DIR
    return not staging.is_dir() or not any(staging.iterdir())


def test_a_file_of_another_repo_is_not_replaced(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    first = puller(hub, paths).pull(f"{FIRST}:tiny.gguf")
    before = len(hub.downloads())
    for attempt in (puller(hub, paths).preflight, puller(hub, paths).pull):
        with pytest.raises(Conflict) as refused:
            attempt(f"{OTHER}:tiny.gguf")
        message = refused.value.message
        assert str(first.path) in message and f"{FIRST}:tiny.gguf" in message, message
        assert "rename it" in message and "remove it" in message, message
        assert refused.value.status_code == 409
    assert len(hub.downloads()) == before  # refused before a byte was fetched
    assert first.path.read_bytes() == model_bytes
    assert no_staging_left(paths)


def test_same_named_files_in_two_folders_of_a_repo_do_not_collide(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    deep = puller(hub, paths).pull(f"{FOLDERS}:sub/a/deep.gguf")
    with pytest.raises(Conflict) as refused:
        puller(hub, paths).pull(f"{FOLDERS}:sub/b/deep.gguf")
    assert f"{FOLDERS}:sub/a/deep.gguf" in refused.value.message
    assert deep.path.read_bytes() == model_bytes


def test_a_file_put_there_by_hand_is_not_replaced(hub: FakeHub, paths: Paths) -> None:
    paths.models_dir.mkdir(parents=True)
    mine = paths.models_dir / "tiny.gguf"
    mine.write_bytes(b"GGUF my own model")
    with pytest.raises(Conflict) as refused:
        puller(hub, paths).pull(f"{FIRST}:tiny.gguf")
    message = refused.value.message
    assert "keel has no record of pulling it" in message, message
    # it may be an older version a keel from before 2026-12-04 pulled (and kept no
    # record of): "another model" was untrue for those
    assert "another model" not in message and "older version" in message, message
    assert mine.read_bytes() == b"GGUF my own model"


def test_the_same_file_put_there_by_hand_is_already_present(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    paths.models_dir.mkdir(parents=True)
    (paths.models_dir / "tiny.gguf").write_bytes(model_bytes)
    pulled = puller(hub, paths).pull(f"{FIRST}:tiny.gguf")
    assert pulled.already_present and not hub.downloads()


def test_pulling_the_same_repo_and_file_again_updates_it_with_a_warning(
    hub: FakeHub, paths: Paths, newer: bytes
) -> None:
    first = puller(hub, paths).pull(f"{FIRST}:tiny.gguf")
    record = paths.models_dir / ".pulled" / "tiny.gguf.json"  # where it came from
    assert record.is_file()
    hub.repos[FIRST]["tiny.gguf"] = newer  # a new version of the file on the hub
    steps: list[PullProgress] = []
    again = puller(hub, paths).pull(f"{FIRST}:tiny.gguf", report=steps.append)
    assert again.path == first.path and not again.already_present
    assert digest(again.path) == hashlib.sha256(newer).hexdigest()
    warnings = [step.message for step in steps if step.status == "warning"]
    assert any("keeps the old file until tiny is loaded again" in w for w in warnings), steps
    # and the new version is keel's to update again
    assert puller(hub, paths).pull(f"{FIRST}:tiny.gguf").already_present


def test_a_pulled_file_since_damaged_is_pulled_again(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    """Cut short on disk, `keel doctor` says to pull it again; the pull refused it (409)
    as a file "put there by hand", though keel's record names this repo and file. One
    replaced by hand with another usable model is still never replaced."""
    first = puller(hub, paths).pull(f"{FIRST}:tiny.gguf")
    first.path.write_bytes(model_bytes[: len(model_bytes) // 2])
    steps: list[PullProgress] = []
    again = puller(hub, paths).pull(f"{FIRST}:tiny.gguf", report=steps.append)
    assert digest(again.path) == hashlib.sha256(model_bytes).hexdigest()
    assert any("is damaged" in step.message for step in steps if step.status == "warning")
    first.path.write_bytes(model_bytes + b"mine")  # a usable model, by hand
    with pytest.raises(Conflict):
        puller(hub, paths).pull(f"{FIRST}:tiny.gguf")


def test_a_file_another_pull_put_there_meanwhile_is_not_replaced(
    hub: FakeHub, paths: Paths, newer: bytes
) -> None:
    """Two pulls of same-named files of two repos at once: both said "ready", and the
    one that ended last replaced the other's file, whose client then loaded what was
    gone. The other pull lands while this one checks its download."""

    def meanwhile(step: PullProgress) -> None:
        if step.status == "verifying":
            puller(hub, paths).pull(f"{OTHER}:tiny.gguf")

    with pytest.raises(Conflict) as refused:
        puller(hub, paths).pull(f"{FIRST}:tiny.gguf", report=meanwhile)
    assert f"{OTHER}:tiny.gguf" in refused.value.message
    assert (paths.models_dir / "tiny.gguf").read_bytes() == newer
    assert no_staging_left(paths)


def test_a_file_named_in_upper_case_loads_by_the_name_the_pull_gives(
    paths: Paths, model_bytes: bytes
) -> None:
    """``Upper-Q8_0.GGUF``: the pull said to load ``Upper-Q8_0``, a 404, and no listing
    showed it (a load and the listing look for ``.gguf``)."""
    from keel.models.registry import list_model_files, resolve_model

    with FakeHub({"keel-test/upper-GGUF": {"Upper-Q8_0.GGUF": model_bytes}}) as hub:
        pulled = puller(hub, paths).pull("keel-test/upper-GGUF")
    assert pulled.name == "Upper-Q8_0" and pulled.path.name == "Upper-Q8_0.gguf"
    assert resolve_model(pulled.name, paths) == pulled.path
    assert pulled.name in {file.name for file in list_model_files(paths)}


def test_a_file_named_as_the_embedded_model_loads_by_its_path(
    hub: FakeHub, paths: Paths, newer: bytes
) -> None:
    """Told to load it by its name, a user got the embedded model: that name is the
    embedded model's. It loads by its path, which the pull gives."""
    from keel.models.registry import resolve_model

    steps: list[PullProgress] = []
    pulled = puller(hub, paths).pull(f"{SAME_NAME}:{EMBEDDED_MODEL_ID}.gguf", report=steps.append)
    assert pulled.name == str(pulled.path) and pulled.path.read_bytes() == newer
    assert resolve_model(pulled.name, paths) == pulled.path
    assert steps[-1].message.endswith(f"load it as {pulled.path}"), steps[-1]
