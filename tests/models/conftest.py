from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import Paths
from keel.models import gguf
from keel.models.registry import embedded_model_path
from tests.models.fake_hub import FakeHub

REPO = "keel-test/tiny-coder-GGUF"
FILE = "tiny-coder-q4_1.gguf"


def header_only(path: Path) -> bytes:
    """The GGUF file ``path``'s header and metadata with no tensors, read by keel's own
    GGUF reader: a valid GGUF file (~1.8 MB of the embedded model's 98 MB) that says what
    the model's header says."""
    with path.open("rb") as file:
        reader = gguf._Reader(file, path)
        magic, version = reader.take(4), reader.u32()
        reader.u64()  # the tensors: none are kept
        keys = reader.u64()
        for _ in range(keys):
            reader.string()
            reader.value(reader.u32())
        end = reader.tell()
        file.seek(24)
        metadata = file.read(end - 24)
    return struct.pack("<4sIQQ", magic, version, 0, keys) + metadata


@pytest.fixture(scope="session")
def whole_model_bytes() -> bytes:
    """The embedded model's real GGUF file."""
    return embedded_model_path().read_bytes()


@pytest.fixture(scope="session")
def header_bytes() -> bytes:
    return header_only(embedded_model_path())


@pytest.fixture
def model_bytes(
    request: pytest.FixtureRequest, whole_model_bytes: bytes, header_bytes: bytes
) -> bytes:
    """The GGUF file the hub serves under a made-up repo: the embedded model's header
    without its tensors, since a pull moves, hashes and checks whatever bytes the hub
    lists (the whole 98 MB cost ~0.3 s of CPU a pull, ~10% of the pytest workers');
    the whole model for a test marked ``whole_model`` (its sizes are the claim: a cut
    at 35 MiB, a disk with 50 MiB free, a truncated tensor table)."""
    whole = request.node.get_closest_marker("whole_model") is not None
    return whole_model_bytes if whole else header_bytes


@pytest.fixture
def hub(model_bytes: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    repos = {
        REPO: {FILE: model_bytes, "README.md": b"# tiny coder\n"},
        "keel-test/two-quants-GGUF": {
            "tiny-Q4_1.gguf": model_bytes,
            "tiny-Q8_0.gguf": model_bytes,
        },
        "TabbyML/models": {"starcoderbase-1B.Q8_0.gguf": model_bytes},
    }
    with FakeHub(repos) as fake:
        # huggingface_hub must never reach huggingface.co from a test.
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield fake


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "keel")
