"""Multiple-choice tasks scored by log-likelihood, in lm-evaluation-harness's formats.

Each task turns one row (a local JSONL row, or a Hub row mapped to the same schema by
``tasks.sources``; schemas in docs/tasks.md) into options
(context, continuation); the predicted option is the argmax of the summed log-probability (acc) or
of log-probability per character of the continuation (acc_norm). No chat template: these read one
step of the model, as the harness does by default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.tasks.data import sample_indices, stderr_of_mean
from prunelens.tasks.loglik import Request, score_requests
from prunelens.tasks.sources import load_rows

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    """One question: option k is (contexts[k], continuations[k]); ``gold`` is the right k."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


# --- reading rows ------------------------------------------------------------------------------


def _check_gold(origin: str, i: int, gold: int, n: int) -> None:
    if not 0 <= gold < n:
        raise PrunelensError(f"{origin}: row {i + 1}: answer index {gold} outside 0..{n - 1}")


def _same_context(ctx: str, choices: Sequence[str], gold: int) -> Item:
    return Item(tuple(ctx for _ in choices), tuple(f" {c}" for c in choices), gold)


def _checked(origin: str, items: list[Item]) -> list[Item]:
    for i, it in enumerate(items):
        _check_gold(origin, i, it.gold, len(it.continuations))
    return items


# --- task formats ------------------------------------------------------------------------------


def _arc(rows: list[dict[str, Any]], path: str) -> list[Item]:
    out = []
    for i, r in enumerate(rows):
        _check_gold(path, i, r["answer"], len(r["choices"]))
        out.append(_same_context(f"Question: {r['question']}\nAnswer:", r["choices"], r["answer"]))
    return out


def _piqa(rows: list[dict[str, Any]], path: str) -> list[Item]:
    return _checked(
        path, [_same_context(f"Question: {r['question']}\nAnswer:", r["choices"], r["answer"]) for r in rows]
    )


def _boolq(rows: list[dict[str, Any]], path: str) -> list[Item]:
    return _checked(
        path,
        [
            _same_context(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], r["answer"])
            for r in rows
        ],
    )


def _winogrande(rows: list[dict[str, Any]], path: str) -> list[Item]:
    """lm-eval's partial scoring: log P(rest of sentence | sentence up to the blank, option filled)."""
    return _checked(
        path,
        [
            Item(
                tuple(r["choices"]), tuple(f" {r['continuation'].strip()}" for _ in r["choices"]), r["answer"]
            )
            for r in rows
        ],
    )


def _hs_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(rows: list[dict[str, Any]], path: str) -> list[Item]:
    out = []
    for i, r in enumerate(rows):
        try:
            label = int(r["label"])
        except ValueError:
            raise PrunelensError(f"{path}: row {i + 1}: label {r['label']!r} is not an index") from None
        ctx = _hs_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        out.append(_same_context(ctx, [_hs_clean(e) for e in r["endings"]], label))
    return _checked(path, out)


def _mmlu_question(r: dict[str, Any], letters: bool) -> str:
    q = r["question"].strip()
    if letters:
        q += "".join(f"\n{LETTERS[k]}. {c}" for k, c in enumerate(r["choices"]))
    return q + "\nAnswer:"


def _mmlu(rows: list[dict[str, Any]], path: str, shots: int, letters: bool,
          data_dir: str | Path | None) -> list[Item]:
    dev: dict[str, list[dict[str, Any]]] = {}
    if shots:
        d = load_rows("mmlu_dev", data_dir)
        dev_path, dev_rows = d.origin, d.rows
        for i, r in enumerate(dev_rows):
            _check_gold(dev_path, i, r["answer"], min(len(r["choices"]), len(LETTERS)))
            dev.setdefault(r["subject"], []).append(r)
    out = []
    for r in rows:
        subject = r["subject"].replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        for ex in dev.get(r["subject"], [])[:shots]:
            ans = LETTERS[ex["answer"]] if letters else ex["choices"][ex["answer"]]
            head += f"{_mmlu_question(ex, letters)} {ans}\n\n"
        ctx = head + _mmlu_question(r, letters)
        options = [LETTERS[k] for k in range(len(r["choices"]))] if letters else r["choices"]
        out.append(_same_context(ctx, options, r["answer"]))
    return _checked(path, out)


@dataclass(frozen=True)
class McqTask:
    name: str
    source: str  # key of tasks.sources.SOURCES
    items: Callable[[list[dict[str, Any]], str, str | Path | None], list[Item]]
    description: str = ""

    def build(self, data_dir: str | Path | None) -> list[Item]:
        """The task's items, from ``data_dir`` or the Hub (``tasks.sources``)."""
        r = load_rows(self.source, data_dir)
        return self.items(r.rows, r.origin, data_dir)


def _rows_only(fn: Callable[[list[dict[str, Any]], str], list[Item]]):
    return lambda rows, origin, data_dir: fn(rows, origin)


def _mmlu_variant(shots: int, letters: bool):
    return lambda rows, origin, data_dir: _mmlu(rows, origin, shots, letters, data_dir)


