"""P1 and P2 for the foundation: cost of the step-wise analysis relative to bare generation.

P1 = time of ``prunelens.analyze`` (dense + pruned, teacher-forced + free-running, all metrics)
     ÷ time of bare KV-cached greedy generation of the same number of tokens by the dense and the
     pruned model (``model.generate``, same batch, same prompts). Goal ≤ 1.3×.
P2 = peak RSS of a process running that analysis ÷ peak RSS of a process that loads the model
     once and runs the same dense generation. Goal ≤ 1.15×.

Run: python benchmarks/bench_analysis.py [--model smollm2-135m] [--drop attn:4] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch


def _setup(model: str, drop: str):
    import prunelens as pl
    from prunelens.model.tokens import encode_prompts, left_pad

    lm = pl.load_model(model)
    plan = pl.select_drop(lm, *drop.split("+"))
    prompts = pl.builtin_prompts()
    ids, mask = left_pad(encode_prompts(lm.tokenizer, prompts), lm.tokenizer.pad_token_id, lm.device)
    return pl, lm, plan, prompts, ids, mask


def _generate(lm, ids, mask, steps: int) -> None:
    lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                      do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)


def bare_time(pl, lm, plan, ids, mask, steps: int) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        _generate(lm, ids, mask, steps)
        with pl.pruned_view(lm.adapter, plan):
            _generate(lm, ids, mask, steps)
    return time.perf_counter() - t


def analysis_time(pl, lm, plan, prompts, steps: int) -> float:
    t = time.perf_counter()
    pl.analyze(lm, plan, prompts, pl.AnalysisSettings(max_new_tokens=steps), progress=False)
    return time.perf_counter() - t


def child(mode: str, model: str, drop: str, steps: int) -> None:
    pl, lm, plan, prompts, ids, mask = _setup(model, drop)
    if mode == "generate":
        with torch.inference_mode():
            _generate(lm, ids, mask, steps)
    else:
        analysis_time(pl, lm, plan, prompts, steps)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drop", default="attn:4")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["generate", "analyze"])
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model, a.drop, a.steps)
        return

    pl, lm, plan, prompts, ids, mask = _setup(a.model, a.drop)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {a.model}; pruning {plan.label()}; "
          f"{len(prompts)} prompts x {a.steps} steps")
    bare_time(pl, lm, plan, ids, mask, 4)  # warm-up
    bare, ana = [], []
    for _ in range(a.repeats):  # interleaved so drift hits both alike
        bare.append(bare_time(pl, lm, plan, ids, mask, a.steps))
        ana.append(analysis_time(pl, lm, plan, prompts, a.steps))
    b, s = min(bare), min(ana)
    print(f"P1 bare generation dense+pruned: {b:.2f} s (min of {a.repeats}); analysis: {s:.2f} s; "
          f"ratio {s / b:.2f}x (goal <= 1.3x)")

    def rss(mode: str) -> float:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", a.model, "--drop",
                              a.drop, "--steps", str(a.steps)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]

    a.drop = plan.label()  # children get the explicit layers: no calibration pass in either
    one, both = rss("generate"), rss("analyze")
    print(f"P2 peak RSS one model + generation: {one:.0f} MB; dense+pruned analysis: {both:.0f} MB; "
          f"ratio {both / one:.3f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
