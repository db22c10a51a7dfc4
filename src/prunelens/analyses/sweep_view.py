"""Tables, the Figure-1 plot and the HTML page of a sweep, rebuilt from its cached cells."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from prunelens.analyses.sweep_data import SCHEMA, SweepResult, is_dense, relative_drop
from prunelens.data import is_number
from prunelens.render import esc, html_page, img, save_figure, subplots
from prunelens.runs import atomic_write_text, write_json
from prunelens.tasks.registry import GENERATIVE, PERPLEXITY

# Non-generative kinds read one step or one representation; fidelity is generative by nature.
GEN_KINDS = (GENERATIVE, "fidelity")


def _grid(result: SweepResult) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    cells = {(c["amount"], c["task"]): c for c in result.cells}
    return list(result.spec.amounts), list(result.spec.tasks), cells


def _dense_amount(amounts: list[str]) -> str | None:
    return next((a for a in amounts if is_dense(a)), None)


def rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per (task, amount): score, stderr, n and the relative drop from the dense score."""
    amounts, tasks, cells = _grid(result)
    dense = _dense_amount(amounts)
    out = []
    for t in tasks:
        base = cells[(dense, t)]["score"] if dense is not None and (dense, t) in cells else None
        for a in amounts:
            c = cells.get((a, t))
            if c is None:
                continue
            out.append({"task": t, "kind": c["kind"], "metric": c["metric"], "amount": a, "label": c["label"],
                        "score": c["score"], "stderr": c["stderr"], "n": c["n"],
                        "relative_drop": relative_drop(base, c["score"], c["kind"] == PERPLEXITY)})
    return out


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def table1(result: SweepResult) -> list[dict[str, Any]]:
    """Per amount: mean relative drop of generative vs non-generative tasks (the paper's Table 1).

    Non-generative = multiple-choice and retrieval; fidelity and perplexity are listed per task only.
    """
    rs = rows(result)
    out = []
    for a in result.spec.amounts:
        here = [r for r in rs if r["amount"] == a]
        gen = _mean([r["relative_drop"] for r in here if r["kind"] == GENERATIVE])
        non = _mean([r["relative_drop"] for r in here if r["kind"] not in (*GEN_KINDS, PERPLEXITY)])
        label = next((r["label"] for r in here), a)
        out.append({"amount": a, "label": label, "generative_drop": gen, "non_generative_drop": non,
                    "generative_worse": None if gen is None or non is None else gen > non,
                    **{f"drop:{r['task']}": r["relative_drop"] for r in here}})
    return out


