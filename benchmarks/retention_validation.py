"""Calibrated retention: how much of the dense model's generative answers a modification keeps,
predicted from the teacher-forced KL, validated on the committed predictor grids (issue 20).

Reads the grids ``benchmarks/predictor_validation.py`` wrote (per pruning: the cheap signals and
per-question outcomes of free-generation answers on ARC-Easy questions the dense model answers
right), and for each model:

- fits retention = σ(w₀ + w₁·log KL_tf) by binomial likelihood on the per-question outcomes;
- leave-one-method-out: each method's prunings predicted by a fit on the other methods (MAE; goal
  ≤ 0.10), the interval radius = split-conformal quantile of those errors at the stated coverage;
- nested coverage: each method held out, fit *and* radius made without it, its rows checked
  against the interval (does the stated coverage hold for unseen methods?);
- held-out family: the fit of one model applied to the other, and the same with the intercept
  re-fitted on one anchor method of the new model.

Writes ``OUT/retention.json``, ``OUT/retention.png`` (predicted vs measured, held-out) and the fits
``advise`` uses, ``src/prunelens/analyses/retention_fits.json``. No model is loaded: seconds.

    python benchmarks/retention_validation.py --out docs/sweeps/retention
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from prunelens.analyses.predictor import (
    interval_coverage,
    predict_retention,
    retention_fit,
)
from prunelens.render import subplots
from prunelens.runs import write_json

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {"smollm2-135m": "docs/sweeps/predictor-smollm2",
         "gemma3-270m": "docs/sweeps/predictor-gemma3-270m",
         "qwen2.5-coder-1.5b": "docs/sweeps/predictor-qwen1.5b-pool500"}
CANDIDATE_FEATURES = (("tf_kl",), ("tf_kl_early",), ("tf_taylor_kl",), ("tf_top1_disagree",),
                      ("fr_token_disagree",), ("tf_kl", "tf_top1_disagree"))


def measured(r: dict) -> float:
    return float(np.mean(r["gen_hits"]))


def anchored(fit: dict, rows: list[dict], anchor: str) -> dict:
    """``fit``'s slope with the intercept re-fitted (binomial likelihood) on one method's rows."""
    ar = [r for r in rows if r["method"] == anchor]
    x = np.log(np.maximum([r[fit["features"][0]] for r in ar], 1e-6))
    k = np.array([np.sum(r["gen_hits"]) for r in ar], dtype=float)
    n = np.array([len(r["gen_hits"]) for r in ar], dtype=float)
    b = fit["weights"][1]
    lo, hi = -30.0, 30.0
    for _ in range(200):  # the score equation in the intercept is monotone: bisection
        a = (lo + hi) / 2
        lo, hi = (a, hi) if float(np.sum(k - n / (1 + np.exp(-(a + b * x))))) > 0 else (lo, a)
    return {**fit, "weights": [a, b]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/sweeps/retention")
    ap.add_argument("--coverage", type=float, default=0.8)
    a = ap.parse_args()
    rows = {m: json.loads((ROOT / d / "validation.json").read_text())["rows"] for m, d in GRIDS.items()}
    out: dict = {"date": time.strftime("%Y-%m-%d"), "grids": GRIDS, "coverage": a.coverage,
                 "target": "share of the dense model's right free-generation answers (ARC-Easy, paired cloze) kept",
                 "models": {}, "feature_table": [], "transfer": []}
    fits = {}
    for model, rs in rows.items():
        fit = retention_fit(rs, coverage=a.coverage)
        cov = interval_coverage(rs, coverage=a.coverage)
        out["models"][model] = {"fit": fit, "nested_coverage": cov, "n_questions": len(rs[0]["gen_hits"])}
        fits[model] = {k: fit[k] for k in ("features", "weights", "coverage", "radius", "log_range", "n_rows",
                                           "methods", "lomo_mae", "scatter")}
        fits[model]["grid"] = GRIDS[model]
        print(f"{model:20s} {len(rs)} prunings, {len(fit['methods'])} methods, {len(rs[0]['gen_hits'])} questions: "
              f"LOMO MAE {fit['lomo_mae']:.3f} (goal <= 0.10); {a.coverage:.0%} interval ±{fit['radius']:.3f}; "
              f"nested held-out coverage {cov['coverage_held_out']:.2f} over {cov['n']} prunings, "
              f"mean width {cov['mean_width']:.2f}")
        for feats in CANDIDATE_FEATURES:  # the alternatives, reported beside the pre-declared tf_kl
            f2 = retention_fit(rs, features=feats, coverage=a.coverage)
            c2 = interval_coverage(rs, features=feats, coverage=a.coverage)
            out["feature_table"].append({"model": model, "features": list(feats), "lomo_mae": f2["lomo_mae"],
                                         "radius": f2["radius"], "coverage_held_out": c2["coverage_held_out"]})
    names = list(rows)
    for tr, te in ((x, y) for x in names for y in names if x != y):
        fit = out["models"][tr]["fit"]
        plain = [abs(predict_retention(fit, r)[0] - measured(r)) for r in rows[te]]
        anch = []
        for m in sorted({r["method"] for r in rows[te]}):
            f2 = anchored(fit, rows[te], m)
            anch += [abs(predict_retention(f2, r)[0] - measured(r)) for r in rows[te] if r["method"] != m]
        row = {"train": tr, "test": te, "mae": float(np.mean(plain)), "mae_one_anchor": float(np.mean(anch))}
        out["transfer"].append(row)
        print(f"held-out family: fit on {tr} -> {te}: MAE {row['mae']:.3f}; intercept re-fitted on one "
              f"method of {te} (mean over anchors): {row['mae_one_anchor']:.3f}")
    fig, axes = subplots(1, len(names), figsize=(4.5 * len(names), 4))
    for ax, model in zip(axes, names, strict=True):
        f = out["models"][model]["fit"]
        meas, pred = np.array(f["measured"]), np.array(f["lomo_predictions"])
        r = f["radius"]
        ax.errorbar(meas, pred, yerr=r, fmt="o", ms=4, alpha=0.7, capsize=2, lw=0.8)
        for s, x, y in zip(f["specs"], meas, pred, strict=True):
            ax.annotate(s, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="measured retention",
               ylabel="predicted (method held out)",
               title=f"{model}: MAE {f['lomo_mae']:.3f}, ±{r:.2f} at {a.coverage:.0%}")
    fig.tight_layout()
    dest = ROOT / a.out
    dest.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest / "retention.png", dpi=130)
    write_json(dest / "retention.json", out)
    write_json(ROOT / "src/prunelens/analyses/retention_fits.json",
               {"date": out["date"], "target": out["target"], "script": "benchmarks/retention_validation.py",
                "fits": fits})
    print(f"wrote {dest / 'retention.json'}, {dest / 'retention.png'} and src/prunelens/analyses/retention_fits.json")


if __name__ == "__main__":
    main()
