"""Counterfactual layerwise transition (the paper's Fig. 4) and where the deviation lives.

For each layer ℓ, only ℓ's attention (or MLP, or whole block, or its sparsified/quantised weights)
is replaced in the otherwise dense model, and the output is compared with the dense model's in the
three spaces: final hidden state h (after the final norm), logits z and probabilities p. Every
non-padding prompt token counts.

The dense forward runs once per batch and records each block's input and keyword arguments
(position embeddings, masks); the counterfactual for ℓ restarts from block ℓ's dense input, so only
blocks ≥ ℓ are recomputed — L(L+1)/2 block calls per kind instead of L² for L separate forwards.

Alongside: the orthogonal share of ‖Δ‖² (the part of the deviation perpendicular to the dense
vector) right after block ℓ, in the final h and in z, and the LM head's attenuation of it
(orthogonal share in z ÷ in h): the paper's observation is that the head removes much of the
orthogonal deviation, which is why z stays nearly parallel.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .analysis import encode_prompts, left_pad, pad_id
from .arch import Adapter
from .capture import capture, first_output
from .errors import PrunelensError
from .metrics import hidden_metrics, logit_metrics
from .models import LoadedModel
from .prune import Modification, view_of
from .prune.drop import DropPlan
from .prune.weights import WeightPatch

SCHEMA = "prunelens.counterfactual/1"
KINDS = ("attn", "mlp", "block")


@dataclass(frozen=True)
class CounterfactualSettings:
    kinds: tuple[str, ...] = ("attn", "mlp")
    temperature: float = 1.0
    batch_size: int = 8
    chat_template: bool = True
    max_prompt_tokens: int = 256


def layer_patch(patch: WeightPatch, adapter: Adapter, i: int) -> WeightPatch:
    """The part of a weight patch that belongs to block ``i``."""
    prefix = adapter.layer_path(i) + "."
    return WeightPatch(patch.method, {p: w for p, w in patch.weights.items() if p.startswith(prefix)})


def single_layer(kind: str, i: int, adapter: Adapter, patch: WeightPatch | None = None) -> Modification:
    """Replace only layer ``i``'s ``kind`` (attn/mlp/block drop, or ``weights`` from ``patch``)."""
    if kind == "weights":
        if patch is None:
            raise PrunelensError("the 'weights' counterfactual needs a weight patch (--prune or --quant)")
        return layer_patch(patch, adapter, i)
    if kind not in KINDS:
        raise PrunelensError(f"unknown counterfactual kind '{kind}'; kinds: {', '.join((*KINDS, 'weights'))}")
    return DropPlan(**{kind: (i,)})


@contextlib.contextmanager
def record_block_calls(adapter: Adapter) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """Record each block's input hidden states and keyword arguments during the next forward."""
    inputs: list[torch.Tensor] = [None] * adapter.n_layers  # type: ignore[list-item]
    kwargs: list[dict[str, Any]] = [{} for _ in range(adapter.n_layers)]

    def hook(i: int):
        def fn(module, args, kw):
            inputs[i] = args[0] if args else kw["hidden_states"]
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(adapter.layers)]
    try:
        yield inputs, kwargs
    finally:
        for h in handles:
            h.remove()


def _run_from(adapter: Adapter, start: int, x: torch.Tensor,
              kwargs: Sequence[dict[str, Any]]) -> torch.Tensor:
    for j in range(start, adapter.n_layers):
        x = first_output(adapter.layers[j](x, **kwargs[j]))
    return x


def _means(m: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in m.items()}


