"""prunelens command line: a thin shell over the Python API (bad input: one line on stderr, exit 2).

The analysis subcommands come from the analysis registry (``prunelens.analyses.base``); the
commands here are the ones that only modify, score or list: prune, rank, ppl, eval, report, models.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from prunelens import options
from prunelens.analyses.base import analyses, for_run
from prunelens.analyses.reports import combined_report, rebuild_report
from prunelens.data import calibration_ids
from prunelens.errors import PrunelensError
from prunelens.model.loading import PRESETS
from prunelens.prune.candidate import check_tokenizers
from prunelens.prune.ct_export import check_model as check_ct_model
from prunelens.prune.ct_export import check_recipe, save_compressed_tensors
from prunelens.prune.drop import DropPlan
from prunelens.prune.gguf_export import TENSOR_TYPES as GGUF_TYPES
from prunelens.prune.gguf_export import family_of, save_gguf, vocab_source
from prunelens.prune.importance import unit_scores
from prunelens.prune.nas_export import check_model as check_nas_model
from prunelens.prune.nas_export import save_nemotron_nas
from prunelens.prune.recipe import build, save_modified
from prunelens.runs import check_out_file, write_json
from prunelens.tasks.mcq import answer_flips
from prunelens.tasks.pairing import check_candidate_tasks, item_changes, score_candidate
from prunelens.tasks.perplexity import (
    POSITIONS,
    check_kld_windows,
    first_scored,
    kl_statistics,
    kld_lines,
    perplexity,
    read_corpus,
)
from prunelens.tasks.registry import run_task
from prunelens.version import __version__


def cmd_prune(args: argparse.Namespace) -> int:
    recipe, cal = options.required_recipe(args), options.calibration(args)
    out = Path(args.out)
    if args.format == "gguf":
        if out.suffix != ".gguf":
            raise PrunelensError(f"--format gguf writes one file: --out must end in .gguf, got '{out}'")
        check_out_file(out, args.overwrite)
        if args.gguf_type not in GGUF_TYPES:
            raise PrunelensError(f"--gguf-type {args.gguf_type}: offered are {', '.join(GGUF_TYPES)}")
    else:
        options.check_checkpoint_dir(out, args.overwrite)
    if args.format == "compressed-tensors":
        check_recipe(list(recipe.steps))
    lm = options.load(args)
    if args.format == "gguf":
        family_of(lm.adapter.config)  # an unsupported family fails before any pruning work
        vocab_source(lm, args.gguf_vocab)
    elif args.format == "nemotron-nas":
        check_nas_model(lm)
    elif args.format == "compressed-tensors":
        check_ct_model(lm, list(recipe.steps))
    plan = build(lm, recipe, cal, inplace=True)
    if args.format == "gguf":
        save_gguf(lm, plan, out, args.gguf_type, args.gguf_vocab)
    elif args.format == "nemotron-nas":
        save_nemotron_nas(lm, plan, out)
    elif args.format == "compressed-tensors":
        info = save_compressed_tensors(lm, plan, out)
        print(f"packed {info['layers_packed']} linear layers as {info['scheme']} (pack-quantized, "
              f"{info['bits_per_weight_on_disk']:.3f} bits per weight on disk with fp32 scales)")
    else:
        save_modified(lm, plan, out)
    print(f"saved {plan.label()} to {out}")
    return 0


def _check_ppl(args: argparse.Namespace) -> None:
    """The cheap checks of ``ppl``, before any model loads (the window count is known already)."""
    if args.out:
        check_out_file(Path(args.out), args.overwrite)
    options.positive("--seq-len", args.seq_len)
    first_scored(args.seq_len, args.positions)
    if args.max_windows is not None:
        options.positive("--max-windows", args.max_windows)
        if args.kld:
            check_kld_windows(args.max_windows, args.seq_len, args.positions)


def cmd_ppl(args: argparse.Namespace) -> int:
    candidate = options.candidate_spec(args)
    recipe = (options.required_recipe(args, "--kld compares the modified model with the dense one, or give "
                                            "--candidate") if args.kld and candidate is None else options.recipe(args))
    cal = options.calibration(args)
    text = read_corpus(args.text)
    _check_ppl(args)
    lm = options.load(args)
    if candidate is None:
        plan = build(lm, recipe, cal, progress=not args.quiet)
        label, record, view = plan.label(), {"modification": plan.to_dict()}, plan
        other = lm if label != "dense" else None  # None: nothing modified, one run
    else:  # both models in memory, fed the same windows of the base's token ids
        cand = options.scoring_candidate(args, lm)
        _print_notes(cand)
        label, record, view, other = cand.label, {"candidate": cand.to_dict()}, None, cand.lm
    kw = dict(seq_len=args.seq_len, max_windows=args.max_windows, progress=not args.quiet, positions=args.positions)
    k = (kl_statistics(lm, text, view, candidate=other if candidate else None, **kw)
         if args.kld else None)  # both perplexities come with it
    dense = perplexity(lm, text, **kw) if k is None else _ppl_of(k, "base")
    mod = (dense if other is None else perplexity(other, text, view, **kw) if k is None else _ppl_of(k, "mod"))
    res = {"model": lm.info["name"], "text": str(args.text), **record, "dense": dense, "modified": mod}
    print(f"{lm.info['name']}  {label}: perplexity {mod['perplexity']:.3f} "
          f"(dense {dense['perplexity']:.3f}) over {mod['tokens']} tokens in {mod['windows']} windows "
          f"of {args.seq_len}" + ("" if args.positions == "all" else f" ({args.positions} of each)"))
    if k is not None:
        res["kl_statistics"] = k
        print("\n".join(kld_lines(k)))
    if args.out:
        write_json(Path(args.out), res)
    return 0


def _ppl_of(k: dict, side: str) -> dict:
    """One side's perplexity record from ``kl_statistics`` (the same windows and positions)."""

    nll = math.log(k[f"ppl_{side}"])
    return {"perplexity": k[f"ppl_{side}"], "nll_per_token": nll, "tokens": int(k["positions"]),
            "windows": k["windows"], "seq_len": k["seq_len"], "positions_rule": k["positions_rule"]}


