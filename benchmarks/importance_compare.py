"""Layer-selection metrics compared at equal drop counts: which layers each picks, and what that
does to generative fidelity and multiple-choice accuracy (issue 7, part 3).

For each drop spec (default ``attn:4``, ``block:2`` and ``block:4``) every applicable metric chooses
the layers on the same calibration text: ``cosine`` (LLM-Drop; ShortGPT's Block Influence for
blocks), ``angular`` (Gromov et al., blocks only), ``kl`` (greedy on the final next-token KL) and
``ppl`` (greedy on calibration perplexity: SLEB for blocks, BlockPruner for sublayers; issue 20).
Each plan is then measured on held-out material: ``prunelens.analyze`` on the built-in prompts
(teacher-forced KL, free-running token agreement, first divergence), seeded multiple-choice
accuracy and WikiText-2 perplexity. Every (spec, metric) row is a cell of ``--cells``, so a killed
run resumes.

    python benchmarks/importance_compare.py [--specs attn:4,block:2,block:4] [--tasks arc_easy,piqa] \
        [--limit 200] [--calib ../shared/data/c4_calibration.jsonl] [--cells DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import prunelens as pl
from prunelens.analyses.cells import CellCache, data_hashes, environment, model_fingerprint
from prunelens.tasks.mcq import evaluate_mcq
from prunelens.tasks.perplexity import perplexity
from prunelens.tasks.sources import load_rows
from prunelens.testing import shared_data_dir

HERE = Path(__file__).resolve().parent
DATA = shared_data_dir()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--specs", default="attn:4,block:2,block:4")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--calib", default=str(DATA / "c4_calibration.jsonl"))
    ap.add_argument("--ppl-windows", type=int, default=40, help="WikiText-2 windows of 1024 tokens")
    ap.add_argument("--cells", default="docs/sweeps/importance-smollm2", help="resumable cell directory")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tasks = [t for t in a.tasks.split(",") if t]
    identity = {"model": a.model, "limit": a.limit, "tasks": tasks, "ppl_windows": a.ppl_windows,
                "calib": {Path(a.calib).name: h for h in data_hashes([a.calib]).values()},
                "environment": environment("cpu", "float32"),
                "model_files": model_fingerprint(a.model)}
    cache = CellCache(a.cells, "manifest.json", "importance comparison", identity).open(
        schema="prunelens.importance-compare/1")
    lm = pl.load_model(a.model)
    text = "\n\n".join(r["text"] for r in load_rows("wikitext", a.data_dir).rows)
    settings = pl.AnalysisSettings(max_new_tokens=32, temperatures=(1.0,))
    if not cache.has("dense"):
        cache.save("dense", {**{t: evaluate_mcq(lm, t, a.data_dir, a.limit, progress=False).acc for t in tasks},
                             "wikitext_ppl": perplexity(lm, text, max_windows=a.ppl_windows, progress=False)})
    dense = cache.load("dense")
    print("dense: " + "  ".join(f"{t} {dense[t]:.3f}" for t in tasks)
          + f"  wikitext ppl {dense['wikitext_ppl']['perplexity']:.2f}", flush=True)
    rows = []
    for spec in a.specs.split(","):
        metrics = ["cosine", "angular", "kl", "ppl"] if spec.startswith("block") else ["cosine", "kl", "ppl"]
        for metric in metrics:
            key = f"{spec}-{metric}"
            if not cache.has(key):
                t0 = time.perf_counter()
                plan = pl.select_drop(lm, spec, metric=metric, calib=a.calib)
                t_sel = time.perf_counter() - t0
                res = pl.analyze(lm, plan, pl.builtin_prompts(), settings, progress=False)
                su = res["summary"]
                cache.save(key, {
                    "spec": spec, "metric": metric, "label": plan.label(), "select_s": t_sel,
                    "tf_kl": su["teacher_forced_mean"]["kl@1"],
                    "tf_top1": su["teacher_forced_mean"]["top1_agree"],
                    "fr_token_agree": su["free_running_mean"]["token_agree"],
                    "median_first_divergence": su["median_first_divergence"],
                    "wikitext_ppl": perplexity(lm, text, plan, max_windows=a.ppl_windows,
                                               progress=False)["perplexity"],
                    **{f"acc_{t}": evaluate_mcq(lm, t, a.data_dir, a.limit, modification=plan,
                                                progress=False).acc for t in tasks}})
            row = cache.load(key)
            rows.append(row)
            print(f"{spec:8s} {metric:8s} {row['label']:22s} select {row['select_s']:6.1f} s | "
                  f"TF KL {row['tf_kl']:.3f} top-1 {row['tf_top1']:.3f} | "
                  f"FR agree {row['fr_token_agree']:.3f} first div "
                  f"{row['median_first_divergence']} | wikitext ppl {row['wikitext_ppl']:.2f} | "
                  + "  ".join(f"{t} {row[f'acc_{t}']:.3f}" for t in tasks), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "limit": a.limit, "calib": a.calib,
                                           "dense": dense, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
