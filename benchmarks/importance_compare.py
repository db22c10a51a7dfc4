"""Layer-selection metrics compared at equal drop counts: which layers each picks, and what that
does to generative fidelity and multiple-choice accuracy (issue 7, part 3).

For each drop spec (default ``attn:4`` and ``block:2``) every applicable metric chooses the layers
on the same calibration text: ``cosine`` (LLM-Drop; ShortGPT's Block Influence for blocks),
``angular`` (Gromov et al., blocks only) and ``kl`` (greedy on the final next-token KL). Each plan
is then measured on held-out material: ``prunelens.analyze`` on the built-in prompts (teacher-forced
KL, free-running token agreement, first divergence) and seeded multiple-choice accuracy.

    python benchmarks/importance_compare.py [--specs attn:4,block:2] [--tasks arc_easy,piqa] \
        [--limit 200] [--calib ../shared/data/c4_calibration.jsonl] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import prunelens as pl
from prunelens.tasks.mcq import evaluate_mcq

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--specs", default="attn:4,block:2")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--calib", default=str(DATA / "c4_calibration.jsonl"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lm = pl.load_model(a.model)
    tasks = [t for t in a.tasks.split(",") if t]
    settings = pl.AnalysisSettings(max_new_tokens=32, temperatures=(1.0,))
    dense = {t: evaluate_mcq(lm, t, a.data_dir, a.limit, progress=False).acc for t in tasks}
    print("dense: " + "  ".join(f"{t} {v:.3f}" for t, v in dense.items()), flush=True)
    rows = []
    for spec in a.specs.split(","):
        metrics = ["cosine", "angular", "kl"] if spec.startswith("block") else ["cosine", "kl"]
        for metric in metrics:
            t0 = time.perf_counter()
            plan = pl.select_drop(lm, spec, metric=metric, calib=a.calib)
            t_sel = time.perf_counter() - t0
            res = pl.analyze(lm, plan, pl.builtin_prompts(), settings, progress=False)
            su = res["summary"]
            row = {"spec": spec, "metric": metric, "label": plan.label(), "select_s": t_sel,
                   "tf_kl": su["teacher_forced_mean"]["kl@1"],
                   "tf_top1": su["teacher_forced_mean"]["top1_agree"],
                   "fr_token_agree": su["free_running_mean"]["token_agree"],
                   "median_first_divergence": su["median_first_divergence"],
                   **{f"acc_{t}": evaluate_mcq(lm, t, a.data_dir, a.limit, modification=plan,
                                               progress=False).acc for t in tasks}}
            rows.append(row)
            print(f"{spec:8s} {metric:8s} {row['label']:22s} select {t_sel:6.1f} s | "
                  f"TF KL {row['tf_kl']:.3f} top-1 {row['tf_top1']:.3f} | "
                  f"FR agree {row['fr_token_agree']:.3f} first div "
                  f"{row['median_first_divergence']} | "
                  + "  ".join(f"{t} {row[f'acc_{t}']:.3f}" for t in tasks), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "limit": a.limit, "calib": a.calib,
                                           "dense": dense, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
