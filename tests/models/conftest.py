from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import Paths
from keel.models.registry import embedded_model_path
from tests.models.fake_hub import FakeHub

REPO = "keel-test/tiny-coder-GGUF"
FILE = "tiny-coder-q4_1.gguf"


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value types and their sizes in bytes (8 is a string, 9 an array)."""


def _after_value(data: bytes, at: int, kind: int) -> int:
    """The offset after the GGUF value of type ``kind`` at ``at``."""
    if kind == 8:
        return at + 8 + int.from_bytes(data[at : at + 8], "little")
    if kind == 9:
        item, count = struct.unpack_from("<IQ", data, at)
        at += 12
        if item in _SCALAR_SIZES:
            return at + count * _SCALAR_SIZES[item]
        for _ in range(count):
            at = _after_value(data, at, item)
        return at
    return at + _SCALAR_SIZES[kind]


def header_only(gguf: bytes) -> bytes:
    """``gguf``'s header and metadata with no tensors: a valid GGUF file (~1.8 MB of the
    embedded model's 98 MB) that says what the model's header says."""
    magic, version, _tensors, keys = struct.unpack_from("<4sIQQ", gguf, 0)
    at = 24
    for _ in range(keys):
        at += 8 + int.from_bytes(gguf[at : at + 8], "little")  # the key's name
        (kind,) = struct.unpack_from("<I", gguf, at)
        at = _after_value(gguf, at + 4, kind)
    return struct.pack("<4sIQQ", magic, version, 0, keys) + gguf[24:at]


@pytest.fixture(scope="session")
def whole_model_bytes() -> bytes:
    """The embedded model's real GGUF file."""
    return embedded_model_path().read_bytes()


@pytest.fixture(scope="session")
def header_bytes(whole_model_bytes: bytes) -> bytes:
    return header_only(whole_model_bytes)


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
