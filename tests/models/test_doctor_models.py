"""keel doctor reports the models in <root>/models: pulled ones, damaged ones, leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import Paths
from keel.models.pull import STAGING_DIR, ModelPuller
from keel.ops.doctor import DoctorOptions, run_checks
from tests.conftest import free_port
from tests.models.conftest import FILE, REPO
from tests.models.fake_hub import FakeHub


def finding(root: Path) -> tuple[str, str]:
    report = run_checks(DoctorOptions(port=free_port()), environ={"KEEL_ROOT": str(root)})
    check = next(check for check in report.checks if check.name == "downloaded models")
    return check.status, check.detail


@pytest.mark.whole_model
def test_doctor_lists_pulled_models_and_flags_leftovers(hub: FakeHub, paths: Paths) -> None:
    status, detail = finding(paths.root)
    assert status == "ok" and "keel models pull" in detail
    ModelPuller(paths, endpoint=hub.url, environ={}).pull(f"{REPO}:{FILE}")
    status, detail = finding(paths.root)
    assert status == "ok"
    assert detail == "tiny-coder-q4_1 (llama, 94 MiB, context 8192, no FIM)"
    (paths.models_dir / "broken.gguf").write_bytes(b"not a model")
    partial = paths.models_dir / STAGING_DIR / "pull-x" / "blob.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 2**20)
    status, detail = finding(paths.root)
    assert status == "warn"
    assert "broken: " in detail and "not a GGUF file" in detail
    assert "1 MiB of a pull that was killed: remove it" in detail
    assert "tiny-coder-q4_1 (llama" in detail


def test_a_models_directory_that_is_a_file_fails(paths: Paths) -> None:
    """It said "ok none in .../models", and every pull then failed."""
    paths.root.mkdir(parents=True)
    paths.models_dir.write_text("not a directory")
    status, detail = finding(paths.root)
    assert status == "FAIL", detail
    assert f"the models directory {paths.models_dir} is not a directory" in detail
    assert "move it away" in detail
