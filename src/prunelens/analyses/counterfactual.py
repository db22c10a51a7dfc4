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

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.errors import PrunelensError
from prunelens.metrics import hidden_metrics, logit_metrics
from prunelens.model.arch import Adapter
from prunelens.model.capture import capture
from prunelens.model.loading import LoadedModel
from prunelens.model.replay import recording_blocks, run_block, run_from
from prunelens.model.tokens import encode_prompts, left_pad, pad_id
from prunelens.prune import Modification, view_of
from prunelens.prune.drop import KINDS, DropPlan
from prunelens.prune.recipe import Calibration, prune_weights
from prunelens.prune.weights import WeightPatch, parse_weight_method
from prunelens.render import esc, html_page, img, save_figure, subplots, text, val
from prunelens.runs import check_out_dir, default_run_dir

SCHEMA = "prunelens.counterfactual/1"


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


def _means(m: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in m.items()}


@torch.inference_mode()
def counterfactual(lm: LoadedModel, prompts: Sequence[str], settings: CounterfactualSettings | None = None,
                   patch: WeightPatch | None = None, progress: bool = True) -> dict[str, Any]:
    """Per layer and kind: similarity of h, z, p when only that layer is replaced."""
    settings = settings or CounterfactualSettings()
    adapter = lm.adapter
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
        valid = mask.bool()
        t0 = time.perf_counter()
        inputs, kwargs, dense_out, h_d, z_d = _dense_pass(lm, ids, mask)
        t_dense += time.perf_counter() - t0
        w = int(valid.sum())
        n_tok += w
        t0 = time.perf_counter()
        for kind in kinds:
            for i in range(L):
                mod = single_layer(kind, i, adapter, patch)
                with view_of(adapter, mod):
                    out_i = run_block(adapter.layers[i], inputs[i], kwargs[i])
                x = run_from(adapter, i + 1, out_i, kwargs)
                row = _layer_row(adapter, dense_out[i][valid], out_i[valid], h_d, z_d, x, valid, T)
                acc = sums[kind][i]
                for k, v in row.items():
                    acc[k] = acc.get(k, 0.0) + float(v.sum())
                bar.update(1)
        t_cf += time.perf_counter() - t0
    bar.close()
    per_kind = {kind: _columns(sums[kind], n_tok) for kind in kinds}
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


def _dense_pass(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, ...]:
    """One dense forward of a batch: every block's input and keyword arguments, every block's output,
    and h and z of the valid tokens."""
    adapter, L = lm.adapter, lm.adapter.n_layers
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    valid = mask.bool()
    with recording_blocks(adapter, inputs_of=range(L)) as calls, capture(adapter, [f"resid.{L}"]) as store:
        lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
    inputs, kwargs = [c[-1] for c in calls.inputs], [c[-1] for c in calls.kwargs]
    x_last = store[f"resid.{L}"]  # dense output of the last block
    dense_out = [*inputs[1:], x_last]  # dense output of block i = input of block i + 1
    h_d = adapter.final_norm(x_last)[valid]
    z_d = adapter.final_logits(x_last)[valid].float()
    return inputs, kwargs, dense_out, h_d, z_d


def _layer_row(adapter: Adapter, dense_local: torch.Tensor, local: torch.Tensor, h_d: torch.Tensor,
               z_d: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, T: float) -> dict[str, torch.Tensor]:
    """One replaced layer against the dense model, per valid token: right after the layer (``local``),
    at the final norm (h), after the LM head (z) and in p; ``x`` is the last block's output (the head
    runs on the whole padded batch, then the padding is dropped, as the dense side did)."""
    lm_ = hidden_metrics(dense_local, local)
    hm = hidden_metrics(h_d, adapter.final_norm(x)[valid])
    z_p = adapter.final_logits(x)[valid].float()
    zm = hidden_metrics(z_d, z_p)
    pm = logit_metrics(z_d, z_p, (T,), 10, light=True, chunk_rows=64)
    return {"cos_local": lm_["cos"], "orth_frac_local": lm_["orth_frac"],
            "cos_h": hm["cos"], "orth_frac_h": hm["orth_frac"], "rel_l2_h": hm["rel_l2"],
            "cos_z": zm["cos"], "orth_frac_z": zm["orth_frac"], "rel_l2_z": zm["rel_l2"],
            "cos_zc": pm["cos_zc"], "cos_p": pm[f"cos_p@{T:g}"], "kl": pm[f"kl@{T:g}"],
            "top1_agree": pm["top1_agree"]}


