"""Format-paired evaluation: the same questions asked as multiple choice and as free generation.

Knowledge loss and format are told apart by reading one set of questions twice, dense and pruned,
each format run the way it is conventionally run:

- style ``cloze`` (ARC, MMLU; the default): multiple choice is lm-eval's log-likelihood of each
  option text after ``Question: ..\nAnswer:`` (one teacher-forced pass, no decoding); generation
  is the question alone as a chat turn, greedy, the answer matched to the option it names (a base
  model without a chat template completes ``Question: ..\nAnswer:`` after three solved examples).
- style ``letters``: the question with lettered options as a chat turn for both; multiple choice
  is the argmax of the next-token logits over the letters (one step, the option subspace), and
  generation is the free reply, matched to an option's text or a bare letter. Needs a model that
  reads lettered options (the 135M default answers "A" to most questions).
- GSM8K: multiple choice offers the gold number among three distractors derived from it (letters);
  generation is few-shot chain of thought scored on the number.

For each pruning, the answers it loses in free generation are traced (``recovery``: the right
answer's rank where it first turned away, k samples at T = 0.7, one solved example in context) and
the multiple-choice probabilities' calibration error is compared with the dense model's.

``select="dense-correct"`` keeps only the questions the dense model gets right in *both* formats,
so that a model near chance still yields a measurable retention signal. The paired gap (MCQ drop −
generative drop, bootstrap CI over questions) comes from ``tasks.paired``; this is the plumbing.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.analyses.recovery import (
    KEYS,
    SAMPLES,
    GenItem,
    Target,
    answer,
    ece_of,
    reading,
    recovery,
    table_rows,
)
from prunelens.analyses.subspace import chance_agreement, choice_shares
from prunelens.errors import PrunelensError
from prunelens.model.generation import Generation, next_token_logits
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import render
from prunelens.prune.candidate import Candidate
from prunelens.registry import did_you_mean
from prunelens.render import esc, html_page, html_table, img, save_figure, subplots, val
from prunelens.runs import check_out_dir, default_run_dir
from prunelens.tasks.config import config_task
from prunelens.tasks.config_file import is_task_config
from prunelens.tasks.data import sample_indices
from prunelens.tasks.gsm8k import evaluate_gsm8k, normalise
from prunelens.tasks.loglik import Request, score_requests
from prunelens.tasks.paired import LETTERS, gsm8k_options, match_choice, paired_gap
from prunelens.tasks.sources import Rows, load_rows

SCHEMA = "prunelens.paired/1"
PAIRED_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k")
STYLES = ("cloze", "letters")
SELECTS = ("all", "dense-correct")
GEN_TOKENS = 40
"""Default budget of a free answer: answers are read from their start, and a longer budget only
lets a drifting (pruned) model name more options, which counts as no answer (``--max-new-tokens``)."""
GSM8K_TOKENS = 256  # GSM8K's chain of thought needs room before the number


@dataclass(frozen=True)
class PairedQuestion:
    """One question in both formats; ``target`` is GSM8K's gold number (None elsewhere)."""

    index: int
    question: str
    choices: tuple[str, ...]
    gold: int
    target: float | None = None


def check_paired_task(task: str, data_dir: str | Path | None) -> Rows:
    """The task's rows (a local file or the Hub), or a one-line error naming what is wrong."""
    if is_task_config(task):
        cfg = config_task(task).config
        if cfg.kind != "multiple_choice":
            raise PrunelensError(f"paired task '{task}' is a {cfg.kind} config: its items have a target but no "
                                 "answer options, so they cannot also be asked as multiple choice; paired takes a "
                                 "multiple_choice config (choices + answer), whose questions it also asks free")
        return cfg.question_rows(data_dir)
    if task not in PAIRED_TASKS:
        raise PrunelensError(f"unknown paired task '{task}'{did_you_mean(task, PAIRED_TASKS)}; paired tasks: "
                             f"{', '.join(PAIRED_TASKS)} "
                             "or a multiple-choice task config .yaml")
    return load_rows(task, data_dir)


