"""The repair table and figure of docs/repair.md (issue 19), from grids measured by
``benchmarks/predictor_validation.py`` over recipes such as ``block:4`` and ``block:4+repair:linear``.

Per recipe: the predictor's teacher-forced KL and free-running disagreement on the built-in chat
prompts, WikiText-2 perplexity, ARC-Easy accuracy (log-likelihood, seeded sample) and, on the
questions the dense model answers right in both formats, the share still right by free generation
(generative retention) and by multiple choice — with binomial standard errors — beside the
retention the shipped calibrated predictor gives from the KL alone (does it still hold for repaired
models?).

    python benchmarks/repair_table.py docs/sweeps/repair-smollm2 [more grids] --figure docs/repair/repair-smollm2.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from prunelens.analyses.predictor import predict_retention, retention_fit_for
from prunelens.render import subplots

VARIANTS = ("", "repair:linear", "repair:cosine", "repair:scale")


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def rows_of(grid: Path) -> tuple[dict, list[dict]]:
    res = json.loads((grid / "validation.json").read_text())
    found = retention_fit_for(res["model"])
    n = res["subset_size"]
    out = []
    for r in res["rows"]:
        drop, _, variant = r["spec"].partition("+")
        gen, mcq = 1 - r["gen_drop"], 1 - r["mcq_drop"]
        pred = predict_retention(found[1], r) if found else None
        out.append({"spec": r["spec"], "drop": drop, "variant": variant, "tf_kl": r["tf_kl"],
                    "fr_disagree": r["fr_token_disagree"], "ppl": r["ppl"], "arc_acc": r["mcq_acc"],
                    "arc_se": _se(r["mcq_acc"], 200) if r["mcq_acc"] is not None else None,
                    "gen": gen, "gen_se": _se(gen, n), "mcq": mcq, "mcq_se": _se(mcq, n),
                    "predicted": pred, "risk": r["risk"]["generative"]})
    return res, out


def table(res: dict, rows: list[dict]) -> str:
    d = res["dense"]
    arc = "not measured (--mcq-limit 0)" if d["mcq_acc"] is None else f"{d['mcq_acc']:.3f}"
    lines = [f"{res['model'].get('preset') or res['model'].get('name')}: dense perplexity {d['ppl']:.2f}, "
             f"ARC-Easy {arc}; retention over the {res['subset_size']} questions right in both "
             "formats (± one standard error)", "",
             "| recipe | TF KL | FR disagree | WikiText-2 ppl | ARC-Easy acc | MC retention | generative retention "
             "| predicted from KL [80 %] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["predicted"]
        pred = f"{p[0]:.2f} [{p[1]:.2f}, {p[2]:.2f}]" + (" (outside fit)" if p[3] else "") if p else "—"
        lines.append(f"| {r['spec']} | {r['tf_kl']:.3f} | {r['fr_disagree']:.3f} | {r['ppl']:.1f} | "
                     + ("— | " if r["arc_acc"] is None else f"{r['arc_acc']:.3f} ± {r['arc_se']:.3f} | ")
                     + f"{r['mcq']:.2f} ± {r['mcq_se']:.2f} | "
                     f"{r['gen']:.2f} ± {r['gen_se']:.2f} | {pred} |")
    return "\n".join(lines)


def figure(rows: list[dict], title: str, path: Path) -> None:
    drops = list(dict.fromkeys(r["drop"] for r in rows))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    by = {(r["drop"], r["variant"]): r for r in rows}
    acc = (("arc_acc", "arc_se", "ARC-Easy accuracy (log-likelihood)", False)
           if all(r["arc_acc"] is not None for r in rows) else
           ("mcq", "mcq_se", "MC retention (dense-correct ARC)", False))
    panels = [("tf_kl", None, "teacher-forced KL (chat prompts)", True),
              ("ppl", None, "WikiText-2 perplexity", True), acc,
              ("gen", "gen_se", "generative retention (dense-correct ARC)", False)]
    fig, axes = subplots(1, 4, figsize=(16, 3.8))
    width = 0.8 / max(len(variants), 1)
    for ax, (key, err, label, log) in zip(axes, panels, strict=True):
        for k, v in enumerate(variants):
            xs = [i + (k - (len(variants) - 1) / 2) * width for i, d in enumerate(drops) if (d, v) in by]
            ys = [by[(d, v)][key] for d in drops if (d, v) in by]
            es = [by[(d, v)][err] for d in drops if (d, v) in by] if err else None
            ax.bar(xs, ys, width, yerr=es, label=v or "unrepaired", capsize=2)
        ax.set_xticks(range(len(drops)), drops, fontsize=8)
        ax.set_title(label, fontsize=9)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="+")
    ap.add_argument("--figure", help="write the figure of the first grid here")
    a = ap.parse_args()
    for k, g in enumerate(a.grids):
        res, rows = rows_of(Path(g))
        print(f"### `{g}`\n\n{table(res, rows)}\n")
        if a.figure and k == 0:
            figure(rows, f"{res['model'].get('preset') or res['model'].get('name')}: repaired vs unrepaired "
                   f"({g})", Path(a.figure))


if __name__ == "__main__":
    main()
