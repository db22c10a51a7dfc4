"""prunelens command line: a thin shell over prunelens.api (bad input: one line on stderr, exit 2)."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any

from .errors import PrunelensError

DEFAULT_MODEL = "smollm2-135m"


def _temps(s: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise PrunelensError(f"temperatures must be numbers, got '{s}'") from None
    if not temps:
        raise PrunelensError("at least one temperature is needed")
    for t in temps:
        if not (t > 0 and math.isfinite(t)):
            raise PrunelensError(f"temperature must be positive, got {t:g}")
    return temps


def _positive(name: str, v: int) -> int:
    if v < 1:
        raise PrunelensError(f"{name} must be at least 1, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset, local HF directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the hub (off by default)")


def _add_drop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop", action="append", default=[], metavar="SPEC",
                   help="KIND:N drops the N least important units, KIND@i,j drops those layers; "
                        "KIND is attn, mlp or block; repeatable (e.g. --drop attn:4 --drop mlp@2)")
    p.add_argument("--importance", default="cosine", choices=["cosine", "angular", "kl"],
                   help="ranking for KIND:N: cosine = 1-cos(in,out) (LLM-Drop / ShortGPT BI), "
                        "angular = best window of N consecutive blocks (Gromov et al.), "
                        "kl = greedy on the final next-token KL (slower: one forward per unit and drop)")
    p.add_argument("--iterative", action="store_true", help="re-score after every drop")
    p.add_argument("--calib", help="calibration text (.txt or .jsonl with a 'text' field); "
                                   "default: a built-in sample")
    p.add_argument("--calib-samples", type=int,
                   help="calibration windows (default 8 for --drop ranking, 32 for --prune/--quant)")
    p.add_argument("--calib-len", type=int,
                   help="tokens per calibration window (default 128 for --drop, 256 for --prune/--quant)")
    p.add_argument("--prune", metavar="SPEC",
                   help="sparsify every decoder linear layer: magnitude|wanda|sparsegpt:RATIO (e.g. "
                        "wanda:0.5) or METHOD:N:M, N kept of every M inputs (e.g. sparsegpt:2:4)")
    p.add_argument("--quant", metavar="SPEC",
                   help="fake-quantise every decoder linear layer: rtn|gptq:wBITS[gGROUP][s] "
                        "(e.g. gptq:w4g128; s = symmetric)")
    p.add_argument("--prune-skip", action="append", default=[], metavar="PATTERN",
                   help="leave these linear layers alone: a layer index or a glob on the module path "
                        "(e.g. 0, '*.mlp.down_proj'); repeatable")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    """--method (repeatable: any drop, prune or quant spec) and how the methods are calibrated."""
    p.add_argument("--method", action="append", default=[], metavar="SPEC", required=True,
                   help="repeatable: a drop (attn:4, mlp:2, block:2), prune (wanda:0.5, sparsegpt:2:4) or "
                        "quant (rtn:w4g128, gptq:w4g128) spec")
    p.add_argument("--importance", default="cosine", choices=["cosine", "angular", "kl"])
    p.add_argument("--calib", help="calibration text (drop ranking and calibrated weight methods)")
    p.add_argument("--calib-samples", type=int)
    p.add_argument("--calib-len", type=int)


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", required=True,
                   help="comma-separated: arc_easy, arc_challenge, piqa, boolq, winogrande, hellaswag, mmlu, "
                        "mmlu_5shot, mmlu_full, mmlu_full_5shot (multiple choice); gsm8k, humaneval, mbpp "
                        "(generative); cranfield or retrieval:DIR (retrieval); fidelity (vs dense, no "
                        "labels)")
    p.add_argument("--data-dir", help="directory with the tasks' data files (see docs/tasks.md)")
    p.add_argument("--limit", type=int, help="a seeded sample of N questions per task")
    p.add_argument("--generative-limit", type=int, metavar="N",
                   help="a different limit for gsm8k/humaneval/mbpp (they cost far more per question)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shots", type=int, default=5, help="GSM8K exemplars (default 5)")
    p.add_argument("--max-new-tokens", type=int,
                   help="generation limit (default: gsm8k 256, humaneval/mbpp 512, fidelity 64)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="generative prompts without the chat template")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"], help="retrieval embedding pooling")
    p.add_argument("--prompts", help="fidelity prompts (.txt one per line, or .jsonl); default: built-in set")
    p.add_argument("--quiet", action="store_true")


def _task_setup(args: argparse.Namespace) -> tuple[list[str], Any]:
    """Task names (each checked, data included) and TaskOptions, before any model is loaded."""
    from .tasks.registry import TaskOptions, check_task

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise PrunelensError("--tasks is empty")
    for t in tasks:
        check_task(t, args.data_dir)
    if args.limit is not None:
        _positive("--limit", args.limit)
    if args.generative_limit is not None:
        _positive("--generative-limit", args.generative_limit)
    _positive("--batch-size", args.batch_size)
    if args.max_new_tokens is not None:
        _positive("--max-new-tokens", args.max_new_tokens)
    if args.shots < 0:
        raise PrunelensError(f"--shots must be at least 0, got {args.shots}")
    prompts = None
    if args.prompts:
        from .data import read_texts

        prompts = tuple(read_texts(args.prompts, "prompt"))
    opts = TaskOptions(limit=args.limit, generative_limit=args.generative_limit, seed=args.seed,
                       batch_size=args.batch_size, shots=args.shots,
                       max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template,
                       pooling=args.pooling, prompts=prompts, progress=not args.quiet)
    return tasks, opts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prunelens", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="trace dense vs pruned through h -> z -> p, per layer and step")
    _add_model_args(a)
    _add_drop_args(a)
    a.add_argument("--prompts", help="prompt file (.txt: one per line; .jsonl: 'prompt'/'text'/"
                                     "'question' field); default: 8 built-in prompts")
    a.add_argument("--limit", type=int, help="use only the first N prompts")
    a.add_argument("--steps", type=int, default=32, help="decoding steps per prompt (default 32)")
    a.add_argument("--temps", default="1", help="temperatures, comma-separated, e.g. 1,0.5 (default 1)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--topk", type=int, default=10, help="k for the top-k variance of dz (default 10)")
    a.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts raw even if the tokenizer has a chat template")
    a.add_argument("--out", help="run directory (default runs/<time>-<model>-<pruning>)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    a.add_argument("--save-pruned", metavar="DIR", help="also save the pruned checkpoint here")
    a.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("prune", help="prune/quantise and save an HF checkpoint plain transformers loads")
    _add_model_args(p)
    _add_drop_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--overwrite", action="store_true")

    r = sub.add_parser("rank", help="print importance scores of every attn/mlp/block unit")
    _add_model_args(r)
    r.add_argument("--kind", default="attn", choices=["attn", "mlp", "block"])
    r.add_argument("--calib")
    r.add_argument("--calib-samples", type=int, default=8)
    r.add_argument("--calib-len", type=int, default=128)

    pp = sub.add_parser("ppl", help="perplexity of the dense and the modified model on a text file")
    _add_model_args(pp)
    _add_drop_args(pp)
    pp.add_argument("--text", required=True,
                    help="corpus: .txt, or .jsonl with a 'text' field per row (rows joined by blank lines)")
    pp.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default 1024)")
    pp.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    pp.add_argument("--out", help="also write the numbers to this JSON file")
    pp.add_argument("--quiet", action="store_true")

    ev = sub.add_parser("eval", help="task scores of the dense and the modified model side by side")
    _add_model_args(ev)
    _add_drop_args(ev)
    _add_task_args(ev)
    ev.add_argument("--out", help="also write all numbers (and per-question outputs) to this JSON")

    sw = sub.add_parser("sweep", help="scores over pruning amounts: Figure-1 plot, tables and report "
                                      "(resumable)")
    _add_model_args(sw)
    sw.add_argument("--prune", required=True, dest="method", metavar="METHOD",
                    help="attn-drop, mlp-drop, block-drop (amounts = layer counts), magnitude, wanda, "
                         "sparsegpt (ratios or N:M), rtn, gptq (bits, e.g. 4 or w4g128)")
    sw.add_argument("--amounts", required=True, help="comma-separated, 0 = dense (e.g. 0,2,4,6,8)")
    sw.add_argument("--importance", default="cosine", choices=["cosine", "angular", "kl"])
    sw.add_argument("--calib", help="calibration text for layer ranking / weight methods")
    sw.add_argument("--calib-samples", type=int)
    sw.add_argument("--calib-len", type=int)
    _add_task_args(sw)
    sw.add_argument("--out", help="sweep directory (default runs/sweep-<model>-<method>); rerun to resume")
    sw.add_argument("--overwrite", action="store_true", help="discard cached cells and start again")

    cf = sub.add_parser("counterfactual", help="replace one layer at a time; similarity of h, z, p at the "
                                               "output per layer (paper Fig. 4) and the deviation split")
    _add_model_args(cf)
    cf.add_argument("--kinds", default="attn,mlp", help="attn, mlp and/or block (default attn,mlp)")
    cf.add_argument("--prune", metavar="SPEC", help="also replace each layer's weights by this sparsity")
    cf.add_argument("--quant", metavar="SPEC", help="... or by this quantisation")
    cf.add_argument("--calib", help="calibration text for --prune/--quant")
    cf.add_argument("--calib-samples", type=int, default=32)
    cf.add_argument("--calib-len", type=int, default=256)
    cf.add_argument("--prompts", help="prompt file (.txt/.jsonl); default: the 8 built-in prompts")
    cf.add_argument("--limit", type=int, help="use only the first N prompts")
    cf.add_argument("--temperature", type=float, default=1.0)
    cf.add_argument("--batch-size", type=int, default=8)
    cf.add_argument("--no-chat-template", action="store_true")
    cf.add_argument("--out", help="run directory (default runs/<time>-<model>-counterfactual)")
    cf.add_argument("--overwrite", action="store_true")
    cf.add_argument("--quiet", action="store_true")

    co = sub.add_parser("compare", help="step-wise KL / cos(p) of several pruning and quantisation methods "
                                        "on the same prompts, in one figure (resumable)")
    _add_model_args(co)
    _add_method_args(co)
    co.add_argument("--prompts", help="prompt file; default: the 8 built-in prompts")
    co.add_argument("--limit", type=int)
    co.add_argument("--steps", type=int, default=32)
    co.add_argument("--temps", default="1")
    co.add_argument("--batch-size", type=int, default=8)
    co.add_argument("--no-chat-template", action="store_true")
    co.add_argument("--out", required=True, help="comparison directory (rerun to resume)")
    co.add_argument("--quiet", action="store_true")

    ss = sub.add_parser("subspace", help="full-vocabulary vs answer-option subspace agreement on a "
                                         "multiple-choice set, across prunings (paper Fig. 8)")
    _add_model_args(ss)
    ss.add_argument("--task", default="mmlu", help="mmlu (default), mmlu_5shot or boolq")
    ss.add_argument("--data-dir", required=True)
    _add_method_args(ss)
    ss.add_argument("--limit", type=int, default=200, help="seeded sample of questions (default 200)")
    ss.add_argument("--temperature", type=float, default=1.0)
    ss.add_argument("--batch-size", type=int, default=8)
    ss.add_argument("--out", help="run directory (default runs/<time>-<model>-subspace)")
    ss.add_argument("--overwrite", action="store_true")
    ss.add_argument("--quiet", action="store_true")

    pa = sub.add_parser("paired", help="the same questions as multiple choice and as free generation, dense "
                                       "vs each pruning: both accuracies and the paired gap")
    _add_model_args(pa)
    pa.add_argument("--task", required=True, help="arc_easy, arc_challenge, mmlu or gsm8k")
    pa.add_argument("--data-dir", required=True)
    _add_method_args(pa)
    pa.add_argument("--style", default="cloze", choices=["cloze", "letters"],
                    help="cloze (default): option log-likelihood vs free answer to the bare question; "
                         "letters: lettered options for both, next-token letter vs free reply")
    pa.add_argument("--select", default="all", choices=["all", "dense-correct"],
                    help="dense-correct: keep only the questions the dense model gets right in both formats "
                         "(--limit then sizes the pool); for models near chance")
    pa.add_argument("--limit", type=int, default=100, help="seeded sample of questions (default 100)")
    pa.add_argument("--shots", type=int, default=5, help="GSM8K exemplars (default 5)")
    pa.add_argument("--batch-size", type=int, default=8)
    pa.add_argument("--no-chat-template", action="store_true")
    pa.add_argument("--out", help="run directory (default runs/<time>-<model>-paired-<task>)")
    pa.add_argument("--overwrite", action="store_true")
    pa.add_argument("--quiet", action="store_true")

    ad = sub.add_parser("advise", help="rank candidate prunings that meet a memory budget by predicted risk "
                                       "for your use (cheap signals, no benchmark)")
    _add_model_args(ad)
    ad.add_argument("--budget", required=True, help="share of the decoder's weight memory to save, e.g. 25%%")
    ad.add_argument("--use", required=True, choices=["generative", "multiple-choice", "retrieval"])
    ad.add_argument("--candidates", help="comma-separated specs to score instead of the automatic set "
                                         "(e.g. attn:8,wanda:0.3,gptq:w4g128)")
    ad.add_argument("--prompts", help="prompt file (.txt, one a line, or .jsonl); default: built-in prompts")
    ad.add_argument("--steps", type=int, default=32, help="decoding steps per prompt (default 32)")
    ad.add_argument("--calib", help="calibration text for drop ranking and weight methods")
    ad.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    ad.add_argument("--out", help="run directory (default runs/<time>-<model>-advise)")
    ad.add_argument("--overwrite", action="store_true")
    ad.add_argument("--quiet", action="store_true")

    rep = sub.add_parser("report", help="rebuild the HTML report from saved run directories")
    rep.add_argument("runs", nargs="+", help="run directories (several are shown side by side)")
    rep.add_argument("--out", help="HTML file (default RUN/report.html for one run, else report.html)")

    sub.add_parser("models", help="list the bundled model presets")
    return ap


def _check_modification_args(args: argparse.Namespace) -> list:
    """Parse every spec before any model is loaded, so bad input fails in a second."""
    from . import api

    if args.prune and args.quant:
        raise PrunelensError("use either --prune or --quant, not both")
    for spec in (args.prune, args.quant):
        if spec:
            method = api.weight_method(spec)
            if (spec is args.prune) != (method.pattern is not None):
                raise PrunelensError(f"'{spec}' is a {'quantisation' if method.quant else 'pruning'} spec; "
                                     f"pass it to --{'quant' if method.quant else 'prune'}")
    for v, name in ((args.calib_samples, "--calib-samples"), (args.calib_len, "--calib-len")):
        if v is not None:
            _positive(name, v)
    if args.calib:
        from .data import read_texts

        read_texts(args.calib, "calibration")
    return api.parse_drops(args.drop)


def _check_checkpoint_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrunelensError(f"'{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrunelensError(f"output directory '{out}' is not empty (use --overwrite)")


def _build_modification(lm, args: argparse.Namespace, requests: list, progress: bool = True,
                        inplace: bool = False):
    """Layer drops (ranked on calibration text) and/or one weight patch, as one modification.

    ``inplace`` writes the new weights into the model (no dense copy kept): for saving only.
    """
    from . import api
    from .prune import combine

    parts = []
    if requests:
        parts.append(api.select_drop(lm, *requests, metric=args.importance, iterative=args.iterative,
                                     calib=args.calib, calib_samples=args.calib_samples or 8,
                                     calib_len=args.calib_len or 128, seed=args.seed))
    spec = args.prune or args.quant
    if spec:
        # calibrated on the model with its layers already dropped; dropped units are not touched
        with (parts[0].view(lm.adapter) if parts else contextlib.nullcontext()):
            parts.append(api.prune_weights(lm, spec, calib=args.calib, calib_samples=args.calib_samples or 32,
                                           calib_len=args.calib_len or 256, seed=args.seed,
                                           skip=args.prune_skip, progress=progress, inplace=inplace))
    return combine(parts)


def cmd_analyze(args: argparse.Namespace) -> int:
    from . import api
    from .analysis import AnalysisSettings, analyze
    from .data import builtin_prompts, read_texts
    from .models import load_model
    from .runs import check_out_dir, default_run_dir, write_run

    # Validate everything cheap before loading a model.
    requests = _check_modification_args(args)
    settings = AnalysisSettings(
        temperatures=_temps(args.temps), max_new_tokens=_positive("--steps", args.steps),
        batch_size=_positive("--batch-size", args.batch_size), topk=_positive("--topk", args.topk),
        chat_template=not args.no_chat_template, seed=args.seed)
    prompts = read_texts(args.prompts, "prompt") if args.prompts else builtin_prompts()
    if args.limit is not None:
        prompts = prompts[:_positive("--limit", args.limit)]
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    if args.save_pruned:
        _check_checkpoint_dir(Path(args.save_pruned), args.overwrite)

    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    plan = _build_modification(lm, args, requests, progress=not args.quiet)
    print(f"pruning: {plan.label()}", file=sys.stderr)
    result = analyze(lm, plan, prompts, settings, progress=not args.quiet)
    out = out or default_run_dir(args.model, plan.label())
    write_run(result, out, overwrite=args.overwrite)
    if args.save_pruned:
        api.save_modified(lm, plan, args.save_pruned)
    _print_summary(result, out)
    return 0


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _print_summary(result: dict[str, Any], out: Path) -> None:
    s = result["summary"]
    t = f"{s['temperature']:g}"
    last, tf, fr = s["last_prompt_token"], s["teacher_forced_mean"], s["free_running_mean"]
    print(f"model {result['model']['name']}  pruning {result['pruning']['label']}")
    print(f"  last prompt token : cos(h)={_fmt(last['cos_h'])}  cos(z)={_fmt(last['cos_z'])}  "
          f"cos(p)={_fmt(last[f'cos_p@{t}'])}  KL@T={t}={_fmt(last[f'kl@{t}'])} "
          f"(Taylor {_fmt(last[f'taylor_kl@{t}'])})")
    print(f"  teacher-forced    : mean KL={_fmt(tf[f'kl@{t}'])}  top-1 agreement={_fmt(tf['top1_agree'])}")
    print(f"  free-running      : mean KL={_fmt(fr[f'kl@{t}'])}  token agreement={_fmt(fr['token_agree'])}  "
          f"diverged {s['prompts_diverged']}/{result['settings']['n_prompts']} prompts "
          f"(median first divergence step {_fmt(s['median_first_divergence'])})")
    print(f"  report: {out / 'report.html'}")


def cmd_prune(args: argparse.Namespace) -> int:
    from . import api
    from .models import load_model

    requests = _check_modification_args(args)
    if not (requests or args.prune or args.quant):
        raise PrunelensError("nothing to do: give --drop, --prune or --quant")
    out = Path(args.out)
    _check_checkpoint_dir(out, args.overwrite)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    plan = _build_modification(lm, args, requests, inplace=True)
    api.save_modified(lm, plan, out)
    print(f"saved {plan.label()} to {out}")
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from .evaluate import perplexity, read_corpus
    from .models import load_model
    from .runs import write_json

    requests = _check_modification_args(args)
    text = read_corpus(args.text)
    _positive("--seq-len", args.seq_len)
    if args.max_windows is not None:
        _positive("--max-windows", args.max_windows)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    plan = _build_modification(lm, args, requests, progress=not args.quiet)
    kw = dict(seq_len=args.seq_len, max_windows=args.max_windows, progress=not args.quiet)
    dense = perplexity(lm, text, **kw)
    mod = perplexity(lm, text, plan, **kw) if plan.label() != "dense" else dense
    res = {"model": lm.info["name"], "text": str(args.text), "modification": plan.to_dict(),
           "dense": dense, "modified": mod}
    print(f"{lm.info['name']}  {plan.label()}: perplexity {mod['perplexity']:.3f} "
          f"(dense {dense['perplexity']:.3f}) over {mod['tokens']} tokens in {mod['windows']} windows "
          f"of {args.seq_len}")
    if args.out:
        write_json(Path(args.out), res)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    import torch

    from .data import calibration_ids
    from .models import load_model
    from .prune.drop import DropPlan
    from .prune.importance import unit_scores

    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
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


def cmd_eval(args: argparse.Namespace) -> int:
    from .models import load_model
    from .runs import write_json
    from .tasks.registry import run_task

    requests = _check_modification_args(args)
    tasks, opts = _task_setup(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    plan = _build_modification(lm, args, requests, progress=not args.quiet)
    modified = plan.label() != "dense"
    rows = []
    for t in tasks:
        dense = run_task(lm, t, args.data_dir, opts)
        mod = run_task(lm, t, args.data_dir, opts, plan) if modified else dense
        rows.append({"task": t, "kind": dense.kind, "dense": dense.to_dict(), "modified": mod.to_dict()})
        print(_score_line(t, dense, mod, plan.label()), flush=True)
    if args.out:
        write_json(Path(args.out), {"model": lm.info, "modification": plan.to_dict(), "limit": args.limit,
                                    "seed": args.seed, "tasks": rows})
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sweep import SweepSpec, parse_amounts, run_sweep
    from .sweep_report import markdown_table, markdown_table1, reading

    amounts = parse_amounts(args.method, args.amounts)
    tasks, opts = _task_setup(args)
    for v, name in ((args.calib_samples, "--calib-samples"), (args.calib_len, "--calib-len")):
        if v is not None:
            _positive(name, v)
    if args.calib:
        from .data import read_texts

        read_texts(args.calib, "calibration")
    spec = SweepSpec(args.model, args.method, tuple(amounts), tuple(tasks), args.data_dir, opts,
                     args.importance, args.calib, args.calib_samples, args.calib_len)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{Path(args.model).name}-{args.method}")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{safe}"
    def load():
        return load_model(args.model, args.device, args.dtype, args.trust_remote_code)

    res = run_sweep(spec, out, load, overwrite=args.overwrite, progress=not args.quiet)
    print(markdown_table(res))
    print(markdown_table1(res))
    for line in reading(res):
        print(line)
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from . import api
    from .counterfactual import KINDS, CounterfactualSettings, counterfactual
    from .data import builtin_prompts, read_texts
    from .mech_report import counterfactual_figures, counterfactual_html, counterfactual_reading
    from .models import load_model
    from .runs import check_out_dir, default_run_dir, write_run

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    for k in kinds:
        if k not in KINDS:
            raise PrunelensError(f"unknown kind '{k}'; kinds: {', '.join(KINDS)}")
    if args.prune and args.quant:
        raise PrunelensError("use either --prune or --quant, not both")
    spec = args.prune or args.quant
    if spec:
        api.weight_method(spec)
    _temps(str(args.temperature))
    prompts = read_texts(args.prompts, "prompt") if args.prompts else builtin_prompts()
    if args.limit is not None:
        prompts = prompts[:_positive("--limit", args.limit)]
    _positive("--batch-size", args.batch_size)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    patch = None
    if spec:
        patch = api.prune_weights(lm, spec, calib=args.calib, calib_samples=args.calib_samples,
                                  calib_len=args.calib_len, seed=args.seed, progress=not args.quiet)
    settings = CounterfactualSettings(kinds=kinds, temperature=args.temperature, batch_size=args.batch_size,
                                      chat_template=not args.no_chat_template)
    result = counterfactual(lm, prompts, settings, patch, progress=not args.quiet)
    out = out or default_run_dir(args.model, "counterfactual")
    write_run(result, out, overwrite=args.overwrite, figures=counterfactual_figures, html=counterfactual_html)
    for line in counterfactual_reading(result):
        print(line)
    t = result["timing"]
    print(f"time {t['counterfactual_s']:.1f} s = {t['ratio_to_dense_forward_per_layer']:.3f} x one dense "
          f"forward per (kind, layer); report: {out / 'report.html'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .analysis import AnalysisSettings
    from .api import spec_kind
    from .compare import compare_methods
    from .data import builtin_prompts, read_texts
    from .models import load_model

    for s in args.method:
        spec_kind(s)
    settings = AnalysisSettings(temperatures=_temps(args.temps),
                                max_new_tokens=_positive("--steps", args.steps),
                                batch_size=_positive("--batch-size", args.batch_size),
                                chat_template=not args.no_chat_template, seed=args.seed)
    prompts = read_texts(args.prompts, "prompt") if args.prompts else builtin_prompts()
    if args.limit is not None:
        prompts = prompts[:_positive("--limit", args.limit)]
    if args.calib:
        read_texts(args.calib, "calibration")
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    res = compare_methods(lm, args.method, prompts, settings, args.out, args.calib, args.calib_samples,
                          args.calib_len, args.seed, progress=not args.quiet)
    t = f"{res['temperature']:g}"
    print(f"{'method':18s} {'removed':>8s} {'bits':>5s} {'TF KL':>8s} {'FR KL':>8s} {'FR agree':>9s}")
    for m in res["methods"]:
        fp, s = m["footprint"] or {}, m["summary"]
        tf, fr = s["teacher_forced_mean"], s["free_running_mean"]
        print(f"{m['spec']:18s} {fp.get('removed_share', 0):8.3f} {fp.get('bits_per_weight', 16):5.2f} "
              f"{_fmt(tf[f'kl@{t}']):>8s} {_fmt(fr[f'kl@{t}']):>8s} {_fmt(fr['token_agree']):>9s}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def cmd_subspace(args: argparse.Namespace) -> int:
    from .api import build_modification, spec_kind
    from .models import load_model
    from .runs import check_out_dir, default_run_dir, write_run
    from .subspace import option_subspace, subspace_figures, subspace_html
    from .tasks.registry import check_task

    for s in args.method:
        spec_kind(s)
    check_task(args.task, args.data_dir)
    _positive("--limit", args.limit)
    _temps(str(args.temperature))
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    mods = {}
    for s in args.method:
        mods[s] = build_modification(lm, s, args.calib, args.calib_samples, args.calib_len, args.seed,
                                     args.importance, progress=not args.quiet)
    res = option_subspace(lm, args.task, args.data_dir, mods, args.limit, args.seed, args.temperature,
                          args.batch_size, progress=not args.quiet)
    out = out or default_run_dir(args.model, "subspace")
    write_run(res, out, overwrite=args.overwrite, figures=subspace_figures, html=subspace_html)
    print(f"{'method':14s} {'KL full':>9s} {'KL options':>10s} {'top-1 agree':>11s} {'option agree':>12s} "
          f"{'acc':>6s} (dense {res['methods'][0]['acc_dense']:.3f})")
    for r in res["methods"]:
        print(f"{r['method']:14s} {r['full_kl']:9.4g} {r['sub_kl']:10.4g} {r['full_top1_agree']:11.3f} "
              f"{r['sub_agree']:12.3f} {r['acc_pruned']:6.3f}")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_paired(args: argparse.Namespace) -> int:
    from .api import build_modification, spec_kind
    from .models import load_model
    from .paired_eval import check_paired_task, paired_eval, paired_figures, paired_html
    from .runs import check_out_dir, default_run_dir, write_run

    for s in args.method:
        spec_kind(s)
    check_paired_task(args.task, args.data_dir)
    _positive("--limit", args.limit)
    _positive("--batch-size", args.batch_size)
    if args.shots < 0:
        raise PrunelensError(f"--shots must be at least 0, got {args.shots}")
    out = Path(args.out) if args.out else default_run_dir(args.model, f"paired-{args.task}")
    check_out_dir(out, args.overwrite)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    mods = {s: build_modification(lm, s, args.calib, args.calib_samples, args.calib_len, args.seed,
                                  args.importance, progress=not args.quiet) for s in args.method}
    res = paired_eval(lm, args.task, args.data_dir, mods, args.limit, args.seed, args.style, args.select,
                      args.shots, args.batch_size, not args.no_chat_template, progress=not args.quiet)
    write_run(res, out, overwrite=args.overwrite, figures=paired_figures, html=paired_html)
    d = res["dense"]
    print(f"{args.task} ({args.style}, {args.select}): {res['n']} of {res['pool']} questions; dense MCQ "
          f"{d['mcq_acc']:.3f}, generative {d['gen_acc']:.3f} (chance {res['chance']:.3f})")
    print(f"{'method':16s} {'MCQ':>6s} {'gen':>6s} {'MCQ drop':>8s} {'gen drop':>8s} {'gap [95% CI]':>22s}")
    for r in res["methods"]:
        print(f"{r['method']:16s} {r['mcq_pruned']:6.3f} {r['gen_pruned']:6.3f} {r['mcq_drop']:8.3f} "
              f"{r['gen_drop']:8.3f} {r['gap']:+7.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from .advise import advise, advise_html, parse_budget
    from .api import spec_kind
    from .data import builtin_prompts, read_texts
    from .models import load_model
    from .runs import check_out_dir, default_run_dir, write_run

    budget = parse_budget(args.budget)
    specs = [s.strip() for s in args.candidates.split(",") if s.strip()] if args.candidates else None
    for s in specs or ():
        spec_kind(s)
    _positive("--steps", args.steps)
    _positive("--calib-samples", args.calib_samples)
    prompts = read_texts(args.prompts, "prompt") if args.prompts else builtin_prompts()
    if args.calib:
        read_texts(args.calib, "calibration")
    out = Path(args.out) if args.out else default_run_dir(args.model, f"advise-{args.use}")
    check_out_dir(out, args.overwrite)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    res = advise(lm, budget, args.use, prompts, specs, args.calib, args.calib_samples, args.steps, args.seed,
                 progress=not args.quiet)
    write_run(res, out, overwrite=args.overwrite, figures=lambda r, d: [], html=advise_html)
    print(f"{'candidate':16s} {'risk':>6s} {'saved':>6s} {'decode':>7s} {'agree run':>9s}  "
          "risk gen / MCQ / retrieval")
    for r in res["rows"]:
        flag = "" if r["meets_budget"] else "  (below budget)"
        print(f"{r['spec']:16s} {r['risk']:6.3f} {r['saved']:6.1%} {r['decode_speedup']:6.2f}x "
              f"{r['agreeing_tokens']:9.1f}  "
              f"{r['risk_generative']:.3f} / {r['risk_multiple_choice']:.3f} / "
              f"{r['risk_retrieval']:.4f}{flag}")
    print(f"recommendation: {res['recommendation']}")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .mech_report import combined_report, rebuild_other_report

    dirs = [Path(r) for r in args.runs]
    for d in dirs:
        if not d.is_dir():
            raise PrunelensError(f"run directory '{d}' does not exist")
    if len(dirs) > 1:
        print(combined_report(dirs, Path(args.out) if args.out else Path("report.html")))
        return 0
    out = Path(args.out) if args.out else dirs[0] / "report.html"
    if out == dirs[0] / "report.html":
        other = rebuild_other_report(dirs[0])
        if other is not None:
            print(other)
            return 0
    print(combined_report(dirs, out))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import PRESETS

    for name, p in PRESETS.items():
        print(f"{name:22s} {p.description}")
    return 0


COMMANDS = {"analyze": cmd_analyze, "prune": cmd_prune, "ppl": cmd_ppl, "eval": cmd_eval, "sweep": cmd_sweep,
            "counterfactual": cmd_counterfactual, "compare": cmd_compare,
            "subspace": cmd_subspace, "paired": cmd_paired, "advise": cmd_advise, "rank": cmd_rank,
            "report": cmd_report, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PrunelensError as e:
        print(f"prunelens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunelens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
