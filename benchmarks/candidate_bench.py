"""A candidate model made elsewhere against its base: the three figures issue 43 asks for, in one run.

1. Speed: ``compare_models`` (both models in memory, lock-step trace) on P prompts × N steps ÷
   generating the same number of tokens with both models through HF ``generate`` (greedy, KV cache,
   the same batch).
2. Memory: peak RSS of the sequential comparison (base, freed, candidate, freed, base re-scoring) ÷
   peak RSS of the larger model alone generating the same tokens — each in its own process.
3. Reference cache: bytes of the top-K reference ÷ float32 logits of the same steps, and the mean
   |ΔKL| (both directions, every valid teacher-forced and free-running step) of the sequential trace
   against the in-memory one.

    python benchmarks/candidate_bench.py --model smollm2-135m --candidate DIR_OR_GGUF [--steps 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time

import torch

from prunelens.analyses.trace import TraceSettings
from prunelens.analyses.trace.core import compare_models, compare_sequential
from prunelens.data import builtin_prompts
from prunelens.model.memory import release_weights
from prunelens.model.tokens import encode_prompts, left_pad, pad_id
from prunelens.prune.candidate import load_candidate
from prunelens.prune.checkpoint import load_model


def _generate(lm, prompts: list[str], steps: int) -> float:
    ids, mask = left_pad(encode_prompts(lm.tokenizer, prompts, True), pad_id(lm), lm.device)
    t0 = time.perf_counter()
    lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                      do_sample=False, pad_token_id=pad_id(lm))
    return time.perf_counter() - t0


def child(mode: str, a: argparse.Namespace) -> None:
    """One measured process: 'alone' generates with the larger model only, 'sequential' compares."""
    prompts, settings = builtin_prompts()[:a.prompts], TraceSettings(max_new_tokens=a.steps, batch_size=a.prompts)
    if mode == "alone":
        for spec in (a.model, a.candidate):  # each alone, one after the other: the larger one sets the peak
            lm = load_model(spec)
            _generate(lm, prompts, a.steps)
            release_weights(lm)
    else:
        compare_sequential(lambda: load_model(a.model), lambda b, _: load_candidate(a.candidate, b), prompts,
                           settings, k=a.topk, progress=False)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own peak resident size (VmHWM: per address space, so a child forked from a large
    parent does not inherit the parent's peak, as ``ru_maxrss`` does)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss(mode: str, a: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--child", mode, "--model", a.model, "--candidate", a.candidate,
           "--steps", str(a.steps), "--prompts", str(a.prompts), "--topk", str(a.topk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_rss_mb"]


def _kl_error(full: dict, seq: dict) -> dict[str, float]:
    """Per mode and direction, the mean KL of the in-memory trace and the mean |ΔKL| per valid cell
    of the sequential (top-K reference) trace against it. The top-K KL is a lower bound of the full
    KL in every cell (one tail bucket on both sides), so the mean |Δ| over the same cells is the
    difference of the two means. ``rkl`` = KL(base ‖ cand) is the direction llama.cpp and mlx-lm
    report; teacher-forced is where both read the same context."""
    out = {}
    for mode in ("teacher_forced", "free_running"):
        for key in ("kl", "rkl"):
            f, q = full["comparison"][mode][key], seq["comparison"][mode][key]
            out[f"{mode}_{key}"], out[f"{mode}_{key}_abs_delta"] = f, abs(f - q)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--candidate", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--child")
    ap.add_argument("--only-memory", action="store_true", help="only the two peak-RSS processes")
    ap.add_argument("--only-cache", action="store_true", help="only the reference cache's size and KL error")
    a = ap.parse_args()
    if a.child:
        child(a.child, a)
        return
    if a.only_memory:
        seq, alone = _rss("sequential", a), _rss("alone", a)
        print(json.dumps({"model": a.model, "candidate": a.candidate, "rss_sequential_mb": round(seq),
                          "rss_alone_mb": round(alone), "rss_ratio": round(seq / alone, 3),
                          "date": time.strftime("%Y-%m-%d")}, indent=1))
        return
    torch.manual_seed(0)
    prompts, settings = builtin_prompts()[:a.prompts], TraceSettings(max_new_tokens=a.steps, batch_size=a.prompts)
    base = load_model(a.model)
    cand = load_candidate(a.candidate, base)
    if not a.only_cache:
        _generate(base, prompts[:1], 2)  # warm-up, untimed
        t_gen = _generate(base, prompts, a.steps) + _generate(cand.lm, prompts, a.steps)
    t0 = time.perf_counter()
    full = compare_models(base, cand, prompts, settings, progress=False)
    t_cmp = time.perf_counter() - t0
    del base, cand
    gc.collect()
    seq = compare_sequential(lambda: load_model(a.model), lambda b, _: load_candidate(a.candidate, b), prompts,
                             settings, k=a.topk, progress=False)
    sizes = seq["sequential"]["reference_bytes"]
    if a.only_cache:
        print(json.dumps({"model": a.model, "candidate": a.candidate, "topk": a.topk, "reference_bytes": sizes,
                          "topk_share_of_full_logits": round(sizes["topk"] / sizes["full_logits"], 5),
                          **_kl_error(full, seq), "date": time.strftime("%Y-%m-%d")}, indent=1))
        return
    rss_seq, rss_alone = _rss("sequential", a), _rss("alone", a)
    print(json.dumps({
        "model": a.model, "candidate": a.candidate, "prompts": a.prompts, "steps": a.steps,
        "compare_s": round(t_cmp, 2), "generate_both_s": round(t_gen, 2), "speed_ratio": round(t_cmp / t_gen, 3),
        "rss_sequential_mb": round(rss_seq), "rss_alone_mb": round(rss_alone),
        "rss_ratio": round(rss_seq / rss_alone, 3), "topk": a.topk, "reference_bytes": sizes,
        "topk_share_of_full_logits": round(sizes["topk"] / sizes["full_logits"], 5), **_kl_error(full, seq),
        "date": time.strftime("%Y-%m-%d"),
    }, indent=1))


if __name__ == "__main__":
    main()
