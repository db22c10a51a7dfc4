"""The prepared check for a lent GPU machine (issue 17): random weights built on the device from a
config, no download, under 8 minutes on one GPU. Prints its figures; exits non-zero on an error.

1. An 8B-shaped Llama in bf16: analysis tokens/s ÷ HF ``generate`` tokens/s for the same dense +
   pruned tokens (goal ≥ 0.8).
2. Wanda and SparseGPT seconds per block (SparseGPT on the first blocks only).
3. One device-map run with part of the model on the CPU (a shallower 8B-wide model saved to disk,
   loaded with ``--max-memory``-style budgets): the same analysis metrics as the all-GPU run.

Run: python benchmarks/gpu_check.py            (on the GPU machine)
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


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def check_pruning(lm, n: int, length: int, sparsegpt_blocks: int) -> dict:
    from prunelens.prune.weights import parse_weight_method, sparsify

    g = torch.Generator().manual_seed(0)
    calib = torch.randint(2, lm.model.config.vocab_size, (n, length), generator=g)
    out = {}
    for spec, skip in (("wanda:0.5", ()), ("sparsegpt:0.5", tuple(str(i) for i in range(sparsegpt_blocks,
                                                                                       lm.adapter.n_layers)))):
        sync()
        patch = sparsify(lm.adapter, parse_weight_method(spec), calib, skip=skip, progress=False)
        per = patch.report["seconds_per_block"]
        done = per[:sparsegpt_blocks] if skip else per
        out[spec] = {"seconds_per_block": sum(done) / len(done), "blocks": len(done),
                     "zero_frac": patch.report["zero_frac"]}
        del patch
    return out


def check_device_map(cfg, dev: torch.device, dtype: torch.dtype, texts: list[str], gpu_budget: str) -> dict:
    from prunelens.analyses.trace import AnalysisSettings, analyze
    from prunelens.model.loading import load_model
    from prunelens.model.placement import Placement
    from prunelens.prune.drop import DropPlan

    lm = build(cfg, dev, dtype)
    with tempfile.TemporaryDirectory() as d:
        lm.model.save_pretrained(d, safe_serialization=True)
        lm.tokenizer.save_pretrained(d)
        plan = DropPlan(attn=(1,))
        s = AnalysisSettings(max_new_tokens=8, batch_size=4, chat_template=False, logit_lens=False)
        ref = analyze(lm, plan, texts[:4], s, progress=False)
        del lm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        budget = {0: gpu_budget, "cpu": "200GiB"} if dev.type == "cuda" else {"cpu": gpu_budget}
        big = load_model(d, dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                         placement=Placement("auto", budget, str(Path(d) / "offload")))
        where = sorted(set(big.model.hf_device_map.values()), key=str)
        t0 = time.perf_counter()
        got = analyze(big, plan, texts[:4], s, progress=False)
        secs = time.perf_counter() - t0
    a = ref["summary"]["teacher_forced_mean"]
    b = got["summary"]["teacher_forced_mean"]
    diff = max(abs(float(a[k]) - float(b[k])) for k in a if isinstance(a[k], (int, float)))
    return {"devices": [str(x) for x in where], "analysis_s": secs, "max_abs_diff_teacher_forced_means": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small config on the CPU: checks the script only")
    ap.add_argument("--out", help="write the figures as JSON")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if not a.tiny and dev.type != "cuda":
        print("gpu_check: no CUDA device (use --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    figures: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    cfg = config(a.tiny)
    texts = prompts(16, 128 if not a.tiny else 16, cfg.vocab_size)
    lm = build(cfg, dev, dtype)
    figures["speed"] = check_speed(lm, texts, 64 if not a.tiny else 8, 16 if not a.tiny else 4)
    print(f"analysis ÷ HF generate tokens/s: {figures['speed']['ratio']:.2f} (goal ≥ 0.8); "
          f"{figures['speed']['analysis_tok_s']:.0f} vs {figures['speed']['hf_tok_s']:.0f} tok/s", flush=True)
    figures["pruning"] = check_pruning(lm, 32 if not a.tiny else 4, 512 if not a.tiny else 16, 4)
    for spec, r in figures["pruning"].items():
        print(f"{spec}: {r['seconds_per_block']:.2f} s per block over {r['blocks']} blocks "
              f"(zeros {r['zero_frac']:.3f})", flush=True)
    del lm
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    figures["device_map"] = check_device_map(config(a.tiny, layers=8), dev, dtype, texts,
                                             "6GiB" if not a.tiny else "60000")
    dm = figures["device_map"]
    print(f"device map over {', '.join(dm['devices'])}: analysis {dm['analysis_s']:.1f} s; "
          f"max |Δ| of teacher-forced means vs one device {dm['max_abs_diff_teacher_forced_means']:.2e}")
    figures["total_s"] = time.perf_counter() - t_start
    print(f"total {figures['total_s']:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