def paired_questions(task: str, data_dir: str | Path | None, limit: int | None, seed: int,
                     shots: int = 0) -> list[PairedQuestion]:
    """A seeded sample of the task's questions; GSM8K's first ``shots`` rows are exemplars, never
    asked (the same pool and sample ``evaluate_gsm8k`` uses, so the two sides stay paired)."""
    data = check_paired_task(task, data_dir)
    rows, path = data.rows, data.origin
    if task == "gsm8k":
        if shots < 0 or shots >= len(rows):
            raise PrunelensError(f"--shots must be in 0..{len(rows) - 1}, got {shots}")
        pool = list(range(shots, len(rows)))
        out = []
        for i in (pool[j] for j in sample_indices(len(pool), limit, seed)):
            target = normalise(rows[i]["target"])
            if target is None:
                raise PrunelensError(f"{path}: row {i + 1}: target {rows[i]['target']!r} is not a number")
            choices, gold = gsm8k_options(target, i)
            out.append(PairedQuestion(i, rows[i]["question"].strip(), tuple(choices), gold, target))
        return out
    out = []
    for i in sample_indices(len(rows), limit, seed):
        r = rows[i]
        if not 2 <= len(r["choices"]) <= len(LETTERS):
            raise PrunelensError(f"{path}: row {i + 1}: needs 2..{len(LETTERS)} choices")
        if not 0 <= r["answer"] < len(r["choices"]):
            raise PrunelensError(f"{path}: row {i + 1}: answer index {r['answer']} outside the choices")
        out.append(PairedQuestion(i, r["question"].strip(), tuple(map(str, r["choices"])), r["answer"]))
    return out


def _listing(q: PairedQuestion) -> str:
    return q.question + "".join(f"\n{LETTERS[k]}. {c}" for k, c in enumerate(q.choices))


def mcq_prompt(q: PairedQuestion) -> str:
    return f"{_listing(q)}\nAnswer with the letter of the correct option."


def gen_prompt(q: PairedQuestion) -> str:
    return f"{_listing(q)}\nAnswer with the text of the correct option."


def letter_ids(tokenizer: Any, n: int) -> list[int]:
    """Token id of each option letter as the reply's first token (one token each, all distinct)."""
    ids = []
    for letter in LETTERS[:n]:
        toks = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise PrunelensError(f"option letter {letter!r} is {len(toks)} tokens for this tokenizer")
        ids.append(toks[0])
    if len(set(ids)) != n:
        raise PrunelensError("two option letters share a token")
    return ids


def free_answer(text: str, choices: Sequence[str]) -> int | None:
    """The option a generated answer gives: the whole text names exactly one, else its first line does."""
    k = match_choice(text, choices)
    if k is None:
        first = next((line for line in text.splitlines() if line.strip()), "")
        k = match_choice(first, choices) if first != text else None
    return k


@dataclass(frozen=True)
class PairedSetup:
    """How one paired run reads its questions (shared by the dense and every modified side)."""

    task: str
    style: str
    data_dir: str | Path
    limit: int | None
    seed: int
    shots: int
    batch_size: int
    chat_template: bool
    progress: bool
    gen_tokens: int = GEN_TOKENS


def _gsm8k_generative(lm: LoadedModel, s: PairedSetup, qs: Sequence[PairedQuestion],
                      modification: Any) -> list[float]:
    res = evaluate_gsm8k(lm, s.data_dir, s.limit, s.seed, s.shots, modification, s.batch_size, s.gen_tokens,
                         s.chat_template, s.progress)
    by_index = {x["index"]: x for x in res.samples}
    if sorted(by_index) != sorted(q.index for q in qs):
        raise PrunelensError("internal: GSM8K generative and multiple-choice samples differ")
    return [float(by_index[q.index]["flexible"] is not None and q.target is not None
                  and math.isclose(by_index[q.index]["flexible"], q.target)) for q in qs]


