"""Figures and HTML pages of the mechanistic analyses (counterfactual transition, deviation split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .report import CSS, _e, _img

SPACES = (("h", "hidden h (final norm)", "tab:blue"), ("z", "logits z", "tab:orange"),
          ("p", "probabilities p", "tab:red"))
KIND_TITLES = {"attn": "attention replaced", "mlp": "MLP replaced", "block": "whole block replaced",
               "weights": "weights replaced"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pos(v: list[Any]) -> np.ndarray:
    a = np.array([np.nan if x is None else x for x in v], dtype=float)
    return np.where(a > 0, a, np.nan)


def counterfactual_figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    """counterfactual.png (1 − cos in h, z, p per replaced layer) and deviation.png (orthogonal share)."""
    plt = _plt()
    fig_dir.mkdir(parents=True, exist_ok=True)
    kinds = list(result["kinds"])
    paths = []
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        c = result["kinds"][kind]
        for s, label, color in SPACES:
            ax.plot(c["layer"], _pos([1 - x for x in c[f"cos_{s}"]]), marker=".", color=color, label=label)
        ax.plot(c["layer"], _pos(c["kl"]), ls="--", color="black", lw=1, label="KL(p' || p)")
        ax.set_yscale("log")
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=10)
        ax.set_xlabel("layer replaced (all others dense)")
    axes[0][0].set_ylabel("1 − cos(dense, counterfactual)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Counterfactual layerwise transition: one layer replaced at a time", fontsize=11)
    fig.tight_layout()
    paths.append(fig_dir / "counterfactual.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        c = result["kinds"][kind]
        ax.plot(c["layer"], c["orth_frac_local"], marker=".", label="Δh right after the layer")
        ax.plot(c["layer"], c["orth_frac_h"], marker=".", label="Δh at the final norm")
        ax.plot(c["layer"], c["orth_frac_z"], marker=".", label="Δz (after the LM head)")
        ax.set_ylim(0, 1.02)
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=10)
        ax.set_xlabel("layer replaced")
    axes[0][0].set_ylabel("orthogonal share of ‖Δ‖²")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Where the deviation lives: orthogonal vs parallel to the dense vector", fontsize=11)
    fig.tight_layout()
    paths.append(fig_dir / "deviation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _g(x: Any) -> str:
    return "—" if x is None else f"{x:.4g}"


def counterfactual_reading(result: dict[str, Any]) -> list[str]:
    out = []
    for kind, s in result["summary"].items():
        m = s["median_1-cos"]
        att = s.get("median_head_attenuation")
        out.append(
            f"{KIND_TITLES.get(kind, kind)}: median 1−cos is {_g(m['h'])} in h, {_g(m['z'])} in z and "
            f"{_g(m['p'])} in p (p moves {_g(s['p_over_z'])}× as much as z). Most harmful layer "
            f"{s['most_harmful_layer']} (KL {_g(s['max_kl'])})."
            + (f" The LM head keeps {_g(att)}× of the orthogonal share of the deviation." if att else ""))
    return out


def counterfactual_html(result: dict[str, Any], figs: list[Path]) -> str:
    rows = []
    for kind, c in result["kinds"].items():
        head = "".join(f"<th>{h}</th>" for h in ("layer", "cos h", "cos z", "cos p", "KL", "top-1 agree",
                                                  "orth Δh local", "orth Δh", "orth Δz"))
        body = "".join(
            "<tr>" + "".join(f"<td>{_g(v)}</td>" for v in (
                c["layer"][i], c["cos_h"][i], c["cos_z"][i], c["cos_p"][i], c["kl"][i], c["top1_agree"][i],
                c["orth_frac_local"][i], c["orth_frac_h"][i], c["orth_frac_z"][i])) + "</tr>"
            for i in range(len(c["layer"])))
        rows.append(f"<h3>{_e(KIND_TITLES.get(kind, kind))}</h3><table><tr>{head}</tr>{body}</table>")
    t = result["timing"]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>prunelens counterfactual</title><style>{CSS}</style></head><body>",
        f"<h1>Counterfactual layerwise transition — {_e(str(result['model'].get('name', '')))}</h1>",
        '<p class="muted">Each layer is replaced alone in the otherwise dense model; the output is compared '
        "with the dense output over every prompt token, in the three spaces.</p>",
        "<h2>Reading</h2>", *(f'<div class="reading">{_e(x)}</div>' for x in counterfactual_reading(result)),
        "<h2>Figures</h2>", *(_img(f) for f in figs),
        "<h2>Per layer</h2>", *rows,
        f'<p class="muted">{result["settings"]["n_prompts"]} prompts, '
        f'{result["settings"]["n_tokens"]} tokens; '
        f"counterfactual time {t['counterfactual_s']:.1f} s = {_g(t['ratio_to_dense_forward_per_layer'])} × "
        "one dense forward per (kind, layer).</p>",
        "</body></html>"])
