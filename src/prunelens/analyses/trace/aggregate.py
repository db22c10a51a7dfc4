"""Step 3 of a trace: per-step values of every batch gathered, then averaged over prompts.

A (prompt, step) cell counts only while it is valid (see ``CONVENTIONS["valid_steps"]``); the
Taylor check reads every valid cell, the step averages count valid cells per step.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prunelens.analyses.trace.decode import MODES, Decoded
from prunelens.divergence import comparison_summary, first_divergent_token, share_of_divergent_tokens
from prunelens.metrics import pearson, spearman

TAYLOR_KEYS = ("kl", "taylor_kl", "one_minus_cos_p", "taylor_cos")
# cruder predictors the paper compares against: plain variance of Δz over the whole vocabulary, and
# over the dense top-k tokens (no probability weighting)
BASELINE_KEYS = ("var_uniform", "var_topk")

COMPARED = re.compile(r"top\d+_agree|label_top\d+")  # the step keys ``comparison`` summarises

# per mode: metric -> one (prompts in batch, steps) array per batch
StepAcc = dict[str, defaultdict[str, list[np.ndarray]]]


def step_accumulator() -> StepAcc:
    return {m: defaultdict(list) for m in MODES}


def add_steps(step_acc: StepAcc, decoded: Decoded, batch: int, steps: int) -> None:
    """One batch's per-step tensors as (batch, steps) float64 arrays, NaN (valid: 0) after the last step."""
    for mode, d in decoded.rows.items():
        for k, seq in d.items():
            arr = torch.stack(seq, 1).cpu().numpy().astype(np.float64)  # (B, steps_done)
            filler = np.full((batch, steps - arr.shape[1]), np.nan if k != "valid" else 0.0)
            step_acc[mode][k].append(np.concatenate([arr, filler], 1))


def prompt_records(decoded: Decoded, prompts: Sequence[str], lengths: Sequence[int], tokenizer: Any,
                   eos: torch.Tensor) -> list[dict[str, Any]]:
    """Per prompt of one batch: both greedy texts and where the free-running tokens first differ."""
    td, tp = torch.stack(decoded.toks_d, 1).cpu(), torch.stack(decoded.toks_p, 1).cpu()
    fr_valid = torch.stack(decoded.rows["free_running"]["valid"], 1).cpu().numpy()
    out = []
    for r, prompt in enumerate(prompts):
        diverged = [i for i in range(td.shape[1]) if fr_valid[r, i] and td[r, i] != tp[r, i]]
        ref_ids, cand_ids = until_eos(td[r], eos), until_eos(tp[r], eos)
        out.append({
            "prompt": prompt,
            "n_prompt_tokens": lengths[r],
            "dense_text": decode_until_eos(tokenizer, td[r], eos),
            "pruned_text": decode_until_eos(tokenizer, tp[r], eos),
            "first_divergence": diverged[0] + 1 if diverged else None,
            "valid_steps_free_running": int(fr_valid[r].sum()),
            # who-what-benchmark's names for the same question, on the greedy token ids
            "fdt": first_divergent_token(ref_ids, cand_ids),
            "sdt": share_of_divergent_tokens(ref_ids, cand_ids),
        })
    return out


def until_eos(toks: torch.Tensor, eos: torch.Tensor) -> list[int]:
    """A greedy continuation's token ids up to (without) its first EOS."""
    ids, stop = toks.tolist(), set(eos.tolist())
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


def decode_until_eos(tokenizer: Any, toks: torch.Tensor, eos: torch.Tensor) -> str:
    return tokenizer.decode(until_eos(toks, eos), skip_special_tokens=True)


def nanmean(a: np.ndarray, valid: np.ndarray) -> tuple[list[float | None], list[int]]:
    """Mean over prompts (axis 0) of a (prompts, steps) array, counting only valid cells."""
    n = valid.sum(0)
    s = np.where(valid, a, 0.0).sum(0)
    mean = [float(x / c) if c else None for x, c in zip(s, n, strict=True)]
    return mean, [int(c) for c in n]


