"""Speed of the training-free repair fit: the streamed fit (``fit_repair``: one reference pass, then
each block of the modified model once, twice where a kept attention is itself corrected) against the
span-by-span definition (``fit_by_full_passes``: one pass up to each span's end with the maps so far
merged, the path prunelens took before and the way ReplaceMe's per-span estimators run), on the same
model, modification and calibration tokens, in one process. Also the largest relative difference of
the fitted maps, which must be rounding only.

Run: python benchmarks/bench_repair.py [--model smollm2-135m] [--recipes attn:8+repair:linear,...]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="attn:8+repair:linear,block:4+repair:linear,wanda:0.5+repair:scale")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    a = ap.parse_args()

    import prunelens as pl
    from prunelens.prune.recipe import WEIGHT_CALIB, Calibration, Recipe, build
    from prunelens.prune.repair import fit_by_full_passes, fit_repair

    lm = pl.load_model(a.model)
    cal = Calibration(samples=a.calib_samples, seq_len=a.calib_len)
    ids, _ = cal.ids(lm, WEIGHT_CALIB)
    print(f"{a.model}: {lm.adapter.n_layers} blocks, calibration {ids.shape[0]} x {ids.shape[1]} tokens, "
          f"{torch.get_num_threads()} threads, fp32")
    print("| recipe | spans fitted | streamed | span by span | ratio | max rel. map difference |")
    print("|---|---|---|---|---|---|")
    for recipe in a.recipes.split(","):
        specs = Recipe.parse(recipe).specs
        base = build(lm, list(specs[:-1]), calibration=cal, progress=False)
        with torch.no_grad():
            t0 = time.perf_counter()
            fast = fit_repair(lm.adapter, base, specs[-1], ids, batch_size=cal.batch_size)
            t1 = time.perf_counter()
            slow = fit_by_full_passes(lm.adapter, base, specs[-1], ids, batch_size=cal.batch_size)
            t2 = time.perf_counter()
        diff = 0.0
        for f, s in zip(fast.maps, slow.maps, strict=True):
            x, y = (f.t, s.t) if f.t is not None else (f.s, s.s)
            diff = max(diff, float((x - y).norm() / y.norm()))
        print(f"| {recipe} | {len(fast.maps)} | {t1 - t0:.1f} s | {t2 - t1:.1f} s | {(t1 - t0) / (t2 - t1):.3f} "
              f"| {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
