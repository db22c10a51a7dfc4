"""Collapse predictor: the risk's closed form, signals ordered by a constructed perturbation, and the
validation statistics (Spearman, leave-one-method-out) on hand-made data."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch

from prunelens.analyses import predictor
from prunelens.errors import PrunelensError


def test_risk_is_one_step_and_compounded_disagreement() -> None:
    r = predictor.risk({"tf_top1_disagree": 0.1}, answer_tokens=32)
    assert r["non_generative"] == pytest.approx(0.1)
    assert r["generative"] == pytest.approx(1 - 0.9 ** 32)  # 0.966: generation is far riskier
    assert r["agreeing_tokens"] == pytest.approx(9.0)  # a / (1 − a)
    assert predictor.risk({"tf_top1_disagree": 0.0}) == {"non_generative": 0.0, "generative": 0.0,
                                                         "agreeing_tokens": float("inf")}
    assert predictor.risk({"tf_top1_disagree": 1.0})["generative"] == 1.0
    assert predictor.risk({"tf_top1_disagree": 0.1}, 1)["generative"] == pytest.approx(0.1)
    with pytest.raises(PrunelensError, match="at least 1 token"):
        predictor.risk({"tf_top1_disagree": 0.1}, 0)


class HiddenNoise:
    """A modification adding fixed Gaussian noise of a given scale to the final-norm output h:
    a logit perturbation whose size is known in advance."""

    def __init__(self, scale: float):
        self.scale = scale

    def label(self) -> str:
        return f"noise{self.scale:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label()}

    def validate(self, n_layers: int) -> None:
        pass

    @contextlib.contextmanager
    def view(self, adapter):
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(4096, adapter.config.hidden_size, generator=gen)

        def hook(module, args, out):
            flat = out.reshape(-1, out.shape[-1])
            return out + self.scale * noise[:flat.shape[0]].reshape(out.shape).to(out.dtype)

        h = adapter.final_norm.register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()


def test_signals_and_risk_grow_with_the_perturbation_on_a_tiny_model() -> None:
    from prunelens.model.arch import Adapter
    from prunelens.model.loading import LoadedModel
    from prunelens.testing import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    lm = LoadedModel(model, tiny_tokenizer(), Adapter(model), {"name": "tiny-llama"})
    prompts = ["w3 w4 w5 w6", "w10 w11 w12", "w20 w21 w22 w23 w24", "w7 w8"]
    rows = [predictor.collapse_signals(lm, HiddenNoise(s), prompts, steps=12, chat_template=False)
            for s in (0.0, 0.05, 0.5, 3.0)]
    sig = [r[0] for r in rows]
    assert sig[0]["tf_kl"] == 0.0 and sig[0]["tf_top1_disagree"] == 0.0 and rows[0][1]["generative"] == 0.0
    kls = [s["tf_kl"] for s in sig]
    assert kls == sorted(kls) and kls[1] > 0 and kls[3] > 10 * kls[1]
    risks = [r[1]["generative"] for r in rows]
    assert risks == sorted(risks) and risks[3] > risks[0]
    assert sig[3]["fr_token_disagree"] >= sig[1]["fr_token_disagree"]
    assert all(set(s) == set(predictor.SIGNALS) for s in sig)


def test_spearman_and_leave_one_method_out() -> None:
    assert predictor.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert predictor.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert predictor.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # tied ranks
    assert np.isnan(predictor.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(PrunelensError):
        predictor.spearman([1, 2], [1, 2])
    # target = 0.5 + 0.1·log(tf_kl): a linear fit on log KL recovers it exactly, even leaving a method out
    rows = []
    for m, kls in (("a", (0.1, 0.2, 0.4)), ("b", (0.05, 1.0, 3.0)), ("c", (0.3, 0.6, 2.0))):
        for k in kls:
            rows.append({"method": m, "tf_kl": k, "target": 0.5 + 0.1 * np.log(k)})
    pred = predictor.lomo_predictions(rows, "target", ["tf_kl"], ridge=0.0)
    assert pred == pytest.approx([r["target"] for r in rows], abs=1e-9)
    # a method's own points never enter its fit: shifting method a's targets leaves a's predictions alone
    shifted = [{**r, "target": r["target"] + (5.0 if r["method"] == "a" else 0.0)} for r in rows]
    pa = predictor.lomo_predictions(shifted, "target", ["tf_kl"], ridge=0.0)
    assert pa[:3] == pytest.approx(pred[:3], abs=1e-9)
    with pytest.raises(PrunelensError, match="at least two methods"):
        predictor.lomo_predictions(rows[:3], "target", ["tf_kl"])


def test_validate_ranks_signals_risk_proxies_and_the_fit() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i, m in enumerate(("attn", "mlp", "wanda", "rtn") * 3):
        d = 0.05 * (i + 1)  # top-1 disagreement grows down the list, and with it the measured drop
        rows.append({"method": m, "spec": f"{m}{i}", "tf_kl": 2 * d, "tf_kl_early": 2 * d, "tf_taylor_kl": d,
                     "tf_top1_disagree": d, "kl_growth": 1.0 + rng.random(),
                     "fr_token_disagree": min(1, 3 * d),
                     "inv_first_divergence": d, "tf_hidden_distance": d / 10,
                     "gen_drop": min(1.0, 1.5 * d), "ppl_log_ratio": -d})
    v = predictor.validate(rows, "gen_drop", ("ppl_log_ratio",))
    assert v["n"] == 12 and v["methods"] == ["attn", "mlp", "rtn", "wanda"]
    assert v["signals"]["tf_top1_disagree"] == pytest.approx(v["risk_generative"])  # both monotone in a
    assert v["signals"]["tf_kl"] > 0.9 and v["proxies"]["ppl_log_ratio"] < -0.9
    assert v["lomo_fit"]["spearman"] > 0.9 and len(v["lomo_fit"]["predictions"]) == 12


def _nested_hits(n_prunings: int, n_questions: int) -> list[list[float]]:
    """Pruning k loses the first 10·k questions: every resample and split keeps the drops ordered."""
    return [[0.0 if q < 10 * k else 1.0 for q in range(n_questions)] for k in range(n_prunings)]


def test_question_noise_of_a_cleanly_ordered_target_is_small() -> None:
    hits = _nested_hits(6, 100)
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    lo, hi = predictor.rho_interval(scores, hits, n_boot=300)
    assert lo > 0.9 and hi == pytest.approx(1.0)
    assert predictor.target_reliability(hits, n_splits=100) > 0.9
    lo, hi = predictor.rho_interval(scores[::-1], hits, n_boot=300)  # a reversed predictor stays reversed
    assert hi < -0.9


def test_question_noise_of_a_coin_flip_target_is_large() -> None:
    rng = np.random.default_rng(1)
    hits = (rng.random((8, 20)) < 0.5).astype(float).tolist()  # every pruning the same true drop
    lo, hi = predictor.rho_interval(list(range(8)), hits, n_boot=300)
    assert lo < 0 < hi  # no ranking to find: the interval spans zero
    assert predictor.target_reliability(hits, n_splits=200) < 0.4
    with pytest.raises(PrunelensError, match="3 or more prunings"):
        predictor.rho_interval([1, 2], hits[:2])
    with pytest.raises(PrunelensError, match="one score per pruning"):
        predictor.rho_interval([1, 2, 3], hits)


def test_validate_with_hits_checks_the_target_and_adds_the_intervals() -> None:
    hits = _nested_hits(6, 60)
    rows = []
    for k, h in enumerate(hits):
        d = 0.05 * (k + 1)
        rows.append({"method": "ab"[k % 2], **dict.fromkeys(predictor.SIGNALS, d), "kl_growth": 1.0,
                     "gen_hits": h, "gen_drop": 1 - float(np.mean(h)), "ppl_log_ratio": float(k % 3)})
    v = predictor.validate(rows, "gen_drop", ("ppl_log_ratio",), hits="gen_hits")
    q = v["questions"]
    assert q["n"] == 60 and q["rho_interval_95"]["risk_generative"][0] > 0.9
    assert q["rho_ceiling"] == pytest.approx(np.sqrt(q["target_reliability"]))
    lo, hi = q["rho_interval_95"]["ppl_log_ratio"]
    assert lo <= v["proxies"]["ppl_log_ratio"] <= hi
    rows[0] = {**rows[0], "gen_drop": 0.5}
    with pytest.raises(PrunelensError, match="not 1 − the mean"):
        predictor.validate(rows, "gen_drop", hits="gen_hits")


# --- calibrated retention ---------------------------------------------------------------------------


def _logistic_rows(w0: float, w1: float, n_q: int = 4000, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of 5 methods whose per-question hits are drawn from σ(w0 + w1·log tf_kl)."""
    rng = np.random.default_rng(seed)
    rows = []
    for m, kls in {"a": (0.02, 0.1), "b": (0.05, 0.3), "c": (0.2, 1.0), "d": (0.5, 2.0), "e": (0.08, 4.0)}.items():
        for kl in kls:
            p = 1 / (1 + np.exp(-(w0 + w1 * np.log(kl))))
            rows.append({"method": m, "spec": f"{m}:{kl}", "tf_kl": kl,
                         "gen_hits": (rng.random(n_q) < p).astype(float).tolist()})
    return rows


