"""``advise --calibrate N`` end to end on one model, and its predictions checked on candidates it
did not calibrate on (issue 44).

Runs ``advise`` as the CLI runs it (cost printed first, N anchors measured on free-generation
ARC-Easy through the resumable cells, every candidate predicted with an interval; run directory with
the decision page under ``OUT/advise``), then measures ``--check`` further candidates the same way
the anchors were measured (same questions, same cells directory, keys ``check-<spec>``) and prints
predicted vs measured retention. Cells are reused on a rerun, so committing ``OUT/cells`` lets a
later session redo the table in seconds.

    python benchmarks/selfcal_check.py --model gemma3-270m --out docs/sweeps/selfcal-gemma3-270m \\
        --calibrate 2 --check 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunelens import builtin_prompts, load_model
from prunelens.analyses.advise import ANALYSIS, advise, candidates, rank, recommendation
from prunelens.analyses.calibration import (
    BUILTIN_LIMIT,
    anchor_cell,
    builtin_target,
    calibrated,
    dense_first,
    identity_of,
)
from prunelens.analyses.selfcal import predict
from prunelens.model.memory import release_freed_memory
from prunelens.prune.recipe import Calibration, build
from prunelens.runs import read_json, write_json
from prunelens.testing import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--calibrate", type=int, default=2)
    ap.add_argument("--check", type=int, default=2, help="candidates, not anchors, measured to check the prediction")
    ap.add_argument("--limit", type=int, default=BUILTIN_LIMIT)
    ap.add_argument("--no-repair", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="read the advise run OUT/advise already holds (the "
                    "checks' cells are reused too): seconds")
    a = ap.parse_args()
    out = ROOT / a.out
    data = shared_data_dir()
    calib = data / "c4_calibration.jsonl"
    lm = load_model(a.model)
    target = builtin_target(lm, data, a.limit, a.seed)
    cells = out / "calibration"
    t0 = time.perf_counter()
    ident = identity_of(a.model, target, [str(calib), 16], 4, a.seed)
    if a.reuse and (out / "advise" / "results.json").is_file():  # the advise run is done: only the checks
        res = read_json(out / "advise" / "results.json")
        took = json.loads((out / "check.json").read_text())["advise_seconds"]
        # calibrated again from its cells by this version, ranked and recommended again, the page redrawn
        res["calibration"] = calibrated(lm, res["rows"], target, a.calibrate, dense_first(lm, target, cells, ident),
                                        lambda s: build(lm, s, Calibration(str(calib), 16, None, a.seed)))
        rank(res["rows"], "generative")
        res["recommendation"] = recommendation(res["rows"], "generative", a.budget, res["min_retention"])
        ANALYSIS.finish(res, out / "advise", overwrite=True)
    else:
        specs = candidates(lm, a.budget, repair=not a.no_repair)
        res = advise(lm, a.budget, "generative", builtin_prompts(), specs, str(calib), 16, 32, a.seed,
                     calibrate=a.calibrate, target=target, cells=cells, model_name=a.model)
        ANALYSIS.finish(res, out / "advise", overwrite=True)
        took = time.perf_counter() - t0
    anchors = {x["spec"] for x in res["calibration"]["anchors"]}
    # the checks: candidates spread over the KL range that were not anchors
    rest = sorted((r for r in res["rows"] if r["spec"] not in anchors), key=lambda r: r["signals"]["tf_kl"])
    picks = [rest[round(j * (len(rest) - 1) / max(a.check - 1, 1))] for j in range(a.check)] if rest else []
    cache, dense = dense_first(lm, target, cells, ident)
    checks = []
    for r in picks:
        key = f"check-{r['spec']}"
        if not cache.has(key):
            mod = build(lm, r["spec"], Calibration(str(calib), 16, None, a.seed), progress=False)
            cache.save(key, anchor_cell(lm, target, r["spec"], mod, dense, 4, a.seed, 8, True))
            del mod
            release_freed_memory()
        c = cache.load(key)
        q = r["retention"]
        # the interval for what n questions measure (the row's is for the true retention)
        m = predict(res["calibration"]["fit"], r["signals"]["tf_kl"], n_items=c["n"])
        checks.append({"spec": r["spec"], "tf_kl": r["signals"]["tf_kl"], "predicted": q["predicted"],
                       "low": q["low"], "high": q["high"], "measured": c["k"] / c["n"], "k": c["k"], "n": c["n"],
                       "low_measured": m["low"], "high_measured": m["high"],
                       "inside": m["low"] <= c["k"] / c["n"] <= m["high"]})
    summary = {"date": time.strftime("%Y-%m-%d"), "model": a.model, "budget": a.budget, "calibrate": a.calibrate,
               "advise_seconds": took, "cost_estimated_s": res["cost"]["seconds"],
               "cost_actual_s": res["cost"]["actual_s"], "anchors": res["calibration"]["anchors"],
               "calibration_model": res["calibration"]["model"], "checks": checks,
               "recommendation": res["recommendation"]}
    write_json(out / "check.json", summary)
    print(f"advise --calibrate {a.calibrate} on {a.model}: {took / 60:.1f} min (estimated "
          f"{res['cost']['seconds'] / 60:.1f} min before it ran)")
    for x in res["calibration"]["anchors"]:
        print(f"anchor {x['spec']:24s} tf KL {x['tf_kl']:.3f}  measured {x['k']}/{x['n']}")
    for c in checks:
        print(f"check  {c['spec']:24s} tf KL {c['tf_kl']:.3f}  predicted {c['predicted']:.2f} "
              f"[{c['low']:.2f}, {c['high']:.2f}]; for {c['n']} questions [{c['low_measured']:.2f}, "
              f"{c['high_measured']:.2f}]  measured {c['measured']:.2f} ({c['k']}/{c['n']})  "
              f"{'inside' if c['inside'] else 'OUTSIDE'}")
    print(json.dumps({"recommendation": res["recommendation"]}))


if __name__ == "__main__":
    main()
