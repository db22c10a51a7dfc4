"""Categorical-token subspace (the paper's Fig. 8): why multiple choice survives pruning.

On a multiple-choice dataset whose options are single tokens (MMLU's " A".." D", BoolQ's " no"/
" yes"), the next-token distribution after the question is compared dense vs pruned twice: over the
full vocabulary, and restricted to the option tokens and renormalised. Pruning moves the full
distribution much more than the tiny option subspace, which is all a multiple-choice score reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.errors import PrunelensError
from prunelens.metrics import logit_metrics, subspace_metrics
from prunelens.model.generation import next_token_logits
from prunelens.model.loading import LoadedModel
from prunelens.render import esc, html_page, html_table, img, save_figure, subplots, text, val
from prunelens.runs import check_out_dir, default_run_dir
from prunelens.tasks.data import sample_indices
from prunelens.tasks.loglik import split_tokens
from prunelens.tasks.mcq import MCQ_TASKS
from prunelens.tasks.registry import check_task

SCHEMA = "prunelens.subspace/1"


def option_items(lm: LoadedModel, task: str, data_dir: str | Path | None, limit: int | None,
                 seed: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(context ids, option token ids, gold) per sampled question; options must be single tokens."""
    if task not in MCQ_TASKS:
        raise PrunelensError(f"unknown task '{task}'; multiple-choice tasks: {', '.join(MCQ_TASKS)}")
    items = MCQ_TASKS[task].build(data_dir)
    ctxs, opts, golds = [], [], []
    for i in sample_indices(len(items), limit, seed):
        it = items[i]
        if len(set(it.contexts)) != 1:
            raise PrunelensError(f"task '{task}' gives each option its own context; the option subspace "
                                 "needs one question with single-token options (use mmlu, mmlu_5shot, boolq)")
        ids = []
        ctx = None
        for cont in it.continuations:
            c, o = split_tokens(lm.tokenizer, it.contexts[0], cont)
            if len(o) != 1:
                raise PrunelensError(f"task '{task}': option {cont!r} is {len(o)} tokens, not one (use mmlu, "
                                     "mmlu_5shot or boolq)")
            ctx, ids = c, [*ids, o[0]]
        if len(set(ids)) != len(ids):
            raise PrunelensError(f"task '{task}': two options share a token")
        ctxs.append(ctx)
        opts.append(ids)
        golds.append(it.gold)
    return ctxs, opts, golds


def _mean(x: torch.Tensor) -> float:
    return float(x.mean())


def choice_shares(choice: torch.Tensor, n_options: int) -> list[float]:
    """Share of questions on which each option position is chosen: a model that always answers 'A'
    agrees with any other such model without reading the question, so agreement needs this beside it."""
    return (torch.bincount(choice, minlength=n_options).double() / max(len(choice), 1)).tolist()


def chance_agreement(shares_d: list[float], shares_p: list[float]) -> float:
    """Agreement two independent choosers with these marginals would reach: Σ_k q_dense(k)·q_pruned(k)."""
    return sum(a * b for a, b in zip(shares_d, shares_p, strict=True))


def option_subspace(lm: LoadedModel, task: str, data_dir: str | Path, modifications: dict[str, Any],
                    limit: int | None = 200, seed: int = 0, temperature: float = 1.0, batch_size: int = 8,
                    progress: bool = True) -> dict[str, Any]:
    """Full-vocabulary vs option-subspace agreement of dense and each modified model."""
    ctxs, opts, golds = option_items(lm, task, data_dir, limit, seed)
    idx = torch.tensor(opts)  # (n, options); equal option counts per task
    gold = torch.tensor(golds)
    z_d = next_token_logits(lm, ctxs, None, batch_size, progress, f"{task} dense")
    choice_d = z_d.gather(-1, idx).argmax(-1)
    acc_dense = _mean((choice_d == gold).double())
    shares_d = choice_shares(choice_d, idx.shape[1])
    rows = []
    for label, mod in modifications.items():
        z_p = next_token_logits(lm, ctxs, mod, batch_size, progress, f"{task} {label}")
        full = logit_metrics(z_d, z_p, (temperature,), 10, light=True, chunk_rows=64)
        sub = subspace_metrics(z_d, z_p, idx, temperature)
        t = f"{temperature:g}"
        choice_p = z_p.gather(-1, idx).argmax(-1)
        shares_p = choice_shares(choice_p, idx.shape[1])
        rows.append({
            "method": label,
            "full_cos_p": _mean(full[f"cos_p@{t}"]), "full_kl": _mean(full[f"kl@{t}"]),
            "full_top1_agree": _mean(full["top1_agree"]),
            "sub_cos": _mean(sub["sub_cos"]), "sub_kl": _mean(sub["sub_kl"]),
            "sub_agree": _mean(sub["sub_agree"]),
            "mass_dense": _mean(sub["mass_dense"]), "mass_pruned": _mean(sub["mass_pruned"]),
            "acc_dense": acc_dense, "acc_pruned": _mean((choice_p == gold).double()),
            "choices_pruned": shares_p, "chance_agree": chance_agreement(shares_d, shares_p),
        })
    return {"schema": SCHEMA, "model": lm.info, "task": task, "n": len(golds), "temperature": temperature,
            "limit": limit, "seed": seed, "option_tokens": sorted({int(i) for row in opts for i in row}),
            "choices_dense": shares_d,
            "methods": rows}


