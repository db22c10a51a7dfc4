"""OWL against uniform sparsity (issue 20): WikiText-2 perplexity of Wanda and SparseGPT with one
ratio for every layer, and with OWL's outlier-weighted ratio per block, at 50–70 %.

The OWL paper (Yin et al. 2023, Table 3) reports OWL well ahead of uniform Wanda at 70 % on
LLaMA-7B…65B and roughly even at 50 %. This checks whether that holds at 135M–1.5B. Same
calibration (C4, ``--calib-samples`` × ``--calib-len`` tokens, seed 0) and the same WikiText-2
windows for every method; each (method, ratio) is a cell of ``OUT/cells``, so a killed run resumes.

    python benchmarks/owl_validation.py [--model smollm2-135m] [--ratios 0.5,0.6,0.7] \\
        [--out docs/sweeps/owl-smollm2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prunelens import load_model
from prunelens.analyses.cells import CellCache, data_hashes, environment, model_fingerprint
from prunelens.model.memory import release_freed_memory
from prunelens.prune.recipe import prune_weights
from prunelens.runs import write_json
from prunelens.tasks.perplexity import perplexity
from prunelens.tasks.sources import load_rows
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()
METHODS = ("wanda", "owl", "sparsegpt", "owl-sparsegpt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.5,0.6,0.7")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=40, help="WikiText-2 windows of 1024 tokens")
    ap.add_argument("--out", default="docs/sweeps/owl-smollm2")
    a = ap.parse_args()
    calib = str(Path(a.data_dir) / "c4_calibration.jsonl")
    identity = {"model": a.model, "calib": {Path(calib).name: h for h in data_hashes([calib]).values()},
                "calib_samples": a.calib_samples, "calib_len": a.calib_len, "ppl_windows": a.ppl_windows,
                "environment": environment("cpu", "float32"), "model_files": model_fingerprint(a.model)}
    cache = CellCache(a.out, "manifest.json", "OWL validation", identity).open(schema="prunelens.owl-validation/1")
    lm = load_model(a.model)
    text = "\n\n".join(r["text"] for r in load_rows("wikitext", a.data_dir).rows)
    kw = dict(max_windows=a.ppl_windows, progress=False)
    if not cache.has("dense"):
        cache.save("dense", perplexity(lm, text, **kw))
    dense = cache.load("dense")["perplexity"]
    print(f"dense {dense:.2f}", flush=True)
    table: dict[str, dict[str, float]] = {}
    for ratio in a.ratios.split(","):
        for method in a.methods.split(","):
            spec = f"{method}:{ratio}"
            if not cache.has(spec):
                t = time.perf_counter()
                patch = prune_weights(lm, spec, calib=calib, calib_samples=a.calib_samples,
                                      calib_len=a.calib_len, progress=False)
                secs = time.perf_counter() - t
                r = patch.report
                cache.save(spec, {"spec": spec, **perplexity(lm, text, patch, **kw), "prune_s": secs,
                                  "zero_frac": r["zero_frac"], "owl": r.get("owl")})
                del patch
                release_freed_memory()
            cell = cache.load(spec)
            table.setdefault(ratio, {})[method] = cell["perplexity"]
            owl = cell.get("owl")
            band = (f"  block sparsity {min(owl['block_sparsity']):.3f}–{max(owl['block_sparsity']):.3f}"
                    if owl else "")
            print(f"{spec:20s} ppl {cell['perplexity']:9.2f}  zeros {cell['zero_frac']:.3f}{band}", flush=True)
    write_json(Path(a.out) / "owl.json", {"model": a.model, "dense_ppl": dense, "table": table})
    print("\n| sparsity | " + " | ".join(a.methods.split(",")) + " |")
    print("|---" * (1 + len(a.methods.split(","))) + "|")
    for ratio, row in table.items():
        print(f"| {ratio} | " + " | ".join(f"{row[m]:.2f}" for m in a.methods.split(",")) + " |")


if __name__ == "__main__":
    from prunelens.errors import PrunelensError

    try:
        main()
    except PrunelensError as e:
        raise SystemExit(f"owl_validation: error: {e}") from None
