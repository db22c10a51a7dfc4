"""Figures and a self-contained HTML report for ``prunelens.analysis`` results.

The report has to be readable without the Python environment that made it: one HTML file with
inline CSS and PNGs embedded as data URIs, so it can be mailed or archived as it is. Results may
come from any pruning kind or an older/newer schema, so every panel and table row is optional:
a missing key drops that piece, it never fails the report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from prunelens.errors import PrunelensError
from prunelens.render import CSS, DPI, esc, fmt, img, num, pct, short
from prunelens.runs import atomic_write_text, read_json

FIGURE_ORDER = ("layerwise", "stepwise", "spaces", "taylor")
SPACE_COLORS = {"h": "tab:green", "z": "tab:orange", "zc": "tab:brown", "p": "tab:purple"}
DROP_COLORS = {"attn": "tab:red", "mlp": "tab:blue", "block": "0.45"}
MODES = {"teacher_forced": "teacher-forced", "free_running": "free-running"}

# --- small helpers shared by figures and HTML ----------------------------------------------------


def _tkey(t: Any) -> str:
    """Temperature suffix as analysis writes it (``f"{T:g}"``)."""
    try:
        return f"{float(t):g}"
    except (TypeError, ValueError):
        return str(t)


def _temperatures(result: dict[str, Any]) -> list[str]:
    """Temperature suffixes from settings, else recovered from the ``kl@T`` keys present."""
    temps = (result.get("settings") or {}).get("temperatures")
    if isinstance(temps, (list, tuple)) and temps:
        return [_tkey(t) for t in temps]
    found: list[str] = []
    for block in [result.get("layerwise") or {}, *((result.get("stepwise") or {}).values())]:
        if isinstance(block, dict):
            for k in block:
                t = k.split("@", 1)[1] if k.startswith(("kl@", "lens_kl@")) else None
                if t is not None and t not in found:
                    found.append(t)
    return found


def _arr(values: Any, n: int | None = None) -> np.ndarray | None:
    """List of numbers/None → float array with NaN gaps; None if absent or all missing."""
    if not isinstance(values, (list, tuple)) or not values:
        return None
    a = np.array([num(v) if num(v) is not None else np.nan for v in values], dtype=float)
    if n is not None:
        a = a[:n] if len(a) >= n else np.concatenate([a, np.full(n - len(a), np.nan)])
    return a if np.isfinite(a).any() else None


def _positive(a: np.ndarray) -> np.ndarray:
    """Values a log axis can show; zeros and rounding negatives become gaps."""
    return np.where(a > 0, a, np.nan)


def _model_name(result: dict[str, Any]) -> str:
    m = result.get("model") or {}
    return str(m.get("name") or m.get("preset") or m.get("source") or "model")


def _label(result: dict[str, Any]) -> str:
    return str((result.get("pruning") or {}).get("label") or "pruned")


def _run_name(result: dict[str, Any]) -> str:
    return f"{_model_name(result)} · {_label(result)}"


def _mpl_text(s: str) -> str:
    """Keep ``$`` in model names from switching matplotlib into mathtext."""
    return s.replace("$", r"\$")


def _dropped(result: dict[str, Any]) -> dict[str, list[int]]:
    p = result.get("pruning") or {}
    out = {}
    for kind in DROP_COLORS:
        idx = [int(i) for i in (p.get(kind) or []) if num(i) is not None]
        if idx:
            out[kind] = idx
    return out


def _new_figure(rows: int, height: float) -> tuple[Figure, list[Axes]]:
    """A pyplot-free Agg figure: no global backend switch, safe inside other people's sessions."""
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


# --- figures -----------------------------------------------------------------------------------


def _shade_drops(ax: Axes, dropped: dict[str, list[int]]) -> list[Patch]:
    """Block i maps stream l=i to l=i+1, so a dropped unit i shades the span [i, i+1]."""
    handles = []
    for kind, idx in dropped.items():
        for i in idx:
            ax.axvspan(i, i + 1, color=DROP_COLORS[kind], alpha=0.13, lw=0)
        handles.append(Patch(color=DROP_COLORS[kind], alpha=0.3,
                             label=f"dropped {kind} ({len(idx)})"))
    return handles