def test_the_logistic_fit_recovers_known_weights_and_predicts_held_out_methods() -> None:
    rows = _logistic_rows(-0.5, -1.2)
    fit = predictor.retention_fit(rows, coverage=0.8)
    assert fit["weights"] == pytest.approx([-0.5, -1.2], abs=0.05)
    assert fit["lomo_mae"] < 0.02  # the law is the same for every method: held-out methods are predicted
    p, lo, hi, outside = predictor.predict_retention(fit, {"tf_kl": 0.3})
    assert p == pytest.approx(1 / (1 + np.exp(0.5 + 1.2 * np.log(0.3))), abs=0.01)
    assert lo <= p <= hi and hi - lo == pytest.approx(2 * fit["radius"]) and not outside
    assert predictor.predict_retention(fit, {"tf_kl": 40.0})[3]  # beyond the fitted KL range: flagged


def test_conformal_radius_is_the_right_order_statistic() -> None:
    errors = [0.05, 0.01, 0.3, 0.2, 0.1, 0.02, 0.07, 0.15, 0.04]  # m = 9
    assert predictor.conformal_radius(errors, 0.8) == 0.2  # ⌈10 · 0.8⌉ = 8th smallest
    assert predictor.conformal_radius(errors, 0.5) == 0.07  # ⌈10 · 0.5⌉ = 5th smallest
    assert predictor.conformal_radius(errors[:3], 0.9) == float("inf")  # too few errors for 90 %


