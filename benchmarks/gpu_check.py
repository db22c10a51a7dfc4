"""The prepared check for a lent GPU machine (issue 17): random weights built on the device from a
config, no download, under 8 minutes on one GPU. Prints its figures; exits non-zero on an error.

1. An 8B-shaped Llama in bf16: analysis tokens/s ÷ HF ``generate`` tokens/s for the same dense +
   pruned tokens (goal ≥ 0.8).
2. Wanda and SparseGPT seconds per block (SparseGPT on the first blocks only); issue 20's
   baselines: OWL (all blocks), AWQ (first blocks), SLEB's greedy selection beside Block Influence.
3. One device-map run with part of the model on the CPU (a shallower 8B-wide model saved to disk,
   loaded once whole on the GPU and once under a ``--max-memory``-style budget): the same tokens and
   metrics, since only the placement differs.

Each section's failure is recorded and the next still runs (a lent GPU is minutes long); --out is
rewritten after every section. --profile FILE adds torch.profiler's op table of one analysis.

Run: python benchmarks/gpu_check.py --out figures.json [--profile ops.txt]   (on the GPU machine)
     python benchmarks/gpu_check.py --tiny     (a CPU smoke test of the script itself)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def tokenizer(vocab: int):
    """A word-level tokenizer over ``w0 … w{vocab-1}`` (no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="w0", eos_token="w1",
                                                unk_token="w0", padding_side="left")


def config(tiny: bool, layers: int | None = None):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 4,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, pad_token_id=0, eos_token_id=1)


def build(cfg, dev: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    from prunelens.model.arch import Adapter
    from prunelens.model.loading import LoadedModel

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer(cfg.vocab_size), Adapter(model), {"name": "random-llama"})


def prompts(n: int, length: int, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(f"w{int(t)}" for t in torch.randint(2, vocab, (length,), generator=g)) for _ in range(n)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_speed(lm, texts: list[str], steps: int, batch: int) -> dict:
    from prunelens.analyses.trace import AnalysisSettings, analyze
    from prunelens.prune.drop import DropPlan, pruned_view

    n = lm.adapter.n_layers
    plan = DropPlan(attn=tuple(range(max(1, n - 8), max(2, n - 4))))
    s = AnalysisSettings(max_new_tokens=steps, batch_size=batch, chat_template=False, logit_lens=False)
    analyze(lm, plan, texts[:batch], AnalysisSettings(max_new_tokens=2, batch_size=batch, chat_template=False),
            progress=False)  # warm-up
    sync()
    t0 = time.perf_counter()
    analyze(lm, plan, texts, s, progress=False)
    sync()
    t_an = time.perf_counter() - t0
    tok = lm.tokenizer
    hf_s = 0.0
    for view in (None, plan):  # the same tokens: dense and pruned, each prompt `steps` new tokens
        for b0 in range(0, len(texts), batch):
            enc = tok(texts[b0:b0 + batch], return_tensors="pt", padding=True).to(lm.device)
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode(), (pruned_view(lm.adapter, view) if view else _null()):
                lm.model.generate(**enc, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  pad_token_id=0)
            sync()
            hf_s += time.perf_counter() - t0
    tokens = 2 * len(texts) * steps
    return {"analysis_s": t_an, "hf_generate_s": hf_s, "tokens": tokens,
            "analysis_tok_s": tokens / t_an, "hf_tok_s": tokens / hf_s, "ratio": hf_s / t_an, "goal": 0.8}


def _without_cudnn_sdpa(fn):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return fn()


def check_generation(lm, n: int, batch: int, max_new: int) -> dict:
    """The generation engine every generative task uses, on the device: continuous vs static batches
    vs HF ``generate`` (batched, same batch size), ragged prompt lengths and ragged ends (2 % of the
    vocabulary made end-of-sequence tokens, for both sides, so rows stop at different steps)."""
    from prunelens.model.generation import decode_attention, generate_full

    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 129, (n,), generator=g).tolist()
    ids = [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths]
    gc = lm.model.generation_config
    old_eos = gc.eos_token_id
    gc.eos_token_id = list(range(2, vocab, 50))
    out: dict = {"prompts": n, "batch": batch, "max_new_tokens": max_new}
    texts = {}
    try:
        for engine in ("continuous", "static"):
            generate_full(lm, ids[:batch], 2, (), batch_size=batch, progress=False, engine=engine)  # warm-up
            sync()
            t0 = time.perf_counter()
            res = generate_full(lm, ids, max_new, (), batch_size=batch, progress=False, engine=engine)
            sync()
            secs = time.perf_counter() - t0
            toks = sum(len(r.ids) for r in res)
            texts[engine] = [r.ids for r in res]
            out[engine] = {"s": secs, "tokens": toks, "tok_s": toks / secs}
        tok = lm.tokenizer
        useful = out["continuous"]["tokens"]
        for name, ctx in (("hf_generate", _null()), ("hf_generate_without_cudnn_sdpa", decode_attention(lm.device))):
            sync()
            t0 = time.perf_counter()
            with ctx, torch.inference_mode():
                for b0 in range(0, n, batch):
                    enc = tok.pad({"input_ids": ids[b0:b0 + batch]}, return_tensors="pt").to(lm.device)
                    lm.model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
            sync()
            secs = time.perf_counter() - t0
            out[name] = {"s": secs, "tokens": useful, "tok_s": useful / secs}
    finally:
        gc.eos_token_id = old_eos
    same = sum(a == b for a, b in zip(texts["continuous"], texts["static"], strict=True))
    out["continuous_equals_static"] = f"{same}/{n}"
    out["lengths"] = sorted(len(t) for t in texts["continuous"])
    return out


