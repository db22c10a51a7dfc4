"""Importance rankings on constructed models whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from prunelens.errors import PrunelensError
from prunelens.metrics import logit_metrics
from prunelens.model.arch import Adapter
from prunelens.model.loading import LoadedModel
from prunelens.prune.base import method_for
from prunelens.prune.drop import DropPlan, parse_drop, pruned_view
from prunelens.prune.importance import angular_scores, greedy_scores, kl_scores, select_drop, unit_scores
from prunelens.prune.recipe import Recipe

N_LAYERS = 8


def _tiny(silent_attn=(), silent_mlp=(), seed: int = 0) -> LoadedModel:
    """A random Llama whose listed sublayers are silenced by zeroing their output projections."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # make every live sublayer matter
            layer.self_attn.o_proj.weight.mul_(20)
            layer.mlp.down_proj.weight.mul_(20)
        for i in silent_attn:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
        for i in silent_mlp:
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return LoadedModel(model, None, Adapter(model), {})


CALIB = torch.randint(0, 101, (4, 24), generator=torch.Generator().manual_seed(1))


def test_silent_attention_scores_zero_and_is_dropped_first() -> None:
    lm = _tiny(silent_attn=(2, 5))
    sc = unit_scores(lm, DropPlan(), CALIB, "attn")
    assert sc[2] == pytest.approx(0.0, abs=1e-12) and sc[5] == pytest.approx(0.0, abs=1e-12)
    assert min(v for i, v in sc.items() if i not in (2, 5)) > 1e-4
    plan = select_drop(lm, [parse_drop("attn:2")], calib=CALIB)
    assert plan.attn == (2, 5) and plan.mlp == () and plan.block == ()


def test_silent_mlp_is_dropped_first() -> None:
    lm = _tiny(silent_mlp=(6,))
    plan = select_drop(lm, [parse_drop("mlp:1")], calib=CALIB)
    assert plan.mlp == (6,)


def test_block_influence_picks_fully_silent_block() -> None:
    lm = _tiny(silent_attn=(1, 4), silent_mlp=(4, 7))
    sc = unit_scores(lm, DropPlan(), CALIB, "block")
    assert sc[4] == pytest.approx(0.0, abs=1e-12)
    assert select_drop(lm, [parse_drop("block:1")], calib=CALIB).block == (4,)


def test_angular_picks_the_silent_window() -> None:
    lm = _tiny(silent_attn=(3, 4, 5), silent_mlp=(3, 4, 5))
    sc = angular_scores(lm, DropPlan(), CALIB, width=3)
    assert sc[3] == pytest.approx(0.0, abs=1e-6)
    assert set(sc) == set(range(0, N_LAYERS - 3 + 1))
    plan = select_drop(lm, [parse_drop("block:3")], metric="angular", calib=CALIB)
    assert plan.block == (3, 4, 5)


def test_iterative_rescoring_excludes_dropped_units_and_records_order() -> None:
    lm = _tiny(silent_attn=(6,))
    plan = select_drop(lm, [parse_drop("attn:3")], iterative=True, calib=CALIB)
    order = plan.info["scores"]["attn:3"]["order"]
    assert order[0] == 6 and len(set(order)) == 3 and set(plan.attn) == set(order)


def test_scores_under_a_plan_see_the_dropped_unit_as_identity() -> None:
    lm = _tiny()
    sc = unit_scores(lm, DropPlan(attn=(3,)), CALIB, "attn")
    assert sc[3] == pytest.approx(0.0, abs=1e-12)  # its output equals its input under the plan


def test_explicit_layers_need_no_calibration_and_counts_are_bounded() -> None:
    lm = _tiny()
    assert select_drop(lm, [parse_drop("mlp@1,3")]).mlp == (1, 3)
    with pytest.raises(PrunelensError, match="need 0 <= N < 8"):
        select_drop(lm, [parse_drop("attn:8")], calib=CALIB)
    with pytest.raises(PrunelensError, match="angular"):
        select_drop(lm, [parse_drop("attn:2")], metric="angular", calib=CALIB)
    with pytest.raises(PrunelensError, match="unknown importance metric"):
        select_drop(lm, [parse_drop("attn:2")], metric="magic", calib=CALIB)


@pytest.mark.parametrize("spec", ["attn", "attn:", "attn:x", "mlp@", "mlp@1,,2", "block@1,1", "ffn:2", "wanda:0.5",
                                  "sleb@3"])
def test_malformed_drop_specs(spec: str) -> None:
    with pytest.raises(PrunelensError):
        parse_drop(spec)


