"""Where the lost answers went: the metrics against their definitions, and the recovery statistics on
a constructed case — a tiny model whose pruned copy demotes (or erases) the dense model's first
answer token by a known amount."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunelens.analyses.recovery import (
    GenItem,
    Target,
    answer,
    ece_of,
    prompt_ids,
    reading,
    recovery,
    table_rows,
)
from prunelens.metrics import expected_calibration_error, rank_at_first_divergence
from prunelens.model.arch import Adapter
from prunelens.model.loading import LoadedModel
from prunelens.testing import VOCAB, tiny_lm


def test_ece_matches_its_definition_on_hand_made_bins() -> None:
    # bin 9 (0.95, 0.95): accuracy 1/2, confidence 0.95; bin 5 (0.55, 0.55): accuracy 1, confidence 0.55
    assert expected_calibration_error([0.95, 0.95, 0.55, 0.55], [1, 0, 1, 1]) == pytest.approx(
        0.5 * 0.45 + 0.5 * 0.45)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0  # confidence 1 sits in the last bin
    assert expected_calibration_error([0.3], [0]) == pytest.approx(0.3)
    # option probabilities: the top option's probability against whether it is the gold one
    assert ece_of([[0.8, 0.2], [0.4, 0.6]], [0, 0]) == pytest.approx(0.5 * 0.2 + 0.5 * 0.6)
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])


def test_rank_at_first_divergence_on_constructed_logits() -> None:
    z = torch.zeros(3, 6)
    z[0, 1] = 2.0  # step 0: the reference token 1 is on top
    z[1, 4], z[1, 0], z[1, 2] = 3.0, 2.5, 2.0  # step 1: token 2 is third
    z[2, 3] = 9.0
    assert rank_at_first_divergence(z, torch.tensor([1, 2, 3])) == (1, 3)
    assert rank_at_first_divergence(z, torch.tensor([1, 4, 3])) is None  # agrees at every step


def _constructed(kind: str) -> tuple[LoadedModel, LoadedModel, Target, GenItem]:
    """Dense tiny model and a 'pruned' copy whose lm_head moves the dense first answer token a, at the
    question's last position only in effect, to just under the runner-up (rank 2) or under every
    other token (rank V)."""
    dense = tiny_lm()
    item = GenItem("q0", ({"role": "user", "content": "w10 w20 w30"},), lambda t: False)
    target = Target("t", "constructed", (item,), 4, (), False, {})
    ids = torch.tensor([prompt_ids(dense, target, [item])[0]])
    with torch.no_grad():
        h = dense.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        z = dense.model.lm_head(h)
    a = int(z.argmax())
    goal = (z.topk(2).values[1] - 0.05) if kind == "demoted" else (z.min() - 1.0)
    model = copy.deepcopy(dense.model)
    w = nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        w[a] += (goal - z[a]) * h / h.dot(h)
    model.lm_head.weight = w
    pruned = LoadedModel(model, dense.tokenizer, Adapter(model), {"name": "tiny-pruned"})
    return dense, pruned, target, item


@pytest.mark.parametrize(("kind", "rank"), [("demoted", 2), ("erased", VOCAB)])
def test_recovery_statistics_on_a_constructed_case(kind: str, rank: int) -> None:
    dense, pruned, target, item = _constructed(kind)
    ref = answer(dense, target, [item])[0]
    right = GenItem(item.key, item.turns, lambda t: t == ref.text)  # the dense answer is the gold one
    assert answer(pruned, target, [right])[0].text != ref.text  # the pruning loses it
    rec = recovery(pruned, target, None, [right], {item.key: list(ref.ids)}, None, samples=3)
    assert rec["n"] == 1 and rec["ranks"] == [rank] and rec["median_rank"] == rank
    assert rec["demoted"] == (1.0 if kind == "demoted" else 0.0)
    assert "in_context" not in rec  # no solved example given
    assert 0.0 <= rec["sampled"] <= 1.0
    # sampling recovers exactly what the check accepts: everything, or nothing
    for ok, share in ((lambda t: True, 1.0), (lambda t: False, 0.0)):
        r = recovery(pruned, target, None, [GenItem(item.key, item.turns, ok)], {item.key: list(ref.ids)},
                     (GenItem("ex", ({"role": "user", "content": "w40"},), ok), "w41"), samples=2)
        assert r["sampled"] == share and r["in_context"] == share
    # the same seed draws the same samples; another seed may not
    a = answer(pruned, target, [item], temperature=0.7, repeat=4, seed=5)
    b = answer(pruned, target, [item], temperature=0.7, repeat=4, seed=5)
    assert [g.ids for g in a] == [g.ids for g in b]


def test_unmodified_model_diverges_nowhere_and_the_reading_says_so() -> None:
    dense, _, target, item = _constructed("demoted")
    ref = answer(dense, target, [item])[0]
    rec = recovery(dense, target, None, [item], {item.key: list(ref.ids)}, None, samples=2)
    assert rec["ranks"] == [] and rec["median_rank"] is None  # teacher-forced on its own answer: no divergence
    recs = {"a": {"n": 4, "ranks": [2, 3, 40, 2], "sampled": 0.5, "samples": 4, "temperature": 0.7,
                  "in_context": 0.25, "demoted": 0.75, "median_rank": 2.5}}
    text = reading(recs)
    assert "Of 4 lost answers, 75% were only demoted" in text and "recover 50%" in text and "brings back 25%" in text
    assert table_rows(recs)[0]["in top 5"] == "75%"
    assert "nothing to trace" in reading({"a": {"n": 0, "samples": 4, "temperature": 0.7}})