def _fig_layerwise(result: dict[str, Any], path: Path) -> bool:
    lw = result.get("layerwise") or {}
    layers = _arr(lw.get("layer"))
    if layers is None:
        return False
    n = len(layers)
    temps = _temperatures(result)
    t0 = temps[0] if temps else None
    cos = {"h": _arr(lw.get("cos_h"), n), "z": _arr(lw.get("lens_cos_z"), n),
           "zc": _arr(lw.get("lens_cos_zc"), n),
           "p": _arr(lw.get(f"lens_cos_p@{t0}"), n) if t0 else None}
    kls = {t: _arr(lw.get(f"lens_kl@{t}"), n) for t in temps}
    kls = {t: a for t, a in kls.items() if a is not None}
    if all(a is None for a in cos.values()) and not kls:
        return False

    fig, (ax1, ax2, ax3) = _new_figure(3, 9.5)
    dropped = _dropped(result)
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
            y = _positive(1.0 - a)
            plotted |= bool(np.isfinite(y).any())
            ax2.plot(layers, y, marker="o", ms=3, color=SPACE_COLORS[s], label=f"1 − {names[s]}")
    _set_log_if_data(ax2, plotted, "1 − cos")
    ax2.set_ylabel("1 − cosine (log)")
    ax2.set_title("(b) distance from 1 (zeros not drawn)", loc="left", fontsize=10)
    _legend_outside(ax2)

    plotted = False
    shades = np.linspace(0.95, 0.55, max(len(kls), 1))
    for (t, a), sh in zip(kls.items(), shades, strict=False):
        y = _positive(a)
        plotted |= bool(np.isfinite(y).any())
        ax3.plot(layers, y, marker="o", ms=3, color=_cmap("Reds", sh), label=f"KL(p_pruned‖p_dense), T={t}")
    _set_log_if_data(ax3, plotted, "KL")
    ax3.set_ylabel("KL, logit lens (log)")
    ax3.set_xlabel("layer index l (0 = embeddings; l = residual stream before block l)")
    ax3.set_title("(c) KL of the logit-lens distribution at the last prompt token", loc="left", fontsize=10)
    ax3.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(ax3)
    fig.suptitle(_mpl_text(f"Per layer: {_model_name(result)} — {_label(result)}"), fontsize=12)
    fig.savefig(path, dpi=DPI)
    return True


def _cmap(name: str, x: float) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps[name](float(x))


def _fig_stepwise(result: dict[str, Any], path: Path) -> bool:
    sw = result.get("stepwise") or {}
    modes = {m: sw[m] for m in MODES if isinstance(sw.get(m), dict) and _arr(sw[m].get("step")) is not None}
    if not modes:
        return False
    temps = _temperatures(result)
    t0 = temps[0] if temps else None
    fig, (ax1, ax2, ax3) = _new_figure(3, 10.0)
    shades = np.linspace(0.9, 0.5, max(len(temps), 1))
    markers = "osD^v<>"

    plotted = False
    for j, (t, sh) in enumerate(zip(temps, shades, strict=False)):
        mk = markers[j % len(markers)]
        for mode, d in modes.items():
            x = _arr(d["step"])
            assert x is not None
            cm = "Blues" if mode == "teacher_forced" else "Reds"
            kl = _arr(d.get(f"kl@{t}"), len(x))
            if kl is not None:
                y = _positive(kl)
                plotted |= bool(np.isfinite(y).any())
                ax1.plot(x, y, color=_cmap(cm, sh), marker=mk, ms=3, label=f"KL {MODES[mode]}, T={t}")
            if mode == "teacher_forced":
                tk = _arr(d.get(f"taylor_kl@{t}"), len(x))
                if tk is not None:
                    y = _positive(tk)
                    plotted |= bool(np.isfinite(y).any())
                    ax1.plot(x, y, color=_cmap(cm, sh), ls="--", lw=1.2,
                             label=f"Taylor Var_p(Δz)/2T², teacher-forced, T={t}")
    _set_log_if_data(ax1, plotted, "KL")
    ax1.set_ylabel("KL(p_pruned‖p_dense) (log)")
    ax1.set_title("(a) KL per decoding step", loc="left", fontsize=10)
    _legend_outside(ax1)

    space_keys = {"h": "cos_h", "z": "cos_z", "p": f"cos_p@{t0}"}
    handles: list[Any] = []
    modes_drawn: set[str] = set()
    for s, key in space_keys.items():
        drawn = False
        for mode, d in modes.items():
            x = _arr(d["step"])
            assert x is not None
            y = _arr(d.get(key), len(x))
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

    k = (result.get("settings") or {}).get("topk", "k")
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
        x = _arr(d["step"])
        assert x is not None
        y = _arr(d.get(key), len(x))
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
    steps = np.concatenate([a for d in modes.values() if (a := _arr(d["step"])) is not None])
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        # the full step range, so steps where no prompt was still valid show as a gap
        ax.set_xlim(np.nanmin(steps) - 0.5, np.nanmax(steps) + 0.5)
    fig.suptitle(_mpl_text(f"Per decoding step: {_model_name(result)} — {_label(result)}"), fontsize=12)
    fig.savefig(path, dpi=DPI)
    return True


