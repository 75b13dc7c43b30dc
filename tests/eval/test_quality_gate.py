"""How the quality gate judges a sample's figures against the recorded ones
(``src/keel/eval/gate_baseline.json``, for the samples stored in ``gate_samples.json``).
The gate itself, 20 completions by the embedded model, is a check of its own in
``make test`` (``python -m keel.eval.gate``), run beside pytest at the lowest CPU
priority."""

from __future__ import annotations

import pytest

from keel.eval.gate import (
    REPOSITORIES,
    SAMPLES_PER_REPOSITORY,
    STORED_LINES,
    GateFigures,
    gate_samples,
    recorded,
)
from keel.eval.scoring import Score
from keel.pipeline.prompt import split_lines

RECORD = GateFigures(
    count=20,
    exact_match=0.2,
    edit_similarity=0.5,
    exact_match_noise=0.09,
    edit_similarity_noise=0.07,
)


def test_a_drop_beyond_the_noise_is_a_regression() -> None:
    same = GateFigures(20, 0.2, 0.5, 0.09, 0.07)
    within = GateFigures(20, 0.15, 0.44, 0.08, 0.07)
    assert same.regressions(RECORD) == [] and within.regressions(RECORD) == []
    worse = GateFigures(20, 0.1, 0.42, 0.07, 0.07)
    found = worse.regressions(RECORD)
    assert len(found) == 2 and found[0].startswith("exact_match 0.100 < recorded 0.200")


def test_the_noise_is_one_standard_error_of_the_sample() -> None:
    scores = [Score(True, 1.0, True)] * 5 + [Score(False, 0.0, False)] * 15
    figures = GateFigures.of(scores)
    assert figures.exact_match == 0.25
    assert figures.exact_match_noise == pytest.approx((0.25 * 0.75 / 20) ** 0.5)
    assert figures.edit_similarity_noise == pytest.approx((0.25 * 0.75) ** 0.5 / 20**0.5)


def test_a_sample_of_another_size_fails() -> None:
    smaller = GateFigures(19, 0.2, 0.5, 0.09, 0.07)
    assert smaller.regressions(RECORD) == ["19 samples scored, 20 recorded"]


def test_the_recorded_figures_are_for_the_gates_sample() -> None:
    assert recorded().count == len(REPOSITORIES) * SAMPLES_PER_REPOSITORY == 20


def test_the_samples_are_stored_not_drawn_from_the_installed_packages() -> None:
    """Drawn from the httpx a fresh install brought, the figures moved with its releases."""
    samples = gate_samples()
    assert len(samples) == recorded().count
    assert {sample.repo for sample in samples} == set(REPOSITORIES)
    for sample in samples:
        assert sample.target.strip() and sample.prefix.strip(), sample
        assert len(split_lines(sample.prefix)) <= STORED_LINES, sample.relpath
        assert len(split_lines(sample.suffix)) <= STORED_LINES, sample.relpath
