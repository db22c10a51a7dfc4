"""Dense vs pruned through h → z → p, per layer on the prompts and per decoding step.

One model, two views (``pruned_view`` swaps modules, no weight is copied). Per batch of prompts:

1. Prefill dense and pruned once each, recording the residual stream at every layer: cosine and
   the parallel/orthogonal split of Δh per layer over all prompt tokens, plus the logit lens
   z_l = lm_head(norm(h_l)) at the last prompt token.
2. Decode with the KV cache, both views in lock-step. The pruned view runs two rows per prompt:
   *teacher-forced* (fed the dense model's greedy tokens) and *free-running* (fed its own). The
   dense view runs each prompt twice as well, so every pruned row has a dense row computed with
   the same batch shape: CPU kernels give batch-shape dependent rounding, and this keeps an empty
   plan exactly equal to the dense model (KL = 0, cos = 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
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
from prunelens.metrics import hidden_metrics, logit_metrics, pearson, spearman
from prunelens.model.capture import capture, resid_names
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_freed_memory
from prunelens.model.runtime import decode_attention, encode_prompts, eos_ids, forward_cached, left_pad, pad_id
from prunelens.prune import Modification, view_of
from prunelens.prune.drop import LAYER_INDEXING
from prunelens.version import __version__

SCHEMA = "prunelens.analysis/1"

CONVENTIONS = {
    "h": "final-norm output (input of the LM head), so z = lm_head(h)",
    "z": "output logits of the model; cos_zc is the cosine of mean-centred logits (shift-invariant like p)",
    "p": "softmax(z / T) for each temperature T",
    "kl": "KL(p_pruned || p_dense), natural log",
    "rkl": "KL(p_dense || p_pruned)",
    "dz": "z_pruned - z_dense",
    "taylor_kl": "Var_{p_dense}(dz) / (2 T^2)",
    "taylor_cos": "Var_r(dz) / (2 T^2), r proportional to p_dense^2; estimates 1 - cos(p)",
    "var_topk": "variance of dz over the top-k dense tokens, equal weights",
    "layer_index": "layerwise index l: residual stream before block l (0 = embeddings); "
                   "l = n_layers is the last block's output, before the final norm",
    "logit_lens": "z_l = lm_head(final_norm(h_l)) at the last prompt token (no logit soft-capping)",
    "drop_indices": LAYER_INDEXING,
    "step": "decoding step t = 1..N: the distribution of the t-th generated token; step 1 is "
            "the last prompt position",
    "teacher_forced": "pruned model fed the dense model's greedy tokens",
    "free_running": "each model fed its own greedy tokens",
    "valid_steps": "teacher-forced steps count until the dense model has emitted EOS; "
                   "free-running steps until either model has",
}


@dataclass
class AnalysisSettings:
    temperatures: tuple[float, ...] = (1.0,)
    max_new_tokens: int = 32
    batch_size: int = 8
    topk: int = 10
    chat_template: bool = True
    logit_lens: bool = True
    seed: int = 0

    def validate(self) -> None:
        if not self.temperatures:
            raise PrunelensError("at least one temperature is needed")
        for t in self.temperatures:
            if not (t > 0 and math.isfinite(t)):
                raise PrunelensError(f"temperature must be positive, got {t}")
        if self.max_new_tokens < 1:
            raise PrunelensError(f"--steps must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise PrunelensError(f"--batch-size must be at least 1, got {self.batch_size}")


# --- tokenisation ------------------------------------------------------------------------------


# --- forward passes ----------------------------------------------------------------------------


def metric_chunk_rows(z: torch.Tensor) -> int:
    """Rows per vocabulary-wide metric pass: one on the CPU (its float64 temporaries stay in cache,
    measured fastest), on an accelerator as many as keep each temporary near 2^23 numbers, since
    there a pass per row is one kernel launch per op per row and launches dominate."""
    return 1 if z.device.type == "cpu" else max(1, (1 << 23) // max(1, z.shape[-1]))


def step_metrics(hd: torch.Tensor, hp: torch.Tensor, zd: torch.Tensor, zp: torch.Tensor,
                 settings: AnalysisSettings) -> dict[str, torch.Tensor]:
    m = {f"{k}_h": v for k, v in hidden_metrics(hd, hp).items()}
    m.update(logit_metrics(zd, zp, settings.temperatures, settings.topk, chunk_rows=metric_chunk_rows(zd)))
    return m


# --- the analysis ------------------------------------------------------------------------------


def _nanmean(a: np.ndarray, valid: np.ndarray) -> tuple[list[float | None], list[int]]:
    """Mean over prompts (axis 0) of a (prompts, steps) array, counting only valid cells."""
    n = valid.sum(0)
    s = np.where(valid, a, 0.0).sum(0)
    mean = [float(x / c) if c else None for x, c in zip(s, n, strict=True)]
    return mean, [int(c) for c in n]


def analyze(
    lm: LoadedModel,
    plan: Modification,
    prompts: Sequence[str],
    settings: AnalysisSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare the dense model with ``plan`` (any modification) applied; returns a JSON-ready dict."""
    with decode_attention(lm.device):
        return _analyze(lm, plan, prompts, settings, progress)