def _fig_taylor(result: dict[str, Any], path: Path) -> bool:
    """Measured KL and 1 − cos(p) against their second-order estimates, every (prompt, step)."""
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
                shade = matplotlib.colormaps[cmaps.get(mode, "Greys")](0.85 - 0.45 * k / max(n_t - 1, 1))
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
    fig.suptitle(_mpl_text(f"Softmax amplification, estimate vs measured: {_model_name(result)} — "
                           f"{_label(result)}"), fontsize=12)
    fig.savefig(path, dpi=DPI)
    return True


def _first(values: Any) -> float | None:
    return num(values[0]) if isinstance(values, (list, tuple)) and values else None


def _fig_spaces(result: dict[str, Any], path: Path) -> bool:
    tf = (result.get("stepwise") or {}).get("teacher_forced") or {}
    bars: list[tuple[str, float | None, Any]] = [("h", _first(tf.get("cos_h")), SPACE_COLORS["h"]),
                                                 ("z", _first(tf.get("cos_z")), SPACE_COLORS["z"])]
    temps = _temperatures(result)
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
    ax.set_title(_mpl_text(f"Representation hierarchy at the last prompt token\n"
                           f"{_model_name(result)} — {_label(result)}"), fontsize=11)
    fig.savefig(path, dpi=DPI)
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


# --- number formatting -------------------------------------------------------------------------


# --- HTML --------------------------------------------------------------------------------------


