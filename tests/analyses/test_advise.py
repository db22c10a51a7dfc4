"""`prunelens advise`: budget parsing, candidates that meet the budget, ranking on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunelens.analyses import advise as adv
from prunelens.analyses import advise_page
from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.prune.checkpoint import load_model
from prunelens.testing import save_tiny, shared_data_dir

DATA = shared_data_dir()


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
    got = adv.candidates(lm, 0.25, repair=False, slow=True)  # 9216 weights: 3 attentions, 2 MLPs, 1 block
    assert got == ["attn:3", "mlp:2", "block:1", "sleb:1", "wanda:0.25", "wanda:2:4", "sparsegpt:0.25",
                   "sparsegpt:2:4", "owl:0.25", "owl-sparsegpt:0.25", "rtn:w4g128", "gptq:w4g128", "awq:w4g128"]
    # by default each drop comes with a linear repair; the methods that take minutes to build and the
    # scale-repaired weight methods come with slow=True
    assert adv.candidates(lm, 0.25) == [
        "attn:3", "attn:3+repair:linear", "mlp:2", "mlp:2+repair:linear", "block:1", "block:1+repair:linear",
        "wanda:0.25", "wanda:2:4", "sparsegpt:0.25", "sparsegpt:2:4", "rtn:w4g128", "gptq:w4g128"]
    assert "wanda:0.25+repair:scale" in adv.candidates(lm, 0.25, slow=True)
    for spec in got[:4]:
        req = method_for(spec).parse(spec)
        plan = DropPlan(**{req.kind: tuple(range(req.count))})
        assert footprint(lm, plan)["removed_share"] >= 0.25
    assert not any(s.startswith("attn:") for s in adv.candidates(lm, 0.26))  # would need all 4
    assert "block:3" in adv.candidates(lm, 0.6)
    assert not any(s.startswith("block:") for s in adv.candidates(lm, 0.9))
    assert adv.candidates(lm, 0.8, slow=True)[-1] == "owl-sparsegpt:0.8"  # past 4-bit quantisation's saving


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
    assert advise_page.gain_text(g) == "vs block:4: KL -0.300, risk -0.100, retention +0.05"


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
    # multiple-choice use: ranked and recommended by the one-step risk, which does not saturate
    assert "predicted risk" in res["recommendation"] and "retention floor" not in res["recommendation"]


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_calibrate_on_the_real_model_measures_an_anchor_and_traces_its_lost_answers(tmp_path: Path,
                                                                                    capsys) -> None:
    out = tmp_path / "adv"
    rc = main(["advise", "--budget", "20%", "--use", "generative", "--recipe", "block:6,wanda:0.2",
               "--calibrate", "1", "--limit", "120", "--data-dir", str(DATA), "--recovery-samples", "2",
               "--steps", "8", "--cells", str(tmp_path / "cells"), "--out", str(out), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert err.index("advise: 2 candidates — block:6, wanda:0.2") < err.index("calibration anchors: ")
    res = json.loads((out / "results.json").read_text())
    cal = res["calibration"]
    assert cal["model"] == "intercept" and cal["asked"] == 120 and cal["dense_right"] >= 8
    assert "smollm2-135m" not in cal["prior_from"]  # its own grid is not used to calibrate it
    (a,) = cal["anchors"]
    assert a["n"] == cal["dense_right"] and a["recovery"]["n"] == min(a["n"] - a["k"], 16)
    rec = a["recovery"]
    if rec["n"]:
        assert len(rec["ranks"]) <= rec["n"] and all(r >= 2 for r in rec["ranks"])
        assert 0 <= rec["sampled"] <= 1 and 0 <= rec.get("in_context", 0) <= 1
    assert 0 <= a["ece"] <= 1 and 0 <= cal["dense_ece"] <= 1  # ARC has options: the MCQ read's ECE
    page = (out / "report.html").read_text()
    assert page.index("retention floor") < page.index("<h2>Evidence</h2>")
    assert "Where the lost answers went" in page or rec["n"] == 0


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
    # a model with no grid of its own and no --calibrate: the prior, said plainly, never "no calibration"
    res = json.loads((tmp_path / "adv" / "results.json").read_text())
    assert res["calibration"]["model"] == "prior" and res["calibration"]["anchors"] == []
    assert "No anchor of this model was measured" in (tmp_path / "adv" / "report.html").read_text()


def _own_answers_config(tmp_path: Path, base: Path, n: int = 12) -> Path:
    """A generate task config whose gold answers are what the dense tiny model says: it answers all
    right, so each anchor's retention is the share of them it keeps."""
    from prunelens.analyses.recovery import GenItem, Target, answer

    lm = load_model(str(base))
    prompts = [f"w{10 + i} w{40 + 2 * i} w{90 - i}" for i in range(n)]
    target = Target("own", "test", tuple(GenItem(i, ({"role": "user", "content": p},), bool)
                                         for i, p in enumerate(prompts)), 3, (), False, {})
    golds = [g.text.strip() for g in answer(lm, target, target.items)]
    lines = [json.dumps({"q": p, "a": a}) + "\n" for p, a in zip(prompts, golds, strict=True)]
    (tmp_path / "own.jsonl").write_text("".join(lines))
    cfg = tmp_path / "own.yaml"
    cfg.write_text("task: own\nkind: generate\ndata_files: own.jsonl\nprompt: '{{q}}'\ntarget: '{{a}}'\n"
                   "max_new_tokens: 3\nchat_template: false\n")
    return cfg


