"""Counterfactual sweep over all layers: prefix reuse vs one full forward per replaced layer.

The counterfactual restarts each replaced layer ℓ from the recorded dense input of block ℓ, so only
blocks ≥ ℓ run (L(L+1)/2 block calls per kind instead of L²). This measures, in one run on the
same prompts, the whole counterfactual (attention and MLP kinds, metrics included) against the
naive way: a full forward of the model with the one layer replaced, for every (kind, layer), with
the same metrics — and reports the ratio, plus the counterfactual ÷ (kinds × L × one dense forward).

    python benchmarks/bench_counterfactual.py [--model smollm2-135m] [--prompts 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from prunelens import builtin_prompts, load_model
from prunelens.analyses.counterfactual import CounterfactualSettings, counterfactual, single_layer
from prunelens.metrics import hidden_metrics, logit_metrics
from prunelens.model.tokens import encode_prompts, left_pad, pad_id
from prunelens.prune import view_of


@torch.inference_mode()
def naive(lm, prompts, kinds, T=1.0) -> float:
    """One full forward per (kind, layer) with that layer replaced, same metrics over all tokens."""
    enc = encode_prompts(lm.tokenizer, prompts, True)
    ids, mask = left_pad(enc, pad_id(lm), lm.device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    valid = mask.bool()
    t0 = time.perf_counter()
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                   output_hidden_states=True)
    z_d, h_d = out.logits[valid].float(), out.hidden_states[-1][valid]
    for kind in kinds:
        for i in range(lm.adapter.n_layers):
            with view_of(lm.adapter, single_layer(kind, i, lm.adapter)):
                o = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                             output_hidden_states=True)
            hidden_metrics(h_d, o.hidden_states[-1][valid])
            hidden_metrics(z_d, o.logits[valid].float())
            logit_metrics(z_d, o.logits[valid].float(), (T,), 10, light=True, chunk_rows=64)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    lm = load_model(args.model)
    prompts = builtin_prompts()[: args.prompts]
    kinds = ("attn", "mlp")
    counterfactual(lm, prompts[:1], CounterfactualSettings(kinds=("attn",)), progress=False)  # warm-up
    t0 = time.perf_counter()
    settings = CounterfactualSettings(kinds=kinds, batch_size=len(prompts))
    res = counterfactual(lm, prompts, settings, progress=False)
    t_cf = time.perf_counter() - t0
    t_naive = naive(lm, prompts, kinds)
    L = lm.adapter.n_layers
    print(f"model {args.model}: {L} layers, kinds {kinds}, {len(prompts)} prompts, "
          f"{res['settings']['n_tokens']} tokens")
    print(f"counterfactual (prefix reuse)      {t_cf:7.2f} s")
    print(f"naive (full forward per layer)     {t_naive:7.2f} s")
    print(f"ratio counterfactual / naive       {t_cf / t_naive:7.3f}  "
          f"(share of block calls: {(L + 1) / (2 * L):.3f})")
    per_layer = res["timing"]["ratio_to_dense_forward_per_layer"]
    print(f"ratio to one dense forward per (kind, layer): {per_layer:.3f}")


if __name__ == "__main__":
    main()
