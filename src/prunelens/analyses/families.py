"""The paper's Figure 1 and Table 1 across pruning families, drawn from saved sweeps.

One sweep per family (attention drop, MLP drop, block drop, or any registered method) on the same
model, options and task data. Nothing is recomputed: the dense cells may come from any one of the
sweeps, since a dense model does not depend on the pruning method, so the dense run is paid once.
Where both the dense and the pruned cell keep per-question outcomes, the relative change and its
standard error are *paired* over the same seeded questions (the dense score's own noise cancels);
otherwise the pruned score's standard error is divided by the dense score.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelens.analyses.base import Analysis, register
from prunelens.analyses.sweep import read_sweep
from prunelens.analyses.sweep_data import SweepResult, is_dense
from prunelens.analyses.sweep_view import GEN_KINDS
from prunelens.errors import PrunelensError
from prunelens.render import esc, html_page, img, save_figure, subplots
from prunelens.runs import atomic_write_text
from prunelens.tasks.data import stderr_of_mean
from prunelens.tasks.registry import PERPLEXITY, item_hits

SCHEMA = "prunelens.families/1"
NAMES = {"attn": "attention drop", "mlp": "MLP drop", "block": "block drop"}
# what a sweep's manifest identity may differ in across families: how the pruning is chosen
PER_FAMILY = ("method", "importance", "calib", "calib_samples", "calib_len", "calib_files")


@dataclass(frozen=True)
class Change:
    """One task at one amount of one family, relative to the dense score (0 = unchanged)."""

    family: str
    amount: str
    task: str
    kind: str
    score: float
    dense: float
    change: float
    stderr: float
    n: int
    paired: bool


def _shared(manifest: dict[str, Any]) -> dict[str, Any]:
    ident = dict(manifest["identity"])
    for k in PER_FAMILY:
        ident.pop(k, None)
    ident.pop("environment", None)  # versions are reported, not required equal
    return ident


def load_families(dirs: list[Path]) -> list[tuple[SweepResult, dict[str, Any]]]:
    """The sweeps with their manifests, or a one-line error when they do not measure the same thing."""
    if len(dirs) < 1:
        raise PrunelensError("families: give at least one sweep directory")
    out = []
    for d in dirs:
        if not (d / "sweep.json").is_file():
            raise PrunelensError(f"'{d}' is not a sweep directory (no sweep.json)")
        out.append(read_sweep(d))
    first_sweep, first = out[0]
    want = _shared(first)
    for sw, m in out[1:]:
        have = _shared(m)
        if have != want:
            diff = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
            raise PrunelensError(f"sweeps '{first_sweep.out_dir}' and '{sw.out_dir}' differ in {', '.join(diff)}; "
                                 "families must share the model, task options and data")
        for task, files in m.get("data", {}).items():
            if task in first.get("data", {}) and first["data"][task] != files:
                raise PrunelensError(f"sweeps '{first_sweep.out_dir}' and '{sw.out_dir}' read different "
                                     f"{task} data")
    return out


def _dense_cells(sweeps: list[SweepResult]) -> dict[str, dict[str, Any]]:
    dense: dict[str, dict[str, Any]] = {}
    for sw in sweeps:
        for c in sw.cells:
            if is_dense(c["amount"]):
                dense.setdefault(c["task"], c)
    return dense


def paired_differences(cell: dict[str, Any], base: dict[str, Any]) -> list[float] | None:
    """Per-problem outcome of ``cell`` minus that of ``base``, or None unless both keep per-problem
    records of the same problems (then the pair's noise cancels problem by problem)."""
    a = item_hits(cell["task"], cell["metric"], cell.get("details", {}))
    b = item_hits(base["task"], base["metric"], base.get("details", {}))
    if a is None or b is None or a.keys() != b.keys():
        return None
    return [a[k] - b[k] for k in a]


def relative_change(cell: dict[str, Any], dense: dict[str, Any]) -> tuple[float, float, bool]:
    """(score/dense − 1, its standard error, paired?) for two cells of one task."""
    d0 = dense["score"]
    if not d0:
        return math.nan, math.nan, False
    change = cell["score"] / d0 - 1.0
    d = paired_differences(cell, dense)
    if d is not None and len(d) > 1:
        return change, stderr_of_mean(d) / d0, True
    se = cell.get("stderr")
    return change, (se / d0 if se is not None and math.isfinite(se) else math.nan), False


def changes(sweeps: list[SweepResult]) -> list[Change]:
    dense = _dense_cells(sweeps)
    out = []
    for sw in sweeps:
        for c in sw.cells:
            base = dense.get(c["task"])
            if base is None or c["kind"] == PERPLEXITY:
                continue
            ch, se, paired = relative_change(c, base)
            out.append(Change(sw.spec.method, c["amount"], c["task"], c["kind"], c["score"], base["score"], ch, se,
                              c["n"], paired))
    return out


def _pool(cs: list[Change]) -> tuple[float | None, float | None]:
    """Mean change over tasks and its standard error (tasks are independent samples)."""
    v = [c for c in cs if math.isfinite(c.change)]
    if not v:
        return None, None
    se2 = [c.stderr ** 2 for c in v if math.isfinite(c.stderr)]
    se = math.sqrt(sum(se2)) / len(v) if len(se2) == len(v) else None
    return sum(c.change for c in v) / len(v), se


def _amount_key(amount: str) -> tuple[float, str]:
    try:
        return float(amount), amount
    except ValueError:
        return math.inf, amount


def table1(cs: list[Change]) -> list[dict[str, Any]]:
    """Per family and amount: mean relative change of generative vs non-generative tasks, ± SE."""
    rows = []
    families = list(dict.fromkeys(c.family for c in cs))
    for fam in families:
        amounts = sorted({c.amount for c in cs if c.family == fam}, key=_amount_key)
        for a in amounts:
            here = [c for c in cs if c.family == fam and c.amount == a]
            gen, gen_se = _pool([c for c in here if c.kind in GEN_KINDS])
            non, non_se = _pool([c for c in here if c.kind not in GEN_KINDS])
            gap = None if gen is None or non is None else gen - non
            gap_se = None if gen_se is None or non_se is None else math.hypot(gen_se, non_se)
            rows.append({"family": fam, "amount": a, "generative": gen, "generative_se": gen_se,
                         "non_generative": non, "non_generative_se": non_se, "gap": gap, "gap_se": gap_se,
                         "tasks": {c.task: {"change": c.change, "stderr": c.stderr, "paired": c.paired}
                                   for c in here}})
    return rows


def _pct(x: float | None, se: float | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:+.0%}" + (f" ± {se:.0%}" if se is not None else "")


def markdown_table1(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | amount | generative: mean change vs dense | non-generative: mean change vs dense "
             "| generative − non-generative |", "|---|---|---|---|---|"]
    for r in rows:
        if is_dense(r["amount"]):
            continue
        lines.append(f"| {NAMES.get(r['family'], r['family'])} | {r['amount']} | "
                     f"{_pct(r['generative'], r['generative_se'])} | "
                     f"{_pct(r['non_generative'], r['non_generative_se'])} | {_pct(r['gap'], r['gap_se'])} |")
    return "\n".join(lines) + "\n"


def markdown_tasks(cs: list[Change]) -> str:
    """Every task's score and change, one row per task and family, one column per amount."""
    amounts = sorted({c.amount for c in cs}, key=_amount_key)
    lines = ["| family | task | " + " | ".join(amounts) + " |", "|---|---|" + "---|" * len(amounts)]
    for fam in dict.fromkeys(c.family for c in cs):
        for task in dict.fromkeys(c.task for c in cs if c.family == fam):
            by = {c.amount: c for c in cs if c.family == fam and c.task == task}
            vals = []
            for a in amounts:
                c = by.get(a)
                vals.append("—" if c is None else f"{c.score:.3f}" if is_dense(a)
                            else f"{c.score:.3f} ({_pct(c.change)})")
            lines.append(f"| {NAMES.get(fam, fam)} | {task} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's two claims, checked at two standard errors on the data at hand."""
    out = []
    numeric = [r for r in rows if not is_dense(r["amount"]) and math.isfinite(_amount_key(r["amount"])[0])]
    for a in sorted({r["amount"] for r in numeric}, key=_amount_key):
        here = {r["family"]: r for r in numeric if r["amount"] == a and r["generative"] is not None}
        if "attn" in here and len(here) > 1:
            att = here["attn"]
            for fam, r in here.items():
                if fam == "attn":
                    continue
                d = att["generative"] - r["generative"]
                se = math.hypot(att["generative_se"] or 0.0, r["generative_se"] or 0.0)
                verdict = ("holds" if d > 2 * se else "fails (the reverse)" if d < -2 * se
                           else "is not resolved")
                out.append(f"{a} layers: generative scores change by {_pct(att['generative'])} after attention "
                           f"drop, {_pct(r['generative'])} after {NAMES.get(fam, fam)} — "
                           f"'attention more robust' {verdict} (difference {d:+.0%} ± {se:.0%}).")
    for r in numeric:
        if r["gap"] is None or r["gap_se"] is None:
            continue
        verdict = ("generative falls further" if r["gap"] < -2 * r["gap_se"] else
                   "multiple choice falls further" if r["gap"] > 2 * r["gap_se"] else "no difference beyond noise")
        out.append(f"{NAMES.get(r['family'], r['family'])} {r['amount']}: generative {_pct(r['generative'])}, "
                   f"non-generative {_pct(r['non_generative'])} — {verdict} (gap {_pct(r['gap'], r['gap_se'])}).")
    return out


def figure(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    """Mean score relative to dense vs layers removed, one line per family with ± SE bars:
    generative tasks left, non-generative right (the paper's Figure 1)."""
    rows = [r for r in result["table1"] if math.isfinite(_amount_key(r["amount"])[0])]
    fig, axes = subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = (("generative", "generative (free-running decoding)"),
              ("non_generative", "non-generative (one step / one representation)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        drawn = False
        for fam in dict.fromkeys(r["family"] for r in rows):
            pts = sorted((_amount_key(r["amount"])[0], 1 + r[key], r[f"{key}_se"] or 0.0) for r in rows
                          if r["family"] == fam and r[key] is not None)
            if pts and pts[0][0] != 0:
                pts.insert(0, (0.0, 1.0, 0.0))  # the dense model is every family's start
            if pts:
                x, y, e = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=NAMES.get(fam, fam))
                drawn = True
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layers removed" if set(result["families"]) <= set(NAMES) else "amount")
        if drawn:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("mean score relative to dense (± SE)")
    fig.suptitle(f"{result['model']}: pruning families", fontsize=11)
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "figure1.png"
    save_figure(fig, path)
    return [path]


def families_result(dirs: list[Path]) -> dict[str, Any]:
    """The Figure-1 / Table-1 result of saved sweeps (a notebook can call this directly)."""
    found = load_families(dirs)
    sweeps = [s for s, _ in found]
    cs = changes(sweeps)
    if not any(is_dense(s) for sw in sweeps for s in sw.spec.amounts):
        raise PrunelensError("families: no sweep has a dense cell (amount 0); add 0 to one sweep's --amounts")
    return {"schema": SCHEMA, "model": sweeps[0].spec.model, "sweeps": [str(d) for d in dirs],
            "families": [s.spec.method for s in sweeps], "changes": [c.__dict__ for c in cs],
            "table1": table1(cs), "options": found[0][1]["identity"]["options"]}


def summary(result: dict[str, Any]) -> list[str]:
    return [markdown_table1(result["table1"]), *reading(result["table1"])]


_TABLE1 = ("generative", "generative_se", "non_generative", "non_generative_se", "gap", "gap_se")
# what the families view reads from a saved result (checked when ``prunelens report`` reads it back)
FIELDS = {"model": "str", "sweeps[]": "str", "families[]": "str", "table1[].family": "str",
          "table1[].amount": "str", **{f"table1[].{k}": "num?" for k in _TABLE1},
          **{f"changes[].{k}": "str" for k in ("family", "amount", "task", "kind")},
          **{f"changes[].{k}": "num" for k in ("score", "dense")},
          **{f"changes[].{k}": "num?" for k in ("change", "stderr")},
          "changes[].n": "int", "changes[].paired": "bool"}


def html(result: dict[str, Any], figs: list[Path]) -> str:
    cs = [Change(**{k: c[k] for k in Change.__dataclass_fields__}) for c in result["changes"]]
    return html_page(f"prunelens families — {result['model']}",
                     f"<h1>Pruning families: {esc(result['model'])}</h1>",
                     '<p class="muted">Mean score relative to the dense model; ± one standard error, paired over '
                     "the same seeded questions where the cells keep per-question outcomes.</p>",
                     "<h2>Reading</h2>", *(f'<div class="reading">{esc(t)}</div>' for t in reading(result["table1"])),
                     "<h2>Figure</h2>", *(img(f) for f in figs),
                     "<h2>Table 1</h2>", f"<pre>{esc(markdown_table1(result['table1']))}</pre>",
                     "<h2>Per task</h2>", f"<pre>{esc(markdown_tasks(cs))}</pre>",
                     "<h2>Sweeps</h2>", f"<pre>{esc(chr(10).join(result['sweeps']))}</pre>")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweeps", nargs="+", help="sweep directories, one per pruning family (same model and options)")
    p.add_argument("--out", required=True, help="directory for results.json, figures/figure1.png, table1.md, "
                   "tasks.md and report.html")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def _run(args: argparse.Namespace) -> int:
    result = families_result([Path(d) for d in args.sweeps])
    out = Path(args.out)
    code = ANALYSIS.finish(result, out, overwrite=args.overwrite)
    atomic_write_text(out / "table1.md", markdown_table1(result["table1"]))
    atomic_write_text(out / "tasks.md", markdown_tasks([Change(**c) for c in result["changes"]]))
    return code


ANALYSIS = register(Analysis("families", "the paper's Figure 1 / Table 1 across pruning families, from saved "
                             "sweeps (nothing recomputed)", _arguments, _run, schema=SCHEMA, figures=figure,
                             html=html, summary=summary, fields=FIELDS))