def profile_analysis(lm, texts: list[str], steps: int, out: str) -> dict:
    """Where an analysis spends its time: torch.profiler's op table (device and host time)."""
    from torch.profiler import ProfilerActivity, profile

    from prunelens.analyses.trace import AnalysisSettings, analyze
    from prunelens.prune.drop import DropPlan

    n = lm.adapter.n_layers
    plan = DropPlan(attn=tuple(range(max(1, n - 8), max(2, n - 4))))
    s = AnalysisSettings(max_new_tokens=steps, batch_size=len(texts), chat_template=False, logit_lens=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        analyze(lm, plan, texts, s, progress=False)
        sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    Path(out).write_text(table + "\n\n" + host)
    print(table, flush=True)
    return {"table": out}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _calib(lm, n: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, lm.model.config.vocab_size, (n, length), generator=g)


def _timed_sparsify(lm, spec: str, calib: torch.Tensor, first_blocks: int | None = None) -> tuple[dict, dict]:
    """One weight method on every block (or the first ``first_blocks``): its wall time, mean seconds
    per modified block, and the report."""
    from prunelens.prune.weights import parse_weight_method, sparsify

    skip = tuple(str(i) for i in range(first_blocks, lm.adapter.n_layers)) if first_blocks else ()
    sync()
    t0 = time.perf_counter()
    report = sparsify(lm.adapter, parse_weight_method(spec), calib, skip=skip, progress=False).report
    sync()
    done = report["seconds_per_block"][:first_blocks] if first_blocks else report["seconds_per_block"]
    return {"seconds": time.perf_counter() - t0, "seconds_per_block": sum(done) / len(done),
            "blocks": len(done)}, report


def check_pruning(lm, n: int, length: int, sparsegpt_blocks: int) -> dict:
    calib = _calib(lm, n, length)
    out = {}
    for spec, first in (("wanda:0.5", None), ("sparsegpt:0.5", sparsegpt_blocks)):
        fig, report = _timed_sparsify(lm, spec, calib, first)
        out[spec] = {**fig, "zero_frac": report["zero_frac"]}
    return out


def check_baselines(lm, n: int, length: int, awq_blocks: int) -> dict:
    """Issue 20's baselines at 8B shape: OWL (dense pre-pass + Wanda per block), AWQ on the first
    blocks, and SLEB's greedy perplexity selection beside one-shot Block Influence."""
    from prunelens.prune.base import method_for
    from prunelens.prune.importance import select_drop

    calib = _calib(lm, n, length)
    out: dict = {}
    for spec, first in (("owl:0.5", None), ("awq:w4g128", awq_blocks)):
        out[spec], report = _timed_sparsify(lm, spec, calib, first)
        if "owl" in report:
            sp = report["owl"]["block_sparsity"]
            out[spec]["block_sparsity_range"] = [min(sp), max(sp)]
    small = calib[:8, :128]
    for name, spec, metric in (("block_influence", "block:2", "cosine"), ("sleb", "sleb:2", "cosine")):
        sync()
        t0 = time.perf_counter()
        plan = select_drop(lm, [method_for(spec).parse(spec)], metric=metric, calib=small)
        sync()
        out[name] = {"spec": spec, "seconds": time.perf_counter() - t0, "blocks": list(plan.block)}
    return out


def check_device_map(cfg, dev: torch.device, dtype: torch.dtype, texts: list[str], gpu_budget: str) -> dict:
    """The same checkpoint loaded twice, whole on one device and under a budget that puts part of it
    on the CPU: the analysis must agree (only the placement differs)."""
    from prunelens.analyses.trace import AnalysisSettings, analyze
    from prunelens.model.placement import Placement
    from prunelens.prune.checkpoint import load_model
    from prunelens.prune.drop import DropPlan

    lm = build(cfg, dev, dtype)
    dt = "bfloat16" if dtype == torch.bfloat16 else "float32"
    with tempfile.TemporaryDirectory() as d:
        lm.model.save_pretrained(d, safe_serialization=True)
        lm.tokenizer.save_pretrained(d)
        del lm
        plan = DropPlan(attn=(1,))
        s = AnalysisSettings(max_new_tokens=8, batch_size=4, chat_template=False, logit_lens=False)
        one = load_model(d, device=dev.type, dtype=dt)
        ref = analyze(one, plan, texts[:4], s, progress=False)
        del one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        budget = {0: gpu_budget, "cpu": "200GiB"} if dev.type == "cuda" else {"cpu": gpu_budget}
        big = load_model(d, dtype=dt, placement=Placement("auto", budget, str(Path(d) / "offload")))
        where = sorted(set(big.info["device_map"].values()), key=str)
        t0 = time.perf_counter()
        got = analyze(big, plan, texts[:4], s, progress=False)
        secs = time.perf_counter() - t0
    a = ref["summary"]["teacher_forced_mean"]
    b = got["summary"]["teacher_forced_mean"]
    diff = max(abs(float(a[k]) - float(b[k])) for k in a if isinstance(a[k], (int, float)))
    kl = [k for k in a if k.startswith("kl@")][0]
    return {"devices": [str(x) for x in where], "analysis_s": secs, "max_abs_diff_teacher_forced_means": diff,
            "teacher_forced_kl": [float(a[kl]), float(b[kl])],
            "same_tokens": ref["per_prompt"] == got["per_prompt"]}


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small config on the CPU: checks the script only")
    ap.add_argument("--out", help="write the figures as JSON (rewritten after each section)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out "
                    "(speed, generation, pruning, baselines, device_map)")
    ap.add_argument("--profile", help="also profile one analysis of 4 prompts; write the op table here")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if not a.tiny and dev.type != "cuda":
        print("gpu_check: no CUDA device (use --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    import transformers

    t_start = time.perf_counter()
    figures: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "date": time.strftime("%Y-%m-%d"), "errors": {}}
    cfg = config(a.tiny)
    texts = prompts(16, 128 if not a.tiny else 16, cfg.vocab_size)

    def section(name: str, fn) -> None:
        """One figure per section; a failure is recorded and the next section still runs (one lease)."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            figures[name] = fn()
            figures[name]["section_s"] = time.perf_counter() - t0
            figures[name]["peak_gpu_gib"] = _peak_gib()
        except Exception as e:  # noqa: BLE001 - reported, and the exit code says it failed
            import traceback

            traceback.print_exc()
            figures["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"gpu_check: {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(figures, indent=1))

    holder: dict = {}
    section("build", lambda: {"params_b": sum(p.numel() for p in holder.setdefault(
        "lm", build(cfg, dev, dtype)).model.parameters()) / 1e9})
    if "lm" in holder:
        lm = holder.pop("lm")
        if "speed" not in a.skip:
            section("speed", lambda: check_speed(lm, texts, 64 if not a.tiny else 8, 16 if not a.tiny else 4))
        if "speed" in figures:
            sp = figures["speed"]
            print(f"analysis ÷ HF generate tokens/s: {sp['ratio']:.2f} (goal ≥ 0.8); "
                  f"{sp['analysis_tok_s']:.0f} vs {sp['hf_tok_s']:.0f} tok/s", flush=True)
        if dev.type == "cuda" and "speed" not in a.skip:  # the largest host cost: cuDNN SDPA re-planning
            section("speed_without_cudnn_sdpa", lambda: _without_cudnn_sdpa(
                lambda: check_speed(lm, texts, 64, 16)))
            if "speed_without_cudnn_sdpa" in figures:
                sp = figures["speed_without_cudnn_sdpa"]
                print(f"without cuDNN SDPA: analysis ÷ HF generate {sp['ratio']:.2f}; "
                      f"{sp['analysis_tok_s']:.0f} vs {sp['hf_tok_s']:.0f} tok/s", flush=True)
        if "generation" not in a.skip:
            section("generation", lambda: check_generation(lm, 48 if not a.tiny else 6, 16 if not a.tiny else 4,
                                                       128 if not a.tiny else 8))
        if "generation" in figures:
            ge = figures["generation"]
            print(f"generation engine: continuous {ge['continuous']['tok_s']:.0f} tok/s, static "
                  f"{ge['static']['tok_s']:.0f}, HF generate {ge['hf_generate']['tok_s']:.0f} (without cuDNN "
                  f"SDPA {ge['hf_generate_without_cudnn_sdpa']['tok_s']:.0f}) (batch "
                  f"{ge['batch']}); continuous == static for {ge['continuous_equals_static']} prompts", flush=True)
        if a.profile:
            section("profile", lambda: profile_analysis(lm, texts[:4], 16, a.profile))
        if "pruning" not in a.skip:
            section("pruning", lambda: check_pruning(lm, 32 if not a.tiny else 4, 512 if not a.tiny else 16, 4))
        for spec, r in figures.get("pruning", {}).items():
            if isinstance(r, dict):
                print(f"{spec}: {r['seconds_per_block']:.2f} s per block over {r['blocks']} blocks "
                      f"(zeros {r['zero_frac']:.3f})", flush=True)
        if "baselines" not in a.skip:
            section("baselines", lambda: check_baselines(lm, 32 if not a.tiny else 4, 512 if not a.tiny else 16, 2))
        for name, r in figures.get("baselines", {}).items():
            if isinstance(r, dict):
                print(f"{name}: {r['seconds']:.1f} s" + (f" ({r['seconds_per_block']:.2f} s per block)"
                                                         if "seconds_per_block" in r else ""), flush=True)
        del lm
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "device_map" not in a.skip:
        section("device_map", lambda: check_device_map(config(a.tiny, layers=8), dev, dtype, texts,
                                                       "3GiB" if not a.tiny else "60000"))
    if "device_map" in figures:
        dm = figures["device_map"]
        print(f"device map over {', '.join(dm['devices'])}: analysis {dm['analysis_s']:.1f} s; "
              f"max |Δ| of teacher-forced means vs one device {dm['max_abs_diff_teacher_forced_means']:.2e}; "
              f"KL {dm['teacher_forced_kl'][0]:.4g} vs {dm['teacher_forced_kl'][1]:.4g}; "
              f"same tokens: {dm['same_tokens']}")
    figures["total_s"] = time.perf_counter() - t_start
    print(f"total {figures['total_s']:.0f} s; errors: {figures['errors'] or 'none'}")
    if a.out:
        Path(a.out).write_text(json.dumps(figures, indent=1))
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
