from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import Paths
from keel.models.registry import embedded_model_path
from tests.models.fake_hub import FakeHub

REPO = "keel-test/tiny-coder-GGUF"
FILE = "tiny-coder-q4_1.gguf"


@pytest.fixture(scope="session")
def model_bytes() -> bytes:
    """The embedded model's real GGUF file, served under a made-up repo."""
    return embedded_model_path().read_bytes()


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
