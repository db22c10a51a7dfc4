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
    # a sequential trace measures h and p only: its z-space keys are absent (None here)
    first = {k: (tf.get(k) or [None])[0] for k in ("cos_h", "cos_z", "cos_zc", f"cos_p@{t}", f"kl@{t}",
                                                    f"taylor_kl@{t}")}
    divs = [p["first_divergence"] for p in result["per_prompt"]]
    return {
        "temperature": temps[0],
        "last_prompt_token": first,
        "min_layer_cos_h": min(result["layerwise"]["cos_h"]),
        "teacher_forced_mean": {k: _mean_valid(tf.get(k, [])) for k in
                                ("cos_h", "cos_z", "cos_zc", f"cos_p@{t}", f"kl@{t}", "top1_agree",
                                 "topk_overlap", "topk_spearman")},
        "free_running_mean": {k: _mean_valid(fr.get(k, [])) for k in
                              ("cos_h", "cos_z", "cos_zc", f"cos_p@{t}", f"kl@{t}", "token_agree")},
        "kl_growth_teacher_forced": _growth(tf[f"kl@{t}"]),
        "kl_growth_free_running": _growth(fr[f"kl@{t}"]),
        "prompts_diverged": sum(d is not None for d in divs),
        "median_first_divergence": float(np.median([d for d in divs if d is not None]))
        if any(d is not None for d in divs) else None,
        "field": field_statistics(result),
    }


def field_statistics(result: dict[str, Any]) -> dict[str, Any] | None:
    """The comparison statistics other tools report, under their names: teacher-forced KL both ways,
    top-K agreement, label in top-K (exllamav3), mean FDT and SDT (who-what-benchmark); None for
    results saved before they were measured."""
    tf = (result.get("comparison") or {}).get("teacher_forced")
    if not tf:
        return None
    records = result["per_prompt"]
    keys = ("kl", "rkl", "top1_agree", "top5_agree", "top10_agree", "label_top1", "label_top5", "label_top10")
    return {**{k: tf.get(k) for k in keys},
            "fdt_mean": _mean_valid([p.get("fdt") for p in records]),
            "sdt_mean": _mean_valid([p.get("sdt") for p in records])}


def _growth(series: list[float | None]) -> float | None:
    """Mean KL over the second half of the steps ÷ mean over the first half."""
    xs = [v for v in series if v is not None]
    if len(xs) < 2:
        return None
    h = len(xs) // 2
    a, b = float(np.mean(xs[:h])), float(np.mean(xs[h:]))
    return b / a if a > 0 else None