@torch.inference_mode()
def _analyze(lm: LoadedModel, plan: Modification, prompts: Sequence[str], settings: AnalysisSettings | None,
             progress: bool) -> dict[str, Any]:
    from transformers import DynamicCache

    settings = settings or AnalysisSettings()
    settings.validate()
    if not prompts:
        raise PrunelensError("no prompts to analyse")
    plan.validate(lm.adapter.n_layers)
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    model, adapter, dev = lm.model, lm.adapter, lm.device
    n_layers, N = adapter.n_layers, settings.max_new_tokens
    pad = pad_id(lm)
    eos = torch.tensor(sorted(eos_ids(lm)) or [-1], device=dev)
    encoded = encode_prompts(lm.tokenizer, prompts, settings.chat_template)

    layer_acc: dict[str, list[list[torch.Tensor]]] = defaultdict(lambda: [[] for _ in range(n_layers + 1)])
    # per mode: metric -> list of (B, N) arrays; plus validity and tokens
    step_acc: dict[str, dict[str, list[np.ndarray]]] = {
        "teacher_forced": defaultdict(list), "free_running": defaultdict(list)}
    per_prompt: list[dict[str, Any]] = []
    n_batches = math.ceil(len(encoded) / settings.batch_size)
    bar = tqdm(total=n_batches * N, desc=f"analyze {plan.label()}", unit="step", disable=not progress)

    for b0 in range(0, len(encoded), settings.batch_size):
        batch = encoded[b0:b0 + settings.batch_size]
        B = len(batch)
        ids, mask = left_pad(batch, pad, dev)
        valid_tok = mask.bool()
        names = resid_names(n_layers) + ["final"]

        # 1. prefill, recording the residual stream of both views
        cache_d, cache_p = DynamicCache(config=model.config), DynamicCache(config=model.config)
        with capture(adapter, names) as dense_states:
            zd = forward_cached(model, ids, mask, cache_d)
        with view_of(adapter, plan), capture(adapter, names) as pr_states:
            zp = forward_cached(model, ids, mask, cache_p)
        for li in range(n_layers + 1):
            a, b = dense_states[f"resid.{li}"], pr_states[f"resid.{li}"]
            for k, v in hidden_metrics(a[valid_tok], b[valid_tok]).items():
                layer_acc[k + "_h"][li].append(v)
        if settings.logit_lens:  # layers go through the LM head in a few batched matmuls
            per_chunk = max(1, 64 // B)
            for l0 in range(0, n_layers + 1, per_chunk):
                ls = range(l0, min(l0 + per_chunk, n_layers + 1))
                lens_d = torch.stack([dense_states[f"resid.{li}"][:, -1] for li in ls])
                lens_p = torch.stack([pr_states[f"resid.{li}"][:, -1] for li in ls])
                lens = logit_metrics(adapter.logits_from_hidden(lens_d).float(),
                                     adapter.logits_from_hidden(lens_p).float(),
                                     settings.temperatures, settings.topk, light=True)
                for k, v in lens.items():  # v: (layers in chunk, B)
                    for j, li in enumerate(ls):
                        layer_acc["lens_" + k][li].append(v[j])
        hd, hp = dense_states["final"][:, -1], pr_states["final"][:, -1]
        del dense_states, pr_states

        # 2. lock-step decoding: rows (2i, 2i+1) = (teacher-forced, free-running) of prompt i. The dense
        # side runs both rows too (the same tokens), so that both sides see the same batch shapes and an
        # empty modification compares bit-identical numbers. Per-step metrics stay on the device until
        # the batch ends (one copy, no synchronisation per metric and step).
        for c in (cache_d, cache_p):
            c.batch_repeat_interleave(2)
        mask2 = mask.repeat_interleave(2, 0)
        zd2, zp2 = zd.repeat_interleave(2, 0), zp.repeat_interleave(2, 0)
        hd2, hp2 = hd.repeat_interleave(2, 0), hp.repeat_interleave(2, 0)
        rows: dict[str, dict[str, list[torch.Tensor]]] = {"teacher_forced": defaultdict(list),
                                                          "free_running": defaultdict(list)}
        ended_d = torch.zeros(B, dtype=torch.bool, device=dev)
        ended_p = torch.zeros(B, dtype=torch.bool, device=dev)
        toks_d, toks_p = [], []
        for t in range(1, N + 1):
            m = step_metrics(hd2, hp2, zd2, zp2, settings)
            tok_d, tok_p = zd2[0::2].argmax(-1), zp2[1::2].argmax(-1)
            valid_tf, valid_fr = ~ended_d, ~(ended_d | ended_p)
            for mode, sl, valid in (("teacher_forced", slice(0, None, 2), valid_tf),
                                    ("free_running", slice(1, None, 2), valid_fr)):
                for k, v in m.items():
                    rows[mode][k].append(v[sl])
                rows[mode]["valid"].append(valid)
            rows["free_running"]["token_agree"].append((tok_d == tok_p).double())
            toks_d.append(tok_d)
            toks_p.append(tok_p)
            ended_d |= torch.isin(tok_d, eos)
            ended_p |= torch.isin(tok_p, eos)
            bar.update(1)
            if t == N or bool((ended_d & ended_p).all()):
                bar.update(N - t)
                break
            feed_d = torch.stack([tok_d, tok_d], 1).reshape(-1, 1)
            feed_p = torch.stack([tok_d, tok_p], 1).reshape(-1, 1)
            mask2 = torch.cat([mask2, mask2.new_ones(2 * B, 1)], 1)
            with capture(adapter, ["final"]) as s:
                zd2 = forward_cached(model, feed_d, mask2, cache_d)
            hd2 = s["final"][:, -1]
            with view_of(adapter, plan), capture(adapter, ["final"]) as s:
                zp2 = forward_cached(model, feed_p, mask2, cache_p)
            hp2 = s["final"][:, -1]
            if dev.type == "cpu":  # the KV cache grows on the CPU heap only there
                release_freed_memory()

        for mode, d in rows.items():
            for k, seq in d.items():
                arr = torch.stack(seq, 1).cpu().numpy().astype(np.float64)  # (B, steps_done)
                filler = np.full((B, N - arr.shape[1]), np.nan if k != "valid" else 0.0)
                step_acc[mode][k].append(np.concatenate([arr, filler], 1))
        td, tp = torch.stack(toks_d, 1).cpu(), torch.stack(toks_p, 1).cpu()
        fr_valid = torch.stack(rows["free_running"]["valid"], 1).cpu().numpy()
        for r in range(B):
            diverged = [i for i in range(td.shape[1]) if fr_valid[r, i] and td[r, i] != tp[r, i]]
            per_prompt.append({
                "prompt": prompts[b0 + r],
                "n_prompt_tokens": len(batch[r]),
                "dense_text": _decode_until_eos(lm.tokenizer, td[r], eos),
                "pruned_text": _decode_until_eos(lm.tokenizer, tp[r], eos),
                "first_divergence": diverged[0] + 1 if diverged else None,
                "valid_steps_free_running": int(fr_valid[r].sum()),
            })
    bar.close()

    layerwise = {"layer": list(range(n_layers + 1))}
    for k, per_layer in layer_acc.items():
        layerwise[k] = torch.stack([torch.cat(v).double().mean() for v in per_layer]).tolist()

    stepwise: dict[str, Any] = {}
    taylor: dict[str, Any] = {}
    for mode, d in step_acc.items():
        valid = np.concatenate(d["valid"], 0).astype(bool)
        plain = {k: np.concatenate(d[k], 0)[valid] for k in BASELINE_KEYS if k in d}
        taylor[mode] = {
            f"{t:g}": taylor_check({**{k: np.concatenate(d[f"{k}@{t:g}"], 0)[valid] for k in TAYLOR_KEYS},
                                    **plain})
            for t in settings.temperatures}
    for mode, d in step_acc.items():
        valid = np.concatenate(d["valid"], 0).astype(bool)
        out: dict[str, Any] = {"step": list(range(1, N + 1))}
        for k, parts in d.items():
            if k == "valid":
                continue
            out[k], out["n"] = _nanmean(np.concatenate(parts, 0), valid)
        stepwise[mode] = out

    elapsed = time.perf_counter() - t0
    result = {
        "schema": SCHEMA,
        "prunelens_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conventions": CONVENTIONS,
        "model": lm.info,
        "pruning": plan.to_dict(),
        "settings": {**asdict(settings), "temperatures": list(settings.temperatures),
                     "n_prompts": len(prompts)},
        "layerwise": layerwise,
        "stepwise": stepwise,
        "taylor": taylor,
        "per_prompt": per_prompt,
        "timing": {"analysis_s": elapsed},
    }
    result["summary"] = summarize(result)
    return result


TAYLOR_KEYS = ("kl", "taylor_kl", "one_minus_cos_p", "taylor_cos")
# cruder predictors the paper compares against: plain variance of Δz over the whole vocabulary, and
# over the dense top-k tokens (no probability weighting)
BASELINE_KEYS = ("var_uniform", "var_topk")


def taylor_check(cells: dict[str, np.ndarray]) -> dict[str, Any]:
    """How well Var_p(Δz)/2T² predicts KL and Var_r(Δz)/2T² predicts 1 − cos(p), over every
    (prompt, step) cell: Spearman correlation, Pearson correlation of the log10 values (positive
    pairs), median estimate/measured ratio, and the points themselves."""
    kl, tk, omc, tc = (torch.from_numpy(cells[k]) for k in TAYLOR_KEYS)
    ratio_kl = (tk / kl)[kl > 0]
    ratio_cos = (tc / omc)[omc > 0]

    def log_pearson(x: torch.Tensor, y: torch.Tensor) -> float:  # the values span many decades
        keep = (x > 0) & (y > 0)
        return pearson(x[keep].log10(), y[keep].log10())

    baselines = {}
    for k in BASELINE_KEYS:
        if k in cells:
            v = torch.from_numpy(cells[k])
            baselines[f"{k}_kl_spearman"] = spearman(v, kl)
            baselines[f"{k}_kl_pearson"] = log_pearson(v, kl)
    return {
        "n": int(kl.numel()),
        "kl_spearman": spearman(tk, kl), "kl_pearson": log_pearson(tk, kl),
        "cos_spearman": spearman(tc, omc), "cos_pearson": log_pearson(tc, omc), **baselines,
        "kl_ratio_median": float(ratio_kl.median()) if ratio_kl.numel() else None,
        "cos_ratio_median": float(ratio_cos.median()) if ratio_cos.numel() else None,
        "points": {k: [float(v) for v in cells[k]] for k in TAYLOR_KEYS},
    }


def _decode_until_eos(tokenizer: Any, toks: torch.Tensor, eos: torch.Tensor) -> str:
    ids = toks.tolist()
    for i, t in enumerate(ids):
        if t in eos.tolist():
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _mean_valid(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return float(np.mean(xs)) if xs else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: the three spaces at the last prompt token, and decoding-step averages."""
    temps = result["settings"]["temperatures"]
    t = f"{temps[0]:g}"
    tf, fr = result["stepwise"]["teacher_forced"], result["stepwise"]["free_running"]
    first = {k: tf[k][0] for k in ("cos_h", "cos_z", "cos_zc", f"cos_p@{t}", f"kl@{t}", f"taylor_kl@{t}")}
    divs = [p["first_divergence"] for p in result["per_prompt"]]
    return {
        "temperature": temps[0],
        "last_prompt_token": first,
        "min_layer_cos_h": min(result["layerwise"]["cos_h"]),
        "teacher_forced_mean": {k: _mean_valid(tf[k]) for k in
                                ("cos_h", "cos_z", "cos_zc", f"cos_p@{t}", f"kl@{t}", "top1_agree",
                                 "topk_overlap", "topk_spearman")},
        "free_running_mean": {k: _mean_valid(fr[k]) for k in
                              ("cos_h", "cos_z", "cos_zc", f"cos_p@{t}", f"kl@{t}", "token_agree")},
        "kl_growth_teacher_forced": _growth(tf[f"kl@{t}"]),
        "kl_growth_free_running": _growth(fr[f"kl@{t}"]),
        "prompts_diverged": sum(d is not None for d in divs),
        "median_first_divergence": float(np.median([d for d in divs if d is not None]))
        if any(d is not None for d in divs) else None,
    }


def _growth(series: list[float | None]) -> float | None:
    """Mean KL over the second half of the steps ÷ mean over the first half."""
    xs = [v for v in series if v is not None]
    if len(xs) < 2:
        return None
    h = len(xs) // 2
    a, b = float(np.mean(xs[:h])), float(np.mean(xs[h:]))
    return b / a if a > 0 else None


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(a: argparse.ArgumentParser) -> None:
    options.add_model_args(a)
    options.add_recipe_args(a)
    a.add_argument("--prompts", help="prompt file (.txt: one per line; .jsonl: 'prompt'/'text'/"
                                     "'question' field); default: 8 built-in prompts")
    a.add_argument("--limit", type=int, help="use only the first N prompts")
    a.add_argument("--steps", type=int, default=32, help="decoding steps per prompt (default 32)")
    a.add_argument("--temps", default="1", help="temperatures, comma-separated, e.g. 1,0.5 (default 1)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--topk", type=int, default=10, help="k for the top-k variance of dz (default 10)")
    a.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts raw even if the tokenizer has a chat template")
    options.add_output_args(a, "runs/<time>-<model>-<pruning>")
    a.add_argument("--save-pruned", metavar="DIR", help="also save the pruned checkpoint here")


def _run(args: argparse.Namespace) -> int:
    from prunelens.prune.recipe import build, save_modified
    from prunelens.runs import check_out_dir, check_writable_parent, default_run_dir, write_run

    # Validate everything cheap before loading a model.
    recipe, cal = options.recipe(args), options.calibration(args)
    settings = AnalysisSettings(
        temperatures=options.temperatures(args.temps), max_new_tokens=options.positive("--steps", args.steps),
        batch_size=options.positive("--batch-size", args.batch_size), topk=options.positive("--topk", args.topk),
        chat_template=not args.no_chat_template, seed=args.seed)
    prompts = options.prompts(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    else:
        check_writable_parent(default_run_dir(args.model, "dense"))
    if args.save_pruned:
        options.check_checkpoint_dir(Path(args.save_pruned), args.overwrite)

    lm = options.load(args)
    plan = build(lm, recipe, cal, progress=not args.quiet)
    print(f"pruning: {plan.label()}", file=sys.stderr)
    result = analyze(lm, plan, prompts, settings, progress=not args.quiet)
    out = out or default_run_dir(args.model, plan.label())
    write_run(result, out, overwrite=args.overwrite)
    if args.save_pruned:
        save_modified(lm, plan, args.save_pruned)
    for line in summary_lines(result):
        print(line)
    print(f"  report: {out / 'report.html'}")
    return 0


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline the command prints: the three spaces at the last prompt token, then decoding."""
    fmt = options.fmt
    s = result["summary"]
    t = f"{s['temperature']:g}"
    last, tf, fr = s["last_prompt_token"], s["teacher_forced_mean"], s["free_running_mean"]
    return [
        f"model {result['model']['name']}  pruning {result['pruning']['label']}",
        f"  last prompt token : cos(h)={fmt(last['cos_h'])}  cos(z)={fmt(last['cos_z'])}  "
        f"cos(p)={fmt(last[f'cos_p@{t}'])}  KL@T={t}={fmt(last[f'kl@{t}'])} "
        f"(Taylor {fmt(last[f'taylor_kl@{t}'])})",
        f"  teacher-forced    : mean KL={fmt(tf[f'kl@{t}'])}  top-1 agreement={fmt(tf['top1_agree'])}",
        f"  free-running      : mean KL={fmt(fr[f'kl@{t}'])}  token agreement={fmt(fr['token_agree'])}  "
        f"diverged {s['prompts_diverged']}/{result['settings']['n_prompts']} prompts "
        f"(median first divergence step {fmt(s['median_first_divergence'])})",
    ]


def _figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    from prunelens.analyses.trace_view import make_figures

    return make_figures(result, fig_dir)


def _html(result: dict[str, Any], figs: list[Path]) -> str:
    from prunelens.analyses.trace_view import render_html

    return render_html([(result, figs)])


register(Analysis("analyze", "trace dense vs pruned through h -> z -> p, per layer and step", _arguments, _run,
                  schema=SCHEMA, figures=_figures, html=_html, summary=summary_lines))
