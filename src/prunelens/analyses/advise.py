"""``prunelens advise``: which pruning to use for a given saving and a given use, before any benchmark.

Candidates meeting the budget (share of the decoder's linear-weight memory saved, bf16 baseline) are
built from every family — attention / MLP / block drops with the count that reaches the budget,
Wanda and SparseGPT unstructured at the budget and 2:4, RTN and GPTQ at 4 bits — and each is scored
with the collapse predictor's cheap signals on a few prompts (``predictor``). For generative use the
candidates are ranked by predicted retention (the share of the dense model's right answers kept, with
an interval), calibrated on the user's own model with ``--calibrate N`` (``calibration``); for
multiple choice by the one-step disagreement, for retrieval by 1 − cos of the final hidden state
(what an embedder pools). Each row also carries the measured greedy-decoding speed-up of the modified
model against the dense one on this machine and the memory it would take. The candidates and the
estimated cost are printed before anything runs.

Each drop and each unstructured Wanda / SparseGPT candidate also comes repaired (``+repair:linear``
after a drop, ReplaceMe; ``+repair:scale`` after a weight method, per-channel correction): a repair
adds no memory, so the question is only whether it lowers the risk, and each repaired row shows its
measured gain over the same pruning unrepaired.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelens import options
from prunelens.analyses.advise_page import FIELDS, advise_figures, advise_html, summary_lines
from prunelens.analyses.base import Analysis, register
from prunelens.analyses.calibration import (
    BUILTIN_LIMIT,
    builtin_target,
    calibrated,
    cells_dir,
    config_target,
    dense_first,
    estimate,
    identity_of,
    probe,
)
from prunelens.analyses.paired import check_paired_task
from prunelens.analyses.predictor import collapse_signals, predict_retention, retention_fit_for
from prunelens.analyses.recovery import SAMPLES, Target
from prunelens.errors import PrunelensError
from prunelens.model.kvcache import forward_cached
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_freed_memory, release_weights
from prunelens.model.tokens import encode_prompts
from prunelens.model.views import view_of
from prunelens.prune.base import methods
from prunelens.prune.candidate import Candidate, stored_footprint
from prunelens.prune.recipe import Calibration, Recipe, build, footprint, split_specs
from prunelens.runs import check_out_dir, default_run_dir
from prunelens.tasks.config_file import is_task_config

SCHEMA = "prunelens.advise/1"
USES = ("generative", "multiple-choice", "retrieval")
DECODE_REPEATS = 2
"""Best of 2 timed decodes per side (it was 3): the dense run is timed right beside each candidate, so
drift cancels, and the third run cost 12 candidates × 4 s of the default sitting."""
REPAIRS = {"attn": "repair:linear", "mlp": "repair:linear", "block": "repair:linear",
           "wanda": "repair:scale", "sparsegpt": "repair:scale"}
"""The repair each family's candidate is also offered with: a dense map after a drop, a per-channel
scale after a weight method (a dense map would undo its sparsity)."""
BUDGET_SLACK = 0.005
"""A candidate within half a point of the budget meets it: zeros the dense (GGUF) weights already
hold are not counted as saved, so Wanda at exactly 25 % saves 24.97 %."""


def parse_budget(text: str) -> float:
    """'25%' or '0.25' → 0.25; the share of weight memory to save, in (0, 1)."""
    t = text.strip()
    try:
        b = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise PrunelensError(f"--budget must be a share such as 25% or 0.25, got '{text}'") from None
    if not 0 < b < 1:
        # a bare number of 1..99 is a percentage written without its sign
        hint = f"; did you mean '{t}%'?" if not t.endswith("%") and 1 <= b < 100 else ""
        raise PrunelensError(f"--budget must lie strictly between 0% and 100%, got '{text}'{hint}")
    return b


def _linear_params(lm: LoadedModel) -> tuple[int, dict[str, list[int]]]:
    """Decoder linear weights in all, and per layer for attention, MLP and the whole block."""
    a = lm.adapter
    per: dict[str, list[int]] = {"attn": [], "mlp": [], "block": []}
    for i in range(a.n_layers):
        for kind in ("attn", "mlp"):
            mod = lm.model.get_submodule(a.sublayer_path(kind, i))
            per[kind].append(sum(m.weight.numel() for m in mod.modules() if isinstance(m, nn.Linear)))
        per["block"].append(per["attn"][-1] + per["mlp"][-1])
    return sum(per["block"]), per


SLOW_TO_BUILD = ("sleb", "owl", "owl-sparsegpt", "awq")
"""Left out of the default set (``--all-candidates`` brings them back, ``--recipe`` names any): each
costs minutes to build here — SLEB 13 min, AWQ 2.5 min, OWL 1–1.5 min on the 135M default model —
and has a cheaper sibling in the set (block drops, RTN/GPTQ, Wanda/SparseGPT)."""


def candidates(lm: LoadedModel, budget: float, repair: bool = True, slow: bool = False) -> list[str]:
    """One spec per family that saves at least ``budget`` of the decoder's linear-weight memory, each
    drop followed by its repaired form (unless ``repair`` is False); with ``slow`` also the
    ``SLOW_TO_BUILD`` families and the scale-repaired Wanda / SparseGPT (a second build each, for a
    measured gain of +0.00 and +0.01 retention on the default model)."""
    total, per = _linear_params(lm)
    n = lm.adapter.n_layers
    out = []
    def wanted(m: Any) -> bool:
        return slow or m.name not in SLOW_TO_BUILD

    for m in filter(wanted, methods("drop")):
        size = sum(per[m.unit]) / n  # layers of one kind are alike in size in these families
        k = math.ceil(budget * total / size - 1e-9)
        if k < n:  # dropping every unit of a kind is not a pruning (the drop planner refuses it)
            out += _with_repair(m.name, m.amount_spec(str(k)), repair)
    ratio = math.ceil(budget * 20 - 1e-9) / 20  # the budget rounded up to 5 %
    for m in filter(wanted, methods("prune")):
        if m.calibrated:  # magnitude pruning is the baseline they beat, not a candidate
            out += _with_repair(m.name, m.amount_spec(f"{ratio:g}"), repair and slow)
            if budget <= 0.5 and ratio != 0.5 and getattr(m, "nm", False):
                out.append(m.amount_spec("2:4"))
    if budget <= 0.72:  # 4-bit weights with a 16-bit scale and zero per 128: 4.25 of 16 bits
        out += [m.amount_spec("w4g128") for m in filter(wanted, methods("quant"))]
    return out


def _with_repair(name: str, spec: str, repair: bool) -> list[str]:
    return [spec, f"{spec}+{REPAIRS[name]}"] if repair and name in REPAIRS else [spec]


def unrepaired(spec: str) -> str | None:
    """The spec without its repair steps (None when it has none): the row a repaired one is measured
    against."""
    steps = Recipe.parse(spec).steps
    kept = [s.text for s in steps if s.family != "repair"]
    return "+".join(kept) if kept and len(kept) < len(steps) else None


def repair_gains(rows: Sequence[dict[str, Any]]) -> None:
    """Adds ``repair_gain`` to each repaired row whose unrepaired form was scored too: what the repair
    bought (positive = better) in teacher-forced KL, risk and predicted retention."""
    by = {r["spec"]: r for r in rows}
    for r in rows:
        base = None if r.get("external") else by.get(unrepaired(r["spec"]) or "")  # a model made elsewhere: no spec
        if base is None:
            continue
        gain = {"of": base["spec"], "tf_kl": base["signals"]["tf_kl"] - r["signals"]["tf_kl"],
                "risk": base["risk"] - r["risk"]}
        if "retention" in r and "retention" in base:
            gain["retention"] = r["retention"]["predicted"] - base["retention"]["predicted"]
        r["repair_gain"] = gain


@torch.inference_mode()
def decode_seconds(lm: LoadedModel, modification: Any, prompt_ids: list[int], tokens: int = 32,
                   repeats: int = 2) -> float:
    """Best-of-``repeats`` time to prefill one prompt and decode exactly ``tokens`` greedy tokens
    (batch 1, KV cache). EOS does not stop it: a pruned model that ends its answer early must not
    look faster than the dense one."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids], device=lm.device)
    best = float("inf")
    with view_of(lm.adapter, modification):
        for _ in range(repeats):
            t = time.perf_counter()
            mask = torch.ones_like(ids)
            cache = DynamicCache(config=lm.model.config)
            z = forward_cached(lm.model, ids, mask, cache)
            for _ in range(tokens - 1):
                mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
                z = forward_cached(lm.model, z.argmax(-1, keepdim=True), mask, cache)
            best = min(best, time.perf_counter() - t)
    return best