MCQ_TASKS: dict[str, McqTask] = {
    t.name: t
    for t in (
        McqTask("arc_easy", "arc_easy", _rows_only(_arc), "ARC-Easy, 'Question: ..\\nAnswer:' + option"),
        McqTask("arc_challenge", "arc_challenge", _rows_only(_arc), "ARC-Challenge, same format"),
        McqTask("piqa", "piqa", _rows_only(_piqa), "PIQA, goal as question, two solutions"),
        McqTask("boolq", "boolq", _rows_only(_boolq), "BoolQ, passage + question, no/yes"),
        McqTask("winogrande", "winogrande", _rows_only(_winogrande), "WinoGrande, partial scoring"),
        McqTask("hellaswag", "hellaswag", _rows_only(_hellaswag),
                "HellaSwag, lm-eval preprocessing (HF schema: ctx_a, ctx_b, activity_label, endings, label)"),
        McqTask("mmlu", "mmlu", _mmlu_variant(0, True), "MMLU 0-shot, option letters scored"),
        McqTask("mmlu_5shot", "mmlu", _mmlu_variant(5, True),
                "MMLU 5-shot (dev examples of the subject), option letters scored"),
        McqTask("mmlu_full", "mmlu", _mmlu_variant(0, False), "MMLU 0-shot, full answer text scored"),
        McqTask("mmlu_full_5shot", "mmlu", _mmlu_variant(5, False), "MMLU 5-shot, full answer text scored"),
    )
}


def mcq_sources(task: McqTask) -> tuple[str, ...]:
    """The data sources a task reads (MMLU's few-shot variants also read the dev split)."""
    return (task.source, "mmlu_dev") if task.name.endswith("5shot") else (task.source,)


# --- scoring -----------------------------------------------------------------------------------


@dataclass
class McqResult:
    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    predictions: list[int] = field(default_factory=list, repr=False)
    predictions_norm: list[int] = field(default_factory=list, repr=False)
    golds: list[int] = field(default_factory=list, repr=False)
    indices: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "task",
                "n",
                "acc",
                "acc_stderr",
                "acc_norm",
                "acc_norm_stderr",
                "indices",
                "predictions",
                "predictions_norm",
                "golds",
            )
        }


def score_items(
    lm: LoadedModel,
    items: Sequence[Item],
    modification: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "mcq",
) -> tuple[list[int], list[int]]:
    """Predicted option per item by acc and by acc_norm."""
    # one request per question; options with their own contexts share the common prefix
    requests = [Request(it.contexts[0], tuple(it.continuations),
                        () if len(set(it.contexts)) == 1 else tuple(it.contexts)) for it in items]
    scored = score_requests(lm, requests, modification, batch_size, progress, desc)
    pred, pred_norm = [], []
    for it, sc in zip(items, scored, strict=True):
        lps = list(sc.logprobs)
        # per character of the option text, without the delimiter space (as lm-eval's acc_norm)
        norm = [
            lp / max(len(c[1:] if c.startswith(" ") else c), 1)
            for lp, c in zip(lps, it.continuations, strict=True)
        ]
        pred.append(max(range(len(lps)), key=lps.__getitem__))
        pred_norm.append(max(range(len(norm)), key=norm.__getitem__))
    return pred, pred_norm


def answer_flips(golds: Sequence[int], dense: Sequence[int], modified: Sequence[int]) -> dict[str, float]:
    """Answer flips (Dutta et al. 2024, "Accuracy is Not All You Need"): the share of questions whose
    correctness changes between the base and the compressed model, right→wrong plus wrong→right.
    Accuracy can stay put while many answers flip both ways; flips track the KL, accuracy does not.
    Also the share whose chosen option changes at all (a change between two wrong options counts)."""
    if not len(golds) == len(dense) == len(modified) or not golds:
        raise PrunelensError("flips need the same questions, with a gold answer and both models' choices")
    n = len(golds)
    rw = sum(d == g != m for g, d, m in zip(golds, dense, modified, strict=True))
    wr = sum(m == g != d for g, d, m in zip(golds, dense, modified, strict=True))
    changed = sum(d != m for d, m in zip(dense, modified, strict=True))
    return {"flips": (rw + wr) / n, "right_to_wrong": rw / n, "wrong_to_right": wr / n, "changed": changed / n,
            "n": n}


def evaluate_mcq(
    lm: LoadedModel,
    task: str,
    data_dir: str | Path | None,
    limit: int | None = None,
    seed: int = 0,
    modification: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> McqResult:
    """Accuracy (and length-normalised accuracy) with standard errors on a seeded sample."""
    if task not in MCQ_TASKS:
        raise PrunelensError(f"unknown task '{task}'; multiple-choice tasks: {', '.join(MCQ_TASKS)}")
    return evaluate_items(lm, task, MCQ_TASKS[task].build(data_dir), limit, seed, modification, batch_size,
                          progress)


def evaluate_items(lm: LoadedModel, task: str, items: Sequence[Item], limit: int | None = None, seed: int = 0,
                   modification: Any = None, batch_size: int = 8, progress: bool = True) -> McqResult:
    """``evaluate_mcq`` on given items (a task config's, or a built-in task's)."""
    idx = sample_indices(len(items), limit, seed)
    chosen = [items[i] for i in idx]
    pred, pred_norm = score_items(lm, chosen, modification, batch_size, progress, desc=task)
    golds = [it.gold for it in chosen]
    hits = [float(p == g) for p, g in zip(pred, golds, strict=True)]
    hits_n = [float(p == g) for p, g in zip(pred_norm, golds, strict=True)]
    return McqResult(task, len(chosen), sum(hits) / len(hits), stderr_of_mean(hits), sum(hits_n) / len(hits_n),
                     stderr_of_mean(hits_n), pred, pred_norm, golds, idx)