def test_calibrate_measures_anchors_on_the_users_task_and_resumes(tmp_path: Path, capsys) -> None:
    base = save_tiny(tmp_path / "base")
    cfg = _own_answers_config(tmp_path, base)
    cells = tmp_path / "cells"
    argv = ["advise", "--model", str(base), "--budget", "10%", "--use", "generative", "--recipe",
            "attn:1,mlp:1,block:2", "--prompts", str(cfg), "--calibrate", "2", "--steps", "4", "--cells", str(cells),
            "--recovery-samples", "2", "--quiet", "--out", str(tmp_path / "adv")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    plan = err.index("advise: 3 candidates — attn:1, mlp:1, block:2")
    assert plan < err.index("cost: about") and "2 anchor(s) measured on own (12 questions" in err
    assert "calibration anchors: " in err
    res = json.loads((tmp_path / "adv" / "results.json").read_text())
    cal = res["calibration"]
    assert cal["model"] == "intercept+slope" and cal["dense_right"] == cal["asked"] == 12
    assert cal["source"].startswith("your task config own.yaml")
    # the anchors are the quartiles of the KL range (of three candidates: the two ends), each measured
    # on the 12 questions, and were named before they were measured
    kls = sorted(r["signals"]["tf_kl"] for r in res["rows"])
    assert sorted(a["tf_kl"] for a in cal["anchors"]) == [kls[0], kls[-1]]
    for a in cal["anchors"]:
        assert a["n"] == 12 and 0 <= a["k"] <= 12 and len(a["examples"]) == min(3, 12 - a["k"])
        assert a["recovery"]["n"] == min(12 - a["k"], 16)
    rows = {r["spec"]: r for r in res["rows"]}
    for r in rows.values():
        q = r["retention"]
        assert 0 <= q["low"] <= q["predicted"] <= q["high"] <= 1
    for a in cal["anchors"]:
        assert rows[a["spec"]]["retention"]["measured"] == pytest.approx(a["k"] / 12)
    # ranked by predicted retention, and the recommendation names the floor
    preds = [r["retention"]["predicted"] for r in res["rows"] if r["meets_budget"]]
    assert preds == sorted(preds, reverse=True) and "retention floor" in res["recommendation"]
    page = (tmp_path / "adv" / "report.html").read_text()
    assert page.index(res["recommendation"][:40]) < page.index("<h2>Evidence</h2>")
    # the same command again resumes from the cells: nothing is measured twice
    stamps = {p.name: p.stat().st_mtime_ns for p in cells.glob("cells/*.json")}
    assert len(stamps) == 3  # dense and two anchors
    assert main([*argv, "--overwrite"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("cells/*.json")} == stamps
    again = json.loads((tmp_path / "adv" / "results.json").read_text())
    assert again["calibration"]["weights"] == cal["weights"]


def test_calibrate_refuses_a_task_the_dense_model_cannot_do_in_one_line(tmp_path: Path, capsys) -> None:
    base = save_tiny(tmp_path / "base")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": f"w{i}", "a": "never"}) + "\n" for i in range(10, 20)))
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("task: bad\nkind: generate\ndata_files: d.jsonl\nprompt: '{{q}}'\ntarget: '{{a}}'\n"
                   "max_new_tokens: 2\n")
    assert main(["advise", "--model", str(base), "--budget", "10%", "--use", "generative", "--recipe", "attn:1",
                 "--prompts", str(cfg), "--calibrate", "1", "--steps", "2", "--cells", str(tmp_path / "c"),
                 "--quiet", "--out", str(tmp_path / "adv")]) != 0
    err = capsys.readouterr().err
    assert "error: the dense model answers only 0 of 10 calibration questions (bad) right" in err
    assert "Traceback" not in err and not (tmp_path / "adv").exists()  # refused before any candidate was built
    mcq = tmp_path / "mcq.yaml"
    mcq.write_text("task: m\nkind: multiple_choice\ndata_files: d.jsonl\nprompt: '{{q}}'\nchoices: ['a', 'b']\n"
                   "answer: 0\n")
    assert main(["advise", "--model", str(base), "--budget", "10%", "--use", "generative", "--recipe", "attn:1",
                 "--prompts", str(mcq), "--calibrate", "1", "--quiet", "--out", str(tmp_path / "adv2")]) != 0
    assert "needs a 'generate' config" in capsys.readouterr().err


def test_recommendation_says_what_meets_the_floor_or_what_comes_closest() -> None:
    def row(spec: str, p: float, saved: float = 0.3) -> dict:
        return {"spec": spec, "meets_budget": True, "saved": saved, "decode_speedup": 1.2, "risk": 0.99,
                "signals": {"tf_top1_disagree": 0.1}, "retention": {"predicted": p, "low": p - 0.1, "high": p + 0.05}}

    met = adv.recommendation([row("a", 0.95), row("b", 0.92)], "generative", 0.25, 0.9)
    assert met.startswith("for generative use at a 25% saving, a, predicted retention 0.95 [0.85, 1.00]")
    assert "meets the 0.90 retention floor (so do 1 more); its interval reaches below the floor" in met
    none = adv.recommendation([row("q", 0.8, 0.73), row("b", 0.5)], "generative", 0.25, 0.9)
    assert none.startswith("nothing meets the 0.90 retention floor at a 25% saving; closest: q, predicted "
                           "retention 0.80 [0.70, 0.85], saves 73%")


def test_trade_off_labels_never_overlap(tmp_path: Path) -> None:
    """Eight candidates on almost the same point: their names stand in a column, apart."""
    import matplotlib
    from matplotlib.text import Text

    matplotlib.use("Agg")
    rows = [{"spec": f"candidate-{i}", "meets_budget": True, "saved": 0.25 + 0.001 * i, "decode_speedup": 1.0,
             "risk": 0.9, "retention": {"predicted": 0.5 + 0.002 * i, "low": 0.4, "high": 0.6,
                                        "outside_fitted_range": False}} for i in range(8)]
    res = {"rows": rows, "use": "generative", "budget": 0.25, "min_retention": 0.9}
    from prunelens.analyses import advise_page as page

    drawn = []
    real = page.save_figure
    page.save_figure = lambda fig, path: drawn.append(fig) or real(fig, path)
    try:
        page.advise_figures(res, tmp_path)
    finally:
        page.save_figure = real
    fig = drawn[0]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [Text.get_window_extent(t, r) for t in ax.texts]  # the name itself, not its leader line
        assert len(boxes) == 8
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert any(abs(line.get_ydata()[0] - 0.9) < 1e-9 for line in ax.lines if len(line.get_ydata()) == 2)


def test_cost_estimate_counts_the_forward_passes_it_prints() -> None:
    from prunelens.analyses.calibration import estimate
    from prunelens.analyses.recovery import GenItem, Target

    speed = {"step_b1": 0.01, "step_b8": 0.02}
    # per candidate: 3 × 32 batch-8 steps of signals (8 prompts), 2 × 2 × 32 batch-1 timed steps
    e = estimate(speed, 2, 8, 32, 2, 0, None, 4)
    assert (e["forward_passes"], e["per_candidate_s"], e["calibration_s"]) == (2 * (96 + 128), 3.2, 0.0)
    target = Target("t", "test", tuple(GenItem(i, (), bool) for i in range(16)), 40, (), False, {})
    # calibration: the dense model on 2 batches × 40 tokens, then each of 2 anchors on the same until the
    # dense pass has said how many it had right
    assert estimate(speed, 0, 8, 32, 2, 2, target, 0)["calibration_s"] == pytest.approx((80 + 2 * 80) * 0.02)
    assert estimate(speed, 0, 8, 32, 2, 2, target, 0, n_right=8)["calibration_s"] == pytest.approx(2 * 40 * 0.02)