def taylor_per_mode(step_acc: StepAcc, temperatures: Sequence[float]) -> dict[str, Any]:
    """Per mode and temperature, the Taylor check over every valid (prompt, step) cell."""
    taylor: dict[str, Any] = {}
    for mode, d in step_acc.items():
        valid = np.concatenate(d["valid"], 0).astype(bool)
        plain = {k: np.concatenate(d[k], 0)[valid] for k in BASELINE_KEYS if k in d}
        taylor[mode] = {
            f"{t:g}": taylor_check({**{k: np.concatenate(d[f"{k}@{t:g}"], 0)[valid] for k in TAYLOR_KEYS},
                                    **plain})
            for t in temperatures}
    return taylor


def stepwise(step_acc: StepAcc, steps: int) -> dict[str, Any]:
    """Per mode, each metric's mean over valid prompts at every step, and how many were valid."""
    out: dict[str, Any] = {}
    for mode, d in step_acc.items():
        valid = np.concatenate(d["valid"], 0).astype(bool)
        per: dict[str, Any] = {"step": list(range(1, steps + 1))}
        for k, parts in d.items():
            if k == "valid":
                continue
            per[k], per["n"] = nanmean(np.concatenate(parts, 0), valid)
        out[mode] = per
    return out


def comparison(step_acc: StepAcc, temperature: float) -> dict[str, Any]:
    """Per mode, the field's comparison statistics over every valid (prompt, step) cell: KL both
    ways, top-K agreement, label in top-K, their standard errors, and KL(ref ‖ cand) bucketed by
    the reference's top-token probability (``divergence.comparison_summary``)."""
    t = f"{temperature:g}"
    out: dict[str, Any] = {}
    for mode, d in step_acc.items():
        valid = np.concatenate(d["valid"], 0).astype(bool)
        if not valid.any():
            continue
        keys = ["p_top_ref", *(k for k in d if COMPARED.fullmatch(k))]
        rows = {k: torch.from_numpy(np.concatenate(d[k], 0)[valid]) for k in keys}
        rows["kl"] = torch.from_numpy(np.concatenate(d[f"kl@{t}"], 0)[valid])
        rows["rkl"] = torch.from_numpy(np.concatenate(d[f"rkl@{t}"], 0)[valid])
        out[mode] = comparison_summary(rows)
    return out


def taylor_check(cells: dict[str, np.ndarray]) -> dict[str, Any]:
    """How well Var_p(Δz)/2T² predicts KL and Var_r(Δz)/2T² predicts 1 − cos(p), over every
    (prompt, step) cell: Spearman correlation, Pearson correlation of the log10 values (positive
    pairs), median estimate/measured ratio, and the points themselves."""
    kl, tk, omc, tc = (torch.from_numpy(cells[k]) for k in TAYLOR_KEYS)
    ratio_kl = (tk / kl)[kl > 0]
    ratio_cos = (tc / omc)[omc > 0]
    baselines = {}
    for k in BASELINE_KEYS:
        if k in cells:
            v = torch.from_numpy(cells[k])
            baselines[f"{k}_kl_spearman"] = spearman(v, kl)
            baselines[f"{k}_kl_pearson"] = _log_pearson(v, kl)
    return {
        "n": int(kl.numel()),
        "kl_spearman": spearman(tk, kl), "kl_pearson": _log_pearson(tk, kl),
        "cos_spearman": spearman(tc, omc), "cos_pearson": _log_pearson(tc, omc), **baselines,
        "kl_ratio_median": float(ratio_kl.median()) if ratio_kl.numel() else None,
        "cos_ratio_median": float(ratio_cos.median()) if ratio_cos.numel() else None,
        "points": {k: [float(v) for v in cells[k]] for k in TAYLOR_KEYS},
    }


def _log_pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of log10 values over the positive pairs (the values span many decades)."""
    keep = (x > 0) & (y > 0)
    return pearson(x[keep].log10(), y[keep].log10())
