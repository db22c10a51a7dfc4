"""``prunelens advise``: which pruning to use for a given saving and a given use, before any benchmark.

Candidates meeting the budget (share of the decoder's linear-weight memory saved, bf16 baseline) are
built from every family — attention / MLP / block drops with the count that reaches the budget,
Wanda and SparseGPT unstructured at the budget and 2:4, RTN and GPTQ at 4 bits — and each is scored
with the collapse predictor's cheap signals on a few prompts (``predictor``). For the chosen use the
candidates are ranked by predicted risk: one-step disagreement for multiple choice, compounded
disagreement over an answer for generation, and 1 − cos of the final hidden state (what an embedder
pools) for retrieval. Each row also carries the measured greedy-decoding speed-up of the modified
model against the dense one on this machine and the memory it would take.

Each drop and each unstructured Wanda / SparseGPT candidate also comes repaired (``+repair:linear``
after a drop, ReplaceMe; ``+repair:scale`` after a weight method, per-channel correction): a repair
adds no memory, so the question is only whether it lowers the risk, and each repaired row shows its
measured gain over the same pruning unrepaired.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.analyses.predictor import (
    collapse_signals,
    predict_retention,
    retention_fit_for,
    shipped_retention_fits,
)
from prunelens.errors import PrunelensError
from prunelens.model.kvcache import forward_cached
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_freed_memory, release_weights
from prunelens.model.tokens import encode_prompts
from prunelens.model.views import view_of
from prunelens.prune.base import methods
from prunelens.prune.candidate import Candidate, stored_footprint
from prunelens.prune.deploy import route
from prunelens.prune.recipe import Calibration, Recipe, build, footprint, split_specs
from prunelens.render import esc, html_page, html_table, img, save_figure, subplots, text, val
from prunelens.runs import check_out_dir, default_run_dir

SCHEMA = "prunelens.advise/1"
USES = ("generative", "multiple-choice", "retrieval")
DECODE_REPEATS = 3
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


def candidates(lm: LoadedModel, budget: float, repair: bool = True) -> list[str]:
    """One spec per family that saves at least ``budget`` of the decoder's linear-weight memory, each
    followed by its repaired form where ``REPAIRS`` has one for the family (unless ``repair`` is False)."""
    total, per = _linear_params(lm)
    n = lm.adapter.n_layers
    out = []
    for m in methods("drop"):
        size = sum(per[m.unit]) / n  # layers of one kind are alike in size in these families
        k = math.ceil(budget * total / size - 1e-9)
        if k < n:  # dropping every unit of a kind is not a pruning (the drop planner refuses it)
            out += _with_repair(m.name, m.amount_spec(str(k)), repair)
    ratio = math.ceil(budget * 20 - 1e-9) / 20  # the budget rounded up to 5 %
    for m in methods("prune"):
        if m.calibrated:  # magnitude pruning is the baseline they beat, not a candidate
            out += _with_repair(m.name, m.amount_spec(f"{ratio:g}"), repair)
            if budget <= 0.5 and ratio != 0.5 and getattr(m, "nm", False):
                out.append(m.amount_spec("2:4"))
    if budget <= 0.72:  # 4-bit weights with a 16-bit scale and zero per 128: 4.25 of 16 bits
        out += [m.amount_spec("w4g128") for m in methods("quant")]
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


def gain_text(g: dict[str, Any]) -> str:
    """'vs block:4: KL -0.120, risk -0.010, retention +0.03' (signed as the repaired minus the plain)."""
    return (f"vs {g['of']}: KL {-g['tf_kl']:+.3f}, risk {-g['risk']:+.3f}"
            + (f", retention {g['retention']:+.2f}" if "retention" in g else ""))


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


def advise(lm: LoadedModel, budget: float, use: str, prompts: Sequence[str],
           specs: Sequence[str] | None = None, calib: str | Path | None = None, calib_samples: int = 16,
           steps: int = 32, seed: int = 0, progress: bool = True, repair: bool = True,
           external: Sequence[str] = (), load_cand: Callable[[str], Candidate] | None = None) -> dict[str, Any]:
    """Every candidate built, scored and timed; rows ranked by predicted risk for ``use``; repaired
    rows carry their gain over the unrepaired pruning. ``external``: compressed models made elsewhere
    (``load_cand`` loads one beside ``lm``), scored the same way, their memory as stored on disk."""
    if use not in USES:
        raise PrunelensError(f"unknown use '{use}'; choose {', '.join(USES)}")
    specs = list(specs or []) if specs or external else candidates(lm, budget, repair)
    calibrated = retention_fit_for(lm.info)
    prompt_ids = encode_prompts(lm.tokenizer, prompts[:1])[0]
    decode_seconds(lm, None, prompt_ids, steps, repeats=1)  # warm-up, untimed
    rows = []
    for spec in tqdm([*specs, *external], desc="candidates", unit="pruning", disable=not progress):
        t0 = time.perf_counter()
        if spec in external:
            assert load_cand is not None, "an external candidate needs its loader"
            mod = load_cand(spec)
            fp, label, model, view = stored_footprint(mod, lm), mod.label, mod.lm, None
        else:
            mod = build(lm, spec, Calibration(calib, calib_samples, None, seed), progress=False)
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
        if calibrated is not None:
            p, lo, hi, outside = predict_retention(calibrated[1], sig)
            row["retention"] = {"predicted": p, "low": lo, "high": hi, "outside_fitted_range": outside}
        if spec in external:
            row["external"] = True
            release_weights(mod.lm)
        rows.append(row)
        del mod
        release_freed_memory()
    repair_gains(rows)
    rows.sort(key=lambda r: (not r["meets_budget"], r["risk"], -r["saved"]))
    fit_info = ({"fitted_on": calibrated[0], "coverage": calibrated[1]["coverage"],
                 "lomo_mae": calibrated[1]["lomo_mae"], "grid": calibrated[1]["grid"]}
                if calibrated is not None else None)
    return {"schema": SCHEMA, "model": lm.info, "budget": budget, "use": use, "steps": steps,
            "n_prompts": len(prompts), "rows": rows, "retention_fit": fit_info,
            "recommendation": recommendation(rows, use, budget)}


def recommendation(rows: Sequence[dict[str, Any]], use: str, budget: float) -> str:
    ok = [r for r in rows if r["meets_budget"]]
    if not ok:
        return f"no candidate saves {budget:.0%}: lower the budget"
    best, worst = ok[0], ok[-1]
    line = (f"for {use} use at a {budget:.0%} saving: {best['spec']} (predicted risk {best['risk']:.2f}, "
            f"teacher-forced top-1 agreement {1 - best['signals']['tf_top1_disagree']:.2f} — about "
            f"{best['agreeing_tokens']:.0f} greedy tokens before it leaves the dense text — saves "
            f"{best['saved']:.0%}, decodes {best['decode_speedup']:.2f}x dense"
            + (f"; predicted generative retention {retention_text(best['retention'])}" if "retention" in best else "")
            + ")")
    if worst is not best:
        line += f"; avoid {worst['spec']} (risk {worst['risk']:.2f})"
    return line


def retention_text(r: dict[str, Any]) -> str:
    """'0.40 [0.25, 0.55]', with a mark where the signals lie outside the data the fit was made on."""
    return (f"{r['predicted']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
            + (" (outside the fitted range)" if r["outside_fitted_range"] else ""))


def _quality(r: dict[str, Any]) -> tuple[float, float, float]:
    """(value, low, high) on the page's quality axis: predicted retention where calibrated, else 1 − risk."""
    if "retention" in r:
        q = r["retention"]
        return q["predicted"], q["low"], q["high"]
    v = 1.0 - r["risk"]
    return v, v, v


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (larger is better on each)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]


