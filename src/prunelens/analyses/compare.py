"""Step-wise accumulation across pruning and quantisation methods (the paper's Fig. 7 and its
quantisation comparison): the same prompts, the same analysis, one figure.

Each method is one full ``analyze`` run saved under ``runs/<method>/`` (so ``prunelens report``
can show any of them), done at most once: a comparison that is interrupted resumes with the
methods already analysed. The memory each method saves is reported beside it (``api.footprint``),
so methods can be compared at similar memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from prunelens import options
from prunelens.analyses.base import Analysis, check_fields, read_checked, register
from prunelens.analyses.cells import CellCache, data_hashes, environment, model_fingerprint
from prunelens.analyses.trace import TraceSettings, analyze, compare_models, load_result, write_trace_run
from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_freed_memory, release_weights
from prunelens.prune.candidate import Candidate
from prunelens.prune.recipe import Calibration, Recipe, build, footprint, is_recipe_file
from prunelens.render import esc, html_page, img, save_figure, subplots, text
from prunelens.runs import atomic_write_text, write_json

SCHEMA = "prunelens.compare/1"
CURVES = ("kl", "cos_p", "top1_agree")


def identity(settings: TraceSettings, prompts: Sequence[str], calibration: Calibration,
             model: str, device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Everything that changes a compared method's numbers (the cell cache's identity)."""
    digest = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    cal = calibration
    return {"model": model, "settings": asdict(settings), "prompts_sha256": digest,
            "calib": str(cal.path) if cal.path else None,
            "calib_files": data_hashes([cal.path] if cal.path else []),
            "calibration": {"samples": cal.samples, "seq_len": cal.seq_len, "seed": cal.seed,
                            "importance": cal.importance},
            "environment": environment(device, dtype), "model_files": model_fingerprint(model)}


def method_key(spec: str, recipe: Recipe) -> str:
    """A method's cached run, named by what it computes: a recipe file by its name and a hash of
    the specs it holds now, so an edited file is analysed again instead of reusing the old run."""
    if not is_recipe_file(spec):
        return spec
    digest = hashlib.sha256("\x00".join(recipe.specs).encode()).hexdigest()[:12]
    return f"{Path(spec).name}@{digest}"


def candidate_key(spec: str) -> str:
    """A candidate's cached run, named by its files' sizes and times: a rewritten checkpoint at the
    same path is analysed again."""
    digest = hashlib.sha256(json.dumps(model_fingerprint(spec), sort_keys=True).encode()).hexdigest()[:12]
    return f"candidate-{Path(spec).name or spec}@{digest}"


def compare_methods(lm: LoadedModel, specs: Sequence[str], prompts: Sequence[str], settings: TraceSettings,
                    out_dir: str | Path, calibration: Calibration | None = None, progress: bool = True,
                    device: str | None = None, dtype: str | None = None, candidates: Sequence[str] = (),
                    load_cand: Callable[[str], Candidate] | None = None) -> dict[str, Any]:
    """Analyse each recipe, and each candidate model made elsewhere (``load_cand`` loads one beside
    ``lm``), on the same prompts; each finished method is a cached run directory, so a rerun with
    more methods analyses only the new ones."""
    if not specs and not candidates:
        raise PrunelensError("give at least one --method or --candidate")
    recipes = {s: Recipe.parse(s) for s in specs}
    for r in recipes.values():  # before the directory is made: a bad method leaves nothing behind
        r.check(lm.adapter.n_layers)
    cal = calibration or Calibration()
    ident = identity(settings, prompts, cal, str(lm.info.get("name")), device, dtype)
    cache = CellCache(out_dir, "compare.json", "comparison", ident, cells="runs")
    cache.open(schema=SCHEMA, methods=[*specs, *candidates])
    out = cache.out
    methods = []
    t = f"{settings.temperatures[0]:g}"
    cached = {"pruning.label": "any", "summary": "dict", **{  # what a cached method's run must hold
        f"stepwise.{m}.{c}{f'@{t}' if c in ('kl', 'cos_p') else ''}": "list"
        for m in ("teacher_forced", "free_running") for c in ("step", *CURVES)}}
    entries = [(method_key(s, r), s, r) for s, r in recipes.items()] + [(candidate_key(c), c, None) for c in candidates]
    for key, spec, recipe in entries:
        run_dir = cache.run_dir(key)
        if (run_dir / "results.json").is_file():
            result = check_fields(load_result(run_dir), cached, run_dir / "results.json")
        else:
            result = _analysed(lm, spec, recipe, cal, prompts, settings, progress, load_cand)
            write_trace_run(result, run_dir, overwrite=True)
            release_freed_memory()
        curves = {}
        for mode in ("teacher_forced", "free_running"):
            sw = result["stepwise"][mode]
            curves[mode] = {"step": sw["step"], **{c: sw[f"{c}@{t}" if c in ("kl", "cos_p") else c]
                                                   for c in CURVES}}
            if mode == "free_running":
                curves[mode]["token_agree"] = sw.get("token_agree")
        methods.append({"spec": spec, "recipe": list(recipe.specs) if recipe else [],
                        "label": result["pruning"]["label"], "footprint": result.get("footprint"),
                        "summary": result["summary"], "curves": curves,
                        "run": str(run_dir)})
    combined = {"schema": SCHEMA, "identity": ident, "temperature": settings.temperatures[0],
                "methods": methods}
    figs = compare_figure(combined, out / "figures")
    write_json(out / "results.json", combined)
    atomic_write_text(out / "report.html", compare_html(combined, figs))
    return combined