def cmd_rank(args: argparse.Namespace) -> int:
    lm = options.load(args)
    ids = calibration_ids(lm.tokenizer, args.calib, args.calib_samples, args.calib_len, args.seed)
    with torch.inference_mode():
        scores = unit_scores(lm, DropPlan(), ids, args.kind)
    print(f"{args.kind} importance (1 - cos(in, out)); lowest is dropped first")
    for rank, (i, s) in enumerate(sorted(scores.items(), key=lambda kv: kv[1]), 1):
        print(f"{rank:3d}. layer {i:3d}  {s:.6f}")
    return 0


def _score_line(task: str, dense: Any, mod: Any, label: str) -> str:
    def one(x: Any) -> str:
        se = "" if x.stderr is None or not math.isfinite(x.stderr) else f"±{x.stderr:.3f}"
        return f"{x.score:.3f}{se}"

    rel = (mod.score - dense.score) / dense.score if dense.score else float("nan")
    extra = ""
    if task == "gsm8k":
        fd, fm = dense.details["format_rate"], mod.details["format_rate"]
        extra = (f"  (formatted {fd:.0%})" if mod is dense
                 else f"  (formatted: dense {fd:.0%}, {label} {fm:.0%})")
    ref = dense.details.get("reference") if isinstance(dense.details, dict) else None
    if ref:
        extra = f"  (all-MiniLM-L6-v2 reference {ref['ndcg_at_10']:.3f})"
    head = f"{task:16s} {dense.metric:12s} n={dense.n:5d}  dense {one(dense)}"
    if mod is dense:
        return head + extra
    return f"{head}  {label} {one(mod)}  relative change {rel:+.1%}{extra}"


def _recipe_pairs(lm: Any, plan: Any, tasks: list[str], args: argparse.Namespace, opts: Any) -> Iterator[tuple]:
    """Each task on the dense model, then inside the recipe's view (the dense score twice without one)."""
    for t in tasks:
        dense = run_task(lm, t, args.data_dir, opts)
        yield t, dense, run_task(lm, t, args.data_dir, opts, plan) if plan.label() != "dense" else dense