def advise_figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    """Predicted quality (with its interval) against memory saved and against measured speed-up, the
    Pareto front of each marked: the trade-off the recommendation is taken from, in one picture."""
    rows = result["rows"]
    if not rows:
        return []
    calibrated = any("retention" in r for r in rows)
    ylabel = "predicted generative retention" if calibrated else f"1 − predicted risk ({result['use']})"
    fig, axes = subplots(1, 2, figsize=(10, 4.2))
    q = [_quality(r) for r in rows]
    for ax, key, xlabel in ((axes[0], "saved", "memory saved vs bf16"), (axes[1], "decode_speedup",
                                                                        "decoding speed-up (measured)")):
        xs = [r[key] for r in rows]
        front = set(pareto_front(list(zip(xs, [v for v, _, _ in q], strict=True))))
        for i, (r, (v, lo, hi)) in enumerate(zip(rows, q, strict=True)):
            ax.errorbar([xs[i]], [v], yerr=[[v - lo], [hi - v]], fmt="o" if i in front else "s",
                        color="C3" if i in front else "C0", ms=6 if i in front else 4, capsize=2, lw=0.8,
                        alpha=1.0 if r["meets_budget"] else 0.4)
            ax.annotate(r["spec"], (xs[i], v), fontsize=7, xytext=(4, 3), textcoords="offset points")
        order = sorted(front, key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [q[i][0] for i in order], color="C3", lw=1, ls="--", label="Pareto front")
        if key == "saved":
            ax.axvline(result["budget"], color="grey", lw=0.8, ls=":", label="budget")
        ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
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
          **{f"rows[].risk_{k}": "num" for k in ("generative", "multiple_choice", "retrieval")}}


