"""What ``advise`` shows: a decision page (recommendation first, the trade-off figure with the
retention floor, where the lost answers went, example texts, then the evidence and every row) and
the same in the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunelens.analyses.recovery import KEYS, reading, table_rows
from prunelens.prune.deploy import route
from prunelens.render import esc, html_page, html_table, img, save_figure, subplots, text, val


def gain_text(g: dict[str, Any]) -> str:
    """'vs block:4: KL -0.120, risk -0.010, retention +0.03' (signed as the repaired minus the plain)."""
    return (f"vs {g['of']}: KL {-g['tf_kl']:+.3f}, risk {-g['risk']:+.3f}"
            + (f", retention {g['retention']:+.2f}" if "retention" in g else ""))


def retention_text(r: dict[str, Any]) -> str:
    """'0.40 [0.25, 0.55]', the measured share for an anchor, and how far outside the fitted KL range."""
    s = f"{r['predicted']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
    if "measured" in r:
        s += f" (anchor: measured {r['measured']:.2f}, {r['k']:.0f}/{r['n']})"
    if r.get("outside"):
        s += f" ({r['outside']:.1f} ranges outside the anchors' KL)"
    elif r["outside_fitted_range"]:
        s += " (outside the fitted range)"
    return s


def _quality(r: dict[str, Any]) -> tuple[float, float, float]:
    """(value, low, high) on the page's quality axis: predicted retention where there is one, else 1 − risk."""
    if "retention" in r:
        q = r["retention"]
        return q["predicted"], q["low"], q["high"]
    v = 1.0 - r["risk"]
    return v, v, v


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (larger is better on each)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]