def subspace_figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    import numpy as np

    fig_dir.mkdir(parents=True, exist_ok=True)
    rows = result["methods"]
    x = np.arange(len(rows))
    fig, (a1, a2) = subplots(1, 2, figsize=(11, 4))
    a1.plot(x, [max(r["full_kl"], 1e-12) for r in rows], marker="o", label="full vocabulary")
    a1.plot(x, [max(r["sub_kl"], 1e-12) for r in rows], marker="o", label="option tokens, renormalised")
    a1.set_yscale("log")
    a1.set_ylabel("KL(pruned ‖ dense)")
    a2.plot(x, [r["full_top1_agree"] for r in rows], marker="o", label="top-1 token, full vocabulary")
    a2.plot(x, [r["sub_agree"] for r in rows], marker="o", label="chosen option")
    if all("chance_agree" in r for r in rows):
        a2.plot(x, [r["chance_agree"] for r in rows], ls="--", color="grey",
                label="chosen option, chance (same marginals)")
    a2.set_ylim(0, 1.02)
    a2.set_ylabel("agreement with dense")
    for a in (a1, a2):
        a.set_xticks(x, [r["method"] for r in rows], rotation=20, fontsize=8)
        a.legend(fontsize=8)
    fig.suptitle(f"{result['task']}: full distribution vs the option subspace (n={result['n']})",
                 fontsize=11)
    fig.tight_layout()
    path = fig_dir / "subspace.png"
    save_figure(fig, path)
    return [path]


# what subspace's view reads from a saved result (checked when ``prunelens report`` reads it back)
FIELDS = {"model": "dict", "task": "str", "n": "int", "methods[].method": "str", "choices_dense[]?": "num",
          **{f"methods[].{k}": "num" for k in ("full_kl", "sub_kl", "full_top1_agree", "sub_agree")},
          "methods[].chance_agree?": "num", "methods[].acc_dense": "num", "methods[].acc_pruned": "num"}


def subspace_html(result: dict[str, Any], figs: list[Path]) -> str:
    keys = ("method", "full_kl", "sub_kl", "full_cos_p", "sub_cos", "full_top1_agree", "sub_agree",
            "chance_agree", "mass_dense", "mass_pruned", "acc_dense", "acc_pruned")
    def cell(v: Any) -> str:
        return val(v, ".4g")

    shares = result.get("choices_dense")
    prior = ("" if shares is None else "<p>Dense model's choices by option position: "
             + ", ".join(val(s, ".0%") for s in shares) + ". chance_agree is the agreement two models with "
             "these choice shares would reach without reading the question.</p>")
    return html_page("prunelens option subspace",
        f"<h1>Option subspace — {esc(result['task'])}, {esc(result['model'].get('name', ''))}</h1>",
        '<p class="muted">Next-token distribution after each question, dense vs pruned: over the whole '
        "vocabulary and restricted to the answer-option tokens (renormalised). mass = share of p on the "
        "options.</p>", prior, html_table(result["methods"], keys, cell), *(img(f) for f in figs))


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(ss: argparse.ArgumentParser) -> None:
    options.add_model_args(ss)
    ss.add_argument("--tasks", "--task", dest="task", default="mmlu", metavar="TASK",
                    help="one task: mmlu (default), mmlu_5shot or boolq")
    ss.add_argument("--data-dir", help="local data files (docs/tasks.md); default: the task's Hub dataset")
    options.add_method_args(ss)
    ss.add_argument("--limit", type=int, default=200, help="seeded sample of questions (default 200)")
    ss.add_argument("--temperature", type=float, default=1.0)
    ss.add_argument("--batch-size", type=int, default=8)
    options.add_output_args(ss, "runs/<time>-<model>-subspace")


def _run(args: argparse.Namespace) -> int:
    recipes = options.method_recipes(args)
    options.positive("--limit", args.limit)
    options.positive("--batch-size", args.batch_size)
    options.temperatures(str(args.temperature))
    check_task(args.task, args.data_dir)
    cal = options.calibration(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out_dir(out, args.overwrite)
    lm = options.load(args)
    mods = options.build_methods(lm, recipes, cal, progress=not args.quiet)
    res = option_subspace(lm, args.task, args.data_dir, mods, args.limit, args.seed, args.temperature,
                          args.batch_size, progress=not args.quiet)
    return ANALYSIS.finish(res, out or default_run_dir(args.model, "subspace"), args.overwrite)


def summary_lines(res: dict[str, Any]) -> list[str]:
    """Full-vocabulary against option-subspace agreement, one row per method."""
    lines = [f"{'method':14s} {'KL full':>9s} {'KL options':>10s} {'top-1 agree':>11s} {'option agree':>12s} "
             f"{'acc':>6s} (dense {text(next(iter(res['methods']), {}).get('acc_dense'), '.3f')})"]
    lines += [f"{r['method']:14s} {r['full_kl']:9.4g} {r['sub_kl']:10.4g} {r['full_top1_agree']:11.3f} "
              f"{r['sub_agree']:12.3f} {r['acc_pruned']:6.3f}" for r in res["methods"]]
    return lines


ANALYSIS = register(Analysis(
    "subspace", "full-vocabulary vs answer-option subspace agreement on a multiple-choice set, "
    "across prunings (paper Fig. 8)", _arguments, _run, schema=SCHEMA,
    figures=subspace_figures, html=subspace_html, summary=summary_lines, fields=FIELDS))