def _analysed(lm: LoadedModel, spec: str, recipe: Recipe | None, cal: Calibration, prompts: Sequence[str],
              settings: TraceSettings, progress: bool, load_cand: Callable[[str], Candidate] | None) -> dict[str, Any]:
    """One method's trace: a recipe's view of ``lm``, or a candidate loaded beside it and freed after."""
    if recipe is not None:
        mod = build(lm, recipe, cal, progress=progress)
        result = analyze(lm, mod, prompts, settings, progress=progress)
        result["footprint"] = footprint(lm, mod)
        return result
    if load_cand is None:
        raise PrunelensError("comparing a candidate model needs a loader for it")
    cand = load_cand(spec)
    result = compare_models(lm, cand, prompts, settings, progress=progress)
    release_weights(cand.lm)
    return result


def _arr(v: Any) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in (v or [])], dtype=float)


def compare_figure(combined: dict[str, Any], fig_dir: Path) -> list[Path]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = subplots(2, 2, figsize=(11, 7), sharex=True)
    for m in combined["methods"]:
        for col, mode in enumerate(("teacher_forced", "free_running")):
            c = m["curves"][mode]
            kl = _arr(c["kl"])
            axes[0][col].plot(c["step"], np.where(kl > 0, kl, np.nan), label=m["spec"])
            axes[1][col].plot(c["step"], 1 - _arr(c["cos_p"]), label=m["spec"])
    t = combined["temperature"]
    titles = ("teacher-forced (fed the dense model's tokens)", "free-running (own tokens)")
    for col, title in enumerate(titles):
        axes[0][col].set_title(title, fontsize=10)
        axes[0][col].set_yscale("log")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("decoding step")
    axes[0][0].set_ylabel(f"KL(p' || p), T={t:g}")
    axes[1][0].set_ylabel("1 − cos(p, p')")
    axes[0][1].legend(fontsize=8, loc="best")
    fig.suptitle("Step-wise deviation by method (mean over prompts)", fontsize=11)
    fig.tight_layout()
    path = fig_dir / "compare.png"
    save_figure(fig, path)
    return [path]


def _g(x: Any) -> str:
    return text(x, ".3g")


_CURVES = [f"methods[].curves.{m}.{k}[]" for m in ("teacher_forced", "free_running") for k in ("step", "kl", "cos_p")]
# what compare's view reads from a saved result (checked when ``prunelens report`` reads it back)
FIELDS = {"temperature": "num", "identity.model": "any", "methods[].spec": "str", "methods[].label": "any",
          "methods[].run": "any", "methods[].footprint?": "dict", "methods[].summary.teacher_forced_mean": "dict",
          "methods[].summary.free_running_mean": "dict", **dict.fromkeys(_CURVES, "num?")}