@torch.inference_mode()
def counterfactual(lm: LoadedModel, prompts: Sequence[str], settings: CounterfactualSettings | None = None,
                   patch: WeightPatch | None = None, progress: bool = True) -> dict[str, Any]:
    """Per layer and kind: similarity of h, z, p when only that layer is replaced."""
    settings = settings or CounterfactualSettings()
    adapter, model = lm.adapter, lm.model
    extra = ("weights",) if patch is not None and "weights" not in settings.kinds else ()
    kinds = tuple(settings.kinds) + extra
    for k in kinds:
        single_layer(k, 0, adapter, patch)  # one-line error for an unknown kind or a missing patch
    if not prompts:
        raise PrunelensError("no prompts given")
    L = adapter.n_layers
    T = settings.temperature
    encoded = [ids[-settings.max_prompt_tokens:]
               for ids in encode_prompts(lm.tokenizer, prompts, settings.chat_template)]
    sums: dict[str, list[dict[str, float]]] = {k: [{} for _ in range(L)] for k in kinds}
    n_tok = 0
    t_dense = t_cf = 0.0
    bar = tqdm(total=len(kinds) * L * ((len(encoded) + settings.batch_size - 1) // settings.batch_size),
               desc="counterfactual", unit="layer", disable=not progress)
    for b0 in range(0, len(encoded), settings.batch_size):
        ids, mask = left_pad(encoded[b0:b0 + settings.batch_size], pad_id(lm), lm.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        valid = mask.bool()
        t0 = time.perf_counter()
        with record_block_calls(adapter) as (inputs, kwargs), capture(adapter, [f"resid.{L}"]) as store:
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                  logits_to_keep=1)
        x_last = store[f"resid.{L}"]  # dense output of the last block
        dense_out = [*inputs[1:], x_last]  # dense output of block i = input of block i + 1
        h_d = adapter.final_norm(x_last)[valid]
        z_d = adapter.final_logits(x_last)[valid].float()
        t_dense += time.perf_counter() - t0
        w = int(valid.sum())
        n_tok += w
        t0 = time.perf_counter()
        for kind in kinds:
            for i in range(L):
                mod = single_layer(kind, i, adapter, patch)
                with view_of(adapter, mod):
                    out_i = first_output(adapter.layers[i](inputs[i], **kwargs[i]))
                x = _run_from(adapter, i + 1, out_i, kwargs)
                local = hidden_metrics(dense_out[i][valid], out_i[valid])
                hm = hidden_metrics(h_d, adapter.final_norm(x)[valid])
                z_p = adapter.final_logits(x)[valid].float()
                zm = hidden_metrics(z_d, z_p)
                pm = logit_metrics(z_d, z_p, (T,), 10, light=True, chunk_rows=64)
                row = {"cos_local": local["cos"], "orth_frac_local": local["orth_frac"],
                       "cos_h": hm["cos"], "orth_frac_h": hm["orth_frac"], "rel_l2_h": hm["rel_l2"],
                       "cos_z": zm["cos"], "orth_frac_z": zm["orth_frac"], "rel_l2_z": zm["rel_l2"],
                       "cos_zc": pm["cos_zc"], "cos_p": pm[f"cos_p@{T:g}"], "kl": pm[f"kl@{T:g}"],
                       "top1_agree": pm["top1_agree"]}
                acc = sums[kind][i]
                for k, v in row.items():
                    acc[k] = acc.get(k, 0.0) + float(v.sum())
                bar.update(1)
        t_cf += time.perf_counter() - t0
    bar.close()
    per_kind: dict[str, dict[str, list[float]]] = {}
    for kind in kinds:
        rows = [{k: v / n_tok for k, v in acc.items()} for acc in sums[kind]]
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        cols["layer"] = list(range(L))
        cols["head_attenuation"] = [z / h if h > 0 else None for z, h in
                                    zip(cols["orth_frac_z"], cols["orth_frac_h"], strict=True)]
        per_kind[kind] = cols
    per_layer = len(kinds) * L * t_dense
    return {
        "schema": SCHEMA,
        "model": lm.info,
        "settings": {**asdict(settings), "kinds": list(kinds), "n_prompts": len(prompts), "n_tokens": n_tok,
                     "weights": patch.to_dict() if patch is not None else None},
        "kinds": per_kind,
        "summary": _summary(per_kind),
        "timing": {"dense_forward_s": t_dense, "counterfactual_s": t_cf,
                   # vs. recomputing the whole model for every (kind, layer): the prefix-reuse gain
                   "ratio_to_dense_forward_per_layer": t_cf / per_layer if per_layer else None},
    }


def _summary(per_kind: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out = {}
    for kind, c in per_kind.items():
        omc = {s: np.array([1 - x for x in c[f"cos_{s}"]]) for s in ("h", "z", "p")}
        worst = int(np.argmax(c["kl"]))
        att = [a for a in c["head_attenuation"] if a is not None]
        out[kind] = {"median_1-cos": {s: float(np.median(v)) for s, v in omc.items()},
                     "p_over_z": float(np.median(omc["p"] / np.maximum(omc["z"], 1e-300))),
                     "most_harmful_layer": worst, "max_kl": float(c["kl"][worst]),
                     "median_head_attenuation": float(np.median(att)) if att else None}
    return out