def _get(d: Any, *path: Any) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _prefixed(d: Any, prefix: str) -> Any:
    """Value of the first key starting with ``prefix`` (temperature-suffixed keys like ``kl@1``)."""
    if not isinstance(d, dict):
        return None
    for k, v in d.items():
        if str(k).startswith(prefix):
            return v
    return None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The stored summary, else one recomputed the way analysis does (older/partial results)."""
    s = result.get("summary")
    if isinstance(s, dict):
        return s
    try:
        from prunelens.analyses.trace import summarize

        return summarize(result)
    except Exception:  # noqa: BLE001 - a partial result just has no summary table
        return {}


def _n_prompts(result: dict[str, Any]) -> int | None:
    n = _get(result, "settings", "n_prompts")
    if isinstance(n, int):
        return n
    pp = result.get("per_prompt")
    return len(pp) if isinstance(pp, list) else None


def _summary_rows(result: dict[str, Any]) -> dict[str, str]:
    """Row label → formatted value; a missing number renders as an em dash."""
    s = _summary(result)
    lp, tf, fr = s.get("last_prompt_token"), s.get("teacher_forced_mean"), s.get("free_running_mean")
    div = s.get("prompts_diverged")
    n = _n_prompts(result)
    # the three spaces, in each of the three places; labels differ by trailing spaces (dict keys)
    def spaces(d: Any, pad: str) -> dict[str, str]:
        return {f"cos(h){pad}": fmt(_get(d, "cos_h")), f"cos(z){pad}": fmt(_get(d, "cos_z")),
                f"cos(z − mean z){pad}": fmt(_get(d, "cos_zc")), f"cos(p){pad}": fmt(_prefixed(d, "cos_p@"))}

    rows: dict[str, str] = {
        "temperature T (first)": _tkey(s["temperature"]) if num(s.get("temperature")) is not None else "—",
        "§last prompt token (step 1)": "", **spaces(lp, ""),
        "KL(p_pruned‖p_dense)": fmt(_prefixed(lp, "kl@")),
        "Taylor Var_p(Δz)/2T²": fmt(_prefixed(lp, "taylor_kl@")),
        "min over layers of cos(h)": fmt(s.get("min_layer_cos_h")),
        "§teacher-forced, mean over steps": "", **spaces(tf, " "),
        "KL ": fmt(_prefixed(tf, "kl@")),
        "top-1 agreement": pct(_get(tf, "top1_agree")),
        "top-k overlap": fmt(_get(tf, "topk_overlap")),
        "top-k Spearman ρ": fmt(_get(tf, "topk_spearman")),
        "KL growth (2nd half ÷ 1st half)": fmt(s.get("kl_growth_teacher_forced")),
        "§free-running, mean over steps": "", **spaces(fr, "  "),
        "KL  ": fmt(_prefixed(fr, "kl@")),
        "token agreement": pct(_get(fr, "token_agree")),
        "KL growth (2nd half ÷ 1st half) ": fmt(s.get("kl_growth_free_running")),
        "§greedy text": "",
        "prompts diverged": "—" if div is None else (f"{div} / {n}" if n is not None else str(div)),
        "median first divergence step": short(s.get("median_first_divergence")),
    }
    return rows


def reading(result: dict[str, Any]) -> str:
    """A plain-language sentence or three built only from this result's numbers."""
    s = _summary(result)
    lp, tf, fr = (s.get(k) or {} for k in ("last_prompt_token", "teacher_forced_mean", "free_running_mean"))
    t = short(s.get("temperature"), "the first T")
    ch, cz, cp = num(lp.get("cos_h")), num(lp.get("cos_z")), num(_prefixed(lp, "cos_p@"))
    kl1, tk = num(_prefixed(lp, "kl@")), num(_prefixed(lp, "taylor_kl@"))
    kl_tf, kl_fr = num(_prefixed(tf, "kl@")), num(_prefixed(fr, "kl@"))
    out = []
    if ch is not None and cz is not None:
        close = min(ch, cz) >= 0.95
        first = f"At the last prompt token cos(h)={fmt(ch)} and cos(z)={fmt(cz)}"
        first += " stay close to 1" if close else ""
        if kl1 is not None:
            first += " while" if close else ";"
            first += f" KL at T={t} is {fmt(kl1)} at the first step"
            if tk is not None:
                first += f" (Taylor estimate {fmt(tk)})"
            if cp is not None:
                first += f" and cos(p)={fmt(cp)}"
        out.append(first + ".")
    if kl_tf is not None and kl_fr is not None:
        sent = (f"Averaged over decoding steps, KL is {fmt(kl_tf)} when the pruned model is fed the dense "
                f"model's tokens and {fmt(kl_fr)} in free-running decoding")
        if kl_tf > 0 and kl_fr / kl_tf >= 1.5:
            sent += f" ({kl_fr / kl_tf:.2g}× larger: errors compound once the model feeds on its own tokens)"
        out.append(sent + ".")
    g = num(s.get("kl_growth_free_running"))
    if g is not None:
        out.append(f"In free-running decoding the mean KL of the second half of the steps is {fmt(g)}× "
                   "that of the first half.")
    div, n = s.get("prompts_diverged"), _n_prompts(result)
    med = num(s.get("median_first_divergence"))
    if isinstance(div, int):
        if div == 0:
            steps = _get(result, "settings", "max_new_tokens")
            out.append("No prompt's greedy output diverges from the dense one"
                       + (f" within {steps} steps." if steps else "."))
        else:
            of = f" of {n}" if n is not None else ""
            out.append(f"{div}{of} prompts' greedy outputs diverge from the dense model's"
                       + (f", at median step {short(med)}." if med is not None else "."))
    return " ".join(out)