def compare_html(combined: dict[str, Any], figs: list[Path]) -> str:
    t = text(combined["temperature"], "g")
    head = "".join(f"<th>{h}</th>" for h in ("method", "pruning", "weights removed", "bits/weight",
                                              "memory vs bf16", "TF mean KL", "TF top-1", "FR mean KL",
                                              "FR token agreement", "diverged"))
    body = []
    for m in combined["methods"]:
        fp, s = m.get("footprint") or {}, m["summary"]
        tf, fr = s["teacher_forced_mean"], s["free_running_mean"]
        vals = (m["spec"], m["label"], _g(fp.get("removed_share")), _g(fp.get("bits_per_weight")),
                _g(fp.get("memory_vs_bf16")), _g(tf.get(f"kl@{t}")), _g(tf.get("top1_agree")),
                _g(fr.get(f"kl@{t}")), _g(fr.get("token_agree")), str(s.get("prompts_diverged")))
        body.append("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in vals) + "</tr>")
    return html_page("prunelens method comparison",
        f"<h1>Step-wise deviation by method — {esc(combined['identity']['model'])}</h1>",
        '<p class="muted">Every method analysed on the same prompts; teacher-forced and free-running '
        "decoding. Memory is idealised (zeros counted as saved).</p>",
        f"<table><tr>{head}</tr>{''.join(body)}</table>", *(img(f) for f in figs),
        "<p>Each method's full analysis report: " + ", ".join(
            f"<code>{esc(m['run'])}/report.html</code>" for m in combined["methods"]) + "</p>")


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(co: argparse.ArgumentParser) -> None:
    options.add_model_args(co)
    options.add_method_args(co)
    co.add_argument("--candidate", action="append", default=[], metavar="MODEL",
                    help="a compressed model made elsewhere (HF directory, hub id, .gguf), compared beside the "
                         "methods; repeatable")
    co.add_argument("--layer-map", metavar="FILE", help="a shallower candidate's layer map (one --candidate)")
    co.add_argument("--prompts", help="prompt file; default: the 8 built-in prompts")
    co.add_argument("--limit", type=int)
    co.add_argument("--steps", type=int, default=32)
    co.add_argument("--temps", default="1")
    co.add_argument("--batch-size", type=int, default=8)
    co.add_argument("--no-chat-template", action="store_true")
    co.add_argument("--out", required=True, help="comparison directory (rerun to resume)")
    co.add_argument("--quiet", action="store_true")


def _run(args: argparse.Namespace) -> int:
    options.method_recipes(args)
    if args.layer_map and len(args.candidate) != 1:
        raise PrunelensError("--layer-map belongs to a single --candidate")
    settings = TraceSettings(temperatures=options.temperatures(args.temps),
                                max_new_tokens=options.positive("--steps", args.steps),
                                batch_size=options.positive("--batch-size", args.batch_size),
                                chat_template=not args.no_chat_template, seed=args.seed)
    prompts = options.prompts(args)
    cal = options.calibration(args)
    lm = options.load(args)
    res = compare_methods(lm, args.method, prompts, settings, args.out, cal, progress=not args.quiet,
                          device=args.device, dtype=args.dtype, candidates=args.candidate,
                          load_cand=lambda spec: options.load_candidate_for(argparse.Namespace(
                              **{**vars(args), "candidate": spec}), lm, cal))
    print("\n".join(summary_lines(res)))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def summary_lines(res: dict[str, Any]) -> list[str]:
    """One row per method: what it removes and how far its distributions drift."""
    t = text(res["temperature"], "g")

    def fmt(x: Any, spec: str = ".4g") -> str:  # a saved result read back may hold anything here
        return text(x, spec, "n/a")

    lines = [f"{'method':18s} {'removed':>8s} {'bits':>5s} {'TF KL':>8s} {'FR KL':>8s} {'FR agree':>9s}"]
    for m in res["methods"]:
        fp, s = m.get("footprint") or {}, m["summary"]
        tf, fr = s["teacher_forced_mean"], s["free_running_mean"]
        lines.append(f"{m['spec']:18s} {fmt(fp.get('removed_share', 0), '.3f'):>8s} "
                     f"{fmt(fp.get('bits_per_weight', 16), '.2f'):>5s} {fmt(tf.get(f'kl@{t}')):>8s} "
                     f"{fmt(fr.get(f'kl@{t}')):>8s} {fmt(fr.get('token_agree')):>9s}")
    return lines


def _rebuild(run_dir: Path) -> str:
    combined = read_checked(run_dir / "results.json", FIELDS)
    return compare_html(combined, compare_figure(combined, run_dir / "figures"))


ANALYSIS = register(Analysis(
    "compare", "step-wise KL / cos(p) of several pruning and quantisation methods on the same prompts, in one "
    "figure (resumable)", _arguments, _run, schema=SCHEMA, figures=compare_figure, html=compare_html,
    summary=summary_lines, marker="compare.json", rebuild=_rebuild, fields=FIELDS))
