"""The figures of a trace run (PNG files), drawn from its saved result only.

Every panel is optional: a key the result lacks (another schema version, a run without the logit
lens) leaves that curve or figure out, it never fails the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prunelens.analyses.trace.labels import (
    DROP_COLORS,
    MODES,
    SPACE_COLORS,
    as_array,
    dropped_units,
    model_name,
    mpl_text,
    positive_only,
    pruning_label,
    temperatures,
)
from prunelens.render import DPI, fmt, num, save_figure

if TYPE_CHECKING:  # matplotlib loads when a figure is drawn, not with `import prunelens` (~0.5 s)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch


def _new_figure(rows: int, height: float) -> tuple[Figure, list[Axes]]:
    """A pyplot-free Agg figure: no global backend switch, safe inside other people's sessions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _legend_outside(ax: Axes, handles: Sequence[Any] | None = None, **kw: Any) -> None:
    """Legends go right of the axes, so they can never hide a curve."""
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles=list(handles), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize=8, frameon=False, **kw)


def _set_log_if_data(ax: Axes, plotted: bool, what: str) -> None:
    if plotted:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, f"no positive {what} to show", transform=ax.transAxes,
                ha="center", va="center", color="0.4")


def _shade_drops(ax: Axes, dropped: dict[str, list[int]]) -> list[Patch]:
    """Block i maps stream l=i to l=i+1, so a dropped unit i shades the span [i, i+1]."""
    from matplotlib.patches import Patch

    handles = []
    for kind, idx in dropped.items():
        for i in idx:
            ax.axvspan(i, i + 1, color=DROP_COLORS[kind], alpha=0.13, lw=0)
        handles.append(Patch(color=DROP_COLORS[kind], alpha=0.3,
                             label=f"dropped {kind} ({len(idx)})"))
    return handles