def _fmt_params(n: Any) -> str:
    v = num(n)
    if v is None:
        return "—"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def _header_card(result: dict[str, Any]) -> str:
    m, p = result.get("model") or {}, result.get("pruning") or {}
    items = []
    for key, label in (("preset", "preset"), ("model_type", "type"), ("n_layers", "layers"),
                       ("hidden_size", "hidden"), ("vocab_size", "vocab"), ("dtype", "dtype"),
                       ("device", "device"), ("gguf", "gguf")):
        if m.get(key) is not None:
            items.append(f"{label} <b>{esc(m[key])}</b>")
    if m.get("n_params") is not None:
        items.insert(0, f"params <b>{esc(_fmt_params(m['n_params']))}</b>")
    drops = ", ".join(f"{len(v)} {k}" for k, v in _dropped(result).items()) or "nothing"
    meta = [f"prunelens {esc(result.get('prunelens_version', '?'))}", esc(result.get("created", ""))]
    secs = num(_get(result, "timing", "analysis_s"))
    if secs is not None:
        meta.append(f"analysis {secs:.1f} s")
    return (f'<div class="card"><div><b>{esc(_model_name(result))}</b></div>'
            f'<div class="label">{esc(p.get("label", "—"))}</div>'
            f"<div>dropped: {esc(drops)}</div>"
            f'<div class="muted">{" · ".join(items)}</div>'
            f'<div class="muted">{" · ".join(x for x in meta if x)}</div></div>')


