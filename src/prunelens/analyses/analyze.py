"""``prunelens analyze``: the trace as a subcommand (arguments, run, printed summary, the predictor's
verdict) and its run directory (results.json, the figures, the page). It lives outside ``trace/``
because it uses the predictor, which is built on the trace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.analyses.predictor import verdict
from prunelens.analyses.trace.core import analyze, compare_models, compare_sequential
from prunelens.analyses.trace.figures import make_figures
from prunelens.analyses.trace.labels import get_in, summary_of
from prunelens.analyses.trace.page import run_html, trace_page, write_trace_run
from prunelens.analyses.trace.sequential import DEFAULT_TOPK
from prunelens.analyses.trace.settings import SCHEMA_FAMILY, TraceSettings
from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.prune.candidate import Candidate
from prunelens.prune.recipe import build, save_modified
from prunelens.render import text
from prunelens.runs import check_out_dir, check_writable_parent, default_run_dir


def _arguments(a: argparse.ArgumentParser) -> None:
    options.add_model_args(a)
    options.add_recipe_args(a)
    options.add_candidate_args(a)
    a.add_argument("--prompts", help="prompt file (.txt: one per line; .jsonl: 'prompt'/'text'/"
                                     "'question' field); default: 8 built-in prompts")
    a.add_argument("--limit", type=int, help="use only the first N prompts")
    a.add_argument("--steps", type=int, default=32, help="decoding steps per prompt (default 32)")
    a.add_argument("--temps", default="1", help="temperatures, comma-separated, e.g. 1,0.5 (default 1)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--topk", type=int, default=10, help="k for the top-k variance of dz (default 10)")
    a.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts raw even if the tokenizer has a chat template")
    g = a.add_argument_group("sequential mode (with --candidate): one model in memory at a time")
    g.add_argument("--sequential", action="store_true",
                   help="run the base, free it, run the candidate, then the base re-scores the candidate's text; "
                        "measures h and p (z-space and the Taylor check need both models in memory)")
    g.add_argument("--reference-cache", metavar="FILE",
                   help="the base's stored reference (top-K log-probs + tail mass, hidden states): read when it "
                        "matches this base, prompts and settings, else written; implies --sequential")
    g.add_argument("--reference-topk", type=int, default=DEFAULT_TOPK,
                   help=f"log-probs kept per step in the reference (default {DEFAULT_TOPK})")
    options.add_output_args(a, "runs/<time>-<model>-<pruning>")
    a.add_argument("--save-pruned", metavar="DIR", help="also save the pruned checkpoint here")


def _settings(args: argparse.Namespace) -> TraceSettings:
    return TraceSettings(
        temperatures=options.temperatures(args.temps), max_new_tokens=options.positive("--steps", args.steps),
        batch_size=options.positive("--batch-size", args.batch_size), topk=options.positive("--topk", args.topk),
        chat_template=not args.no_chat_template, seed=args.seed)


def _run(args: argparse.Namespace) -> int:
    # Validate everything cheap before loading a model.
    recipe, cal = options.recipe(args), options.calibration(args)
    candidate = options.candidate_spec(args)
    settings = _settings(args)
    prompts = options.prompts(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    else:
        check_writable_parent(default_run_dir(args.model, "dense"))
    if args.save_pruned:
        if candidate:
            raise PrunelensError("--save-pruned saves a recipe's model; a --candidate is saved already")
        options.check_checkpoint_dir(Path(args.save_pruned), args.overwrite)
    sequential = bool(args.sequential or args.reference_cache)
    if sequential and candidate is None:
        raise PrunelensError("--sequential and --reference-cache compare a --candidate with its base")
    options.positive("--reference-topk", args.reference_topk)
    if candidate is None:
        options.require(recipe, "analyze compares the modified model with the dense one (or give --candidate)")

    if sequential:
        lm, result = _sequential(args, cal, prompts, settings)
        label = result["pruning"]["label"]
    else:
        lm = options.load(args)
        if candidate is not None:
            cand = _announced(options.load_candidate_for(args, lm, cal))
            result = compare_models(lm, cand, prompts, settings, progress=not args.quiet)
            label = cand.label
        else:
            plan = build(lm, recipe, cal, progress=not args.quiet)
            print(f"pruning: {plan.label()}", file=sys.stderr)
            result = analyze(lm, plan, prompts, settings, progress=not args.quiet)
            label = plan.label()
    out = out or default_run_dir(args.model, label)
    result["verdict"] = verdict(result)
    result["next"] = {"model": args.model, "recipe": None if candidate is not None else "+".join(recipe.specs)}
    write_trace_run(result, out, overwrite=args.overwrite)
    if args.save_pruned:
        save_modified(lm, plan, args.save_pruned)
    for line in summary_lines(result):
        print(line)
    print(f"  report: {out / 'report.html'}")
    return 0


def _announced(cand: Candidate) -> Candidate:
    for note in cand.notes:
        print(f"note: {note}", file=sys.stderr)
    lmap = f", layer map {cand.layer_map.source}" if cand.layer_map else ""
    print(f"candidate: {cand.label} ({cand.lm.info['n_layers']} layers{lmap})", file=sys.stderr)
    return cand


def _sequential(args: argparse.Namespace, cal: Any, prompts: list[str],
                settings: TraceSettings) -> tuple[LoadedModel, dict[str, Any]]:
    """The sequential comparison; returns the base as it ends (loaded) and the result."""
    held: dict[str, LoadedModel] = {}

    def load_base() -> LoadedModel:
        held["base"] = options.load(args)
        return held["base"]

    def load_cand(base: LoadedModel, states: Any) -> Candidate:
        return _announced(options.load_candidate_for(args, base, cal, base_states=states))

    result = compare_sequential(load_base, load_cand, prompts, settings, k=args.reference_topk,
                                reference_cache=args.reference_cache, calibration=lambda b: cal.ids(b, (8, 128))[0],
                                progress=not args.quiet)
    return held["base"], result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline the command prints: the three spaces at the last prompt token, then decoding."""
    def fmt(x: Any) -> str:  # a saved result read back may hold anything: never a crash
        return text(x, ".4g", "n/a")

    s = summary_of(result)
    t = text(s.get("temperature"), "g")
    last, tf, fr = ({} if not isinstance(d, dict) else d for d in (
        s.get("last_prompt_token"), s.get("teacher_forced_mean"), s.get("free_running_mean")))
    return [
        f"model {text(get_in(result, 'model', 'name'))}  pruning {text(get_in(result, 'pruning', 'label'))}",
        f"  last prompt token : cos(h)={fmt(last.get('cos_h'))}  cos(z)={fmt(last.get('cos_z'))}  "
        f"cos(p)={fmt(last.get(f'cos_p@{t}'))}  KL@T={t}={fmt(last.get(f'kl@{t}'))} "
        f"(Taylor {fmt(last.get(f'taylor_kl@{t}'))})",
        f"  teacher-forced    : mean KL={fmt(tf.get(f'kl@{t}'))}  top-1 agreement={fmt(tf.get('top1_agree'))}",
        f"  free-running      : mean KL={fmt(fr.get(f'kl@{t}'))}  token agreement={fmt(fr.get('token_agree'))}  "
        f"diverged {text(s.get('prompts_diverged'))}/{text(get_in(result, 'settings', 'n_prompts'))} prompts "
        f"(median first divergence step {fmt(s.get('median_first_divergence'))})",
        *_field_lines(s.get("field")),
        *([f"  verdict           : {v['text']}"] if isinstance(v := result.get("verdict"), dict) and "text" in v
          else []),
    ]


def _field_lines(f: Any) -> list[str]:
    """The field's statistics under their names (absent from results saved before them)."""
    if not isinstance(f, dict):
        return []
    def fmt(x: Any) -> str:
        return text(x, ".4g", "n/a")
    return [f"  field statistics  : KL(p_base‖p_cand)={fmt(f.get('rkl'))}  top-K agreement K=1/5/10 "
            f"{fmt(f.get('top1_agree'))}/{fmt(f.get('top5_agree'))}/{fmt(f.get('top10_agree'))}  "
            f"base token in top-5 {fmt(f.get('label_top5'))}  FDT {fmt(f.get('fdt_mean'))}  "
            f"SDT {fmt(f.get('sdt_mean'))}"]


ANALYSIS = register(Analysis(
    "analyze", "trace dense vs pruned through h -> z -> p, per layer and step", _arguments, _run,
    schema=SCHEMA_FAMILY, figures=make_figures, html=run_html, summary=summary_lines,
    rebuild=lambda run_dir: trace_page([run_dir]), combine=trace_page))
