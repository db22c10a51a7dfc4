"""Format-paired evaluation, pure part: distractors, answer matching and the paired gap by hand."""

from __future__ import annotations

import numpy as np
import pytest

from prunelens.errors import PrunelensError
from prunelens.tasks.paired import (
    gsm8k_distractors,
    gsm8k_options,
    match_choice,
    mcnemar_exact_p,
    paired_gap,
    paired_test,
)


@pytest.mark.parametrize("gold", [0, 1, 7, 18, 250, 3.5, -4])
def test_distractors_are_deterministic_distinct_and_wrong(gold: float) -> None:
    d = gsm8k_distractors(gold)
    assert d == gsm8k_distractors(gold) and len(d) == 3 == len(set(d)) and gold not in d
    if gold == int(gold):
        assert all(x == int(x) for x in d)
    if gold >= 0:
        assert all(x >= 0 for x in d)


def test_distractors_by_hand() -> None:
    assert gsm8k_distractors(18) == [19, 17, 36]
    assert gsm8k_distractors(0) == [1, 10, 2]  # no negatives, no 0 × 2 = gold
    assert gsm8k_distractors(3.5) == [4.5, 2.5, 7.0]


def test_gold_position_cycles_over_the_letters() -> None:
    positions = [gsm8k_options(18, i)[1] for i in range(8)]
    assert positions == [0, 1, 2, 3, 0, 1, 2, 3]
    opts, pos = gsm8k_options(18, 2)
    assert opts == ["19", "17", "18", "36"] and opts[pos] == "18"


@pytest.mark.parametrize(("text", "want"), [
    ("The answer is photosynthesis.", 1),
    ("B", 1), ("(C)", 2), ("Answer: D.", 3), ("E", None),  # only four options
    ("It could be respiration or photosynthesis", None),  # two options named
    ("I don't know", None),
])
def test_match_choice(text: str, want: int | None) -> None:
    choices = ["respiration", "photosynthesis", "digestion", "osmosis"]
    assert match_choice(text, choices) == want


def test_match_prefers_the_longest_option_containing_the_others() -> None:
    assert match_choice("They moved to New York City last year", ["York", "New York City", "Paris"]) == 1


def test_paired_gap_by_hand() -> None:
    # 4 questions; MCQ loses one (1 of 4), generation loses three: gap = 0.25 - 0.75 = -0.5
    g = paired_gap([1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], n_boot=500)
    assert (g.mcq_drop, g.gen_drop, g.gap) == (0.25, 0.75, -0.5)
    assert g.ci_low <= g.gap <= g.ci_high
    # per-question differences are {0, -1, -1, 0} + ... so the CI lives inside [-1, 0]
    assert -1.0 <= g.ci_low and g.ci_high <= 0.0


def test_identical_runs_give_a_zero_gap_with_a_zero_width_interval() -> None:
    x = [1, 0, 1, 1, 0]
    g = paired_gap(x, x, x, x)
    assert g.gap == 0 and g.ci_low == 0 and g.ci_high == 0


def test_bootstrap_interval_shrinks_with_more_questions_and_excludes_zero_for_a_real_gap() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (50, 800):
        md = rng.random(n) < 0.7
        gd = rng.random(n) < 0.6
        mp = md & (rng.random(n) < 0.95)  # MCQ keeps ~95 % of its hits
        gp = gd & (rng.random(n) < 0.3)  # generation keeps ~30 %
        g = paired_gap(md, mp, gd, gp, seed=1)
        widths.append(g.ci_high - g.ci_low)
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16) = 1/4
    assert g.ci_high < 0  # generation lost significantly more


def test_mismatched_runs_are_refused() -> None:
    with pytest.raises(PrunelensError, match="same non-empty set"):
        paired_gap([1, 0], [1], [1, 0], [1, 0])
    with pytest.raises(PrunelensError, match="confidence"):
        paired_gap([1], [1], [1], [1], confidence=1.5)


@pytest.mark.parametrize(("b", "c", "p"), [(0, 0, 1.0), (0, 2, 0.5), (0, 6, 2 / 64), (1, 9, 2 * 11 / 1024),
                                           (9, 1, 2 * 11 / 1024), (5, 5, 1.0), (3, 4, 1.0)])
def test_mcnemar_exact_p_by_hand(b: int, c: int, p: float) -> None:
    assert mcnemar_exact_p(b, c) == pytest.approx(p, abs=1e-15)


def test_paired_test_of_one_to_three_right_of_ten_is_flagged_too_small() -> None:
    dense = {i: float(i == 0) for i in range(10)}
    modified = {i: float(i < 3) for i in range(10)}
    t = paired_test(dense, modified)
    assert (t.n, t.lost, t.gained) == (10, 0, 2)
    assert t.difference == pytest.approx(0.2)
    assert t.stderr == pytest.approx(np.sqrt(1.6 / 9) / np.sqrt(10))
    assert t.p_mcnemar == pytest.approx(0.5)
    assert t.too_small and "too few to read" in t.line() and "p=0.5" in t.line()


def test_paired_test_large_and_clear() -> None:
    dense = {i: 1.0 for i in range(40)}
    modified = {i: float(i >= 12) for i in range(40)}  # 12 lost, none gained
    t = paired_test(dense, modified)
    assert (t.lost, t.gained, t.too_small) == (12, 0, False)
    assert t.difference == pytest.approx(-0.3)
    assert t.p_mcnemar == pytest.approx(2 / 2 ** 12)
    assert "too few" not in t.line()


def test_paired_test_needs_the_same_items() -> None:
    with pytest.raises(PrunelensError, match="same non-empty set"):
        paired_test({1: 1.0}, {2: 1.0})
    with pytest.raises(PrunelensError):
        paired_test({}, {})