def _summary_table(runs: Sequence[dict[str, Any]]) -> str:
    per_run = [_summary_rows(r) for r in runs]
    head = "".join(f'<th class="run-col">{esc(_run_name(r))}</th>' for r in runs)
    body = []
    for label in per_run[0]:
        if label.startswith("§"):
            body.append(f'<tr class="group"><th colspan="{len(runs) + 1}">{esc(label[1:])}</th></tr>')
            continue
        cells = "".join(f'<td class="num">{esc(rows.get(label, "—"))}</td>' for rows in per_run)
        body.append(f"<tr><th>{esc(label.strip())}</th>{cells}</tr>")
    return f'<table class="summary"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def _split_common(a: str, b: str) -> int:
    """Length of the shared prefix, backed off to a word start so a split word is shown whole."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    if n < min(len(a), len(b)):
        while n > 0 and a[n - 1].isalnum():
            n -= 1
    return n


def _text_cell(text: str, common: int) -> str:
    """Escaped text; the part after the shared prefix is highlighted."""
    return (f'<td class="text">{esc(text[:common])}'
            + (f'<span class="diff">{esc(text[common:])}</span>' if text[common:] else "") + "</td>")


def _prompt_table(result: dict[str, Any]) -> str:
    pp = result.get("per_prompt")
    if not isinstance(pp, list) or not pp:
        return ""
    rows = []
    for i, p in enumerate(pp, 1):
        if not isinstance(p, dict):
            continue
        dense, pruned = str(p.get("dense_text", "")), str(p.get("pruned_text", ""))
        c = _split_common(dense, pruned)
        fd = p.get("first_divergence")
        rows.append(f'<tr><td class="num">{i}</td><td class="text">{esc(p.get("prompt", ""))}</td>'
                    f"{_text_cell(dense, c)}{_text_cell(pruned, c)}"
                    f'<td class="num">{esc("—" if fd is None else fd)}</td></tr>')
    return ('<table class="prompts"><tr><th>#</th><th>prompt</th><th>dense (greedy)</th>'
            "<th>pruned (greedy)</th><th>first divergence</th></tr>" + "".join(rows) + "</table>"
            '<div class="muted">Highlighted: text after the longest common prefix.</div>')


def _kv_table(d: dict[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        val = json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)
        rows.append(f'<tr><th>{esc(k)}</th><td class="text">{esc(val)}</td></tr>')
    return f"<table>{''.join(rows)}</table>"


def _layer_key(kv: tuple[str, Any]) -> tuple[bool, int, str]:
    """Numeric layer keys in numeric order (JSON turned them into strings), others after."""
    k = kv[0]
    return (not k.isdigit(), int(k) if k.isdigit() else 0, k)


def _pruning_parts(result: dict[str, Any]) -> list[dict[str, Any]]:
    p = result.get("pruning") or {}
    parts = p.get("parts")
    return [q for q in parts if isinstance(q, dict)] if isinstance(parts, list) else [p]


_WEIGHT_KEYS = ("label", "pattern", "target_sparsity", "zero_frac", "dense_zero_frac",
                "added_frac_of_dense_nonzeros", "nm_violations", "quant", "bits_per_weight", "effective_mb",
                "fp16_mb", "n_modules", "n_weights", "seconds", "calibration", "skip")


def _weights_section(result: dict[str, Any]) -> str:
    """Sparsity / quantisation report of weight modifications: overall numbers, then per module."""
    out = []
    for part in _pruning_parts(result):
        if part.get("kind") != "weights":
            continue
        top = {k: part[k] for k in _WEIGHT_KEYS if k in part}
        out.append(_kv_table(top))
        layers = part.get("layers")
        if isinstance(layers, list) and layers:
            cols = [c for c in ("module", "numel", "dense_zero_frac", "zero_frac",
                                "added_frac_of_dense_nonzeros", "nm_violations") if c in layers[0]]
            head = "".join(f"<th>{esc(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(
                f"<td>{esc(fmt(r.get(c)) if isinstance(r.get(c), float) else r.get(c))}</td>" for c in cols)
                + "</tr>" for r in layers)
            out.append(f"<details><summary>per module ({len(layers)})</summary><div class=\"scroll\">"
                       f"<table><tr>{head}</tr>{body}</table></div></details>")
    return "".join(out)


def _selection(result: dict[str, Any]) -> str:
    """Importance metric, order and per-layer scores, dropped layers highlighted."""
    p = result.get("pruning") or {}
    sel = p.get("selection") or next(
        (q.get("selection") for q in _pruning_parts(result) if q.get("selection")), None)
    if not isinstance(sel, dict) or not sel:
        return '<p class="muted">No selection info (layers given explicitly or not recorded).</p>'
    top = {k: v for k, v in sel.items() if k != "scores"}
    parts = [_kv_table(top)] if top else []
    scores = sel.get("scores")
    if isinstance(scores, dict):
        for req, info in scores.items():
            if not isinstance(info, dict):
                continue
            kind = str(req).split(":", 1)[0].split("@", 1)[0]
            dropped = {int(i) for i in (p.get(kind) or []) if num(i) is not None}
            head = f"<h4>{esc(req)}</h4>"
            extra = {k: v for k, v in info.items() if k != "scores"}
            if extra:
                pairs = " · ".join(f"{esc(k)}: <b>{esc(v)}</b>" for k, v in extra.items())
                head += f"<div>{pairs}</div>"
            sc = info.get("scores")
            if isinstance(sc, dict) and sc:
                items = sorted(((str(k), num(v)) for k, v in sc.items()), key=_layer_key)
                cls = ['class="num drop"' if k.isdigit() and int(k) in dropped else 'class="num"'
                       for k, _ in items]
                r1 = "".join(f"<td {c}>{esc(k)}</td>" for c, (k, _) in zip(cls, items, strict=True))
                r2 = "".join(f"<td {c}>{esc(fmt(v))}</td>" for c, (_, v) in zip(cls, items, strict=True))
                head += (f'<div class="scroll"><table><tr><th>layer</th>{r1}</tr>'
                         f"<tr><th>score</th>{r2}</tr></table></div>")
            parts.append(head)
    return "".join(parts)


def render_html(runs: list[tuple[dict[str, Any], list[Path]]], title: str = "prunelens report") -> str:
    """One self-contained page: runs side by side, images inline, every data string escaped."""
    if not runs:
        raise PrunelensError("nothing to report: no runs given")
    results = [r for r, _ in runs]
    ncol = len(runs)
    grid = f'style="grid-template-columns:repeat({ncol},minmax(0,1fr))"'
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>",
           '<p class="muted">Dense vs pruned, traced through hidden states h → logits z → probabilities '
           "p = softmax(z/T), per layer and per decoding step.</p>",
           f'<div class="runs" {grid}>', *(_header_card(r) for r in results), "</div>",
           "<h2>Summary</h2>", _summary_table(results),
           "<h2>Reading</h2>"]
    for r in results:
        text = reading(r)
        if text:
            prefix = f"<b>{esc(_run_name(r))}</b>: " if ncol > 1 else ""
            out.append(f'<div class="reading">{prefix}{esc(text)}</div>')

    by_name: list[dict[str, Path]] = [{Path(f).stem: Path(f) for f in figs if Path(f).is_file()}
                                      for _, figs in runs]
    names = [n for n in FIGURE_ORDER if any(n in d for d in by_name)]
    names += sorted({n for d in by_name for n in d} - set(names))
    if names:
        out.append("<h2>Figures</h2>")
        for name in names:
            cells = "".join(f"<div>{img(d[name]) if name in d else ''}</div>" for d in by_name)
            out.append(f'<h3>{esc(name)}</h3><div class="runs" {grid}>{cells}</div>')

    def per_run(title: str, section: Any, empty: str) -> None:
        """One section with each run's part under its name (when there are several runs)."""
        out.append(f"<h2>{title}</h2>")
        for r in results:
            if ncol > 1:
                out.append(f"<h3>{esc(_run_name(r))}</h3>")
            out.append(section(r) or f'<p class="muted">{empty}</p>')

    per_run("Prompts", _prompt_table, "No per-prompt results.")
    per_run("Pruning selection", _selection, "")
    if any(_weights_section(r) for r in results):
        per_run("Weights: sparsity and quantisation", _weights_section, "No weight modification.")

    out.append("<h2>Settings and conventions</h2>")
    for r in results:
        label = f" — {esc(_run_name(r))}" if ncol > 1 else ""
        for key in ("settings", "conventions", "model"):
            d = r.get(key)
            if isinstance(d, dict) and d:
                out.append(f"<details><summary>{key}{label}</summary>{_kv_table(d)}</details>")
    out.append("</body></html>")
    return "\n".join(out)


