"""The field's proxies beside the collapse predictor (issue 20): answer flips on a multiple-choice set
(Dutta et al. 2024) and llama.cpp's KL-divergence statistics on WikiText-2, for every pruning of a
committed predictor grid, ranked against that grid's measured generative drop.

For each pruning of ``GRID/validation.json`` (written by ``benchmarks/predictor_validation.py``):
the modification is rebuilt with the same seed and calibration, then

- flips: ARC-Easy, a seeded sample of ``--mcq-limit`` questions scored by option log-likelihood,
  dense vs modified: the share whose correctness changed (right→wrong + wrong→right);
- KL statistics (``prunelens ppl --kld``): mean, median and 99th-percentile KL(dense ‖ modified)
  per token, 1 − same-top-token share and RMS Δp of the next token's probability, over the same
  WikiText-2 windows as the grid's perplexity proxy.

Each pruning's numbers go to the cell cache (``OUT/cells``) as they finish, so a killed run
resumes. The end writes ``OUT/proxies.json``: Spearman of every proxy, the predictor's risk and its
KL signal with the measured generative drop, with 95 % intervals over a bootstrap of the grid's
questions (the same procedure as the grid's own table).

    python benchmarks/proxy_validation.py --grid docs/sweeps/predictor-smollm2 --out docs/sweeps/proxies-smollm2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunelens import load_model
from prunelens.analyses.cells import CellCache, data_hashes, environment, model_fingerprint
from prunelens.analyses.predictor import rho_interval, risk, spearman
from prunelens.model.memory import release_freed_memory
from prunelens.prune.recipe import Calibration, build
from prunelens.runs import write_json
from prunelens.tasks.mcq import answer_flips, evaluate_mcq
from prunelens.tasks.perplexity import kl_statistics
from prunelens.tasks.registry import check_task
from prunelens.tasks.sources import load_rows
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()
PROXIES = ("flips", "mean_kld", "kld_p50", "kld_p99", "not_same_top", "rms_dp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", required=True, help="a predictor_validation output directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir", default=str(DATA) if DATA.is_dir() else None)
    ap.add_argument("--calib", help="calibration file (default: c4_calibration.jsonl in --data-dir)")
    ap.add_argument("--mcq-limit", type=int, default=200)
    ap.add_argument("--ppl-windows", type=int, default=4, help="WikiText-2 windows of 512 tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    grid = json.loads((Path(args.grid) / "validation.json").read_text())
    model = grid["model"].get("preset") or grid["model"]["name"]
    data = args.data_dir
    c4 = Path(data) / "c4_calibration.jsonl" if data else None
    calib = args.calib or (str(c4) if c4 and c4.is_file() else None)
    hashes = {**check_task("arc_easy", data), **check_task("wikitext", data),
              **({Path(calib).name: h for h in data_hashes([calib]).values()} if calib else {})}
    identity = {"model": model, "grid": str(args.grid), "mcq_limit": args.mcq_limit, "ppl_windows": args.ppl_windows,
                "seed": args.seed, "data": hashes, "environment": environment("cpu", "float32"),
                "model_files": model_fingerprint(model)}
    out = Path(args.out)
    cache = CellCache(out, "manifest.json", "proxy validation", identity)
    cache.open(schema="prunelens.proxy-validation/1")
    lm = load_model(model)
    text = "\n\n".join(r["text"] for r in load_rows("wikitext", data).rows)
    dense = evaluate_mcq(lm, "arc_easy", data, args.mcq_limit, args.seed, progress=False)
    rows = []
    for g in grid["rows"]:
        spec = g["spec"]
        key = "".join(c if c.isalnum() else "_" for c in spec)
        if not cache.has(key):
            t = time.perf_counter()
            mod = build(lm, spec, Calibration(calib, seed=args.seed), progress=False)
            m = evaluate_mcq(lm, "arc_easy", data, args.mcq_limit, args.seed, mod, progress=False)
            k = kl_statistics(lm, text, mod, 512, args.ppl_windows, progress=False)
            cell = {"spec": spec, "flips": answer_flips(dense.golds, dense.predictions, m.predictions),
                    "mcq_acc": m.acc, "kl_statistics": k, "seconds": time.perf_counter() - t}
            cache.save(key, cell)
            del mod
            release_freed_memory()
            print(f"{spec:14s} flips {cell['flips']['flips']:.3f}  mean KLD {k['mean_kld']:.4f}  p99 "
                  f"{k['kld_p99']:.3f}  same top {k['same_top']:.3f}  RMS Δp {k['rms_dp']:.3f}  "
                  f"({cell['seconds']:.0f} s)", flush=True)
        cell = cache.load(key)
        k = cell["kl_statistics"]
        rows.append({**g, "flips": cell["flips"]["flips"], "mean_kld": k["mean_kld"], "kld_p50": k["kld_p50"],
                     "kld_p99": k["kld_p99"], "not_same_top": 1 - k["same_top"], "rms_dp": k["rms_dp"]})
    y = [r["gen_drop"] for r in rows]
    hits = [r["gen_hits"] for r in rows]
    scored = {"risk_generative (predictor)": [risk(r)["generative"] for r in rows],
              "tf_kl (predictor's signal)": [r["tf_kl"] for r in rows],
              "ppl_log_ratio (grid's proxy)": [r["ppl_log_ratio"] for r in rows],
              "mcq_drop (grid's proxy)": [r["mcq_drop"] for r in rows],
              **{p: [r[p] for r in rows] for p in PROXIES}}
    table = {name: {"spearman": spearman(v, y), "interval_95": rho_interval(v, hits)} for name, v in scored.items()}
    res = {"model": model, "grid": str(args.grid), "n_prunings": len(rows), "n_questions": len(hits[0]),
           "dense_arc_acc": dense.acc, "mcq_limit": args.mcq_limit, "table": table, "rows": rows}
    write_json(out / "proxies.json", res)
    print(f"Spearman with the measured generative drop ({len(rows)} prunings, {len(hits[0])} questions):")
    for name, r in sorted(table.items(), key=lambda kv: -kv[1]["spearman"]):
        lo, hi = r["interval_95"]
        print(f"  {name:30s} {r['spearman']:.3f}  [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    from prunelens.errors import PrunelensError

    try:
        main()
    except PrunelensError as e:
        raise SystemExit(f"proxy_validation: error: {e}") from None
