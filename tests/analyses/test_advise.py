"""`prunelens advise`: budget parsing, candidates that meet the budget, ranking on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunelens.analyses import advise as adv
from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.prune.checkpoint import load_model
from prunelens.testing import save_tiny


def test_budget_parses_percent_and_share() -> None:
    assert adv.parse_budget("25%") == pytest.approx(0.25)
    assert adv.parse_budget("0.3") == pytest.approx(0.3)
    for bad, msg in (("abc", "such as 25%"), ("0%", "strictly between"), ("1", "strictly between"),
                     ("150%", "strictly between"), ("15", "did you mean '15%'"), ("1", "did you mean '1%'")):
        with pytest.raises(PrunelensError, match=msg):
            adv.parse_budget(bad)
    for no_hint in ("150", "0", "150%", "-5"):
        with pytest.raises(PrunelensError) as e:
            adv.parse_budget(no_hint)
        assert "did you mean" not in str(e.value)


def test_candidates_meet_the_budget_on_a_tiny_model() -> None:
    from prunelens.model.arch import Adapter
    from prunelens.model.loading import LoadedModel
    from prunelens.prune.base import method_for
    from prunelens.prune.drop import DropPlan
    from prunelens.prune.recipe import footprint
    from prunelens.testing import tiny_model, tiny_tokenizer

    model = tiny_model("llama")  # per layer: attention 3072 weights, MLP 6144, so 36864 in all
    lm = LoadedModel(model, tiny_tokenizer(), Adapter(model), {"name": "tiny-llama"})
    assert adv._linear_params(lm)[0] == 36864
    got = adv.candidates(lm, 0.25, repair=False)  # 9216 weights: 3 attentions, 2 MLPs, 1 block (cosine or SLEB)
    assert got == ["attn:3", "mlp:2", "block:1", "sleb:1", "wanda:0.25", "wanda:2:4", "sparsegpt:0.25",
                   "sparsegpt:2:4", "owl:0.25", "owl-sparsegpt:0.25", "rtn:w4g128", "gptq:w4g128", "awq:w4g128"]
    # by default each drop comes with a linear repair and unstructured Wanda/SparseGPT with a scale one
    assert adv.candidates(lm, 0.25) == [
        "attn:3", "attn:3+repair:linear", "mlp:2", "mlp:2+repair:linear", "block:1", "block:1+repair:linear",
        "sleb:1", "wanda:0.25", "wanda:0.25+repair:scale", "wanda:2:4", "sparsegpt:0.25",
        "sparsegpt:0.25+repair:scale", "sparsegpt:2:4", "owl:0.25", "owl-sparsegpt:0.25", "rtn:w4g128",
        "gptq:w4g128", "awq:w4g128"]
    for spec in got[:4]:
        req = method_for(spec).parse(spec)
        plan = DropPlan(**{req.kind: tuple(range(req.count))})
        assert footprint(lm, plan)["removed_share"] >= 0.25
    assert not any(s.startswith("attn:") for s in adv.candidates(lm, 0.26))  # would need all 4
    assert "block:3" in adv.candidates(lm, 0.6)
    assert not any(s.startswith("block:") for s in adv.candidates(lm, 0.9))
    assert adv.candidates(lm, 0.8)[-1] == "owl-sparsegpt:0.8"  # past 4-bit quantisation's saving


def test_repair_gain_is_measured_against_the_same_pruning_unrepaired() -> None:
    assert adv.unrepaired("block:4+repair:linear") == "block:4"
    assert adv.unrepaired("block:2+wanda:0.5+repair:scale") == "block:2+wanda:0.5"
    assert adv.unrepaired("block:4") is None
    rows = [{"spec": "block:4", "risk": 0.9, "signals": {"tf_kl": 1.0}, "retention": {"predicted": 0.2}},
            {"spec": "block:4+repair:linear", "risk": 0.8, "signals": {"tf_kl": 0.7},
             "retention": {"predicted": 0.25}},
            {"spec": "attn:2+repair:linear", "risk": 0.5, "signals": {"tf_kl": 0.3}}]  # its base was not scored
    adv.repair_gains(rows)
    g = rows[1]["repair_gain"]
    assert g["of"] == "block:4" and g == pytest.approx({"of": "block:4", "tf_kl": 0.3, "risk": 0.1,
                                                        "retention": 0.05})
    assert "repair_gain" not in rows[0] and "repair_gain" not in rows[2]
    assert adv.gain_text(g) == "vs block:4: KL -0.300, risk -0.100, retention +0.05"


@pytest.mark.slow
def test_advise_ranks_real_candidates_by_risk(tmp_path: Path) -> None:
    from prunelens.cli import main

    out = tmp_path / "adv"
    rc = main(["advise", "--budget", "3%", "--use", "multiple-choice", "--candidates",
               "attn:4,attn:4+repair:linear,rtn:w4g128",
               "--steps", "8", "--out", str(out), "--quiet"])
    assert rc == 0 and (out / "report.html").is_file()
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["spec"] for r in rows] == sorted([r["spec"] for r in rows], key=lambda s: next(
        r["risk"] for r in rows if r["spec"] == s))
    for r in rows:
        assert r["meets_budget"] and r["saved"] >= 0.03
        assert r["risk"] == r["risk_multiple_choice"] == pytest.approx(r["signals"]["tf_top1_disagree"])
        assert 0 <= r["risk_multiple_choice"] <= r["risk_generative"] <= 1  # one step vs compounded
        assert r["decode_speedup"] > 0
    by = {r["spec"]: r for r in rows}
    assert by["rtn:w4g128"]["saved"] == pytest.approx(1 - 4.25 / 16, abs=0.01)  # 4 bits + scale/zero per 128
    # the repaired drop saves what the drop saves and carries its measured gain over it
    rep, base = by["attn:4+repair:linear"], by["attn:4"]
    assert rep["saved"] == pytest.approx(base["saved"])
    assert rep["repair_gain"]["tf_kl"] == pytest.approx(base["signals"]["tf_kl"] - rep["signals"]["tf_kl"])
    assert rep["signals"]["tf_kl"] != base["signals"]["tf_kl"]
    assert res["recommendation"].startswith(f"for multiple-choice use at a 3% saving: {rows[0]['spec']}")
    # the default model has a retention calibration: every row carries a prediction with its interval,
    # the page draws the trade-off figure and says what the number means
    assert res["retention_fit"]["fitted_on"] == "smollm2-135m"
    for r in rows:
        q = r["retention"]
        assert 0 <= q["low"] <= q["predicted"] <= q["high"] <= 1
    assert by["attn:4"]["retention"]["predicted"] != by["rtn:w4g128"]["retention"]["predicted"]
    assert (out / "figures" / "tradeoff.png").is_file()
    page = (out / "report.html").read_text()
    assert "Evidence" in page and "free-generation answers" in page and "data:image/png" in page
    assert "vs attn:4: KL" in page
    assert "predicted generative retention" in res["recommendation"]


def test_decode_timing_runs_exactly_the_asked_tokens_even_past_eos() -> None:
    from prunelens.model.arch import Adapter
    from prunelens.model.loading import LoadedModel
    from prunelens.testing import EOS, tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    with torch.no_grad():  # make EOS the argmax everywhere: generation would stop at once
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS] = 1.0
    lm = LoadedModel(model, tiny_tokenizer(), Adapter(model), {"name": "tiny-llama"})
    calls = []
    h = model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        assert adv.decode_seconds(lm, None, [5, 6, 7], tokens=9, repeats=2) > 0
    finally:
        h.remove()
    assert len(calls) == 2 * 9  # per repeat: one prefill and 8 cached steps, EOS or not


def test_an_external_candidate_is_ranked_beside_the_specs(tmp_path: Path) -> None:
    """``advise --candidate``: a model made elsewhere gets the same signals as the recipe that made it
    (it is that recipe's checkpoint), and its memory as its files store it (fp32 here: 2x bf16)."""
    base = save_tiny(tmp_path / "base")
    assert main(["prune", "--model", str(base), "--recipe", "wanda:0.5", "--calib-samples", "2",
                 "--out", str(tmp_path / "cand")]) == 0
    assert main(["advise", "--model", str(base), "--budget", "25%", "--use", "generative", "--recipe",
                 "wanda:0.5", "--candidate", str(tmp_path / "cand"), "--steps", "4", "--calib-samples", "2",
                 "--quiet", "--out", str(tmp_path / "adv")]) == 0
    rows = {r["spec"]: r for r in json.loads((tmp_path / "adv" / "results.json").read_text())["rows"]}
    view, ext = rows["wanda:0.5"], rows[str(tmp_path / "cand")]
    for key in ("tf_kl", "tf_top1_disagree", "fr_token_disagree"):
        assert ext["signals"][key] == pytest.approx(view["signals"][key], rel=1e-4, abs=1e-6)
    stored = (tmp_path / "cand" / "model.safetensors").stat().st_size
    n_params = int(load_model(str(base)).info["n_params"])
    assert ext["memory_vs_bf16"] == pytest.approx(stored / (2 * n_params), rel=1e-9)
    assert not ext["meets_budget"] and view["meets_budget"]  # a dense fp32 file saves nothing on disk