def _eval_row(t: str, dense: Any, mod: Any, label: str) -> dict[str, Any]:
    """One task's record, printed as it is made: both scores, the MCQ answer flips, and the paired
    test with the items lost and gained."""
    modified = mod is not dense
    row = {"task": dense.task, "kind": dense.kind, "dense": dense.to_dict(), "modified": mod.to_dict()}
    pred = "predictions_norm" if dense.metric == "acc_norm" else "predictions"  # the scored choice
    if modified and dense.kind == "multiple-choice" and pred in dense.details:
        row["flips"] = answer_flips(dense.details["golds"], dense.details[pred], mod.details[pred])
    if dense.task != t:  # a task config: its file
        row["config"] = t
    ch = item_changes(t, dense, mod) if modified else None
    row["paired"] = None if ch is None else asdict(ch.test)
    if ch is not None:
        row["lost"], row["gained"] = ch.lost, ch.gained
    print(_score_line(dense.task, dense, mod, label)
          + (f"  flips {row['flips']['flips']:.1%}" if "flips" in row else ""), flush=True)
    if modified:
        print(f"{'':16s} " + (ch.test.line() if ch is not None
                              else "no per-item outcomes: no paired test for this task"), flush=True)
        if ch is not None:
            print(f"{'':16s} {ch.line(label)}", flush=True)
    return row


def cmd_eval(args: argparse.Namespace) -> int:
    recipe, cal = options.recipe(args), options.calibration(args)
    candidate = options.candidate_spec(args)
    tasks, opts = options.task_setup(args)
    if candidate is not None:
        check_candidate_tasks(tasks)
    if args.out:
        check_out_file(Path(args.out), args.overwrite)
    cand_tok = options.candidate_tokenizer(args) if candidate is not None else None
    lm = options.load(args)
    info = lm.info
    if cand_tok is not None:  # before the base's first task
        check_tokenizers(lm.tokenizer, cand_tok, candidate)
    if candidate is None:
        plan = build(lm, recipe, cal, progress=not args.quiet)
        record, label = {"modification": plan.to_dict()}, plan.label()
        pairs = _recipe_pairs(lm, plan, tasks, args, opts)
    else:  # sequential: the base on every task, its weights freed, then the candidate loaded
        dense, cand = score_candidate(lm, tasks, args.data_dir, opts, partial(options.scoring_candidate, args))
        _print_notes(cand)
        record, label = {"candidate": cand.to_dict()}, cand.label
        pairs = ((t, d, run_task(cand.lm, t, args.data_dir, opts)) for t, d in zip(tasks, dense, strict=True))
    rows = [_eval_row(t, dense, mod, label) for t, dense, mod in pairs]
    if args.out:
        write_json(Path(args.out), {"model": info, **record, "limit": args.limit, "seed": args.seed, "tasks": rows})
    return 0


def _print_notes(cand: Any) -> None:
    for note in cand.notes:
        print(f"note: {note}", file=sys.stderr)


def _print_summary(run_dir: Path) -> None:
    """The summary lines of a saved run, as its command printed them (when the analysis has some)."""

    found = for_run(run_dir)
    if found is not None and found.summary is not None and (run_dir / "results.json").is_file():
        print("\n".join(found.summary(found.saved(run_dir))))


def _unfinished(run_dir: Path) -> int:
    """1 after listing what a run still lacks (a sharded sweep's missing or failed cells), else 0."""
    found = for_run(run_dir)
    lines = found.unfinished(run_dir) if found is not None and found.unfinished is not None else []
    if lines:
        print("\n".join(lines), file=sys.stderr)
    return 1 if lines else 0


def cmd_report(args: argparse.Namespace) -> int:
    dirs = [Path(r) for r in args.runs]
    for d in dirs:
        if not d.is_dir():
            raise PrunelensError(f"run directory '{d}' does not exist")
    if args.out:
        check_out_file(Path(args.out), overwrite=True)  # a report is rebuilt in place by design
    if len(dirs) > 1:
        print(combined_report(dirs, Path(args.out) if args.out else Path("report.html")))
        return 0
    _print_summary(dirs[0])
    out = Path(args.out) if args.out else dirs[0] / "report.html"
    if out == dirs[0] / "report.html":
        other = rebuild_report(dirs[0])
        if other is not None:
            print(other)
            return _unfinished(dirs[0])
    print(combined_report(dirs, out))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    for name, p in PRESETS.items():
        print(f"{name:22s} {p.description}")
    return 0