def mcq_probs(lm: LoadedModel, s: PairedSetup, qs: Sequence[PairedQuestion], modification: Any,
              label: str) -> list[list[float]]:
    """The multiple-choice read of each question as probabilities over its options: softmax of the
    letters' next-token logits, or of the options' summed log-likelihoods (cloze)."""
    if s.style == "letters":
        ctx = [render(lm.tokenizer, [{"role": "user", "content": mcq_prompt(q)}], s.chat_template)
               for q in qs]
        z = next_token_logits(lm, ctx, modification, s.batch_size, s.progress, f"{s.task} mcq {label}")
        scores = [zq[torch.tensor(letter_ids(lm.tokenizer, len(q.choices)))].double()
                  for q, zq in zip(qs, z, strict=True)]
    else:
        reqs = [Request(f"Question: {q.question}\nAnswer:", tuple(f" {c}" for c in q.choices)) for q in qs]
        scored = score_requests(lm, reqs, modification, s.batch_size, s.progress, f"{s.task} mcq {label}")
        scores = [torch.tensor(sc.logprobs, dtype=torch.float64) for sc in scored]
    return [torch.softmax(x, 0).tolist() for x in scores]


BASE_SHOTS = (("Which of these is a source of light?", "the Sun"),
              ("What do plants need to make their own food?", "sunlight"),
              ("Which tool is used to measure the mass of an object?", "a balance"))
"""Solved examples a base model (no chat template) sees before a free cloze question: asked bare it
only continues the question (Gemma-3-270M: 3 % of ARC-Easy answered); with these, 13 %. Written
here, not drawn from any test set."""


def _turns(s: PairedSetup, q: PairedQuestion, chat: bool) -> tuple[dict[str, str], ...]:
    """The free question: the bare question as a chat turn; for a base model the cloze read's own
    ``Question: ..\nAnswer:`` after ``BASE_SHOTS``, to be completed on one line."""
    if s.style == "letters" or chat:
        return ({"role": "user", "content": gen_prompt(q) if s.style == "letters" else q.question},)
    shots = [t for sq, sa in BASE_SHOTS for t in ({"role": "user", "content": f"Question: {sq}\nAnswer:"},
                                                  {"role": "assistant", "content": sa})]
    return (*shots, {"role": "user", "content": f"Question: {q.question}\nAnswer:"})


def paired_target(s: PairedSetup, qs: Sequence[PairedQuestion], tokenizer: Any) -> Target:
    """The free-generation side of these questions as a ``Target`` (what recovery re-asks and advise
    calibrates on), with their multiple-choice probabilities for the ECE. Not for GSM8K (few-shot)."""
    quiet = replace(s, progress=False)
    chat = s.chat_template and bool(getattr(tokenizer, "chat_template", None))
    items = tuple(GenItem(q.index, _turns(s, q, chat), functools.partial(_right, q)) for q in qs)
    return Target(f"{s.task} (free generation, {s.style})", "built-in", items, s.gen_tokens,
                  () if s.style == "letters" else ("\n\n",) if chat else ("\n",), s.chat_template,
                  {"task": s.task, "style": s.style, "limit": s.limit, "seed": s.seed},
                  lambda lm, mod: mcq_probs(lm, quiet, qs, mod, "ece"), tuple(q.gold for q in qs))


def _right(q: PairedQuestion, text: str) -> bool:
    return free_answer(text, q.choices) == q.gold


def both_formats(lm: LoadedModel, s: PairedSetup, qs: Sequence[PairedQuestion], modification: Any,
          label: str) -> dict[str, Any]:
    """Both formats for one model (dense or modified): per-question outcomes and readouts."""
    probs = mcq_probs(lm, s, qs, modification, label)
    choice = [max(range(len(p)), key=p.__getitem__) for p in probs]
    mcq_hits = [float(c == q.gold) for c, q in zip(choice, qs, strict=True)]
    if s.task == "gsm8k":
        gen_hits = _gsm8k_generative(lm, s, qs, modification)
        answers: list[int | None] = [q.gold if h else None for q, h in zip(qs, gen_hits, strict=True)]
        gens = [Generation("", ())] * len(qs)
    else:
        target = paired_target(s, qs, lm.tokenizer)
        gens = answer(lm, target, target.items, modification, batch_size=s.batch_size, progress=s.progress,
                      desc=f"{s.task} generate {label}")
        answers = [free_answer(g.text, q.choices) for g, q in zip(gens, qs, strict=True)]
        gen_hits = [float(a == q.gold) for a, q in zip(answers, qs, strict=True)]
    return {"mcq_choice": choice, "mcq_hits": mcq_hits, "gen_answer": answers, "gen_hits": gen_hits,
            "gen_text": [g.text for g in gens], "mcq_shares": _choice_shares(choice, qs), "mcq_probs": probs,
            "gens": gens}