def advise_html(result: dict[str, Any], figs: list[Path]) -> str:
    fit = result.get("retention_fit")
    keys = ("spec", "retention", "risk", "saved", "decode ×", "tf KL", "tf top-1", "agree run", "repair gain")

    def cell(v: Any) -> str:  # None: a value JSON cannot hold (an infinite agreeing run)
        return val(v, ".3g")

    rows = [{"spec": f"{r['spec']}{'' if r['meets_budget'] else ' (below budget)'}",
             "retention": retention_text(r["retention"]) if "retention" in r else None,
             "risk": r["risk"], "saved": val(r["saved"], ".1%"), "decode ×": r["decode_speedup"],
             "tf KL": r["signals"]["tf_kl"], "tf top-1": 1 - r["signals"]["tf_top1_disagree"],
             "agree run": r["agreeing_tokens"],
             "repair gain": gain_text(r["repair_gain"]) if "repair_gain" in r else None} for r in result["rows"]]
    best = next((r for r in result["rows"] if r["meets_budget"]), None)
    evidence = []
    if best is not None:
        evidence.append(f"On the {val(result['n_prompts'])} prompts, {esc(best['spec'])} agrees with the dense "
                        f"model's top token on {val(1 - best['signals']['tf_top1_disagree'], '.0%')} of "
                        f"teacher-forced steps (KL {val(best['signals']['tf_kl'], '.3f')} nats), about "
                        f"{val(best['agreeing_tokens'], '.0f')} greedy "
                        "tokens before it leaves the dense text.")
    if fit:
        evidence.append(f"Retention is the share of the dense model's right free-generation answers a "
                        f"modification keeps, predicted from the teacher-forced KL by a fit on "
                        f"{esc(fit['fitted_on'])}'s measured grid ({esc(fit['grid'])}); on methods held out of "
                        f"that fit its error was {val(fit['lomo_mae'], '.2f')} on average and the intervals "
                        f"cover {val(fit['coverage'], '.0%')}. Marked candidates lie outside the fitted range.")
    else:
        evidence.append("No retention calibration exists for this model (a fit does not transfer across "
                        "model families): the figure shows 1 − predicted risk, which ranks but saturates.")
    style = ("<style>table{font-size:12px;table-layout:auto;width:100%;max-width:100%}"
             "td,th{padding:2px 6px;white-space:nowrap}img{max-width:100%}</style>")
    return html_page("prunelens advise", style,
        f"<h1>Advice — {esc(result['model'].get('name', ''))}, {val(result['budget'], '.0%')} saving, "
        f"{esc(result['use'])} use</h1>", f"<p><b>{esc(result['recommendation'])}</b></p>",
        *[img(f) for f in figs],
        "<h2>Evidence</h2>", *[f"<p>{e}</p>" for e in evidence],
        '<p class="muted">Ranked by the predicted risk for this use, from the teacher-forced top-1 agreement a '
        "on the prompts: 1 − a for one step (multiple choice), 1 − a^32 for a generated answer, 1 − cos of the "
        "final hidden state for retrieval. saved = share of decoder linear-weight memory saved against bf16 "
        "(unstructured zeros only save it in a sparse format); decode × = measured greedy decoding, batch 1, "
        "dense time ÷ modified time, on this machine.</p>",
        html_table(rows, keys, cell))


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(ad: argparse.ArgumentParser) -> None:
    options.add_model_args(ad)
    ad.add_argument("--budget", required=True, help="share of the decoder's weight memory to save, e.g. 25%%")
    ad.add_argument("--use", required=True, choices=["generative", "multiple-choice", "retrieval"],
                    help="what the model is for: its risk ranks the candidates")
    ad.add_argument("--recipe", "--candidates", dest="candidates", action="append", metavar="SPECS",
                    help="candidates to score instead of the automatic set: comma-separated specs or recipes "
                         "joined by '+' (e.g. attn:8,wanda:0.3,gptq:w4g128); repeatable")
    ad.add_argument("--candidate", action="append", default=[], metavar="MODEL",
                    help="a compressed model made elsewhere (HF directory, .gguf, hub id), ranked beside the specs "
                         "(its memory as stored on disk); repeatable")
    ad.add_argument("--prompts", help="prompt file (.txt, one a line, .jsonl, or a task config .yaml: its "
                    "prompts); default: built-in prompts")
    ad.add_argument("--steps", type=int, default=32, help="decoding steps per prompt (default 32)")
    ad.add_argument("--calib", help="calibration text for drop ranking and weight methods")
    ad.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    ad.add_argument("--no-repair", action="store_true", help="leave out the repaired candidates "
                    "(drop+repair:linear, wanda/sparsegpt+repair:scale)")
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
    prompts = options.prompts(args)
    Calibration(args.calib).check()
    out = Path(args.out) if args.out else default_run_dir(args.model, f"advise-{args.use}")
    check_out_dir(out, args.overwrite)
    lm = options.load(args)
    cal = Calibration(args.calib, args.calib_samples, None, args.seed)
    res = advise(lm, budget, args.use, prompts, specs, args.calib, args.calib_samples, args.steps, args.seed,
                 progress=not args.quiet, repair=not args.no_repair, external=args.candidate,
                 load_cand=lambda spec: options.load_candidate_for(argparse.Namespace(
                     **{**vars(args), "candidate": spec, "layer_map": None}), lm, cal))
    return ANALYSIS.finish(res, out, args.overwrite)


