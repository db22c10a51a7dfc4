"""A trace's headline numbers, computed from its saved result (so the page can redo it for old runs)."""

from __future__ import annotations

from typing import Any

import numpy as np


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