def test_stated_coverage_holds_for_held_out_methods_when_methods_differ_at_random() -> None:
    """Each method gets its own offset (a pruning family the KL does not fully describe): the nested
    check (fit and radius made without the held-out method) should cover about the stated share."""
    rng = np.random.default_rng(3)
    rows = []
    for j in range(12):
        off = rng.normal(0, 0.4)
        for kl in (0.05, 0.3, 1.5):
            p = 1 / (1 + np.exp(-(0.3 + off - 1.0 * np.log(kl))))
            rows.append({"method": f"m{j}", "tf_kl": kl, "gen_hits": (rng.random(400) < p).astype(float).tolist()})
    cov = predictor.interval_coverage(rows, coverage=0.8)
    assert cov["n"] == len(rows) and 0.65 <= cov["coverage_held_out"] <= 1.0
    assert predictor.retention_fit(rows)["lomo_mae"] > 0.02  # the offsets are real error, not fitted away


def test_the_shipped_fits_serve_the_bundled_models_only() -> None:
    name, fit = predictor.retention_fit_for({"preset": "smollm2-135m", "name": "smollm2-135m"})
    assert name == "smollm2-135m" and fit["lomo_mae"] <= 0.10 and fit["features"] == ["tf_kl"]
    assert predictor.retention_fit_for({"name": "/data/my-llama"}) is None
    # more KL, less retention
    lo_kl, hi_kl = (predictor.predict_retention(fit, {"tf_kl": k})[0] for k in (0.05, 2.0))
    assert 1 >= lo_kl > hi_kl >= 0


def test_pareto_front_by_definition() -> None:
    from prunelens.analyses.advise_page import pareto_front

    pts = [(0.25, 0.9), (0.25, 0.5), (0.5, 0.6), (0.3, 0.9), (0.6, 0.1), (0.5, 0.2)]
    assert pareto_front(pts) == [2, 3, 4]
