"""Collapse predictor validated against measured score drops over a grid of prunings.

For one model: the questions of ARC-Easy that the dense model answers right in *both* formats
(multiple choice by option log-likelihood, and free generation matched to an option: the
``paired_eval`` cloze style, ``select="dense-correct"``) are fixed once. Then, for every pruning
of the grid (layer drops, weight sparsification, quantisation, each at several amounts):

- the predictor's signals on the 8 built-in chat prompts × 32 steps (``predictor.collapse_signals``);
- measured: the share of those questions still answered right by free generation (``gen_drop`` =
  1 − retained) and by multiple choice (``mcq_drop``);
- the proxies people use today: the change of WikiText-2 perplexity (log ratio, a few 512-token
  windows) and the change of ordinary ARC-Easy accuracy (log-likelihood, a seeded sample).

Each pruning's numbers, per-question outcomes included, are saved as they finish in the cell cache
(``OUT/cells/*.json`` under ``OUT/manifest.json``, which records the settings, data hashes and
package versions): a killed run resumes, a run with other settings or data is refused. The end
writes ``OUT/validation.json`` with Spearman correlations against the measured generative drop — per
signal, for the predicted risk, for each proxy and for a leave-one-method-out linear fit — their 95
% intervals over a bootstrap of the questions, the split-half reliability of the measured drops
(which caps the reachable ρ), and ``OUT/predictor.png``.

    python benchmarks/predictor_validation.py --out docs/sweeps/predictor-smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from prunelens import builtin_prompts, load_model
from prunelens.analyses.cells import CellCache, data_hashes, environment, model_fingerprint
from prunelens.analyses.paired import PairedSetup, both_formats, paired_questions
from prunelens.analyses.predictor import collapse_signals, validate
from prunelens.model.memory import release_freed_memory
from prunelens.prune.base import method_name
from prunelens.prune.recipe import Calibration, build, footprint, split_specs
from prunelens.render import subplots
from prunelens.runs import write_json
from prunelens.tasks.mcq import evaluate_mcq
from prunelens.tasks.perplexity import perplexity
from prunelens.tasks.registry import check_task
from prunelens.tasks.sources import load_rows
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()
GRID = ("attn:2", "attn:4", "attn:6", "attn:8", "mlp:1", "mlp:2", "mlp:3", "block:1", "block:2", "block:3",
        "magnitude:0.2", "magnitude:0.3", "wanda:0.3", "wanda:0.5", "wanda:2:4", "sparsegpt:0.5",
        "rtn:w4g128", "rtn:w3g128")


def method_of(spec: str) -> str:
    """The family a spec belongs to (its amounts vary within it): the unit left out in validation.
    A recipe's family joins its parts' (``block+repair:linear``)."""
    if "+" in spec:
        return "+".join(method_of(p) if not p.startswith("repair") else p for p in spec.split("+"))
    head = method_name(spec)
    if head in ("rtn", "gptq"):
        return head
    return f"{head}-nm" if spec.count(":") == 2 else head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(DATA) if DATA.is_dir() else None,
                    help="local data (default ../shared/data when present; without it ARC-Easy and WikiText-2 "
                    "load from the Hub)")
    ap.add_argument("--calib", help="calibration file (default: c4_calibration.jsonl in --data-dir, else the "
                    "built-in sample)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", default=",".join(GRID))
    ap.add_argument("--pool", type=int, default=500, help="ARC-Easy questions the subset is drawn from")
    ap.add_argument("--mcq-limit", type=int, default=200,
                    help="ARC-Easy questions for the accuracy proxy; 0 leaves that proxy out (large models)")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8,
                    help="generation batch; larger is faster for a 1B+ model (weights read once a step)")
    args = ap.parse_args()
    out = Path(args.out)
    data = args.data_dir
    c4 = Path(data) / "c4_calibration.jsonl" if data else None
    calib = args.calib or (str(c4) if c4 and c4.is_file() else None)
    # each dataset's identity: a local file's hash, or the Hub rows' (tasks.sources)
    hashes = {**check_task("arc_easy", data), **check_task("wikitext", data),
              **({Path(calib).name: h for h in data_hashes([calib]).values()} if calib else {})}
    identity = {"model": args.model, "pool": args.pool, "mcq_limit": args.mcq_limit,
                "ppl_windows": args.ppl_windows, "seed": args.seed, "data": hashes,
                "environment": environment("cpu", "float32"), "model_files": model_fingerprint(args.model)}
    # runs from before the manifest existed hold dense.json + cells/: adopted, their cells kept
    cache = CellCache(out, "manifest.json", "predictor validation", identity, adopt=(out / "dense.json").is_file())
    cache.open(schema="prunelens.predictor-validation/1")
    t0 = time.perf_counter()
    lm = load_model(args.model)
    text = "\n\n".join(r["text"] for r in load_rows("wikitext", data).rows)
    setup = PairedSetup("arc_easy", "cloze", data, args.pool, args.seed, 0, args.batch_size, True, False)

    base_path = out / "dense.json"
    if base_path.is_file():
        base = json.loads(base_path.read_text())
    else:
        pool = paired_questions("arc_easy", data, args.pool, args.seed)
        side = both_formats(lm, setup, pool, None, "dense")
        keep = [i for i, (m, g) in enumerate(zip(side["mcq_hits"], side["gen_hits"], strict=True)) if m and g]
        base = {"model": lm.info, "pool": len(pool), "keep": [pool[i].index for i in keep],
                "pool_mcq_acc": sum(side["mcq_hits"]) / len(pool),
                "pool_gen_acc": sum(side["gen_hits"]) / len(pool),
                "ppl": perplexity(lm, text, None, 512, args.ppl_windows, progress=False)["perplexity"],
                "mcq_acc": (evaluate_mcq(lm, "arc_easy", data, args.mcq_limit, args.seed, progress=False).acc
                            if args.mcq_limit else None)}
        write_json(base_path, base)
        print(f"dense: {len(keep)} of {len(pool)} questions right in both formats; ppl {base['ppl']:.2f}, "
              f"ARC-Easy acc {base['mcq_acc']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    pool = {q.index: q for q in paired_questions("arc_easy", data, args.pool, args.seed)}
    subset = [pool[i] for i in base["keep"]]
    prompts = builtin_prompts()

    rows = []
    for spec in split_specs(args.grid):
        key = "".join(c if c.isalnum() else "_" for c in spec)
        if cache.has(key):
            rows.append(cache.load(key))
            continue
        t = time.perf_counter()
        mod = build(lm, spec, Calibration(calib, seed=args.seed), progress=False)
        t_mod = time.perf_counter() - t
        sig, rk = collapse_signals(lm, mod, prompts, steps=32)
        t_sig = time.perf_counter() - t - t_mod
        side = both_formats(lm, setup, subset, mod, spec)
        ppl = perplexity(lm, text, mod, 512, args.ppl_windows, progress=False)["perplexity"]
        acc = (evaluate_mcq(lm, "arc_easy", data, args.mcq_limit, args.seed, mod, progress=False).acc
               if args.mcq_limit else None)
        row = {"spec": spec, "label": mod.label(), "method": method_of(spec), **sig, "risk": rk,
               "gen_drop": 1 - sum(side["gen_hits"]) / len(subset),
               "mcq_drop": 1 - sum(side["mcq_hits"]) / len(subset),
               "gen_hits": side["gen_hits"], "mcq_hits": side["mcq_hits"],
               "ppl": ppl, "ppl_log_ratio": math.log(ppl / base["ppl"]),
               "mcq_acc": acc, "mcq_acc_drop": None if acc is None else base["mcq_acc"] - acc,
               "footprint": footprint(lm, mod), "seconds": {"modify": t_mod, "signals": t_sig,
                                                           "total": time.perf_counter() - t}}
        cache.save(key, row)
        rows.append(row)
        print(f"{spec:14s} gen drop {row['gen_drop']:.3f}  mcq drop {row['mcq_drop']:.3f}  risk(gen) "
              f"{rk['generative']:.3f}  tf KL {sig['tf_kl']:.3f}  ppl x{ppl / base['ppl']:.2f}  "
              f"ARC acc {acc}  signals {t_sig:.1f} s  total {row['seconds']['total']:.0f} s", flush=True)
        del mod
        release_freed_memory()

    acc_proxy = ("mcq_acc_drop",) if args.mcq_limit else ()
    per_question = all("gen_hits" in r for r in rows)  # cells from before they were kept have none
    res = {"model": lm.info, "dense": base, "subset_size": len(subset), "rows": rows,
           "generative": validate(rows, "gen_drop", ("ppl_log_ratio", *acc_proxy, "mcq_drop"),
                                  hits="gen_hits" if per_question else None),
           "multiple_choice": validate(rows, "mcq_drop", ("ppl_log_ratio", *acc_proxy),
                                       hits="mcq_hits" if per_question else None)}
    write_json(out / "validation.json", res)
    _figure(res, out / "predictor.png")
    g = res["generative"]
    print(f"Spearman vs measured generative drop over {g['n']} prunings: risk {g['risk_generative']:.3f}; "
          f"LOMO fit {g['lomo_fit']['spearman']:.3f}; proxies " +
          ", ".join(f"{k} {v:.3f}" for k, v in g["proxies"].items()) + "; signals " +
          ", ".join(f"{k} {v:.3f}" for k, v in g["signals"].items()))
    if "questions" in g:
        q = g["questions"]
        print(f"over the {q['n']} questions: 95 % intervals " + ", ".join(
            f"{k} [{lo:.2f}, {hi:.2f}]" for k, (lo, hi) in q["rho_interval_95"].items()) +
            f"; target reliability {q['target_reliability']:.2f}, ρ ceiling {q['rho_ceiling']:.2f}")


def _figure(res: dict, path: Path) -> None:
    rows = res["rows"]
    methods = sorted({r["method"] for r in rows})
    fig, axes = subplots(1, 3, figsize=(13, 4))
    has_acc = "mcq_acc_drop" in res["generative"]["proxies"]
    third = (("mcq_acc_drop", "proxy: ARC-Easy accuracy drop") if has_acc
             else ("mcq_drop", "proxy: multiple-choice drop, same questions"))
    panels = [("tf_top1_disagree", "predictor: teacher-forced top-1 disagreement (1 − a)"),
              ("ppl_log_ratio", "proxy: log perplexity ratio"), third]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for m in methods:
            pts = [r for r in rows if r["method"] == m]
            ax.scatter([r[key] for r in pts], [r["gen_drop"] for r in pts], label=m, s=22)
        rho = (res["generative"]["signals"].get(key) if key in res["generative"]["signals"]
               else res["generative"]["proxies"][key])
        ax.set_title(f"{label}\nSpearman {rho:.2f}", fontsize=9)
        ax.set_ylabel("measured generative drop (dense-correct ARC-Easy)")
        ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{res['model'].get('name')}: {len(rows)} prunings, {res['subset_size']} questions",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    from prunelens.errors import PrunelensError

    try:
        main()
    except PrunelensError as e:  # one line, as the CLI does
        raise SystemExit(f"predictor_validation: error: {e}") from None