def _choice_shares(choice: Sequence[int], qs: Sequence[PairedQuestion]) -> list[float] | None:
    """Share of questions answered with each option position (None when option counts differ)."""
    n_opt = {len(q.choices) for q in qs}
    return choice_shares(torch.tensor(list(choice)), n_opt.pop()) if len(n_opt) == 1 else None


def _subset(side: dict[str, Any], keep: Sequence[int], qs: Sequence[PairedQuestion]) -> dict[str, Any]:
    """The kept questions' entries of one side (``qs``: the kept questions, for the choice shares)."""
    out = {k: [v[i] for i in keep] for k, v in side.items() if k != "mcq_shares"}
    return {**out, "mcq_shares": _choice_shares(out["mcq_choice"], qs)}


def paired_eval(lm: LoadedModel, task: str, data_dir: str | Path, modifications: dict[str, Any],
                limit: int | None = 100, seed: int = 0, style: str = "cloze", select: str = "all",
                shots: int = 5, batch_size: int = 8, chat_template: bool = True, n_boot: int = 2000,
                progress: bool = True, gen_tokens: int | None = None, samples: int = SAMPLES) -> dict[str, Any]:
    """Dense and each modification (or ``Candidate``, a model made elsewhere) on the same questions in
    both formats, with the paired gap.
    With ``select="dense-correct"``, ``limit`` sizes the pool the subset is drawn from; ``gen_tokens``
    is the free answers' budget (None: 40, or 256 for GSM8K's chain of thought); ``samples``: k of the
    recovery reading of lost answers (``recovery``; 0 leaves it out; not for GSM8K)."""
    if style not in STYLES:
        raise PrunelensError(f"unknown paired style '{style}'; styles: {', '.join(STYLES)}")
    if select not in SELECTS:
        raise PrunelensError(f"unknown selection '{select}'; choose {' or '.join(SELECTS)}")
    if task == "gsm8k":
        style = "letters"  # GSM8K's options are numbers: multiple choice is always over letters
    pool = paired_questions(task, data_dir, limit, seed, shots if task == "gsm8k" else 0)
    if gen_tokens is None:
        gen_tokens = GSM8K_TOKENS if task == "gsm8k" else GEN_TOKENS
    setup = PairedSetup(task, style, data_dir, limit, seed, shots, batch_size, chat_template, progress, gen_tokens)
    dense_pool = both_formats(lm, setup, pool, None, "dense")
    keep = list(range(len(pool)))
    if select == "dense-correct":
        keep = [i for i in keep if dense_pool["mcq_hits"][i] and dense_pool["gen_hits"][i]]
        if not keep:
            raise PrunelensError(f"the dense model answers none of the {len(pool)} questions right in both "
                                 "formats; use a larger --limit or --select all")
    qs = [pool[i] for i in keep]
    dense = {**_subset(dense_pool, keep, qs), "tokenizer": lm.tokenizer}
    rows = []
    for label, m in modifications.items():
        model, mod = (m.lm, None) if isinstance(m, Candidate) else (lm, m)  # a model made elsewhere, as it is
        # GSM8K's generative side draws its own sample (the pool): run the pool, keep the subset
        side = _subset(both_formats(model, setup, pool, mod, label), keep, qs) if task == "gsm8k" else \
            both_formats(model, setup, qs, mod, label)
        gap = paired_gap(dense["mcq_hits"], side["mcq_hits"], dense["gen_hits"], side["gen_hits"],
                         n_boot=n_boot, seed=seed)
        agree = sum(a == b for a, b in zip(dense["mcq_choice"], side["mcq_choice"], strict=True)) / len(qs)
        rows.append({"method": label, **gap.__dict__,
                     "mcq_agree": agree,
                     "mcq_chance_agree": (None if dense["mcq_shares"] is None or side["mcq_shares"] is None
                                          else chance_agreement(dense["mcq_shares"], side["mcq_shares"])),
                     "gen_answered": _answered(side), "mcq_shares": side["mcq_shares"],
                     "per_question": _per_question(side)})
        if task != "gsm8k" and samples:
            rows[-1]["where_answers_went"] = _where(model, mod, setup, qs, dense, side, samples)
    return {"schema": SCHEMA, "model": lm.info, "task": task, "style": style, "select": select,
            "pool": len(pool), "n": len(qs), "limit": limit, "seed": seed,
            "shots": shots if task == "gsm8k" else None, "chat_template": chat_template,
            "chance": sum(1 / len(q.choices) for q in qs) / len(qs), "gen_tokens": gen_tokens,
            "dense_pool": {"mcq_acc": _mean(dense_pool["mcq_hits"]), "gen_acc": _mean(dense_pool["gen_hits"]),
                           "gen_answered": _answered(dense_pool), "mcq_shares": dense_pool["mcq_shares"]},
            "dense": {"mcq_acc": _mean(dense["mcq_hits"]), "gen_acc": _mean(dense["gen_hits"]),
                      "gen_answered": _answered(dense), "per_question": _per_question(dense)},
            "questions": [{"index": q.index, "gold": q.gold, "choices": list(q.choices)} for q in qs],
            "methods": rows}


