"""Speed and memory of the calibrated weight methods, and SparseGPT against its reference code.

Part 1 (always): for each of Wanda, SparseGPT (50 %) and GPTQ (w4, groups of 64), run
``prunelens`` end to end (calibration forward passes, statistics, the algorithm, the next block's
inputs) in a fresh process and report wall time per block, in total, and peak RSS ÷ the RSS of the
loaded model. ``--max-blocks K`` times only the first K blocks (the others just pass activations
on) and extrapolates the total as mean-per-block × blocks — stated in the output.

Part 2 (``--reference DIR``): DIR holds ``sparsegpt.py`` and ``quant.py`` of IST-DASLab/sparsegpt
(not part of prunelens). For every linear layer of the first ``--ref-blocks`` blocks, the same
weight W and the same Hessian H (collected once by prunelens) are given to the reference
``SparseGPT.fasterprune`` and to ``prunelens.prune.sparse.sparsegpt_prune``; the script reports the
summed algorithm time of each (interleaved, best of --repeats) and the reconstruction error
tr((W−Ŵ)H(W−Ŵ)ᵀ) of each result.

Run: python benchmarks/bench_sparsity.py [--model smollm2-135m] [--reference /path/to/sparsegpt]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import resource
import subprocess
import sys
import time

import torch

METHODS = ["wanda:0.5", "sparsegpt:0.5", "gptq:w4g64"]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(a: argparse.Namespace) -> None:
    import prunelens as pl
    from prunelens.prune.recipe import prune_weights

    lm = pl.load_model(a.model)
    for p in lm.model.parameters():  # page the mmapped weights in: "one model loaded"
        p.data.sum()
    base = _rss_mb()
    n = lm.adapter.n_layers
    skip = [str(i) for i in range(a.max_blocks, n)] if a.max_blocks else []
    t = time.perf_counter()
    patch = prune_weights(lm, a.child, calib=a.calib, calib_samples=a.calib_samples, calib_len=a.calib_len,
                          skip=skip, inplace=True, progress=False)
    total = time.perf_counter() - t
    per_block = patch.report["seconds_per_block"][: a.max_blocks or n]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": a.child, "n_layers": n, "timed_blocks": len(per_block), "total_s": total,
                      "per_block_s": per_block, "model_rss_mb": base, "peak_rss_mb": peak}))


def reference_race(a: argparse.Namespace) -> None:
    sys.path.insert(0, a.reference)
    torch.cuda.synchronize = lambda *args, **kw: None  # the reference times itself with CUDA syncs
    from sparsegpt import SparseGPT  # the reference implementation, from --reference

    import prunelens as pl
    from prunelens.data import calibration_ids
    from prunelens.prune.sparse import Pattern, sparsegpt_prune

    lm = pl.load_model(a.model)
    ids = calibration_ids(lm.tokenizer, a.calib, a.calib_samples, a.calib_len, 0)
    targets = [f"{lm.adapter.layer_path(i)}.{rel}"
               for i in range(a.ref_blocks) for rel in lm.adapter.spec.linears]
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def f(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hs[name] = hs.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    handles = [lm.model.get_submodule(t).register_forward_pre_hook(hook(t)) for t in targets]
    with torch.inference_mode():
        for b in range(0, len(ids), 4):
            lm.model(input_ids=ids[b:b + 4], use_cache=False)
    for h in handles:
        h.remove()
    H = {t: hs[t] * (2.0 / counts[t]) for t in targets}

    for label, ratio, n, m in (("50% unstructured", 0.5, 0, 0), ("2:4", 0.0, 2, 4)):
        pattern = Pattern(ratio=ratio) if not n else Pattern(n=m - n, m=m)
        best = {"reference": float("inf"), "prunelens": float("inf")}
        errs = {}
        for _ in range(a.repeats):
            tt = {"reference": 0.0, "prunelens": 0.0}
            e = {"reference": 0.0, "prunelens": 0.0}
            for t in targets:
                lin = lm.model.get_submodule(t)
                W = lin.weight.data.clone()
                ref_layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
                ref_layer.weight.data = W.clone()
                ref = SparseGPT(ref_layer)
                ref.H = H[t].clone()
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # it prints a time and error per layer
                    ref.fasterprune(ratio, prunen=n, prunem=m, blocksize=128, percdamp=0.01)
                tt["reference"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                ours = sparsegpt_prune(W, H[t], pattern, blocksize=128, percdamp=0.01)
                tt["prunelens"] += time.perf_counter() - t0
                for k, What in (("reference", ref_layer.weight.data), ("prunelens", ours)):
                    d = (W - What).double()
                    e[k] += float(torch.trace(d @ H[t].double() @ d.T))
            best = {k: min(best[k], tt[k]) for k in best}
            errs = e
        print(f"SparseGPT {label}, {len(targets)} linear layers of {a.ref_blocks} blocks: reference "
              f"{best['reference']:.2f} s, prunelens {best['prunelens']:.2f} s, ratio "
              f"{best['prunelens'] / best['reference']:.2f}x (goal <= 1.0x); reconstruction error "
              f"tr(dW H dW^T): reference {errs['reference']:.4g}, prunelens {errs['prunelens']:.4g}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=None, help="calibration file (default: built-in sample)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--max-blocks", type=int, default=0, help="time only the first K blocks (0 = all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reference", help="directory with the reference sparsegpt.py and quant.py")
    ap.add_argument("--ref-blocks", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {a.model}; calibration {a.calib_samples} x {a.calib_len} tokens from "
          f"{a.calib or 'the built-in sample'}", flush=True)
    if a.methods:
        for m in a.methods.split(","):
            cmd = [sys.executable, __file__, "--child", m, "--model", a.model, "--calib-samples",
                   str(a.calib_samples), "--calib-len", str(a.calib_len), "--max-blocks", str(a.max_blocks)]
            if a.calib:
                cmd += ["--calib", a.calib]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{m}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            pb = r["per_block_s"]
            mean = sum(pb) / len(pb)
            total = (f"{r['total_s']:.1f} s" if r["timed_blocks"] == r["n_layers"] else
                     f"~{mean * r['n_layers']:.0f} s extrapolated from {r['timed_blocks']} of "
                     f"{r['n_layers']} blocks")
            print(f"{m}: total {total}; per block mean {mean:.2f} s (min {min(pb):.2f}, max {max(pb):.2f}); "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB = {r['peak_rss_mb'] / r['model_rss_mb']:.2f}x the "
                  f"loaded model ({r['model_rss_mb']:.0f} MB)", flush=True)
    if a.reference:
        reference_race(a)


if __name__ == "__main__":
    main()
