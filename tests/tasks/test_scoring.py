"""Retrieval and generation-fidelity scores against hand-computed values."""

from __future__ import annotations

import math

import pytest

from prunelens.tasks.scoring import (
    dcg,
    first_divergence,
    lcs_length,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
    repetition_rate,
    rouge_l,
    token_agreement,
)


def test_ndcg_hand_computed() -> None:
    rel = {"a": 3, "b": 2, "c": 1, "z": 0}
    # ranking b, x, a: DCG = 2/log2(2) + 0 + 3/log2(4) = 2 + 1.5; ideal 3, 2, 1 = 3 + 2/log2(3) + 1/2
    got = ndcg_at_k(["b", "x", "a"], rel, 10)
    assert got == pytest.approx(3.5 / (3 + 2 / math.log2(3) + 0.5))
    assert ndcg_at_k(["a", "b", "c"], rel, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], rel, 10) == 0.0
    # the cut-off applies to both the ranking and the ideal ranking
    assert ndcg_at_k(["b", "a"], rel, 1) == pytest.approx(2 / 3)
    assert math.isnan(ndcg_at_k(["a"], {"a": 0}, 10))
    assert dcg([1, 1]) == pytest.approx(1 + 1 / math.log2(3))


def test_recall_and_reciprocal_rank() -> None:
    rel = {"a": 1, "b": 4, "c": 0}  # grade 0 is not relevant
    assert recall_at_k(["c", "a", "x"], rel, 2) == 0.5
    assert recall_at_k(["c", "a", "b"], rel, 3) == 1.0
    assert reciprocal_rank(["c", "x", "b"], rel, 10) == pytest.approx(1 / 3)
    assert reciprocal_rank(["c", "x", "b"], rel, 2) == 0.0


def test_lcs_and_rouge_l() -> None:
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example
    assert lcs_length([], [1]) == 0
    # "the cat sat" vs "the cat on the mat": LCS "the cat" = 2, P = 2/3, R = 2/5
    p, r = 2 / 3, 2 / 5
    assert rouge_l("the cat sat", "the cat on the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def test_divergence_agreement_repetition() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 4], [1, 2, 3]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # stopping early is a divergence
    assert token_agreement([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # missing positions count as mismatches
    assert token_agreement([1, 2, 3, 4], [1, 2]) == 0.5  # so do extra ones
    assert token_agreement([], []) == 1.0
    assert repetition_rate([1, 2, 3, 4, 5]) == 0.0
    # 1 2 1 2 1 2 1 2: 5 four-grams, 2 distinct -> 3/5 repeat an earlier one
    assert repetition_rate([1, 2] * 4) == pytest.approx(3 / 5)
    assert repetition_rate([1, 2], n=4) == 0.0