def _where(model: LoadedModel, mod: Any, s: PairedSetup, qs: Sequence[PairedQuestion], dense: dict[str, Any],
           side: dict[str, Any], samples: int) -> dict[str, Any]:
    """Where the answers this pruning lost went (``recovery``), with the ECE of both sides' MCQ reads."""
    target = paired_target(s, qs, model.tokenizer)
    pairs = list(zip(target.items, dense["gens"], dense["gen_hits"], side["gen_hits"], strict=True))
    solved = [(it, g.text) for it, g, d, m in pairs if d and m]
    ids = {it.key: (g.ids if model.tokenizer is dense["tokenizer"] else  # a model made elsewhere: its tokens
                    model.tokenizer(g.text, add_special_tokens=False)["input_ids"]) for it, g, _, _ in pairs}
    rec = recovery(model, target, mod, [it for it, _, d, m in pairs if d and not m], ids,
                   solved[0] if solved else None, samples, seed=s.seed, batch_size=s.batch_size)
    return {**rec, "ece": {"dense": ece_of(dense["mcq_probs"], target.golds or ()),
                           "pruned": ece_of(side["mcq_probs"], target.golds or ())}}


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x)


def _answered(side: dict[str, Any]) -> float:
    """Share of free answers that name exactly one option (right or wrong): a low share is a
    format failure, not a wrong answer."""
    return _mean([float(a is not None) for a in side["gen_answer"]])


def _per_question(side: dict[str, Any]) -> dict[str, list[Any]]:
    return {"mcq_choice": side["mcq_choice"], "gen_answer": side["gen_answer"], "gen_text": side["gen_text"]}


