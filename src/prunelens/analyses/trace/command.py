"""``prunelens analyze``: the trace as a subcommand (arguments, run, printed summary) and its run
directory (results.json, the figures, the page)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.analyses.trace.core import analyze
from prunelens.analyses.trace.figures import make_figures
from prunelens.analyses.trace.labels import get_in, summary_of
from prunelens.analyses.trace.page import run_html, trace_page
from prunelens.analyses.trace.settings import SCHEMA_FAMILY, TraceSettings
from prunelens.prune.recipe import build, save_modified
from prunelens.render import text
from prunelens.runs import check_out_dir, check_writable_parent, default_run_dir, write_run


def write_trace_run(result: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> Path:
    """A trace result's run directory: results.json, figures/*.png and report.html, atomically."""
    return write_run(result, out_dir, overwrite=overwrite, figures=make_figures, html=run_html)


def _arguments(a: argparse.ArgumentParser) -> None:
    options.add_model_args(a)
    options.add_recipe_args(a)
    a.add_argument("--prompts", help="prompt file (.txt: one per line; .jsonl: 'prompt'/'text'/"
                                     "'question' field); default: 8 built-in prompts")
    a.add_argument("--limit", type=int, help="use only the first N prompts")
    a.add_argument("--steps", type=int, default=32, help="decoding steps per prompt (default 32)")
    a.add_argument("--temps", default="1", help="temperatures, comma-separated, e.g. 1,0.5 (default 1)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--topk", type=int, default=10, help="k for the top-k variance of dz (default 10)")
    a.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts raw even if the tokenizer has a chat template")
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
    settings = _settings(args)
    prompts = options.prompts(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    else:
        check_writable_parent(default_run_dir(args.model, "dense"))
    if args.save_pruned:
        options.check_checkpoint_dir(Path(args.save_pruned), args.overwrite)
    options.require(recipe, "analyze compares the modified model with the dense one")

    lm = options.load(args)
    plan = build(lm, recipe, cal, progress=not args.quiet)
    print(f"pruning: {plan.label()}", file=sys.stderr)
    result = analyze(lm, plan, prompts, settings, progress=not args.quiet)
    out = out or default_run_dir(args.model, plan.label())
    write_trace_run(result, out, overwrite=args.overwrite)
    if args.save_pruned:
        save_modified(lm, plan, args.save_pruned)
    for line in summary_lines(result):
        print(line)
    print(f"  report: {out / 'report.html'}")
    return 0


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
    ]


ANALYSIS = register(Analysis(
    "analyze", "trace dense vs pruned through h -> z -> p, per layer and step", _arguments, _run,
    schema=SCHEMA_FAMILY, figures=make_figures, html=run_html, summary=summary_lines,
    rebuild=lambda run_dir: trace_page([run_dir]), combine=trace_page))