def _fig_layerwise(result: dict[str, Any], path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    lw = result.get("layerwise") or {}
    layers = as_array(lw.get("layer"))
    if layers is None:
        return False
    n = len(layers)
    temps = temperatures(result)
    t0 = temps[0] if temps else None
    cos = {"h": as_array(lw.get("cos_h"), n), "z": as_array(lw.get("lens_cos_z"), n),
           "zc": as_array(lw.get("lens_cos_zc"), n),
           "p": as_array(lw.get(f"lens_cos_p@{t0}"), n) if t0 else None}
    kls = {t: as_array(lw.get(f"lens_kl@{t}"), n) for t in temps}
    kls = {t: a for t, a in kls.items() if a is not None}
    if all(a is None for a in cos.values()) and not kls:
        return False

    fig, (ax1, ax2, ax3) = _new_figure(3, 9.5)
    dropped = dropped_units(result)
    names = {"h": "cos(h), all prompt tokens", "z": "cos(z), logit lens",
             "zc": "cos(z − mean z), logit lens", "p": f"cos(p), logit lens, T={t0}"}
    for ax in (ax1, ax2, ax3):
        span_handles = _shade_drops(ax, dropped)
        ax.grid(alpha=0.3)
    for s, a in cos.items():
        if a is not None:
            ax1.plot(layers, a, marker="o", ms=3, color=SPACE_COLORS[s], label=names[s])
    ax1.set_ylabel("cosine(dense, pruned)")
    ax1.set_title("(a) similarity per layer", loc="left", fontsize=10)
    _legend_outside(ax1, ax1.get_legend_handles_labels()[0] + span_handles)

    plotted = False
    for s, a in cos.items():
        if a is not None:
            y = positive_only(1.0 - a)
            plotted |= bool(np.isfinite(y).any())
            ax2.plot(layers, y, marker="o", ms=3, color=SPACE_COLORS[s], label=f"1 − {names[s]}")
    _set_log_if_data(ax2, plotted, "1 − cos")
    ax2.set_ylabel("1 − cosine (log)")
    ax2.set_title("(b) distance from 1 (zeros not drawn)", loc="left", fontsize=10)
    _legend_outside(ax2)

    plotted = False
    shades = np.linspace(0.95, 0.55, max(len(kls), 1))
    for (t, a), sh in zip(kls.items(), shades, strict=False):
        y = positive_only(a)
        plotted |= bool(np.isfinite(y).any())
        ax3.plot(layers, y, marker="o", ms=3, color=_cmap("Reds", sh), label=f"KL(p_pruned‖p_dense), T={t}")
    _set_log_if_data(ax3, plotted, "KL")
    ax3.set_ylabel("KL, logit lens (log)")
    ax3.set_xlabel("layer index l (0 = embeddings; l = residual stream before block l)")
    ax3.set_title("(c) KL of the logit-lens distribution at the last prompt token", loc="left", fontsize=10)
    ax3.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(ax3)
    fig.suptitle(mpl_text(f"Per layer: {model_name(result)} — {pruning_label(result)}"), fontsize=12)
    save_figure(fig, path)
    return True


def _cmap(name: str, x: float) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps[name](float(x))


def _fig_stepwise(result: dict[str, Any], path: Path) -> bool:
    sw = result.get("stepwise") or {}
    modes = {m: sw[m] for m in MODES if isinstance(sw.get(m), dict) and as_array(sw[m].get("step")) is not None}
    if not modes:
        return False
    temps = temperatures(result)
    fig, (ax1, ax2, ax3) = _new_figure(3, 10.0)
    _step_kl(ax1, modes, temps)
    _step_spaces(ax2, modes, temps[0] if temps else None)
    _step_agreement(ax3, modes, (result.get("settings") or {}).get("topk", "k"))
    steps = np.concatenate([a for d in modes.values() if (a := as_array(d["step"])) is not None])
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        # the full step range, so steps where no prompt was still valid show as a gap
        ax.set_xlim(np.nanmin(steps) - 0.5, np.nanmax(steps) + 0.5)
    fig.suptitle(mpl_text(f"Per decoding step: {model_name(result)} — {pruning_label(result)}"), fontsize=12)
    save_figure(fig, path)
    return True


def _step_kl(ax1: Axes, modes: dict[str, Any], temps: list[str]) -> None:
    """(a) KL per step, each mode and temperature, with the teacher-forced Taylor estimate."""
    shades = np.linspace(0.9, 0.5, max(len(temps), 1))
    markers = "osD^v<>"
    plotted = False
    for j, (t, sh) in enumerate(zip(temps, shades, strict=False)):
        mk = markers[j % len(markers)]
        for mode, d in modes.items():
            x = as_array(d["step"])
            assert x is not None
            cm = "Blues" if mode == "teacher_forced" else "Reds"
            kl = as_array(d.get(f"kl@{t}"), len(x))
            if kl is not None:
                y = positive_only(kl)
                plotted |= bool(np.isfinite(y).any())
                ax1.plot(x, y, color=_cmap(cm, sh), marker=mk, ms=3, label=f"KL {MODES[mode]}, T={t}")
            if mode == "teacher_forced":
                tk = as_array(d.get(f"taylor_kl@{t}"), len(x))
                if tk is not None:
                    y = positive_only(tk)
                    plotted |= bool(np.isfinite(y).any())
                    ax1.plot(x, y, color=_cmap(cm, sh), ls="--", lw=1.2,
                             label=f"Taylor Var_p(Δz)/2T², teacher-forced, T={t}")
    _set_log_if_data(ax1, plotted, "KL")
    ax1.set_ylabel("KL(p_pruned‖p_dense) (log)")
    ax1.set_title("(a) KL per decoding step", loc="left", fontsize=10)
    _legend_outside(ax1)


def _step_spaces(ax2: Axes, modes: dict[str, Any], t0: str | None) -> None:
    """(b) cos of h, z and p per step; solid teacher-forced, dashed free-running."""
    from matplotlib.lines import Line2D

    space_keys = {"h": "cos_h", "z": "cos_z", "p": f"cos_p@{t0}"}
    handles: list[Any] = []
    modes_drawn: set[str] = set()
    for s, key in space_keys.items():
        drawn = False
        for mode, d in modes.items():
            x = as_array(d["step"])
            assert x is not None
            y = as_array(d.get(key), len(x))
            if y is not None:
                ax2.plot(x, y, color=SPACE_COLORS[s], ls="-" if mode == "teacher_forced" else "--",
                         marker="o" if mode == "teacher_forced" else None, ms=2.5)
                drawn = True
                modes_drawn.add(mode)
        if drawn:
            label = f"cos({s})" + (f", T={t0}" if s == "p" else "")
            handles.append(Line2D([], [], color=SPACE_COLORS[s], label=label))
    if "teacher_forced" in modes_drawn:
        handles.append(Line2D([], [], color="0.3", ls="-", marker="o", ms=2.5, label="teacher-forced"))
    if "free_running" in modes_drawn:
        handles.append(Line2D([], [], color="0.3", ls="--", label="free-running"))
    ax2.set_ylabel("cosine(dense, pruned)")
    ax2.set_title("(b) similarity of h, z, p per step", loc="left", fontsize=10)
    _legend_outside(ax2, handles)


def _step_agreement(ax3: Axes, modes: dict[str, Any], k: Any) -> None:
    """(c) top-token stability: agreement, top-k overlap and rank correlation per step."""
    from matplotlib.ticker import MaxNLocator

    agreement = (("teacher_forced", "top1_agree", "tab:blue", "top-1 agreement, teacher-forced"),
                 ("free_running", "token_agree", "tab:red", "token agreement, free-running"),
                 ("teacher_forced", "topk_overlap", "tab:cyan", f"top-{k} overlap, teacher-forced"),
                 ("teacher_forced", "topk_spearman", "tab:olive",
                  f"Spearman ρ on dense top-{k}, teacher-forced"))
    lowest = 0.0
    for mode, key, color, name in agreement:
        d = modes.get(mode)
        if d is None:
            continue
        x = as_array(d["step"])
        assert x is not None
        y = as_array(d.get(key), len(x))
        if y is not None:
            ax3.plot(x, y, color=color, marker="o", ms=3, drawstyle="default", label=name)
            if np.isfinite(y).any():
                lowest = min(lowest, float(np.nanmin(y)))
    ax3.set_ylim(lowest - 0.05, 1.05)
    ax3.set_ylabel("fraction / correlation")
    ax3.set_xlabel("decoding step t (1 = distribution at the last prompt position)")
    ax3.set_title("(c) top-token stability", loc="left", fontsize=10)
    ax3.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(ax3)


def _fig_taylor(result: dict[str, Any], path: Path) -> bool:
    """Measured KL and 1 − cos(p) against their second-order estimates, every (prompt, step)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    tay = result.get("taylor") or {}
    if not tay:
        return False
    fig = Figure(figsize=(11, 4.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    specs = (("taylor_kl", "kl", "kl", "Var_p(Δz)/2T²", "KL(p_pruned‖p_dense)"),
             ("taylor_cos", "one_minus_cos_p", "cos", "Var_r(Δz)/2T², r ∝ p²", "1 − cos(p)"))
    # one colour family per mode, one shade and marker per temperature
    cmaps = {"teacher_forced": "Blues", "free_running": "Reds"}
    markers = ("o", "^", "s", "D", "v")
    drawn = False
    for ax, (px, py, tag, xl, yl) in zip(axes, specs, strict=True):
        lo, hi = np.inf, -np.inf
        for mode, per_t in tay.items():
            n_t = len(per_t)
            for k, (t, info) in enumerate(per_t.items()):
                shade = colormaps[cmaps.get(mode, "Greys")](0.85 - 0.45 * k / max(n_t - 1, 1))
                pts = info.get("points") or {}
                x, y = np.asarray(pts.get(px, []), float), np.asarray(pts.get(py, []), float)
                keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
                if not keep.any():
                    continue
                rho, r = num(info.get(f"{tag}_spearman")), num(info.get(f"{tag}_pearson"))
                ax.scatter(x[keep], y[keep], s=9, alpha=0.5, color=shade, marker=markers[k % len(markers)],
                           label=f"{mode.replace('_', '-')}, T={t}: ρ={fmt(rho)}, r(log)={fmt(r)}")
                lo, hi = min(lo, x[keep].min(), y[keep].min()), max(hi, x[keep].max(), y[keep].max())
                drawn = True
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], color="0.3", ls="--", lw=1, label="estimate = measured")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"second-order estimate {xl}")
        ax.set_ylabel(f"measured {yl}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    if not drawn:
        return False
    fig.suptitle(mpl_text(f"Softmax amplification, estimate vs measured: {model_name(result)} — "
                           f"{pruning_label(result)}"), fontsize=12)
    save_figure(fig, path)
    return True


def _first(values: Any) -> float | None:
    return num(values[0]) if isinstance(values, (list, tuple)) and values else None


def _fig_spaces(result: dict[str, Any], path: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tf = (result.get("stepwise") or {}).get("teacher_forced") or {}
    bars: list[tuple[str, float | None, Any]] = [("h", _first(tf.get("cos_h")), SPACE_COLORS["h"]),
                                                 ("z", _first(tf.get("cos_z")), SPACE_COLORS["z"])]
    temps = temperatures(result)
    for t, sh in zip(temps, np.linspace(0.8, 0.45, max(len(temps), 1)), strict=False):
        bars.append((f"p, T={t}", _first(tf.get(f"cos_p@{t}")), _cmap("Purples", sh)))
    bars = [b for b in bars if b[1] is not None]
    if not bars:
        return False
    fig = Figure(figsize=(6.5, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = np.arange(len(bars))
    vals = [1.0 - float(v) for _, v, _ in bars]  # type: ignore[arg-type]
    pos = [v for v in vals if v > 0]
    floor = min(pos) / 10 if pos else 1e-8
    ax.bar(xs, [v if v > 0 else np.nan for v in vals], color=[c for *_, c in bars], width=0.6)
    for x, v in zip(xs, vals, strict=True):
        txt = f"{v:.2g}" if v > 0 else "≤ 0"
        ax.text(x, v if v > 0 else floor, txt, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs, [f"1 − cos({name})" for name, *_ in bars], fontsize=9)
    if pos:
        ax.set_yscale("log")
        ax.set_ylim(floor, max(pos) * 3)
    ax.set_ylabel("1 − cosine(dense, pruned) (log)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(mpl_text(f"Representation hierarchy at the last prompt token\n"
                           f"{model_name(result)} — {pruning_label(result)}"), fontsize=11)
    save_figure(fig, path)
    return True


def make_figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    """Write layerwise.png, stepwise.png and spaces.png (those the data allows); return their paths."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fn in (("layerwise", _fig_layerwise), ("stepwise", _fig_stepwise), ("spaces", _fig_spaces),
                     ("taylor", _fig_taylor)):
        path = fig_dir / f"{name}.png"
        if fn(result, path):
            out.append(path)
    return out
