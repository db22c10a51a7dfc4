"""Self-calibrated retention across model families, held out one family at a time (issue 44).

The shipped retention fits predict held-out *methods* of their own model well and held-out
*families* badly (docs/beyond-the-paper.md §2b). ``advise --calibrate N`` therefore treats the
other families' fits as a prior and measures N anchor prunings of the user's model
(``analyses.selfcal``). This script checks that procedure the way a user meets it: for each family
F and each target, the prior is made from the *other* families' ARC fits only, N = 0..3 anchors of
F are chosen as ``advise`` chooses them (spread over the KL range), and every other pruning of F is
predicted and compared with its measured retention (MAE, and whether the measured share falls in
the stated interval for that many questions).

Targets: free-generation ARC-Easy (the paired cloze grids of ``predictor_validation.py``, all three
families) and GSM8K / HumanEval (Qwen2.5-Coder-1.5B's Figure-1 sweeps, 50 problems each; the two
small models answer 0 and 5 of 50 right dense, too few to measure a retention on).

Stages (``--stage``): ``signals`` computes the predictor's teacher-forced KL for each pruning of the
Figure-1 sweeps (the same 8 prompts × 32 steps as the grids; cells under ``OUT/cells``, resumable);
``table`` (seconds) writes ``OUT/selfcal.json`` and prints the table.

    python benchmarks/selfcal_validation.py --stage signals --out docs/sweeps/selfcal
    python benchmarks/selfcal_validation.py --stage table --out docs/sweeps/selfcal
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from prunelens import builtin_prompts, load_model
from prunelens.analyses.cells import CellCache, cell_name, environment, model_fingerprint
from prunelens.analyses.predictor import collapse_signals, retention_fit
from prunelens.analyses.selfcal import calibrate, choose_anchors, predict, prior_from_fits, scatter_from_fits
from prunelens.model.memory import release_freed_memory
from prunelens.prune.recipe import build
from prunelens.runs import write_json
from prunelens.tasks.base import TASKS

ROOT = Path(__file__).resolve().parents[1]
ARC_GRIDS = {"smollm2-135m": "docs/sweeps/predictor-smollm2",
             "gemma3-270m": "docs/sweeps/predictor-gemma3-270m",
             "qwen2.5-coder-1.5b": "docs/sweeps/predictor-qwen1.5b-pool500"}
FIG1 = {"model": "qwen2.5-coder-1.5b", "sweeps": ("docs/sweeps/fig1-qwen1.5b-attn", "docs/sweeps/fig1-qwen1.5b-mlp",
                                                   "docs/sweeps/fig1-qwen1.5b-block"),
        "tasks": {"gsm8k": "exact_match", "humaneval": "pass@1"}}
MAX_ANCHORS = 3


def _cell(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def fig1_prunings() -> list[dict[str, Any]]:
    """Each pruning of the Figure-1 sweeps as an exact layer spec, with its per-problem outcomes."""
    out = []
    for sweep in FIG1["sweeps"]:
        for cell in sorted((ROOT / sweep / "cells").glob("*--gsm8k.json")):
            c = _cell(cell)
            mod = c["modification"]
            layers = {k: mod.get(k) or [] for k in ("attn", "mlp", "block")}
            kind = [k for k, v in layers.items() if v]
            row: dict[str, Any] = {"sweep": sweep, "amount": c["amount"], "method": c["method"],
                                   "spec": f"{kind[0]}@{','.join(map(str, layers[kind[0]]))}" if kind else None}
            for task, metric in FIG1["tasks"].items():
                d = _cell(cell.with_name(f"{c['amount']}--{task}.json"))
                row[task] = TASKS[task].hits(metric, d["details"])
            out.append(row)
    return out


def stage_signals(out: Path) -> None:
    prompts = builtin_prompts()
    identity = {"model": FIG1["model"], "prompts": "builtin", "steps": 32,
                "model_files": model_fingerprint(FIG1["model"]), "environment": environment("cpu", "float32")}
    cache = CellCache(out, "manifest.json", "self-calibration validation", identity).open(
        schema="prunelens.selfcal-validation/1")
    lm = load_model(FIG1["model"])
    for p in fig1_prunings():
        if p["spec"] is None or cache.has(p["spec"]):
            continue
        t = time.perf_counter()
        mod = build(lm, p["spec"], progress=False)
        sig, _ = collapse_signals(lm, mod, prompts, steps=32)
        cache.save(p["spec"], {"spec": p["spec"], **sig, "seconds": time.perf_counter() - t})
        print(f"{p['spec']:24s} tf KL {sig['tf_kl']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
        del mod
        release_freed_memory()


def target_rows(out: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(family, target) -> rows of {spec, method, tf_kl, hits on the dense model's right answers}."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for fam, grid in ARC_GRIDS.items():
        v = json.loads((ROOT / grid / "validation.json").read_text())
        rows[(fam, "arc_easy (generative)")] = [
            {"spec": r["spec"], "method": r["method"], "tf_kl": r["tf_kl"], "hits": r["gen_hits"]} for r in v["rows"]]
    prunings = fig1_prunings()
    dense = next(p for p in prunings if p["spec"] is None)
    for task in FIG1["tasks"]:
        right = [q for q, h in dense[task].items() if h]
        rs = []
        for p in prunings:
            cell = out / "cells" / f"{cell_name(p['spec'] or '')}.json"
            if p["spec"] is None or not cell.is_file():
                continue
            rs.append({"spec": p["spec"], "method": p["method"], "tf_kl": _cell(cell)["tf_kl"],
                       "hits": [p[task][q] for q in right]})
        rows[(FIG1["model"], task)] = rs
    return rows


def held_out(rows: list[dict[str, Any]], prior: tuple[np.ndarray, np.ndarray, float], n_anchors: int,
             coverage: float) -> dict[str, Any]:
    """Anchors chosen as ``advise`` chooses them; every other row predicted and checked."""
    logs = [math.log(max(r["tf_kl"], 1e-6)) for r in rows]
    idx = choose_anchors(logs, n_anchors)
    anchors = [{"tf_kl": rows[i]["tf_kl"], "k": float(np.sum(rows[i]["hits"])), "n": len(rows[i]["hits"])}
               for i in idx]
    cal = calibrate(anchors, *prior[:2], coverage=coverage, scatter=prior[2])
    errs, inside = [], []
    for i, r in enumerate(rows):
        if i in idx:
            continue
        p = predict(cal, r["tf_kl"], n_items=len(r["hits"]))
        m = float(np.mean(r["hits"]))
        errs.append(abs(p["predicted"] - m))
        inside.append(p["low"] <= m <= p["high"])
    return {"anchors": [rows[i]["spec"] for i in idx], "model": cal["model"], "mae": float(np.mean(errs)),
            "coverage": float(np.mean(inside)), "n_predicted": len(errs)}


def stage_table(out: Path, coverage: float) -> dict[str, Any]:
    rows = target_rows(out)
    fits = {fam: retention_fit(rs, hits="hits", coverage=coverage)
            for (fam, tgt), rs in rows.items() if tgt.startswith("arc_easy")}
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "coverage": coverage, "arc_grids": ARC_GRIDS,
                           "fig1": FIG1, "table": []}
    for (fam, tgt), rs in rows.items():
        others = {f: v for f, v in fits.items() if f != fam}
        prior = (*prior_from_fits(others), scatter_from_fits(others))
        n_items = len(rs[0]["hits"]) if rs else 0
        for n in range(MAX_ANCHORS + 1):
            h = held_out(rs, prior, n, coverage)
            res["table"].append({"family": fam, "target": tgt, "prunings": len(rs), "questions": n_items,
                                 "n_anchors": n, **h})
    write_json(out / "selfcal.json", res)
    print(f"| held-out family | target | prunings / questions | N | model | MAE | {coverage:.0%} coverage |")
    print("|---|---|---|---|---|---|---|")
    for t in res["table"]:
        print(f"| {t['family']} | {t['target']} | {t['prunings']} / {t['questions']} | {t['n_anchors']} | {t['model']} "
              f"| {t['mae']:.3f} | {t['coverage']:.2f} ({t['n_predicted']}) |")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("signals", "table"), required=True)
    ap.add_argument("--out", default="docs/sweeps/selfcal")
    ap.add_argument("--coverage", type=float, default=0.8)
    a = ap.parse_args()
    out = ROOT / a.out if not Path(a.out).is_absolute() else Path(a.out)
    if a.stage == "signals":
        stage_signals(out)
    else:
        stage_table(out, a.coverage)


if __name__ == "__main__":
    main()
