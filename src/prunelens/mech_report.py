"""Figures and HTML pages of the mechanistic analyses (counterfactual transition, deviation split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .report import (
    CSS,
    _atomic_write,
    _e,
    _img,
    analysis_page,
    html_page,
    read_json,
    report_from_run_dirs,
)

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


def _per_kind_figure(result: dict[str, Any], path: Path, draw: Any, xlabel: str, ylabel: str,
                     title: str) -> Path:
    """One panel per replaced kind; ``draw(ax, columns)`` plots that kind's per-layer curves."""
    plt = _plt()
    kinds = list(result["kinds"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        draw(ax, result["kinds"][kind])
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
    return html_page("prunelens counterfactual",
        f"<h1>Counterfactual layerwise transition — {_e(str(result['model'].get('name', '')))}</h1>",
        '<p class="muted">Each layer is replaced alone in the otherwise dense model; the output is compared '
        "with the dense output over every prompt token, in the three spaces.</p>",
        "<h2>Reading</h2>", *(f'<div class="reading">{_e(x)}</div>' for x in counterfactual_reading(result)),
        "<h2>Figures</h2>", *(_img(f) for f in figs),
        "<h2>Per layer</h2>", *rows,
        f'<p class="muted">{result["settings"]["n_prompts"]} prompts, '
        f'{result["settings"]["n_tokens"]} tokens; '
        f"counterfactual time {t['counterfactual_s']:.1f} s = {_g(t['ratio_to_dense_forward_per_layer'])} × "
        "one dense forward per (kind, layer).</p>")


def render_other_run(run_dir: Path) -> str | None:
    """The HTML page of a sweep, comparison, counterfactual or subspace run, re-rendered from its
    saved results (figures redrawn, nothing recomputed); None for an analysis run."""
    d = Path(run_dir)
    if (d / "sweep.json").is_file():
        from .sweep import SweepResult, SweepSpec, cell_path, load_cell
        from .sweep_report import write_outputs
        from .tasks.registry import TaskOptions

        m = read_json(d / "sweep.json")
        ident = m["identity"]
        opts = {**ident["options"], "prompts": tuple(ident["options"]["prompts"] or ()) or None}
        spec = SweepSpec(m["model"], m["method"], tuple(m["amounts"]), tuple(m["tasks"]), m["data_dir"],
                         TaskOptions(**opts), ident["importance"], ident["calib"], ident["calib_samples"],
                         ident["calib_len"])
        cells = [load_cell(cell_path(d, a, t)) for a in spec.amounts for t in spec.tasks
                 if cell_path(d, a, t).is_file()]
        write_outputs(SweepResult(spec, cells, d))
        return (d / "report.html").read_text(encoding="utf-8")
    if (d / "compare.json").is_file() and (d / "results.json").is_file():
        from .compare import compare_figure, compare_html

        combined = read_json(d / "results.json")
        return compare_html(combined, compare_figure(combined, d / "figures"))
    path = d / "results.json"
    if not path.is_file():
        return None
    result = read_json(path)
    schema = result.get("schema", "") if isinstance(result, dict) else ""
    if schema.startswith("prunelens.counterfactual"):
        figs, html = counterfactual_figures, counterfactual_html
    elif schema.startswith("prunelens.subspace"):
        from .subspace import subspace_figures, subspace_html

        figs, html = subspace_figures, subspace_html
    elif schema.startswith("prunelens.paired"):
        from .paired_eval import paired_figures, paired_html

        figs, html = paired_figures, paired_html
    elif schema.startswith("prunelens.advise"):
        from .advise import advise_html

        return advise_html(result, [])
    else:
        return None
    return html(result, figs(result, d / "figures"))


def rebuild_other_report(run_dir: Path) -> Path | None:
    """Rewrite report.html of a sweep, comparison, counterfactual or subspace run; None for an
    analysis run (the caller handles those)."""
    html = render_other_run(run_dir)
    if html is None:
        return None
    out = Path(run_dir) / "report.html"
    _atomic_write(out, html)
    return out


def _body(html: str) -> str:
    """The inside of <body> of one of our own pages (they are built by this package)."""
    a, b = html.find("<body>"), html.rfind("</body>")
    return html[a + len("<body>"):b] if a >= 0 and b > a else html


def combined_report(run_dirs: list[Path], out_html: Path) -> Path:
    """One page for runs of any kind: analysis runs side by side as usual, then every other run
    (sweep, comparison, counterfactual, subspace) in its own column, from saved results only."""
    others = [(d, render_other_run(d)) for d in run_dirs]
    if all(h is None for _, h in others):
        return report_from_run_dirs(run_dirs, out_html)
    analysis = [d for d, h in others if h is None]
    parts = []
    if analysis:
        parts.append(_body(analysis_page(analysis)))
    cols = [f"<div><h2>{_e(str(d))}</h2>{_body(h)}</div>" for d, h in others if h is not None]
    grid = f'style="grid-template-columns:repeat({min(len(cols), 3)},minmax(0,1fr))"'
    parts.append(f'<div class="runs" {grid}>{"".join(cols)}</div>')
    title = "prunelens report — " + ", ".join(Path(d).name for d in run_dirs)
    page = "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                       f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
                       f"<h1>{_e(title)}</h1>", *parts, "</body></html>"])
    _atomic_write(Path(out_html), page)
    return Path(out_html)
