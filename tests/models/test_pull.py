"""Pulls against a real local HTTP server that answers as the Hugging Face hub does."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import pytest

from keel.config import Paths
from keel.errors import (
    ClientDisconnected,
    InsufficientStorage,
    MissingDependency,
    NotFound,
    RequestError,
    Unavailable,
    UpstreamAuthError,
    UpstreamError,
)
from keel.models.gguf import weights_bytes
from keel.models.pull import STAGING_DIR, ModelPuller, PullProgress
from keel.models.registry import list_model_files, read_facts, resolve_model
from keel.models.tabby_registry import RegistryModel
from tests.models.conftest import FILE, REPO
from tests.models.fake_hub import FakeHub, sha256


def puller(hub: FakeHub, paths: Paths, **kwargs: object) -> ModelPuller:
    environ = kwargs.pop("environ", {})
    assert isinstance(environ, dict)
    return ModelPuller(paths, endpoint=hub.url, environ=environ, **kwargs)  # type: ignore[arg-type]


def nothing_left(paths: Paths) -> bool:
    """No model file and no staging leftovers under the model directory."""
    staging = paths.models_dir / STAGING_DIR
    leftovers = list(staging.iterdir()) if staging.is_dir() else []
    return not leftovers and not list(paths.models_dir.rglob("*.gguf"))


def test_a_repo_file_lands_verified_in_the_model_directory(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    steps: list[PullProgress] = []
    pulled = puller(hub, paths).pull(f"{REPO}:{FILE}", report=steps.append)
    assert pulled.path == paths.models_dir / FILE
    assert pulled.name == "tiny-coder-q4_1" and not pulled.already_present
    on_disk = hashlib.sha256(pulled.path.read_bytes()).hexdigest()
    assert pulled.sha256 == sha256(model_bytes) == on_disk
    statuses = [step.status for step in steps]
    assert statuses[0] == "resolving" and statuses[-1] == "ready"
    assert "verifying" in statuses
    downloading = [step for step in steps if step.downloaded is not None]
    assert downloading[-1].downloaded == len(model_bytes) and "100%" in downloading[-1].message
    assert list((paths.models_dir / STAGING_DIR).iterdir()) == []
    listed = {file.name: file for file in list_model_files(paths)}
    assert listed["tiny-coder-q4_1"].path == pulled.path
    assert resolve_model("tiny-coder-q4_1", paths) == pulled.path
    facts = read_facts(pulled.path)
    assert facts.architecture == "llama" and facts.context_length == 8192 and not facts.fim


def test_pulling_again_keeps_the_verified_file(hub: FakeHub, paths: Paths) -> None:
    puller(hub, paths).pull(f"{REPO}:{FILE}")
    before = len(hub.downloads())
    again = puller(hub, paths).pull(f"{REPO}:{FILE}")
    assert again.already_present and len(hub.downloads()) == before


def test_a_quant_picks_the_one_matching_file(hub: FakeHub, paths: Paths) -> None:
    pulled = puller(hub, paths).pull("keel-test/two-quants-GGUF", quant="q8_0")
    assert pulled.path.name == "tiny-Q8_0.gguf"
    with pytest.raises(RequestError) as no_choice:  # the spec is incomplete: a 400
        puller(hub, paths).plan("keel-test/two-quants-GGUF")
    assert "tiny-Q4_1.gguf" in no_choice.value.message and "quant" in no_choice.value.message
    with pytest.raises(NotFound) as no_match:
        puller(hub, paths).plan("keel-test/two-quants-GGUF", quant="Q5_K_M")
    assert "tiny-Q4_1.gguf, tiny-Q8_0.gguf" in no_match.value.message


def test_a_quant_whose_name_is_in_anothers_picks_its_own_file() -> None:
    """Q6_K is in Q6_K_L's name too, F16 in BF16's, Q4_0 in Q4_0_4_4's: each was
    refused as matching several files, and the message did not say how to choose."""
    from keel.models.pull import HubFile, choose_file

    names = ["m-Q6_K.gguf", "m-Q6_K_L.gguf", "m-F16.gguf", "m-BF16.gguf", "m-Q4_0.gguf"]
    names += ["m-Q4_0_4_4.gguf", "m-Q5_K_M.gguf", "m-Q5_K_S.gguf"]
    files = [HubFile("org/m-GGUF", name, 1, None) for name in names]
    for quant, name in [("Q6_K", "m-Q6_K"), ("q6-k", "m-Q6_K"), ("F16", "m-F16")]:
        assert choose_file(files, "org/m-GGUF", None, quant).filename == f"{name}.gguf"
    assert choose_file(files, "org/m-GGUF", None, "Q4_0").filename == "m-Q4_0.gguf"
    assert choose_file(files, "org/m-GGUF", None, "bf16").filename == "m-BF16.gguf"
    with pytest.raises(RequestError) as several:
        choose_file(files, "org/m-GGUF", None, "Q5_K")
    assert "m-Q5_K_M.gguf, m-Q5_K_S.gguf" in several.value.message
    assert "name the file instead: org/m-GGUF:m-Q5_K_M.gguf" in several.value.message


def test_a_repo_with_one_gguf_needs_no_quant(hub: FakeHub, paths: Paths) -> None:
    assert puller(hub, paths).plan(REPO).file.filename == FILE


def test_a_missing_file_lists_the_repos_gguf_files(hub: FakeHub, paths: Paths) -> None:
    with pytest.raises(NotFound) as missing:
        puller(hub, paths).pull(f"{REPO}:tiny-coder-q8_0.gguf")
    assert FILE in missing.value.message and "README" not in missing.value.message
    assert missing.value.status_code == 404
    assert nothing_left(paths) and hub.downloads() == []


def test_an_unknown_repo_is_not_found(hub: FakeHub, paths: Paths) -> None:
    with pytest.raises(NotFound):
        puller(hub, paths).pull("keel-test/no-such-repo:x.gguf")


@pytest.mark.whole_model
def test_a_cut_connection_resumes_where_it_stopped(
    hub: FakeHub,
    paths: Paths,
    model_bytes: bytes,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub.cut_after = 35 * 2**20
    pulled = puller(hub, paths).pull(f"{REPO}:{FILE}")
    # said through keel's logging alone: huggingface_hub's own handler wrote its resumes
    # to stderr in plain text as well (twice in text logs, and a line no JSON log reads)
    said = [r.getMessage() for r in caplog.records]
    assert any("resuming from 35 MiB" in line for line in said), said
    assert "resum" not in capfd.readouterr().err.lower()
    gets = hub.downloads()
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    # every byte that came is kept (huggingface_hub resumed after its last 10 MiB piece)
    assert gets[1].headers["range"] == f"bytes={35 * 2**20}-"
    assert pulled.path.read_bytes() == model_bytes


def test_a_checksum_mismatch_keeps_nothing(hub: FakeHub, paths: Paths) -> None:
    hub.corrupt = True
    with pytest.raises(UpstreamError) as corrupt:
        puller(hub, paths).pull(f"{REPO}:{FILE}")
    assert corrupt.value.code == "checksum_mismatch"
    assert "failed its checksum" in corrupt.value.message
    assert "(HF_ENDPOINT) serves another file" in corrupt.value.message  # a mirror's fault
    assert nothing_left(paths)


def test_a_tabby_name_maps_to_the_registry_file_and_checksum(hub: FakeHub, paths: Paths) -> None:
    # TabbyML/StarCoder-1B is TabbyML/models:starcoderbase-1B.Q8_0.gguf with the
    # registry's sha256; the fake hub serves other bytes under that name.
    with pytest.raises(UpstreamError) as mismatch:
        puller(hub, paths).pull("TabbyML/StarCoder-1B")
    assert mismatch.value.code == "checksum_mismatch"
    message = mismatch.value.message
    assert "1bb6441486d102db03dac30c82d6b1029ee4f9f5d73f27444fa58cbfcd7cfa0f" in message
    # the hub's own sha256 matches: it was "the server serves another file than the one
    # it lists, pull again", which brings the same file
    assert "against Tabby's registry" in message and "serves another file" not in message
    assert "TabbyML/models:starcoderbase-1B.Q8_0.gguf" in message
    assert [seen.path for seen in hub.downloads()] == [
        "/TabbyML/models/resolve/main/starcoderbase-1B.Q8_0.gguf"
    ]
    assert nothing_left(paths)


def test_a_registry_model_lands_where_a_tabby_config_finds_it(
    hub: FakeHub, paths: Paths, model_bytes: bytes
) -> None:
    registry = {"tinycoder": RegistryModel("TinyCoder", REPO, FILE, sha256(model_bytes))}
    pulled = puller(hub, paths, registry=registry).pull("TabbyML/TinyCoder")
    assert pulled.name == "TabbyML/TinyCoder"
    assert pulled.path == paths.models_dir / "TabbyML" / "TinyCoder.gguf"
    assert resolve_model("TabbyML/TinyCoder", paths) == pulled.path
    assert "TabbyML/TinyCoder" in {file.name for file in list_model_files(paths)}
    assert resolve_model("TinyCoder", paths) == pulled.path, "Tabby's bare name"


@pytest.mark.whole_model
def test_a_full_disk_is_refused_before_any_download(hub: FakeHub, paths: Paths) -> None:
    small_disk = puller(hub, paths, free_bytes=lambda _: 50 * 2**20, min_free_bytes=0)
    with pytest.raises(InsufficientStorage) as full:
        small_disk.pull(f"{REPO}:{FILE}")
    assert full.value.status_code == 507
    assert "94 MiB" in full.value.message and "50 MiB free" in full.value.message
    assert "--min-free-mib" in full.value.message  # how to keep less free
    reserve = puller(hub, paths, min_free_bytes=1 << 62)
    with pytest.raises(InsufficientStorage):
        reserve.pull(f"{REPO}:{FILE}")
    assert hub.downloads() == [] and nothing_left(paths)


def test_a_401_says_to_set_hf_token(hub: FakeHub, paths: Paths, model_bytes: bytes) -> None:
    hub.token = "hf_secret"
    with pytest.raises(UpstreamAuthError) as refused:
        puller(hub, paths).pull(f"{REPO}:{FILE}")
    assert "set HF_TOKEN" in refused.value.message and "401" in refused.value.message
    with pytest.raises(UpstreamAuthError) as wrong:
        puller(hub, paths, environ={"HF_TOKEN": "hf_wrong"}).pull(f"{REPO}:{FILE}")
    assert "your HF_TOKEN has no access" in wrong.value.message
    with pytest.raises(UpstreamAuthError) as blank:
        puller(hub, paths, environ={"HF_TOKEN": " \n"}).pull(f"{REPO}:{FILE}")
    assert "set HF_TOKEN" in blank.value.message
    # a token file's newline, cleaned as huggingface_hub cleans it: it was "Illegal header
    # value", filed under "cannot reach" the hub
    secret = {"HF_TOKEN": "hf_secret\n"}
    pulled = puller(hub, paths, environ=secret).pull(f"{REPO}:{FILE}")
    assert pulled.path.read_bytes() == model_bytes
    assert hub.downloads()[-1].headers["authorization"] == "Bearer hf_secret"


def test_offline_mode_refuses_without_a_request(hub: FakeHub, paths: Paths) -> None:
    with pytest.raises(Unavailable) as offline:
        puller(hub, paths, environ={"HF_HUB_OFFLINE": "1"}).pull(f"{REPO}:{FILE}")
    assert "HF_HUB_OFFLINE" in offline.value.message and hub.seen == []


def test_a_model_too_big_for_memory_is_warned_about(hub: FakeHub, paths: Paths) -> None:
    steps: list[PullProgress] = []
    puller(hub, paths, available_memory=lambda: 64 * 2**20).pull(
        f"{REPO}:{FILE}", report=steps.append
    )
    warnings = [step.message for step in steps if step.status == "warning"]
    assert len(warnings) == 1 and "64 MiB is available" in warnings[0]


@pytest.mark.whole_model
def test_a_cancelled_pull_stops_and_keeps_nothing(hub: FakeHub, paths: Paths) -> None:
    cancelled = threading.Event()

    def report(step: PullProgress) -> None:
        if step.downloaded:
            cancelled.set()

    with pytest.raises(ClientDisconnected):
        puller(hub, paths).pull(f"{REPO}:{FILE}", report=report, cancelled=cancelled)
    assert nothing_left(paths)


@pytest.mark.parametrize(
    ("spec", "quant"),
    [
        ("not a repo", None),
        ("org/repo:weights.bin", None),
        ("org/repo:a.gguf", "Q8_0"),
        ("../etc:x.gguf", None),
        ("TabbyML/StarCoder-1B", "Q4_0"),
    ],
)
def test_bad_specs_are_the_callers_error(spec: str, quant: str | None, tmp_path: Path) -> None:
    with pytest.raises(RequestError):
        ModelPuller(Paths(tmp_path), endpoint="http://127.0.0.1:9", environ={}).pull(
            spec, quant=quant
        )


@pytest.mark.whole_model
def test_a_truncated_gguf_is_discarded_though_its_checksum_matches(
    model_bytes: bytes, paths: Paths
) -> None:
    """The hub's checksum is of the bytes it has: a file uploaded cut short matches it.
    Its header says how long it must be: the pull refuses it, as a load would."""
    repos = {"keel-test/cut-GGUF": {"cut.gguf": model_bytes[: 3 * 2**20]}}
    with FakeHub(repos) as cut, pytest.raises(UpstreamError) as refused:
        puller(cut, paths).pull("keel-test/cut-GGUF:cut.gguf")
    assert "truncated" in refused.value.message and "discarded" in refused.value.message
    assert nothing_left(paths)


def test_tabbys_model_directories_load_and_a_registry_name_says_how_to_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Tabby migrant's models: a model directory (its weights in ggml/), and the ones
    Tabby downloaded under ~/.tabby/models by registry name. Both were "not found", and
    a registry name not on disk said nothing of `keel models pull`."""
    paths = Paths(tmp_path / "keel")
    weights = tmp_path / "StarCoder-1B" / "ggml" / "model-00001-of-00001.gguf"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path / "StarCoder-1B"), paths) == weights
    monkeypatch.delenv("TABBY_ROOT", raising=False)
    monkeypatch.delenv("TABBY_MODEL_CACHE_ROOT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    downloaded = tmp_path / "home/.tabby/models/TabbyML/StarCoder-1B/ggml/q8_0.v2.gguf"
    downloaded.parent.mkdir(parents=True)
    downloaded.write_bytes(b"GGUF")
    assert resolve_model("TabbyML/StarCoder-1B", paths) == downloaded
    # Tabby's docs and most configs write a registry model without TabbyML/
    assert resolve_model("StarCoder-1B", paths) == downloaded
    with pytest.raises(MissingDependency) as missing:
        resolve_model("TabbyML/Qwen2.5-Coder-1.5B", paths)
    assert missing.value.message.endswith("or pull it: keel models pull TabbyML/Qwen2.5-Coder-1.5B")
    with pytest.raises(MissingDependency) as bare:
        resolve_model("Qwen2.5-Coder-1.5B", paths)
    assert bare.value.message.endswith("or pull it: keel models pull Qwen2.5-Coder-1.5B")
    with pytest.raises(MissingDependency) as path:
        resolve_model(str(tmp_path / "nowhere.gguf"), paths)
    assert "keel models pull" not in path.value.message
    assert path.value.message.count(str(tmp_path / "nowhere.gguf") + ",") == 1, "listed once"


def test_a_tabby_model_stored_in_parts_is_found_and_sized_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tabby stores Qwen2.5-Coder 7B and 14B Instruct as ``model-0000N-of-00003.gguf``;
    llama.cpp loads the first with the rest. They were "not found" (exit 69), and a
    memory check would have counted the first part alone."""
    monkeypatch.setenv("TABBY_MODEL_CACHE_ROOT", str(tmp_path / "cache"))
    ggml = tmp_path / "cache/TabbyML/Qwen2.5-Coder-7B-Instruct/ggml"
    ggml.mkdir(parents=True)
    for n, size in ((1, 100), (2, 200), (3, 300)):
        (ggml / f"model-{n:05d}-of-00003.gguf").write_bytes(b"GGUF" + b"\0" * (size - 4))
    first = ggml / "model-00001-of-00003.gguf"
    paths = Paths(tmp_path / "keel")
    assert resolve_model("Qwen2.5-Coder-7B-Instruct", paths) == first
    assert weights_bytes(first) == 600
    listed = [(m.name, m.path, m.size_bytes) for m in list_model_files(paths) if not m.embedded]
    assert listed == [("TabbyML/Qwen2.5-Coder-7B-Instruct", first, 600)]
    assert weights_bytes(ggml / "model-00002-of-00003.gguf") == 200  # not a first part


def test_tabbys_model_directory_is_where_tabby_finds_it_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tabby's Docker image sets TABBY_ROOT=/data; TABBY_MODEL_CACHE_ROOT moves the models
    alone. keel looked only in ~/.tabby/models (exit 69 for a model Tabby served), and
    listed none of Tabby's downloads, though a load found them."""
    paths = Paths(tmp_path / "keel")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TABBY_MODEL_CACHE_ROOT", raising=False)
    monkeypatch.setenv("TABBY_ROOT", str(tmp_path / "data"))
    weights = tmp_path / "data/models/TabbyML/RootModel/ggml/model-00001-of-00001.gguf"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"GGUF")
    assert resolve_model("TabbyML/RootModel", paths) == weights
    assert resolve_model("RootModel", paths) == weights
    assert [(m.name, m.path) for m in list_model_files(paths) if not m.embedded] == [
        ("TabbyML/RootModel", weights)
    ]
    monkeypatch.setenv("TABBY_MODEL_CACHE_ROOT", str(tmp_path / "cache"))
    with pytest.raises(MissingDependency):
        resolve_model("TabbyML/RootModel", paths)  # the cache root wins, as in Tabby
    cached = tmp_path / "cache/TabbyML/CacheModel/ggml/q8_0.v2.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert resolve_model("TabbyML/CacheModel", paths) == cached
    # a pulled copy under the same name is the one a load takes, and the one listed
    pulled = paths.models_dir / "TabbyML/CacheModel.gguf"
    pulled.parent.mkdir(parents=True)
    pulled.write_bytes(b"GGUF")
    listed = [(m.name, m.path) for m in list_model_files(paths) if not m.embedded]
    assert listed == [("TabbyML/CacheModel", pulled)]
    assert resolve_model("TabbyML/CacheModel", paths) == pulled


def test_no_home_directory_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container run as a user with no home (and KEEL_ROOT set for it): looking in
    ~/.tabby raised RuntimeError for every model."""
    import pwd

    paths = Paths(tmp_path / "keel")
    paths.models_dir.mkdir(parents=True)
    (paths.models_dir / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.delenv("HOME", raising=False)

    def no_user(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_user)
    assert resolve_model("m", paths) == paths.models_dir / "m.gguf"
    with pytest.raises(MissingDependency):
        resolve_model("missing", paths)


def test_a_hub_that_never_answers_is_a_quick_error(paths: Paths) -> None:
    """A hub that takes the connection and says nothing (a stuck proxy): a clear error
    within the hub timeout. The lookup had no timeout, and `keel models pull` hung."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete in the backlog; nothing is ever sent
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(UpstreamError) as refused:
            ModelPuller(paths, endpoint=endpoint, environ={}, hub_timeout=0.5).pull(
                f"{REPO}:{FILE}"
            )
    assert time.monotonic() - started < 10
    assert "did not answer" in refused.value.message and "0.5s" in refused.value.message
