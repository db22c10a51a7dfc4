"""Collapse predictor: cheap signals of a modified model and the risk they predict, per use.

The signals come from one short ``analyze`` run (a few prompts × a few dozen decoding steps, dense vs
modified, seconds on the CPU for the default model): teacher-forced KL and its Taylor estimate,
early-step KL, KL growth over the steps, teacher-forced top-1 agreement, free-running token
agreement and first divergence.

The risk follows the paper's argument rather than a fit. Reading one step (multiple choice) fails
where the modified model's top token differs from the dense one's: risk 1 − a, with ``a`` the
teacher-forced top-1 agreement. Free generation of L tokens stays on the dense trajectory only if
every step agrees, and each disagreement feeds the next step a context the dense model never saw:
risk 1 − a^L. Both are monotone in ``a``, so they rank prunings alike; what differs is the level —
a = 0.85 is a 15 % risk for one step and a 99.5 % risk for 32 tokens. ``validate`` measures how well
each signal, the risk and a fitted combination (leave-one-method-out) rank measured score drops.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from prunelens.analyses.trace import TraceSettings, analyze, compare_models, summarize
from prunelens.errors import PrunelensError
from prunelens.metrics import spearman as rank_spearman
from prunelens.model.loading import LoadedModel
from prunelens.prune.candidate import Candidate

ANSWER_TOKENS = 32
"""L in 1 − a^L: the length of a short generated answer (a GSM8K step, a code line or two)."""
EARLY_STEPS = 8
SIGNALS = ("tf_kl", "tf_kl_early", "tf_taylor_kl", "tf_top1_disagree", "kl_growth", "fr_token_disagree",
           "inv_first_divergence", "tf_hidden_distance")
"""Every signal is oriented so that larger means a larger expected loss."""


def signals_from_result(result: Mapping[str, Any]) -> dict[str, float]:
    """The predictor's signals from an ``analyze`` result (teacher-forced and free-running steps)."""
    s = result.get("summary") or summarize(dict(result))  # ``analyze`` already summarised it
    t = f"{s['temperature']:g}"
    tf = result["stepwise"]["teacher_forced"]
    early = [v for v in tf[f"kl@{t}"][:EARLY_STEPS] if v is not None]
    taylor = [v for v in tf.get(f"taylor_kl@{t}", []) if v is not None]  # absent from sequential traces
    steps = result["settings"]["max_new_tokens"]
    first = s["median_first_divergence"]
    return {
        "tf_kl": float(s["teacher_forced_mean"][f"kl@{t}"]),
        "tf_kl_early": float(np.mean(early)) if early else float("nan"),
        "tf_taylor_kl": float(np.mean(taylor)) if taylor else float("nan"),
        "tf_top1_disagree": 1.0 - float(s["teacher_forced_mean"]["top1_agree"]),
        "kl_growth": float(s["kl_growth_teacher_forced"] or 1.0),
        "fr_token_disagree": 1.0 - float(s["free_running_mean"]["token_agree"]),
        # never diverging within the window counts as diverging just after it
        "inv_first_divergence": 1.0 / (1.0 + (steps if first is None else first)),
        "tf_hidden_distance": 1.0 - float(s["teacher_forced_mean"]["cos_h"]),  # what an embedder pools
    }


def risk(sig: Mapping[str, float], answer_tokens: int = ANSWER_TOKENS) -> dict[str, float]:
    """Predicted probability of a changed answer: one step (multiple choice, retrieval-style reads)
    and ``answer_tokens`` greedy steps (generation)."""
    if answer_tokens < 1:
        raise PrunelensError(f"answer length must be at least 1 token, got {answer_tokens}")
    a = min(max(1.0 - sig["tf_top1_disagree"], 0.0), 1.0)
    return {"non_generative": 1.0 - a, "generative": 1.0 - a ** answer_tokens,
            # mean run of agreeing greedy tokens before the first disagreement (geometric): readable
            # where 1 − a^L saturates near 1
            "agreeing_tokens": a / (1.0 - a) if a < 1 else float("inf")}