def label_positions(ys: Sequence[float], lo: float, hi: float, gap: float) -> list[float]:
    """Label heights as close to ``ys`` as a column allows: in the order of ``ys``, each at least
    ``gap`` above the one below, the column pushed down where it would leave ``hi`` (it may then
    reach below ``lo``: the labels never overlap, the axis clips nothing)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [0.0] * len(ys)
    prev = -float("inf")
    for i in order:  # upwards: each at its point or just above the one below
        pos[i] = max(ys[i], prev + gap)
        prev = pos[i]
    ceiling = hi
    for i in reversed(order):  # downwards: under ``hi`` and just under the one above
        pos[i] = min(pos[i], ceiling)
        ceiling = pos[i] - gap
    return pos


def _labels(ax: Any, xs: Sequence[float], ys: Sequence[float], names: Sequence[str]) -> None:
    """Every point's name in a column right of the axes, a thin line to its point: names of points
    that sit close together cannot overlap there."""
    fig = ax.figure
    lo, hi = ax.get_ylim()
    height_in = ax.get_position().height * fig.get_figheight()
    gap = (hi - lo) * (9.5 / 72) / height_in  # 7-point text and a little air
    for x, y, yl, name in zip(xs, ys, label_positions(ys, lo, hi, gap), names, strict=True):
        ax.annotate(name, (x, y), xytext=(1.03, yl), textcoords=ax.get_yaxis_transform(), fontsize=7,
                    va="center", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6", "shrinkA": 0, "shrinkB": 2})


def advise_figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    """Predicted quality (with its interval) against memory saved and against measured speed-up, the
    Pareto front of each marked and the retention floor drawn: the trade-off the recommendation is
    taken from, in one picture."""
    rows = result["rows"]
    if not rows:
        return []
    calibrated = any("retention" in r for r in rows)
    ylabel = "predicted generative retention" if calibrated else f"1 − predicted risk ({result['use']})"
    fig, axes = subplots(1, 2, figsize=(12, 4.8))
    fig.subplots_adjust(left=0.06, right=0.86, wspace=0.55, bottom=0.2, top=0.96)  # before the labels measure
    q = [_quality(r) for r in rows]
    for ax, key, xlabel in ((axes[0], "saved", "memory saved vs bf16"), (axes[1], "decode_speedup",
                                                                        "decoding speed-up (measured)")):
        xs = [r[key] for r in rows]
        front = set(pareto_front(list(zip(xs, [v for v, _, _ in q], strict=True))))
        for i, (r, (v, lo, hi)) in enumerate(zip(rows, q, strict=True)):
            ax.errorbar([xs[i]], [v], yerr=[[v - lo], [hi - v]], fmt="o" if i in front else "s",
                        color="C3" if i in front else "C0", ms=6 if i in front else 4, capsize=2, lw=0.8,
                        alpha=1.0 if r["meets_budget"] else 0.4)
            if "measured" in r.get("retention", {}):
                ax.plot([xs[i]], [r["retention"]["measured"]], "kx", ms=7)
        order = sorted(front, key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [q[i][0] for i in order], color="C3", lw=1, ls="--", label="Pareto front")
        if calibrated and result.get("min_retention") is not None:
            ax.axhline(result["min_retention"], color="C2", lw=1, label=f"retention floor {result['min_retention']:g}")
        if key == "saved":
            ax.axvline(result["budget"], color="grey", lw=0.8, ls=":", label="budget")
        if any("measured" in r.get("retention", {}) for r in rows):
            ax.plot([], [], "kx", label="anchor, measured")
        ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, frameon=False)
        _labels(ax, xs, [v for v, _, _ in q], [r["spec"] for r in rows])
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "tradeoff.png"
    save_figure(fig, path)
    return [path]


# what advise's view reads from a saved result (checked when ``prunelens report`` reads it back)
FIELDS = {"model": "dict", "use": "str", "budget": "num", "n_prompts": "int", "recommendation": "str",
          "rows[].spec": "str", "rows[].meets_budget": "bool", "rows[].risk": "num", "rows[].saved": "num",
          "rows[].decode_speedup": "num", "rows[].agreeing_tokens": "num?", "rows[].signals.tf_kl": "num",
          "rows[].signals.tf_top1_disagree": "num", **{f"rows[].retention?.{k}": "num" for k in
                                                        ("predicted", "low", "high")},
          "rows[].retention?.outside_fitted_range": "bool", "rows[].repair_gain?.of": "str",
          "rows[].repair_gain?.tf_kl": "num", "rows[].repair_gain?.risk": "num",
          "rows[].repair_gain?.retention?": "num", "retention_fit?.lomo_mae": "num",
          "retention_fit?.coverage": "num", "retention_fit?.fitted_on": "any", "retention_fit?.grid": "any",
          "calibration?.target": "str", "calibration?.anchors": "list", "calibration?.model": "str",
          **{f"rows[].risk_{k}": "num" for k in ("generative", "multiple_choice", "retrieval")}}


def _recovery(cal: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {a["spec"]: {**a["recovery"], "ece": ({"dense": cal["dense_ece"], "pruned": a["ece"]}
                                                 if a.get("ece") is not None and cal.get("dense_ece") is not None
                                                 else None)}
            for a in (cal or {}).get("anchors", [])}


def calibration_text(cal: dict[str, Any]) -> str:
    if not cal["anchors"]:
        return (f"No anchor of this model was measured: retention comes from the prior of the shipped fits "
                f"({', '.join(cal['prior_from'])}), its {cal['coverage']:.0%} interval as wide as those models "
                "disagree; --calibrate 2 measures two candidates of this model and narrows it.")
    anchors = ", ".join(f"{a['spec']} kept {a['k']:.0f}/{a['n']}" for a in cal["anchors"]) or "none measured"
    how = {"prior": "the prior alone (the other models' fits: a wide interval)",
           "intercept": "the intercept through the anchor, the prior's slope",
           "intercept+slope": "intercept and slope, with the other models' fits as prior"}[cal["model"]]
    return (f"Retention calibrated on this model: {len(cal['anchors'])} anchor(s) measured on {cal['source']} "
            f"({cal['dense_right']} of {cal['asked']} questions the dense model answers right): {anchors}; fitted "
            f"{how}; prior from {', '.join(cal['prior_from'])}; {cal['coverage']:.0%} intervals for the true "
            "retention.")


def advise_html(result: dict[str, Any], figs: list[Path]) -> str:
    fit, cal = result.get("retention_fit"), result.get("calibration")
    keys = ("spec", "retention", "saved", "decode ×", "tf KL", "tf top-1", "agree run", "risk", "repair gain")

    def cell(v: Any) -> str:  # None: a value JSON cannot hold (an infinite agreeing run)
        return val(v, ".3g")

    rows = [{"spec": f"{r['spec']}{'' if r['meets_budget'] else ' (below budget)'}",
             "retention": retention_text(r["retention"]) if "retention" in r else None,
             "risk": r["risk"], "saved": val(r["saved"], ".1%"), "decode ×": r["decode_speedup"],
             "tf KL": r["signals"]["tf_kl"], "tf top-1": 1 - r["signals"]["tf_top1_disagree"],
             "agree run": r["agreeing_tokens"],
             "repair gain": gain_text(r["repair_gain"]) if "repair_gain" in r else None} for r in result["rows"]]
    evidence = []
    if cal:
        evidence.append(esc(calibration_text(cal)))
    elif fit:
        evidence.append(f"Retention is the share of the dense model's right free-generation answers a "
                        f"modification keeps, predicted from the teacher-forced KL by a fit on "
                        f"{esc(fit['fitted_on'])}'s measured grid ({esc(fit['grid'])}); on methods held out of "
                        f"that fit its error was {val(fit['lomo_mae'], '.2f')} on average and the intervals "
                        f"cover {val(fit['coverage'], '.0%')}.")
    recs = _recovery(cal)
    where = ([] if not recs else
             ["<h2>Where the lost answers went</h2>", f"<p>{esc(reading(recs))}</p>",
              html_table(table_rows(recs), KEYS, cell)])
    examples = [e | {"pruning": a["spec"]} for a in (cal or {}).get("anchors", []) for e in a.get("examples", [])]
    shown = ([] if not examples else
             ["<h2>What the anchors said instead</h2>",
              html_table(examples[:6], ("pruning", "question", "dense", "pruned"), lambda v: esc(str(v)[:160]))])
    style = ("<style>table{font-size:12px;table-layout:auto;width:100%;max-width:100%}"
             "td,th{padding:2px 6px}img{max-width:100%}.rec{font-size:15px;border-left:4px solid #2a7;"
             "padding:6px 10px;background:#f3faf6}</style>")
    return html_page("prunelens advise", style,
        f"<h1>Advice — {esc(result['model'].get('name', ''))}, {val(result['budget'], '.0%')} saving, "
        f"{esc(result['use'])} use</h1>", f"<p class=\"rec\"><b>{esc(result['recommendation'])}</b></p>",
        *[img(f) for f in figs], *where, *shown,
        "<h2>Evidence</h2>", *[f"<p>{e}</p>" for e in evidence],
        '<p class="muted">retention = share of the dense model\'s right free-generation answers a pruning keeps '
        "(interval: the stated coverage for the true share); × in the figure: an anchor's measured share. "
        "risk = 1 − a^32 from the teacher-forced top-1 agreement a (kept for reference: it saturates). saved = "
        "share of decoder linear-weight memory saved against bf16 (unstructured zeros only save it in a sparse "
        "format); decode × = measured greedy decoding, batch 1, dense time ÷ modified time, on this machine.</p>",
        html_table(rows, keys, cell))


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The recommendation, then the candidates in their ranked order, and what calibrated them."""
    fit, cal = res.get("retention_fit"), res.get("calibration")
    lines = [f"recommendation: {res['recommendation']}",
             f"{'candidate':22s} {'generative retention':44s} {'saved':>6s} {'decode':>7s} {'agree run':>9s} "
             "risk gen / MCQ / retrieval"]
    for r in res["rows"]:
        flag = "" if r["meets_budget"] else "  (below budget)"
        keep = "—" if "retention" not in r else retention_text(r["retention"])
        lines.append(f"{r['spec']:22s} {keep:44s} {r['saved']:6.1%} {r['decode_speedup']:6.2f}x "
                     f"{text(r['agreeing_tokens'], '.1f', 'inf'):>9s} {r['risk_generative']:.3f} / "
                     f"{r['risk_multiple_choice']:.3f} / {r['risk_retrieval']:.4f}{flag}")
    lines += [f"repair gain of {r['spec']} {gain_text(r['repair_gain'])} (negative = repair helps)"
              for r in res["rows"] if "repair_gain" in r]
    if cal:
        lines.append(calibration_text(cal))
        recs = _recovery(cal)
        if recs:
            lines.append(f"where the lost answers went: {reading(recs)}")
        if cal.get("cells"):
            lines.append(f"calibration cells: {cal['cells']}")
    elif fit:
        lines.append(f"generative retention: share of the dense model's right free-generation answers kept, "
                     f"{fit['coverage']:.0%} interval, fitted on {fit['fitted_on']} (held-out-method MAE "
                     f"{fit['lomo_mae']:.2f})")
    best = next((r for r in res["rows"] if r["meets_budget"]), None)
    how = route(best["spec"]) if best and not best.get("external") else None
    return [*lines, *([f"deploy: {how} (docs/deploy.md)"] if how else [])]