def _columns(sums: list[dict[str, float]], n_tok: int) -> dict[str, list[Any]]:
    """Per-layer token sums of one kind as per-layer means, one column per metric."""
    rows = [{k: v / n_tok for k, v in acc.items()} for acc in sums]
    cols: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in rows[0]}
    cols["layer"] = list(range(len(sums)))
    cols["head_attenuation"] = [z / h if h > 0 else None for z, h in
                                zip(cols["orth_frac_z"], cols["orth_frac_h"], strict=True)]
    return cols


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


SPACES = (("h", "hidden h (final norm)", "tab:blue"), ("z", "logits z", "tab:orange"),
          ("p", "probabilities p", "tab:red"))


KIND_TITLES = {"attn": "attention replaced", "mlp": "MLP replaced", "block": "whole block replaced",
               "weights": "weights replaced"}


def _pos(v: list[Any]) -> np.ndarray:
    a = np.array([np.nan if x is None else x for x in v], dtype=float)
    return np.where(a > 0, a, np.nan)


def _per_kind_figure(result: dict[str, Any], path: Path, draw: Any, xlabel: str, ylabel: str,
                     title: str) -> Path:
    """One panel per replaced kind; ``draw(ax, columns)`` plots that kind's per-layer curves."""
    kinds = list(result["kinds"])
    fig, axes = subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        draw(ax, result["kinds"][kind])
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _draw_spaces(ax: Any, c: dict[str, Any]) -> None:
    for s, label, color in SPACES:
        ax.plot(c["layer"], _pos([1 - x for x in c[f"cos_{s}"]]), marker=".", color=color, label=label)
    ax.plot(c["layer"], _pos(c["kl"]), ls="--", color="black", lw=1, label="KL(p' || p)")
    ax.set_yscale("log")


def _draw_orthogonal(ax: Any, c: dict[str, Any]) -> None:
    ax.plot(c["layer"], c["orth_frac_local"], marker=".", label="Δh right after the layer")
    ax.plot(c["layer"], c["orth_frac_h"], marker=".", label="Δh at the final norm")
    ax.plot(c["layer"], c["orth_frac_z"], marker=".", label="Δz (after the LM head)")
    ax.set_ylim(0, 1.02)