def collapse_signals(lm: LoadedModel, modification: Any, prompts: Sequence[str], steps: int = 32,
                     batch_size: int = 8, chat_template: bool = True, progress: bool = False
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Signals and predicted risks of one modification (or ``Candidate``) on a small prompt set (no labels needed)."""
    settings = TraceSettings(max_new_tokens=steps, batch_size=batch_size, chat_template=chat_template,
                                logit_lens=False)
    result = (compare_models(lm, modification, prompts, settings, progress) if isinstance(modification, Candidate)
              else analyze(lm, modification, prompts, settings, progress=progress))  # a model made elsewhere
    sig = signals_from_result(result)
    return sig, risk(sig)


# --- validation against measured drops ------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equal-length series (nan when either is constant)."""
    if len(x) != len(y) or len(x) < 3:
        raise PrunelensError("Spearman's correlation needs the same 3 or more points on both sides")
    return rank_spearman(torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(y), dtype=torch.float64))


def _features(rows: Sequence[Mapping[str, float]], names: Sequence[str]) -> np.ndarray:
    """Design matrix: log of the KL-like signals (they span decades), the rest as they are."""
    cols = []
    for n in names:
        v = np.array([r[n] for r in rows], dtype=float)
        cols.append(np.log(np.maximum(v, 1e-9)) if "kl" in n and n != "kl_growth" else v)
    return np.column_stack([np.ones(len(rows)), *cols])


def lomo_predictions(rows: Sequence[Mapping[str, Any]], target: str, names: Sequence[str],
                     ridge: float = 1e-3) -> list[float]:
    """Leave-one-method-out predictions of ``target`` from a ridge-regularised linear fit on the
    signals ``names``: each method's points are predicted by a fit on all the other methods."""
    methods = sorted({r["method"] for r in rows})
    if len(methods) < 2:
        raise PrunelensError("leave-one-method-out needs at least two methods")
    x = _features(rows, names)
    y = np.array([r[target] for r in rows], dtype=float)
    pred = np.empty(len(rows))
    for m in methods:
        test = np.array([r["method"] == m for r in rows])
        xt, yt = x[~test], y[~test]
        reg = ridge * np.eye(x.shape[1])
        reg[0, 0] = 0.0  # the intercept is not shrunk
        w = np.linalg.solve(xt.T @ xt + reg, xt.T @ yt)
        pred[test] = x[test] @ w
    return pred.tolist()


def _hits_matrix(hits: Sequence[Sequence[float]]) -> np.ndarray:
    h = np.asarray(hits, dtype=float)
    if h.ndim != 2 or h.shape[0] < 3 or h.shape[1] < 2:
        raise PrunelensError("per-question hits need 3 or more prunings × 2 or more questions")
    return h