# --- run directories ---------------------------------------------------------------------------


def load_result(run_dir: Path) -> dict[str, Any]:
    """results.json of a run directory, checked to be a prunelens analysis."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise PrunelensError(f"'{run_dir}' has no results.json (not a prunelens run directory)")
    result = read_json(path)
    schema = result.get("schema", "") if isinstance(result, dict) else ""
    if not isinstance(schema, str) or not schema.startswith("prunelens.analysis"):
        raise PrunelensError(f"'{path}' is not a prunelens analysis result (schema {schema!r})")
    return result


def _existing_figures(fig_dir: Path) -> list[Path]:
    found = sorted(fig_dir.glob("*.png")) if fig_dir.is_dir() else []
    rank = {n: i for i, n in enumerate(FIGURE_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.name))


def report_from_run_dirs(run_dirs: Iterable[Path], out_html: Path) -> Path:
    """Rebuild one HTML report from saved runs, reusing their figures where they exist."""
    out = Path(out_html)
    atomic_write_text(out, analysis_page(run_dirs))
    return out


def analysis_page(run_dirs: Iterable[Path]) -> str:
    """The HTML page of saved analysis runs side by side."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise PrunelensError("no run directories given")
    runs = []
    for d in dirs:
        result = load_result(d)
        figs = _existing_figures(d / "figures") or make_figures(result, d / "figures")
        runs.append((result, figs))
    title = "prunelens report — " + ", ".join(_run_name(r) for r, _ in runs)
    return render_html(runs, title=title)
