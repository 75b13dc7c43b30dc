"""The eval's sampling is deterministic and cuts tasks as an editor would; scores are right."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keel.eval.samples import sample_repository
from keel.eval.scoring import Score, Summary, edit_distance, edit_similarity
from tests.forked import run_keel

MODULE = "".join(
    f"""def handler_{i}(request, retries={i}):
    if request is None:
        raise ValueError("request {i} is required")
    response = request.send(timeout=retries * 2)
    return response.json()


"""
    for i in range(12)
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "handlers.py").write_text(MODULE)
    (tmp_path / "pkg" / "more.py").write_text(MODULE.replace("handler_", "other_"))
    return tmp_path


def test_sampling_is_deterministic_and_balanced(repo: Path) -> None:
    first = sample_repository("pkg", repo, 10, seed=3)
    assert first == sample_repository("pkg", repo, 10, seed=3)
    assert first != sample_repository("pkg", repo, 10, seed=4)
    assert [s.kind for s in first].count("block") == 5
    assert [s.kind for s in first].count("line") == 5


def test_tasks_hide_exactly_the_target(repo: Path) -> None:
    for sample in sample_repository("pkg", repo, 10, seed=0):
        original = (repo / sample.relpath).read_text()
        assert sample.target
        if sample.kind == "line":
            assert sample.prefix + sample.target + sample.suffix == original
            assert "\n" not in sample.target
        else:
            cursor_line = sample.prefix.rpartition("\n")[2]  # the editor's auto-indent
            assert cursor_line.strip() == "" and len(cursor_line) >= 4
            assert sample.prefix.rpartition("\n")[0].rstrip().endswith(":")
            assert sample.prefix + sample.target + sample.suffix == original


def test_scores() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abcd", "abcx") == 0.75
    exact = Score.of("return x  \n", "return x")
    assert exact.exact and exact.first_line and exact.similarity == 1.0
    longer = Score.of("return x\nprint(y)", "return x")
    assert not longer.exact and longer.first_line and 0 < longer.similarity < 1
    summary = Summary.of([exact, longer])
    assert summary.count == 2 and summary.exact_match == 0.5 and summary.first_line_match == 1.0


def test_an_eval_with_nothing_to_sample_fails_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It printed a table of zeros, as if measured, and exited 0."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("# no Python here\n")
    monkeypatch.chdir(tmp_path)  # keel's working directory: a fork takes the test's
    done = run_keel(
        ["eval", "--samples", "2", "--repo", f"docs={tmp_path}"],
        {**os.environ, "KEEL_ROOT": str(tmp_path / "root")},
        timeout=120,
    )
    assert done.returncode != 0, done.stdout
    assert "has no Python code to sample" in done.stderr and "Traceback" not in done.stderr
    assert "EM" not in done.stdout