def _ppl_args(pp: argparse.ArgumentParser) -> None:
    """ppl: a recipe or a --candidate against the dense model, on one text."""
    options.add_model_args(pp)
    options.add_recipe_args(pp)
    pp.add_argument("--text", required=True,
                    help="corpus: .txt, or .jsonl with a 'text' field per row (rows joined by blank lines)")
    pp.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default 1024)")
    pp.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    pp.add_argument("--kld", action="store_true", help="also llama.cpp's KL-divergence statistics of the "
                    "modified model against the dense one (mean/median/p99 KL, same top token, RMS Δp)")
    pp.add_argument("--positions", default="all", metavar="|".join(POSITIONS),
                    help="scored positions of each window: all (default) or second-half, llama.cpp's "
                         "llama-perplexity convention (BOS first where the model adds one, then the "
                         "predictions from seq_len/2 on), for numbers to set beside llama.cpp's")
    options.add_candidate_args(pp)
    pp.add_argument("--out", help="also write the numbers to this JSON file")
    pp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    pp.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prunelens", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"prunelens {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, arguments: Any, run: Any) -> None:
        p = sub.add_parser(name, help=help)
        arguments(p)
        p.set_defaults(run=run)

    for a in analyses():
        add(a.name, a.help, a.add_arguments, a.run)

    def prune_args(p: argparse.ArgumentParser) -> None:
        options.add_model_args(p)
        options.add_recipe_args(p)
        p.add_argument("--out", required=True, help="checkpoint directory (--format gguf: a .gguf file)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--format", choices=("hf", "gguf", "compressed-tensors", "nemotron-nas"), default="hf",
                       help="hf: a checkpoint plain transformers loads (default); gguf: one file llama.cpp/Ollama "
                            "run, dropped attention as llama.cpp's deci architecture; compressed-tensors: rtn/gptq "
                            "weights packed as llm-compressor writes them, for vLLM; nemotron-nas: dropped "
                            "sublayers as DeciLM no-ops that vLLM/SGLang/TensorRT-LLM skip (docs/deploy.md)")
        p.add_argument("--gguf-type", default="f16", help=f"GGUF tensor type: {', '.join(GGUF_TYPES)} (default f16)")
        p.add_argument("--gguf-vocab", metavar="FILE.gguf",
                       help="a GGUF of the base model to take the tokenizer from (default: the GGUF the base "
                            "was loaded from)")

    def rank_args(r: argparse.ArgumentParser) -> None:
        options.add_model_args(r)
        r.add_argument("--kind", default="attn", choices=["attn", "mlp", "block"])
        r.add_argument("--calib")
        r.add_argument("--calib-samples", type=int, default=8)
        r.add_argument("--calib-len", type=int, default=128)

    def eval_args(ev: argparse.ArgumentParser) -> None:
        options.add_model_args(ev)
        options.add_recipe_args(ev)
        options.add_task_args(ev)
        options.add_candidate_args(ev)
        ev.add_argument("--out", help="also write all numbers (and per-question outputs) to this JSON")
        ev.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    def report_args(rep: argparse.ArgumentParser) -> None:
        rep.add_argument("runs", nargs="+", help="run directories (several are shown side by side)")
        rep.add_argument("--out", help="HTML file (default RUN/report.html for one run, else report.html)")

    add("prune", "prune/quantise and save an HF checkpoint plain transformers loads", prune_args, cmd_prune)
    add("rank", "print importance scores of every attn/mlp/block unit", rank_args, cmd_rank)
    add("ppl", "perplexity of the dense and the modified model on a text file", _ppl_args, cmd_ppl)
    add("eval", "task scores of the dense and the modified model side by side", eval_args, cmd_eval)
    add("report", "rebuild the HTML report from saved run directories", report_args, cmd_report)
    add("models", "list the bundled model presets", lambda p: None, cmd_models)
    return options.fill_help(ap)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: what a launched job or rerun repeats
    try:
        return args.run(args)
    except PrunelensError as e:
        print(f"prunelens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunelens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