def counterfactual_figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    """counterfactual.png (1 − cos in h, z, p per replaced layer) and deviation.png (orthogonal share)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    return [
        _per_kind_figure(result, fig_dir / "counterfactual.png", _draw_spaces,
                         "layer replaced (all others dense)", "1 − cos(dense, counterfactual)",
                         "Counterfactual layerwise transition: one layer replaced at a time"),
        _per_kind_figure(result, fig_dir / "deviation.png", _draw_orthogonal, "layer replaced",
                         "orthogonal share of ‖Δ‖²",
                         "Where the deviation lives: orthogonal vs parallel to the dense vector"),
    ]


def _g(x: Any) -> str:
    return text(x, ".4g")


_COLUMNS = ("layer", "cos_h", "cos_z", "cos_p", "kl", "top1_agree", "orth_frac_local", "orth_frac_h", "orth_frac_z")
# what the counterfactual's view reads from a saved result (checked when ``prunelens report`` reads it back)
FIELDS = {"model": "dict", "settings.n_prompts": "int", "settings.n_tokens": "int",
          "timing.counterfactual_s": "num", "timing.ratio_to_dense_forward_per_layer": "num?",
          **{f"kinds{{}}.{c}[]": "num?" for c in _COLUMNS},
          **{f"summary{{}}.median_1-cos.{s}": "num?" for s in "hzp"}, "summary{}.p_over_z": "num?",
          "summary{}.max_kl": "num?", "summary{}.median_head_attenuation?": "num"}


def counterfactual_reading(result: dict[str, Any]) -> list[str]:
    out = []
    for kind, s in result["summary"].items():
        m = s["median_1-cos"]
        att = s.get("median_head_attenuation")
        out.append(
            f"{KIND_TITLES.get(kind, kind)}: median 1−cos is {_g(m['h'])} in h, {_g(m['z'])} in z and "
            f"{_g(m['p'])} in p (p moves {_g(s['p_over_z'])}× as much as z). Most harmful layer "
            f"{text(s.get('most_harmful_layer'))} (KL {_g(s['max_kl'])})."
            + (f" The LM head keeps {_g(att)}× of the orthogonal share of the deviation." if att else ""))
    return out


def counterfactual_html(result: dict[str, Any], figs: list[Path]) -> str:
    rows = []
    for kind, c in result["kinds"].items():
        head = "".join(f"<th>{h}</th>" for h in ("layer", "cos h", "cos z", "cos p", "KL", "top-1 agree",
                                                  "orth Δh local", "orth Δh", "orth Δz"))
        body = "".join(
            "<tr>" + "".join(f"<td>{val(v, '.4g')}</td>" for v in vs) + "</tr>"
            for vs in zip(*(c[k] for k in _COLUMNS), strict=False))
        rows.append(f"<h3>{esc(KIND_TITLES.get(kind, kind))}</h3><table><tr>{head}</tr>{body}</table>")
    t = result["timing"]
    return html_page("prunelens counterfactual",
        f"<h1>Counterfactual layerwise transition — {esc(result['model'].get('name', ''))}</h1>",
        '<p class="muted">Each layer is replaced alone in the otherwise dense model; the output is compared '
        "with the dense output over every prompt token, in the three spaces.</p>",
        "<h2>Reading</h2>", *(f'<div class="reading">{esc(x)}</div>' for x in counterfactual_reading(result)),
        "<h2>Figures</h2>", *(img(f) for f in figs),
        "<h2>Per layer</h2>", *rows,
        f'<p class="muted">{val(result["settings"]["n_prompts"])} prompts, '
        f'{val(result["settings"]["n_tokens"])} tokens; '
        f"counterfactual time {val(t['counterfactual_s'], '.1f')} s = "
        f"{val(t['ratio_to_dense_forward_per_layer'], '.4g')} × "
        "one dense forward per (kind, layer).</p>")


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(cf: argparse.ArgumentParser) -> None:
    options.add_model_args(cf)
    cf.add_argument("--kinds", default="attn,mlp", help="attn, mlp and/or block (default attn,mlp)")
    cf.add_argument("--prune", metavar="SPEC", help="also replace each layer's weights by this sparsity")
    cf.add_argument("--quant", metavar="SPEC", help="... or by this quantisation")
    cf.add_argument("--calib", help="calibration text for --prune/--quant")
    cf.add_argument("--calib-samples", type=int, default=32)
    cf.add_argument("--calib-len", type=int, default=256)
    cf.add_argument("--prompts", help="prompt file (.txt/.jsonl); default: the 8 built-in prompts")
    cf.add_argument("--limit", type=int, help="use only the first N prompts")
    cf.add_argument("--temperature", type=float, default=1.0)
    cf.add_argument("--batch-size", type=int, default=8)
    cf.add_argument("--no-chat-template", action="store_true")
    options.add_output_args(cf, "runs/<time>-<model>-counterfactual")


def _run(args: argparse.Namespace) -> int:
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    for k in kinds:
        if k not in KINDS:
            raise PrunelensError(f"unknown kind '{k}'; kinds: {', '.join(KINDS)}")
    if not kinds:
        raise PrunelensError(f"--kinds {args.kinds!r} names no kind; give one or more of {', '.join(KINDS)}")
    if args.prune and args.quant:
        raise PrunelensError("use either --prune or --quant, not both")
    spec = args.prune or args.quant
    method = parse_weight_method(spec) if spec else None  # parsed once, before the model loads
    options.temperatures(str(args.temperature))
    prompts = options.prompts(args)
    options.positive("--batch-size", args.batch_size)
    cal = Calibration(args.calib, args.calib_samples, args.calib_len, args.seed)
    cal.check()
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    lm = options.load(args)
    patch = prune_weights(lm, method, cal, progress=not args.quiet) if method else None
    settings = CounterfactualSettings(kinds=kinds, temperature=args.temperature, batch_size=args.batch_size,
                                      chat_template=not args.no_chat_template)
    result = counterfactual(lm, prompts, settings, patch, progress=not args.quiet)
    return ANALYSIS.finish(result, out or default_run_dir(args.model, "counterfactual"), args.overwrite)


def summary_lines(result: dict[str, Any]) -> list[str]:
    t = result["timing"]
    return [*counterfactual_reading(result),
            f"time {text(t['counterfactual_s'], '.1f')} s = {text(t['ratio_to_dense_forward_per_layer'], '.3f')} "
            "x one dense "
            "forward per (kind, layer)"]


ANALYSIS = register(Analysis(
    "counterfactual", "replace one layer at a time; similarity of h, z, p at the output per layer "
    "(paper Fig. 4) and the deviation split", _arguments, _run, schema=SCHEMA,
    figures=counterfactual_figures, html=counterfactual_html, summary=summary_lines, fields=FIELDS))