def paired_figures(result: dict[str, Any], fig_dir: Path) -> list[Path]:
    """Accuracy in each format, dense and per method, on the same questions."""
    import numpy as np

    fig_dir.mkdir(parents=True, exist_ok=True)
    labels = ["dense", *(r["method"] for r in result["methods"])]
    mcq = [result["dense"]["mcq_acc"], *(r["mcq_pruned"] for r in result["methods"])]
    gen = [result["dense"]["gen_acc"], *(r["gen_pruned"] for r in result["methods"])]
    x = np.arange(len(labels))
    fig, ax = subplots(figsize=(max(5.0, 1.3 * len(labels)), 3.8))
    ax.bar(x - 0.2, mcq, 0.4, label="multiple choice (one pass)")
    ax.bar(x + 0.2, gen, 0.4, label="free generation")
    if result["select"] == "all":
        ax.axhline(result["chance"], ls="--", color="grey", lw=1, label="chance")
    ax.set_xticks(x, labels, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy" if result["select"] == "all" else "retained (dense = 1)")
    ax.legend(fontsize=8)
    ax.set_title(f"{result['task']} ({result['style']}): n={result['n']} of {result['pool']}", fontsize=10)
    fig.tight_layout()
    path = fig_dir / "paired.png"
    save_figure(fig, path)
    return [path]


# what paired's view reads from a saved result (checked when ``prunelens report`` reads it back)
FIELDS = {"model": "dict", "task": "str", "style": "str", "select": "str", "n": "int", "pool": "int",
          "chance": "num", "dense.mcq_acc": "num", "dense.gen_acc": "num", "dense_pool?.mcq_acc": "num",
          "dense_pool?.gen_acc": "num", "methods[].method": "str", "methods[].mcq_pruned": "num",
          "methods[].gen_pruned": "num",
          **{f"methods[].{k}": "num" for k in ("mcq_drop", "gen_drop", "gap", "ci_low", "ci_high")}}


def paired_html(result: dict[str, Any], figs: list[Path]) -> str:
    keys = ("method", "mcq_pruned", "gen_pruned", "mcq_drop", "gen_drop", "gap", "ci_low", "ci_high",
            "mcq_agree", "mcq_chance_agree", "gen_answered")

    def cell(v: Any) -> str:
        return val(v, ".3f")

    d, pool = result["dense"], result.get("dense_pool") or {}
    sel = ("" if result["select"] == "all" else
           f"<p>Only the {val(result['n'])} questions (of a seeded pool of {val(result['pool'])}) that the dense "
           f"model answers right in both formats are kept; on the pool it scored {val(pool.get('mcq_acc'), '.3f')} "
           f"in multiple choice and {val(pool.get('gen_acc'), '.3f')} in generation. Accuracies below are the "
           "share retained.</p>")
    return html_page("prunelens paired formats",
        f"<h1>Format-paired evaluation — {esc(result['task'])}, "
        f"{esc(result['model'].get('name', ''))}</h1>",
        f'<p class="muted">Style {esc(result["style"])}; dense: multiple choice {val(d["mcq_acc"], ".3f")}, '
        f"generation {val(d['gen_acc'], '.3f')} (chance {val(result['chance'], '.3f')}). gap = MCQ drop − generative "
        "drop (negative: generation lost more), 95% bootstrap CI over questions. gen_answered = share of free "
        "answers naming exactly one option.</p>", sel, html_table(result["methods"], keys, cell),
        *(img(f) for f in figs), *where_html(result["methods"]))


def where_html(methods: Sequence[dict[str, Any]]) -> list[str]:
    """The recovery table and its one-sentence reading (nothing when no row has one)."""
    recs = {r["method"]: r["where_answers_went"] for r in methods if "where_answers_went" in r}
    if not recs:
        return []
    return ["<h2>Where the lost answers went</h2>", f"<p>{esc(reading(recs))}</p>",
            html_table(table_rows(recs), KEYS, lambda v: val(v, ".3g")),
            '<p class="muted">Per pruning, the questions the dense model answers right in free generation and '
            "the pruned one does not: the right continuation's rank where the pruned model, teacher-forced on "
            "it, first prefers another token; the share that any of k samples at T = 0.7 or one solved example "
            "in context answers right; the expected calibration error of the multiple-choice probabilities over "
            "all questions.</p>"]


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(pa: argparse.ArgumentParser) -> None:
    options.add_model_args(pa)
    pa.add_argument("--tasks", "--task", dest="task", required=True, metavar="TASK",
                    help="one task: arc_easy, arc_challenge, mmlu, gsm8k, or a multiple-choice task config .yaml")
    pa.add_argument("--data-dir", help="local data files (docs/tasks.md); default: the task's Hub dataset")
    options.add_method_args(pa)
    pa.add_argument("--style", default="cloze", choices=["cloze", "letters"],
                    help="cloze (default): option log-likelihood vs free answer to the bare question; "
                         "letters: lettered options for both, next-token letter vs free reply")
    pa.add_argument("--select", default="all", choices=["all", "dense-correct"],
                    help="dense-correct: keep only the questions the dense model gets right in both formats "
                         "(--limit then sizes the pool); for models near chance")
    pa.add_argument("--limit", type=int, default=100, help="seeded sample of questions (default 100)")
    pa.add_argument("--shots", type=int, default=5, help="GSM8K exemplars (default 5)")
    pa.add_argument("--max-new-tokens", type=int, metavar="N",
                    help=f"budget of each free answer in tokens (default {GEN_TOKENS}; GSM8K's chain of thought "
                         f"{GSM8K_TOKENS})")
    pa.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default 8)")
    pa.add_argument("--recovery-samples", type=int, default=SAMPLES, metavar="K",
                    help=f"for each lost answer, K samples at T=0.7 and one in-context retry (where the "
                         f"answers went; default {SAMPLES}, 0 to skip)")
    pa.add_argument("--no-chat-template", action="store_true",
                    help="send the bare prompts instead of the tokenizer's chat template")
    options.add_candidate_args(pa)
    options.add_output_args(pa, "runs/<time>-<model>-paired-<task>")