def _f(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if pct and abs(x) < 0.005:
        return "0%"
    return f"{x:+.0%}" if pct else f"{x:.3f}"


def markdown_table(result: SweepResult) -> str:
    amounts, tasks, cells = _grid(result)
    rs = {(r["task"], r["amount"]): r for r in rows(result)}
    head = "| task | kind | metric | " + " | ".join(_label_of(result, a) for a in amounts) + " |"
    lines = [head, "|" + "---|" * (3 + len(amounts))]
    for t in tasks:
        first = next((rs[(t, a)] for a in amounts if (t, a) in rs), None)
        if first is None:
            continue
        vals = []
        for a in amounts:
            r = rs.get((t, a))
            if r is None:
                vals.append("—")
                continue
            se = "" if r["stderr"] is None or not math.isfinite(r["stderr"]) else f" ±{r['stderr']:.3f}"
            drop = "" if a == _dense_amount(amounts) else f" ({_f(-r['relative_drop'], True)})" \
                if r["relative_drop"] is not None else " (—)"
            vals.append(f"{r['score']:.3f}{se}{drop}")
        lines.append(f"| {t} | {first['kind']} | {first['metric']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _label_of(result: SweepResult, amount: str) -> str:
    c = next((c for c in result.cells if c["amount"] == amount), None)
    return f"{amount} ({c['label']})" if c is not None and c["label"] != amount else amount


def markdown_table1(result: SweepResult) -> str:
    lines = ["| amount | pruning | generative: mean change vs dense | non-generative: mean change vs dense "
             "| generative drop larger? |",
             "|---|---|---|---|---|"]
    for r in table1(result):
        worse = {True: "yes", False: "no", None: "—"}[r["generative_worse"]]
        gen, non = (None if d is None else -d for d in (r["generative_drop"], r["non_generative_drop"]))
        lines.append(f"| {r['amount']} | {r['label']} | {_f(gen, True)} | {_f(non, True)} | {worse} |")
    return "\n".join(lines) + "\n"


def csv_text(result: SweepResult) -> str:
    buf = io.StringIO()
    keys = ["task", "kind", "metric", "amount", "label", "score", "stderr", "n", "relative_drop"]
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows(result):
        w.writerow({k: ("" if r[k] is None else r[k]) for k in keys})
    return buf.getvalue()


def _x(amount: str, i: int) -> float:
    try:
        return float(amount)
    except ValueError:
        return float(i)  # N:M or wBgG amounts: plot in the given order


def _rel_se(row: dict[str, Any], dense: float | None) -> float:
    """The pruned score's standard error on the relative scale (0 where unknown, e.g. perplexity)."""
    se = row["stderr"]
    if not dense or se is None or not math.isfinite(se) or row["kind"] == PERPLEXITY:
        return 0.0
    return se / dense


def figure1(result: SweepResult, path: Path) -> Path:
    """Score relative to dense vs amount: generative tasks left, non-generative right."""
    amounts = list(result.spec.amounts)
    rs = rows(result)
    numeric = all(is_number(a) or a == "dense" for a in amounts)
    xs = {a: (0.0 if a == "dense" else _x(a, i)) if numeric else float(i) for i, a in enumerate(amounts)}
    dense = _dense_amount(amounts)
    fig, axes = subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = (("generative (free-running decoding)", lambda k: k in GEN_KINDS),
              ("non-generative (one step / one representation)", lambda k: k not in GEN_KINDS))
    for ax, (title, keep) in zip(axes, panels, strict=True):
        drawn = False
        for t in dict.fromkeys(r["task"] for r in rs if keep(r["kind"])):
            base = next((r["score"] for r in rs if r["task"] == t and r["amount"] == dense), None)
            pts = [(xs[r["amount"]], 1 - r["relative_drop"], _rel_se(r, base)) for r in rs
                   if r["task"] == t and r["relative_drop"] is not None]
            if pts:
                x, y, e = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=t)
                drawn = True
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{result.spec.method} amount")
        if not numeric:
            ax.set_xticks(list(xs.values()), amounts)
        if drawn:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("score relative to dense (± SE)")
    fig.suptitle(f"{result.spec.model}: {result.spec.method}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def _md_to_html_table(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if not set(ln) <= set("|-")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{esc(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def reading(result: SweepResult) -> list[str]:
    out = []
    for r in table1(result):
        if is_dense(r["amount"]) or r["generative_worse"] is None:
            continue
        gen = _f(-r["generative_drop"], True)
        non = _f(-r["non_generative_drop"], True)
        out.append(f"{r['label']}: generative tasks change by {gen} of their dense score on average, "
                   f"non-generative tasks by {non} — the generative drop is "
                   f"{'larger' if r['generative_worse'] else 'not larger'}.")
    return out


def missing(result: SweepResult) -> list[str]:
    """``amount/task`` of the grid's cells not (yet) finished."""
    done = {(c["amount"], c["task"]) for c in result.cells}
    return [f"{a}/{t}" for a in result.spec.amounts for t in result.spec.tasks if (a, t) not in done]


def render_sweep_html(result: SweepResult, fig: Path) -> str:
    s = result.spec
    gap = missing(result)
    warn = (f'<div class="reading"><b>Incomplete: {len(result.cells)} of {len(result.cells) + len(gap)} '
            f"cells finished</b>; missing {esc(', '.join(gap))}. `prunelens report` lists why and the "
            "command computing only them.</div>") if gap else ""
    return html_page(f"prunelens sweep — {s.model} {s.method}",
        f"<h1>Sweep: {esc(s.model)}, {esc(s.method)}</h1>", warn,
        '<p class="muted">Scores of the dense and pruned model per task; drops are relative to the dense '
        "score. Generative tasks decode freely for many steps; multiple-choice and retrieval read one step "
        "or one representation.</p>",
        "<h2>Reading</h2>", *(f'<div class="reading">{esc(t)}</div>' for t in reading(result)),
        "<h2>Figure</h2>", img(fig),
        "<h2>Scores</h2>", _md_to_html_table(markdown_table(result)),
        "<h2>Relative drops</h2>", _md_to_html_table(markdown_table1(result)),
        "<h2>Settings</h2>", f"<pre>{esc(str(result.identity()))}</pre>")


def write_outputs(result: SweepResult) -> None:
    """results.json, table.csv, table.md, table1.md, figure1.png and report.html (each atomic)."""
    out = result.out_dir
    assert out is not None
    slim = [{k: v for k, v in c.items() if k != "details"} for c in result.cells]
    write_json(out / "results.json", {"schema": SCHEMA, "spec": result.identity(), "missing": missing(result),
                                      "cells": slim,
                                      "rows": rows(result), "table1": table1(result)})
    atomic_write_text(out / "table.csv", csv_text(result))
    atomic_write_text(out / "table.md", markdown_table(result))
    atomic_write_text(out / "table1.md", markdown_table1(result))
    tmp_fig = out / f".figure1.{os.getpid()}.tmp.png"  # shards of one sweep may write it at once
    figure1(result, tmp_fig)
    tmp_fig.replace(out / "figure1.png")
    atomic_write_text(out / "report.html", render_sweep_html(result, out / "figure1.png"))
