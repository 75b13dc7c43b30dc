"""The quality gate: a small ``keel eval`` sample with the embedded model must score as
recorded (``src/keel/eval/gate_baseline.json``), within the sample's noise."""

from __future__ import annotations

import pytest

from keel.eval.gate import GateFigures, recorded, run_gate
from keel.eval.scoring import Score

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


@pytest.mark.integration
async def test_completion_quality_holds_on_a_small_sample() -> None:
    figures = await run_gate()
    baseline = recorded()
    assert figures.count == baseline.count == 20
    assert figures.regressions(baseline) == [], (figures, baseline)
