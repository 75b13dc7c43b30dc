"""An embedding batch split into parts by estimated tokens, in order, nothing lost."""

from __future__ import annotations

from keel.providers.base import estimate_tokens, token_groups


def test_groups_keep_order_and_stay_within_the_budget() -> None:
    texts = [f"x{n}" * (n + 1) * 20 for n in range(30)]
    groups = token_groups(texts, 300)
    assert [text for group in groups for text in group] == texts
    for group in groups:
        assert len(group) == 1 or sum(map(estimate_tokens, group)) <= 300


def test_an_input_over_the_budget_goes_alone_and_an_empty_batch_has_no_part() -> None:
    big, small = "y" * 3000, "z"
    assert token_groups([small, big, small], 100) == [[small], [big], [small]]
    assert token_groups([small, small], 100) == [[small, small]]
    assert token_groups([], 100) == []