def _run(args: argparse.Namespace) -> int:
    spec = options.candidate_spec(args)
    recipes = options.method_recipes(args)
    options.positive("--limit", args.limit)
    options.positive("--batch-size", args.batch_size)
    if args.max_new_tokens is not None:
        options.positive("--max-new-tokens", args.max_new_tokens)
    if args.shots < 0:
        raise PrunelensError(f"--shots must be at least 0, got {args.shots}")
    if args.recovery_samples < 0:
        raise PrunelensError(f"--recovery-samples must be 0 (skip) or more, got {args.recovery_samples}")
    check_paired_task(args.task, args.data_dir)
    cal = options.calibration(args)
    out = Path(args.out) if args.out else default_run_dir(args.model, f"paired-{args.task}")
    check_out_dir(out, args.overwrite)
    lm = options.load(args)
    mods = options.build_methods(lm, recipes, cal, progress=not args.quiet)
    if spec is not None:
        cand = options.load_candidate_for(args, lm, cal, align=False)
        mods[cand.label] = cand
    res = paired_eval(lm, args.task, args.data_dir, mods, args.limit, args.seed, args.style, args.select,
                      args.shots, args.batch_size, not args.no_chat_template, progress=not args.quiet,
                      gen_tokens=args.max_new_tokens, samples=args.recovery_samples)
    return ANALYSIS.finish(res, out, args.overwrite)


def summary_lines(res: dict[str, Any]) -> list[str]:
    """Both accuracies of the dense model, then each method's drops and paired gap."""
    d = res["dense"]
    lines = [f"{res['task']} ({res['style']}, {res['select']}): {res['n']} of {res['pool']} questions; dense MCQ "
             f"{d['mcq_acc']:.3f}, generative {d['gen_acc']:.3f} (chance {res['chance']:.3f})",
             f"{'method':16s} {'MCQ':>6s} {'gen':>6s} {'MCQ drop':>8s} {'gen drop':>8s} {'gap [95% CI]':>22s}"]
    lines += [f"{r['method']:16s} {r['mcq_pruned']:6.3f} {r['gen_pruned']:6.3f} {r['mcq_drop']:8.3f} "
              f"{r['gen_drop']:8.3f} {r['gap']:+7.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
              for r in res["methods"]]
    recs = {r["method"]: r["where_answers_went"] for r in res["methods"] if "where_answers_went" in r}
    return [*lines, f"where the lost answers went: {reading(recs)}"] if recs else lines


ANALYSIS = register(Analysis(
    "paired", "the same questions as multiple choice and as free generation, dense vs each "
    "pruning: both accuracies and the paired gap", _arguments, _run, schema=SCHEMA,
    figures=paired_figures, html=paired_html, summary=summary_lines, fields=FIELDS))
