"""WikiText-2 perplexity of the default model under each sparsity / quantisation method.

The literature's ordering (Wanda, SparseGPT papers): magnitude ≫ Wanda ≈ SparseGPT at 50 %
unstructured; 2:4 and 4:8 worse than unstructured at the same density; 4-bit GPTQ closer to dense
than any 50 % pruning. This script measures it on one model with one calibration set and prints a
Markdown table (token-level perplexity; windows of --seq-len tokens, the first --max-windows).

Run: python benchmarks/ppl_sparsity.py --text ../shared/data/wikitext2_raw_test.jsonl \
         --calib ../shared/data/c4_calibration.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import prunelens as pl
from prunelens.prune.recipe import prune_weights
from prunelens.tasks.perplexity import perplexity, read_corpus

METHODS = ["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4",
           "wanda:4:8", "sparsegpt:4:8", "rtn:w4g64", "gptq:w4g64", "rtn:w3g64", "gptq:w3g64"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", help="write all numbers here")
    a = ap.parse_args()

    lm = pl.load_model(a.model)
    text = read_corpus(a.text)
    kw = dict(seq_len=a.seq_len, max_windows=a.max_windows, progress=False)
    rows = [{"method": "dense", **perplexity(lm, text, **kw), "prune_s": 0.0}]
    print(f"dense: {rows[0]['perplexity']:.3f}", flush=True)
    for spec in a.methods.split(","):
        t = time.perf_counter()
        patch = prune_weights(lm, spec, calib=a.calib, calib_samples=a.calib_samples,
                              calib_len=a.calib_len, progress=False)
        secs = time.perf_counter() - t
        r = patch.report
        rows.append({"method": spec, **perplexity(lm, text, patch, **kw), "prune_s": secs,
                     "zero_frac": r.get("zero_frac"), "bits_per_weight": r.get("bits_per_weight"),
                     "nm_violations": r.get("nm_violations")})
        print(f"{spec}: {rows[-1]['perplexity']:.3f} ({secs:.1f} s)", flush=True)
        del patch
    print(f"\nmodel {a.model}; calibration {a.calib_samples} x {a.calib_len} tokens from {a.calib}; "
          f"{rows[0]['tokens']} predicted tokens ({rows[0]['windows']} windows of {a.seq_len})\n")
    print("| method | perplexity | linear-layer zeros | bits/weight | time to prune (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        z = "" if r.get("zero_frac") is None else f"{r['zero_frac']:.3f}"
        b = "" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.3g}"
        print(f"| {r['method']} | {r['perplexity']:.2f} | {z} | {b} | {r['prune_s']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