def summary_lines(res: dict[str, Any]) -> list[str]:
    """The candidates ranked by risk for the use, and the recommendation."""
    fit = res.get("retention_fit")
    lines = [f"{'candidate':16s} {'risk':>6s} {'saved':>6s} {'decode':>7s} {'agree run':>9s}  "
             f"{'generative retention':22s} risk gen / MCQ / retrieval"]
    for r in res["rows"]:
        flag = "" if r["meets_budget"] else "  (below budget)"
        ret = r.get("retention")
        keep = "—" if ret is None else f"{ret['predicted']:.2f} [{ret['low']:.2f}, {ret['high']:.2f}]" + (
            "*" if ret["outside_fitted_range"] else "")
        lines.append(f"{r['spec']:16s} {r['risk']:6.3f} {r['saved']:6.1%} {r['decode_speedup']:6.2f}x "
                     f"{text(r['agreeing_tokens'], '.1f', 'inf'):>9s}  {keep:22s} "
                     f"{r['risk_generative']:.3f} / {r['risk_multiple_choice']:.3f} / "
                     f"{r['risk_retrieval']:.4f}{flag}")
    for r in res["rows"]:
        if "repair_gain" in r:
            lines.append(f"repair gain of {r['spec']} {gain_text(r['repair_gain'])} (negative = repair helps)")
    if fit:
        lines.append(f"generative retention: share of the dense model's right free-generation answers kept, "
                     f"{fit['coverage']:.0%} interval, fitted on {fit['fitted_on']} (held-out-method MAE "
                     f"{fit['lomo_mae']:.2f}); * = signals outside the fitted range")
    else:
        lines.append("generative retention: no calibration for this model (fitted for "
                     f"{', '.join(sorted(shipped_retention_fits()))}); run benchmarks/predictor_validation.py on it")
    best = next((r for r in res["rows"] if r["meets_budget"]), None)
    how = route(best["spec"]) if best else None
    deploy = [f"deploy: {how} (docs/deploy.md)"] if how else []
    return [*lines, f"recommendation: {res['recommendation']}", *deploy]


ANALYSIS = register(Analysis(
    "advise", "rank candidate prunings that meet a memory budget by predicted risk for your use "
    "(cheap signals, no benchmark)", _arguments, _run, schema=SCHEMA, figures=advise_figures, html=advise_html,
    summary=summary_lines, fields=FIELDS))