def rho_interval(scores: Sequence[float], hits: Sequence[Sequence[float]], n_boot: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman(scores, drop), resampling the *questions*.

    ``hits[k][q]`` is 1 where pruning k still answers question q. The measured drop of a pruning is
    1 − its mean hit, so a small question set makes it coarse; the interval says how far ρ moves
    with the questions alone (resamples whose drops are all equal are skipped)."""
    h = _hits_matrix(hits)
    if len(scores) != h.shape[0]:
        raise PrunelensError("one score per pruning is needed")
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(n_boot):
        drop = 1.0 - h[:, rng.integers(0, h.shape[1], h.shape[1])].mean(1)
        if np.ptp(drop) > 0:
            rhos.append(spearman(scores, drop.tolist()))
    if not rhos:
        raise PrunelensError("every resample gives the same drop for all prunings")
    a = (1 - confidence) / 2
    lo, hi = np.quantile(rhos, [a, 1 - a])
    return float(lo), float(hi)


def target_reliability(hits: Sequence[Sequence[float]], n_splits: int = 500, seed: int = 0) -> float:
    """Split-half reliability of the measured drops' ranking, Spearman–Brown corrected to the full
    question set: the mean Spearman between the drops on two random halves of the questions, r,
    becomes 2r / (1 + r). Its square root bounds the ρ that even a perfect predictor of the true
    drops can reach against these measured ones (attenuation by the target's own noise)."""
    h = _hits_matrix(hits)
    rng = np.random.default_rng(seed)
    half = h.shape[1] // 2
    rs = []
    for _ in range(n_splits):
        perm = rng.permutation(h.shape[1])
        a, b = h[:, perm[:half]].mean(1), h[:, perm[half:2 * half]].mean(1)
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            rs.append(spearman(a.tolist(), b.tolist()))
    if not rs:
        raise PrunelensError("no split gives unequal drops on both halves")
    r = float(np.mean(rs))
    return 2 * r / (1 + r) if r > -1 else float("nan")


def validate(rows: Sequence[Mapping[str, Any]], target: str, proxies: Sequence[str] = (),
             fitted: Sequence[str] = ("tf_kl", "tf_top1_disagree", "inv_first_divergence"),
             hits: str | None = None) -> dict[str, Any]:
    """Spearman of each signal, the predicted risk, each proxy (e.g. perplexity or MCQ change) and the
    leave-one-method-out fit against the measured ``target`` over all rows (prunings). With
    ``hits`` (the rows' per-question outcome key, ``target`` = 1 − their mean): question-bootstrap
    intervals of the risk's and each proxy's ρ, and the target's reliability and ρ ceiling."""
    y = [float(r[target]) for r in rows]
    out: dict[str, Any] = {"target": target, "n": len(rows),
                           "methods": sorted({r["method"] for r in rows})}
    out["signals"] = {n: spearman([r[n] for r in rows], y) for n in SIGNALS}
    gen_risk = [risk(r)["generative"] for r in rows]
    out["risk_generative"] = spearman(gen_risk, y)
    out["proxies"] = {p: spearman([r[p] for r in rows], y) for p in proxies}
    lomo = lomo_predictions(rows, target, fitted)
    out["lomo_fit"] = {"features": list(fitted), "spearman": spearman(lomo, y), "predictions": lomo}
    if hits is not None:
        h = [r[hits] for r in rows]
        if any(abs(1 - float(np.mean(x)) - t) > 1e-9 for x, t in zip(h, y, strict=True)):
            raise PrunelensError(f"{target} is not 1 − the mean of {hits}")
        scored = {"risk_generative": gen_risk,
                  **{p: [r[p] for r in rows] for p in proxies}}
        rel = target_reliability(h)
        out["questions"] = {"n": len(h[0]),
                            "rho_interval_95": {k: rho_interval(v, h) for k, v in scored.items()},
                            "target_reliability": rel, "rho_ceiling": math.sqrt(rel) if rel > 0 else 0.0}
    return out


# --- calibrated retention: the score a user keeps, with an interval ---------------------------------
# The risk above saturates (1 − a^32 ≈ 1 for most prunings of a small model), so it ranks but does not
# say how much is lost. Here the measured retention of generative answers (the share of the dense
# model's correct answers a modification keeps) is fitted as a logistic function of the teacher-forced
# KL, on per-question outcomes, and the interval comes from leave-one-method-out errors.

RETENTION_FEATURES = ("tf_kl",)


def _design(rows: Sequence[Mapping[str, Any]], features: Sequence[str]) -> np.ndarray:
    return np.column_stack([np.ones(len(rows)), *[np.log(np.maximum([float(r[f]) for r in rows], 1e-6))
                                                  for f in features]])


def fit_logistic(x: np.ndarray, k: np.ndarray, n: np.ndarray, ridge: float = 1e-3, iters: int = 100) -> np.ndarray:
    """Binomial maximum likelihood of P(hit) = σ(x·w) from k hits out of n per row (IRLS, Newton);
    a small ridge on the slopes keeps separable data finite."""
    w = np.zeros(x.shape[1])
    reg = ridge * np.eye(x.shape[1])
    reg[0, 0] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (k - n * p) - reg @ w
        hess = (x * (n * p * (1 - p))[:, None]).T @ x + reg
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def conformal_radius(errors: Sequence[float], coverage: float) -> float:
    """The ⌈(m+1)·coverage⌉-th smallest of m absolute held-out errors (split-conformal): a new
    method's error falls below it with probability ≥ ``coverage`` when methods are exchangeable;
    infinite when m is too small for that coverage."""
    e = np.sort(np.abs(np.asarray(errors, dtype=float)))
    rank = math.ceil((len(e) + 1) * coverage)
    return float(e[rank - 1]) if rank <= len(e) else float("inf")


def _retention_counts(rows: Sequence[Mapping[str, Any]], hits: str) -> tuple[np.ndarray, np.ndarray]:
    k = np.array([float(np.sum(r[hits])) for r in rows])
    n = np.array([float(len(r[hits])) for r in rows])
    return k, n


def retention_fit(rows: Sequence[Mapping[str, Any]], hits: str = "gen_hits",
                  features: Sequence[str] = RETENTION_FEATURES, coverage: float = 0.8,
                  ridge: float = 1e-3) -> dict[str, Any]:
    """Fit retention = σ(w₀ + Σ w·log feature) on ``rows`` (each with per-question ``hits`` on the
    dense model's correct answers) and its interval radius from leave-one-method-out errors.
    Returns a JSON-ready fit: weights, radius, the features' fitted range, and the LOMO figures."""
    if len({r["method"] for r in rows}) < 3:
        raise PrunelensError("a retention fit needs prunings of 3 or more methods")
    x = _design(rows, features)
    k, n = _retention_counts(rows, hits)
    w = fit_logistic(x, k, n, ridge)
    lomo = lomo_retention(rows, hits, features, ridge)
    measured = k / n
    errors = np.abs(np.array(lomo) - measured)
    logs = x[:, 1:]
    return {"features": list(features), "weights": w.tolist(), "coverage": coverage,
            "radius": conformal_radius(errors, coverage), "scatter": method_scatter(x @ w, k, n),
            "log_range": [[float(c.min()), float(c.max())] for c in logs.T],
            "n_rows": len(rows), "methods": sorted({r["method"] for r in rows}),
            "lomo_mae": float(errors.mean()), "lomo_predictions": [float(v) for v in lomo],
            "measured": measured.tolist(), "specs": [r.get("spec", "") for r in rows]}


def method_scatter(z: np.ndarray, k: np.ndarray, n: np.ndarray) -> float:
    """How far prunings lie from the fitted curve beyond their questions' noise, in logit units: the
    s.d. of logit(measured) − z after the binomial variance of each measured share is taken out (two
    parameters fitted: divided by m − 2). A new method of a calibrated model is off its curve by about
    this much, however many anchors were measured."""
    share = (k + 0.5) / (n + 1)  # never 0 or 1: a logit exists
    resid = np.log(share / (1 - share)) - z
    noise = 1 / ((n + 1) * share * (1 - share))
    return float(math.sqrt(max(float(np.sum(resid ** 2 - noise)) / max(len(z) - 2, 1), 0.0)))


def lomo_retention(rows: Sequence[Mapping[str, Any]], hits: str = "gen_hits",
                   features: Sequence[str] = RETENTION_FEATURES, ridge: float = 1e-3) -> list[float]:
    """Each row's retention predicted by a fit on the other methods' rows."""
    x = _design(rows, features)
    k, n = _retention_counts(rows, hits)
    pred = np.empty(len(rows))
    for m in sorted({r["method"] for r in rows}):
        test = np.array([r["method"] == m for r in rows])
        w = fit_logistic(x[~test], k[~test], n[~test], ridge)
        pred[test] = 1 / (1 + np.exp(-(x[test] @ w)))
    return pred.tolist()


def interval_coverage(rows: Sequence[Mapping[str, Any]], hits: str = "gen_hits",
                      features: Sequence[str] = RETENTION_FEATURES, coverage: float = 0.8,
                      ridge: float = 1e-3) -> dict[str, Any]:
    """Whether the stated coverage holds for methods never seen: each method is held out, the fit and
    its radius (from the remaining methods' own leave-one-method-out errors) are made without it, and
    its rows are checked against the interval. Returns the share covered and the mean width."""
    k, n = _retention_counts(rows, hits)
    inside, widths = [], []
    for m in sorted({r["method"] for r in rows}):
        train = [r for r in rows if r["method"] != m]
        test_idx = [i for i, r in enumerate(rows) if r["method"] == m]
        if len({r["method"] for r in train}) < 3:
            continue
        fit = retention_fit(train, hits, features, coverage, ridge)
        for i in test_idx:
            p, lo, hi, _ = predict_retention(fit, rows[i])
            inside.append(lo <= k[i] / n[i] <= hi)
            widths.append(hi - lo)
    return {"coverage_stated": coverage, "coverage_held_out": float(np.mean(inside)) if inside else float("nan"),
            "mean_width": float(np.mean(widths)) if widths else float("nan"), "n": len(inside)}


def predict_retention(fit: Mapping[str, Any], signals: Mapping[str, float]) -> tuple[float, float, float, bool]:
    """(predicted retention, interval low, high, whether the signals lie outside the fitted range)."""
    logs = [math.log(max(float(signals[f]), 1e-6)) for f in fit["features"]]
    z = fit["weights"][0] + sum(w * v for w, v in zip(fit["weights"][1:], logs, strict=True))
    p = 1 / (1 + math.exp(-z))
    r = fit["radius"]
    outside = any(not lo <= v <= hi for v, (lo, hi) in zip(logs, fit["log_range"], strict=True))
    return p, max(0.0, p - r), min(1.0, p + r), outside


@functools.cache
def shipped_retention_fits() -> dict[str, dict[str, Any]]:
    """The retention fits shipped with the package, by model (``retention_fits.json``, written by
    ``benchmarks/retention_validation.py``)."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).with_name("retention_fits.json")).read_text())["fits"]


def retention_fit_for(model_info: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The shipped retention fit of this model (matched by preset or name), with the model it was
    fitted on; None for a model no grid was measured on (``benchmarks/retention_validation.py``
    shows the fit of one family does not transfer to another: MAE 0.17–0.34)."""
    fits = shipped_retention_fits()
    for key in (model_info.get("preset"), model_info.get("name")):
        if key in fits:
            return key, fits[key]
    return None


def verdict(result: Mapping[str, Any], answer_tokens: int = ANSWER_TOKENS) -> dict[str, Any]:
    """What a trace's numbers predict for generation: the paper's risk (1 − a^L) and, where a
    retention fit was shipped for the base model, the calibrated retention with its interval, said
    plainly when the signals lie outside the fitted range or the modification was made by another
    tool (a method the fit, validated leave-one-method-out on prunelens's own prunings, never saw)."""
    sig = signals_from_result(result)
    rk = risk(sig, answer_tokens)
    external = (result.get("pruning") or {}).get("kind") == "candidate"
    out: dict[str, Any] = {"signals": sig, "risk_generative": rk["generative"],
                           "risk_multiple_choice": rk["non_generative"], "agreeing_tokens": rk["agreeing_tokens"],
                           "answer_tokens": answer_tokens, "retention": None, "fit": None}
    found = retention_fit_for(result.get("model") or {})
    if found is not None:
        name, fit = found
        p, lo, hi, outside = predict_retention(fit, sig)
        out["retention"] = {"predicted": p, "low": lo, "high": hi, "outside_fitted_range": outside}
        out["fit"] = {"fitted_on": name, "methods": fit.get("methods", []), "coverage": fit["coverage"],
                      "lomo_mae": fit.get("lomo_mae"), "grid": fit.get("grid")}
    out["text"] = verdict_text(out, external)
    return out


def verdict_text(v: Mapping[str, Any], external: bool) -> str:
    """The verdict in one paragraph, every caveat stated."""
    a = 1 - v["signals"]["tf_top1_disagree"]
    head = (f"teacher-forced top-1 agreement {a:.3f}: about {v['agreeing_tokens']:.3g} greedy tokens before the "
            f"output leaves the base's; risk of a changed {v['answer_tokens']}-token answer "
            f"{v['risk_generative']:.2f}, of a changed one-token (multiple-choice) answer "
            f"{v['risk_multiple_choice']:.2f}")
    r, fit = v["retention"], v["fit"]
    if r is None:
        return head + ("; no retention fit was measured for this base model, so the risk ranks candidates "
                       "but is not calibrated (benchmarks/retention_validation.py makes one)")
    text = (f"{head}; predicted generative retention {r['predicted']:.2f} "
            f"[{r['low']:.2f}, {r['high']:.2f}] ({fit['coverage']:.0%} interval, fitted on {fit['fitted_on']} "
            f"prunings by {', '.join(fit['methods'])})")
    if r["outside_fitted_range"]:
        text += "; its KL lies outside the range the fit saw, so this is an extrapolation"
    if external:
        text += (f"; this candidate was made by another tool, a method the fit never saw: for methods it never "
                 f"saw its leave-one-method-out error was {fit['lomo_mae']:.2f}")
    return text