def test_drop_spec_forms() -> None:
    assert parse_drop("attn:4").count == 4
    assert parse_drop("mlp@7,3").layers == (3, 7)
    assert str(parse_drop("block@2,1")) == "block@1,2"


def test_kl_scores_are_the_output_kl_and_zero_for_a_silent_unit() -> None:
    lm = _tiny(silent_attn=(3,))
    sc = kl_scores(lm, DropPlan(), CALIB, "attn", range(N_LAYERS), batch_size=3)  # uneven batches
    assert sc[3] == pytest.approx(0.0, abs=1e-9)
    assert min(v for i, v in sc.items() if i != 3) > 1e-5
    with torch.no_grad():  # the definition, by the metrics module: mean over every token of KL(p'‖p)
        z_d = lm.model(CALIB).logits
        with pruned_view(lm.adapter, DropPlan(attn=(5,))):
            z_p = lm.model(CALIB).logits
    want = float(logit_metrics(z_d, z_p, (1.0,), light=True)["kl@1"].mean())
    assert sc[5] == pytest.approx(want, rel=1e-4)


def test_kl_greedy_drops_silent_units_first_and_logs_the_order() -> None:
    lm = _tiny(silent_mlp=(6, 2))
    plan = select_drop(lm, [parse_drop("mlp:2")], metric="kl", calib=CALIB)
    assert set(plan.mlp) == {2, 6} and plan.attn == ()
    log = plan.info["scores"]["mlp:2"]
    assert sorted(log["order"]) == [2, 6] and len(log["scores"]) == N_LAYERS
    # a third drop must then take a live unit: the one whose removal costs the least KL on top
    plan3 = select_drop(lm, [parse_drop("mlp:3")], metric="kl", calib=CALIB)
    rest = kl_scores(lm, DropPlan(mlp=(2, 6)), CALIB, "mlp", [i for i in range(N_LAYERS) if i not in (2, 6)])
    assert plan3.info["scores"]["mlp:3"]["order"][2] == min(rest, key=rest.__getitem__)


def test_ppl_scores_are_the_calibration_perplexity_of_the_pruned_model() -> None:
    """SLEB's score of a block is exp of transformers' own next-token loss with that block removed."""
    lm = _tiny(silent_attn=(1,), silent_mlp=(1,))
    sc = greedy_scores(lm, DropPlan(), CALIB, "block", range(N_LAYERS), metric="ppl", batch_size=3)
    for i in (1, 4):
        with torch.no_grad(), pruned_view(lm.adapter, DropPlan(block=(i,))):
            want = float(torch.exp(lm.model(CALIB, labels=CALIB).loss))
        assert sc[i] == pytest.approx(want, rel=1e-5)
    with torch.no_grad():  # a silent block leaves the dense perplexity
        dense = float(torch.exp(lm.model(CALIB, labels=CALIB).loss))
    assert sc[1] == pytest.approx(dense, rel=1e-5)


def test_sleb_spec_removes_blocks_greedily_by_perplexity() -> None:
    req = method_for("sleb:2").parse("sleb:2")
    assert (req.kind, req.count, req.metric, str(req)) == ("block", 2, "ppl", "sleb:2")
    assert parse_drop("sleb:2") == req  # the public parser takes every registered drop kind
    with pytest.raises(PrunelensError, match="sleb:N"):
        method_for("sleb@3").parse("sleb@3")
    lm = _tiny()
    # the calibration's metric is cosine: sleb overrides it, a plain block request keeps it
    plan = select_drop(lm, Recipe.parse("sleb:2").drops, metric="cosine", calib=CALIB)
    log = plan.info["scores"]["sleb:2"]
    # as in SLEB's code, the first and last remaining blocks are never candidates
    first = greedy_scores(lm, DropPlan(), CALIB, "block", range(1, N_LAYERS - 1), "ppl")
    assert log["metric"] == "ppl" and log["order"][0] == min(first, key=first.__getitem__)
    k = log["order"][0]
    rest = greedy_scores(lm, DropPlan(block=(k,)), CALIB, "block",
                         [i for i in range(1, N_LAYERS - 1) if i != k], "ppl")
    assert log["order"][1] == min(rest, key=rest.__getitem__) and plan.block == tuple(sorted(log["order"]))
    assert select_drop(lm, [parse_drop("block:1")], calib=CALIB).info["scores"]["block:1"]["metric"] == "cosine"
    # the plain ppl importance ranks every block, ends included
    lm_end = _tiny(silent_attn=(0,), silent_mlp=(0,))
    assert select_drop(lm_end, [parse_drop("block:1")], metric="ppl", calib=CALIB).info["scores"]["block:1"][
        "scores"].keys() == set(range(N_LAYERS))