def risk_for(use: str, sig: dict[str, float], rk: dict[str, float]) -> float:
    if use == "generative":
        return rk["generative"]
    if use == "multiple-choice":
        return rk["non_generative"]
    return sig["tf_hidden_distance"]


MIN_RETENTION = 0.9
"""The default retention floor: a pruning should keep at least 90 % of the dense model's right
answers to be recommended (``--min-retention``)."""


def announce(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def advise(lm: LoadedModel, budget: float, use: str, prompts: Sequence[str],
           specs: Sequence[str] | None = None, calib: str | Path | None = None, calib_samples: int = 16,
           steps: int = 32, seed: int = 0, progress: bool = True, repair: bool = True,
           external: Sequence[str] = (), load_cand: Callable[[str], Candidate] | None = None, *,
           calibrate: int | None = None, target: Target | None = None, cells: Path | None = None,
           min_retention: float = MIN_RETENTION, samples: int = SAMPLES, model_name: str | None = None,
           say: Callable[[str], None] | None = announce, slow: bool = False) -> dict[str, Any]:
    """Every candidate built, scored and timed, with a predicted generative retention and interval;
    ranked by that retention for generative use (by the one-step risk for multiple choice, by hidden
    distance for retrieval); repaired rows carry their gain. ``external``: compressed models made
    elsewhere (``load_cand`` loads one), their memory as stored on disk.

    Retention: ``calibrate`` = N measures N anchor candidates on ``target`` (default free-generation
    ARC-Easy) and calibrates the shipped fits on them (``calibration``); None uses the model's own
    shipped fit where it has one, else the prior of the shipped fits (N = 0). ``say`` gets the list of
    candidates and the estimated cost before anything is built."""
    if use not in USES:
        raise PrunelensError(f"unknown use '{use}'; choose {', '.join(USES)}")
    specs = list(specs or []) if specs or external else candidates(lm, budget, repair, slow)
    own = retention_fit_for(lm.info) if calibrate is None else None
    n_anchors = calibrate or 0
    if n_anchors and target is None:
        target = builtin_target(lm, None, BUILTIN_LIMIT, seed)
    prompt_ids = encode_prompts(lm.tokenizer, prompts[:1])[0]
    decode_seconds(lm, None, prompt_ids, steps, repeats=1)  # warm-up, untimed
    t_start = time.perf_counter()
    cost = estimate(probe(lm, prompt_ids), len(specs) + len(external), len(prompts), steps, DECODE_REPEATS,
                    n_anchors, target, samples)
    if say is not None:
        say(plan_text([*specs, *external], cost, n_anchors, target))
    opened = None
    if own is None and n_anchors and target is not None:
        name = model_name or lm.info.get("name", "")
        settings = [str(calib), calib_samples]
        opened = dense_first(lm, target, cells or cells_dir(name, target, settings),
                             identity_of(name, target, settings, samples, seed), progress=progress)
        n_right = int(sum(opened[1]["hits"]))
        left = estimate(cost["speed"], 0, len(prompts), steps, DECODE_REPEATS, n_anchors, target, samples, n_right)
        if say is not None:
            say(f"calibration: the dense model answers {n_right} of {len(target.items)} questions right; each "
                f"anchor is asked those (about {left['calibration_s'] / 60:.1f} min for the {n_anchors})")
    cal = Calibration(calib, calib_samples, None, seed)
    rows = []
    bar = tqdm([*specs, *external], desc="candidates", unit="pruning", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec, refresh=True)
        rows.append(score_candidate(lm, spec, spec in external, load_cand, prompts, prompt_ids, steps, budget, use,
                                    cal))
        release_freed_memory()
    cal_info, fit_info = None, None
    if own is not None:
        for r in rows:
            p, lo, hi, outside = predict_retention(own[1], r["signals"])
            r["retention"] = {"predicted": p, "low": lo, "high": hi, "outside_fitted_range": outside}
        fit_info = {"fitted_on": own[0], "coverage": own[1]["coverage"], "lomo_mae": own[1]["lomo_mae"],
                    "grid": own[1]["grid"]}
    else:
        cal_info = calibrated(lm, rows, target, n_anchors, opened,
                              lambda s: build(lm, s, cal, progress=False),
                              samples, seed, progress=progress, say=say)
    repair_gains(rows)
    rank(rows, use)
    return {"schema": SCHEMA, "model": lm.info, "budget": budget, "use": use, "steps": steps,
            "n_prompts": len(prompts), "rows": rows, "retention_fit": fit_info, "calibration": cal_info,
            "min_retention": min_retention,
            "cost": {**cost, "actual_s": time.perf_counter() - t_start},
            "recommendation": recommendation(rows, use, budget, min_retention)}


def rank(rows: list[dict[str, Any]], use: str) -> None:
    """In place: candidates meeting the budget first, then by predicted retention for generative use
    (by risk for the others), larger savings first among equals."""
    if use == "generative":
        rows.sort(key=lambda r: (not r["meets_budget"], -r["retention"]["predicted"], -r["saved"]))
    else:
        rows.sort(key=lambda r: (not r["meets_budget"], r["risk"], -r["saved"]))


def plan_text(specs: Sequence[str], cost: dict[str, Any], n_anchors: int, target: Target | None) -> str:
    """What is about to run and what it costs, before it runs."""
    cal = (f"; then {n_anchors} anchor(s) measured on {target.name} ({len(target.items)} questions asked of the "
           f"dense model, its right ones of each anchor, at most {target.max_new_tokens} tokens each)"
           if n_anchors and target is not None else "")
    return (f"advise: {len(specs)} candidates — {', '.join(specs)}{cal}\n"
            f"cost: about {cost['forward_passes']:,} forward passes, about {cost['seconds'] / 60:.1f} min on this "
            f"device ({cost['per_candidate_s']:.0f} s a candidate for its signals and timing, plus building it: "
            "seconds for a drop or RTN, up to a minute for SparseGPT or GPTQ on the default model"
            + (f"; {cost['calibration_s'] / 60:.1f} min calibrating" if cost["calibration_s"] else "") + ")")


def score_candidate(lm: LoadedModel, spec: str, is_external: bool, load_cand: Callable[[str], Candidate] | None,
                    prompts: Sequence[str], prompt_ids: list[int], steps: int, budget: float, use: str,
                    cal: Calibration) -> dict[str, Any]:
    """One candidate built (or loaded), its signals, risks, measured decode speed-up and memory."""
    t0 = time.perf_counter()
    if is_external:
        assert load_cand is not None, "an external candidate needs its loader"
        mod = load_cand(spec)
        fp, label, model, view = stored_footprint(mod, lm), mod.label, mod.lm, None
    else:
        mod = build(lm, spec, cal, progress=False)
        fp, label, model, view = footprint(lm, mod), mod.label(), lm, mod
    t_build = time.perf_counter() - t0
    sig, rk = collapse_signals(lm, mod, prompts, steps)
    # dense timed right beside each candidate: the ratio cancels the machine's drift over the run
    t_dense = decode_seconds(lm, None, prompt_ids, steps, DECODE_REPEATS)
    t_dec = decode_seconds(model, view, prompt_ids, steps, DECODE_REPEATS)
    row = {"spec": spec, "label": label, "signals": sig, "risk_generative": rk["generative"],
           "risk_multiple_choice": rk["non_generative"], "risk_retrieval": sig["tf_hidden_distance"],
           "agreeing_tokens": rk["agreeing_tokens"], "saved": 1 - fp["memory_vs_bf16"],
           "meets_budget": 1 - fp["memory_vs_bf16"] >= budget - BUDGET_SLACK,
           "removed_share": fp["removed_share"], "memory_vs_bf16": fp["memory_vs_bf16"],
           "decode_speedup": t_dense / t_dec, "decode_seconds": t_dec, "dense_decode_seconds": t_dense,
           "seconds": time.perf_counter() - t0, "build_seconds": t_build, "risk": risk_for(use, sig, rk)}
    if is_external:
        row["external"] = True
        release_weights(mod.lm)
    return row


def recommendation(rows: Sequence[dict[str, Any]], use: str, budget: float, floor: float = MIN_RETENTION) -> str:
    """One sentence: for generative use, the candidate that meets the retention floor at the budget
    (or that nothing does, and what comes closest), each with its interval; else the least risk."""
    ok = [r for r in rows if r["meets_budget"]]
    if not ok:
        return f"no candidate saves {budget:.0%}: lower the budget"
    best = ok[0]
    if use != "generative" or "retention" not in best:
        worst = ok[-1]
        return (f"for {use} use at a {budget:.0%} saving: {best['spec']} (predicted risk {best['risk']:.2f}, "
                f"teacher-forced top-1 agreement {1 - best['signals']['tf_top1_disagree']:.2f}, saves "
                f"{best['saved']:.0%}, decodes {best['decode_speedup']:.2f}x dense)"
                + (f"; avoid {worst['spec']} (risk {worst['risk']:.2f})" if worst is not best else ""))
    q = best["retention"]
    what = (f"{best['spec']}, predicted retention {q['predicted']:.2f} [{q['low']:.2f}, {q['high']:.2f}], "
            f"saves {best['saved']:.0%}, decodes {best['decode_speedup']:.2f}x dense")
    meet = [r for r in ok if r["retention"]["predicted"] >= floor]
    if meet:
        return (f"for generative use at a {budget:.0%} saving, {what} — it meets the {floor:.2f} retention floor"
                + (f" (so do {len(meet) - 1} more)" if len(meet) > 1 else "")
                + ("; its interval reaches below the floor" if q["low"] < floor else ""))
    return (f"nothing meets the {floor:.2f} retention floor at a {budget:.0%} saving; closest: {what}"
            "; lower the budget or the floor, or measure it (prunelens eval)")


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(ad: argparse.ArgumentParser) -> None:
    options.add_model_args(ad)
    ad.add_argument("--budget", required=True, help="share of the decoder's weight memory to save, e.g. 25%%")
    ad.add_argument("--use", required=True, choices=["generative", "multiple-choice", "retrieval"],
                    help="what the model is for: generative ranks by predicted retention, the others by risk")
    ad.add_argument("--recipe", "--candidates", dest="candidates", action="append", metavar="SPECS",
                    help="candidates to score instead of the automatic set: comma-separated specs or recipes "
                         "joined by '+' (e.g. attn:8,wanda:0.3,gptq:w4g128); repeatable")
    ad.add_argument("--candidate", action="append", default=[], metavar="MODEL",
                    help="a compressed model made elsewhere (HF directory, .gguf, hub id), ranked beside the specs "
                         "(its memory as stored on disk); repeatable")
    ad.add_argument("--prompts", help="prompt file (.txt, one a line, .jsonl, or a task config .yaml: its "
                    "prompts, and with --calibrate its questions and gold answers); default: built-in prompts")
    ad.add_argument("--calibrate", type=int, metavar="N",
                    help="measure N anchor candidates on a small generative set (the --prompts task config, else "
                         "free-generation ARC-Easy) and calibrate the retention prediction on them; 2 is a good "
                         "start. Default: the model's own shipped fit where it has one, else the prior (N=0)")
    ad.add_argument("--limit", dest="target_limit", type=int, metavar="N",
                    help=f"questions of the calibration set asked of the dense model (default {BUILTIN_LIMIT}; a "
                         "task config: all its rows)")
    ad.add_argument("--min-retention", type=float, default=MIN_RETENTION,
                    help=f"the retention floor the recommendation must meet (default {MIN_RETENTION})")
    ad.add_argument("--recovery-samples", type=int, default=SAMPLES, metavar="K",
                    help=f"samples at T=0.7 for each answer an anchor loses (where the answers went; default "
                         f"{SAMPLES}, 0 to skip)")
    ad.add_argument("--cells", help="calibration cells (resumable); default: under the cache, named by the model, "
                    "task and calibration settings")
    ad.add_argument("--data-dir", help="local data for the built-in calibration set (arc_easy_test.jsonl); "
                    "default: its Hub dataset")
    ad.add_argument("--steps", type=int, default=32, help="decoding steps per prompt (default 32)")
    ad.add_argument("--calib", help="calibration text for drop ranking and weight methods")
    ad.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    ad.add_argument("--no-repair", action="store_true", help="leave out the repaired candidates "
                    "(drop+repair:linear, wanda/sparsegpt+repair:scale)")
    ad.add_argument("--all-candidates", action="store_true", help=f"also the methods that take minutes to build "
                    f"({', '.join(SLOW_TO_BUILD)}) and the scale-repaired Wanda/SparseGPT, left out of the "
                    "default set to keep it short")
    options.add_output_args(ad, "runs/<time>-<model>-advise")


def _run(args: argparse.Namespace) -> int:
    budget = parse_budget(args.budget)
    given = ",".join(args.candidates) if args.candidates is not None else None
    specs = split_specs(given) if given is not None else None
    if specs is not None and not specs:  # an empty list is not "the default grid"
        raise PrunelensError(f"--candidates '{given}' names no candidate; give specs, or leave "
                             "the flag out for the default grid")
    for s in specs or ():
        Recipe.parse(s)
    options.positive("--steps", args.steps)
    options.positive("--calib-samples", args.calib_samples)
    if args.calibrate is not None and args.calibrate < 0:
        raise PrunelensError(f"--calibrate must be 0 or more anchors, got {args.calibrate}")
    if args.target_limit is not None:
        options.positive("--limit", args.target_limit)
    if not 0 < args.min_retention <= 1:
        raise PrunelensError(f"--min-retention must lie in (0, 1], got {args.min_retention}")
    if args.recovery_samples < 0:
        raise PrunelensError(f"--recovery-samples must be 0 (skip) or more, got {args.recovery_samples}")
    prompts = options.prompts(args)
    Calibration(args.calib).check()
    target = None
    if args.calibrate:
        target = (config_target(args.prompts, args.target_limit, args.seed) if is_task_config(args.prompts) else None)
        if target is None and args.data_dir is not None:
            check_paired_task("arc_easy", args.data_dir)
    out = Path(args.out) if args.out else default_run_dir(args.model, f"advise-{args.use}")
    check_out_dir(out, args.overwrite)
    lm = options.load(args)
    if args.calibrate and target is None:
        target = builtin_target(lm, args.data_dir, args.target_limit or BUILTIN_LIMIT, args.seed)
    cal = Calibration(args.calib, args.calib_samples, None, args.seed)
    res = advise(lm, budget, args.use, prompts, specs, args.calib, args.calib_samples, args.steps, args.seed,
                 progress=not args.quiet, repair=not args.no_repair, external=args.candidate,
                 load_cand=lambda spec: options.load_candidate_for(argparse.Namespace(
                     **{**vars(args), "candidate": spec, "layer_map": None}), lm, cal),
                 calibrate=args.calibrate, target=target, cells=Path(args.cells) if args.cells else None,
                 min_retention=args.min_retention, samples=args.recovery_samples, model_name=args.model,
                 slow=args.all_candidates)
    return ANALYSIS.finish(res, out, args.overwrite)


ANALYSIS = register(Analysis(
    "advise", "rank candidate prunings that meet a memory budget by predicted generative retention (or risk "
    "for other uses), calibrated on a few measured anchors with --calibrate N", _arguments, _run, schema=SCHEMA,
    figures=advise_figures, html=advise_html, summary=summary_lines, fields=FIELDS))
