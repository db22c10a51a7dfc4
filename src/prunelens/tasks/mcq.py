"""Multiple-choice tasks scored by log-likelihood, in lm-evaluation-harness's formats.

Each task turns one row (a local JSONL row, or a Hub row mapped to the same schema by its
``Source`` below; schemas in docs/tasks.md) into options
(context, continuation); the predicted option is the argmax of the summed log-probability (acc) or
of log-probability per character of the continuation (acc_norm). No chat template: these read one
step of the model, as the harness does by default. The tasks register themselves at the end.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.tasks.base import MULTIPLE_CHOICE, Task, TaskOptions, TaskScore, register, run_kwargs
from prunelens.tasks.data import sample_indices, stderr_of_mean
from prunelens.tasks.loglik import Request, score_requests
from prunelens.tasks.sources import HubSplit, Source, load_rows, register_source

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    """One question: option k is (contexts[k], continuations[k]); ``gold`` is the right k."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


# --- data: Hub schema -> local schema ----------------------------------------------------------


def _arc_hub(r: dict[str, Any]) -> dict[str, Any]:
    labels = list(r["choices"]["label"])
    if r["answerKey"] not in labels:
        raise ValueError(f"answerKey {r['answerKey']!r} is not among the labels {labels}")
    return {"id": r["id"], "question": r["question"], "choices": list(r["choices"]["text"]), "labels": labels,
            "answer": labels.index(r["answerKey"])}


def _piqa_hub(r: dict[str, Any]) -> dict[str, Any]:
    return {"question": r["goal"], "choices": [r["sol1"], r["sol2"]], "answer": int(r["label"])}


def _boolq_hub(r: dict[str, Any]) -> dict[str, Any]:
    # SuperGLUE's passage is "<title> -- <passage>"; the local schema keeps the two apart
    title, sep, passage = r["passage"].partition(" -- ")
    if not sep:
        title, passage = "", r["passage"]
    return {"idx": int(r["idx"]), "question": r["question"], "title": title, "passage": passage,
            "choices": ["no", "yes"], "answer": int(r["label"])}


def _winogrande_hub(r: dict[str, Any]) -> dict[str, Any]:
    # lm-eval's partial scoring: each option fills the blank, the rest of the sentence is scored
    s = r["sentence"]
    i = s.index("_")
    return {"choices": [s[:i] + r["option1"], s[:i] + r["option2"]], "continuation": s[i + 1:].strip(),
            "answer": {"1": 0, "2": 1}[str(r["answer"])]}


_ARC = {"question": str, "choices": list, "answer": int}
_MMLU = {"subject": str, "question": str, "choices": list, "answer": int}
_ARC_COLS = ("id", "question", "choices", "answerKey")
_MMLU_COLS = ("subject", "question", "choices", "answer")

ARC_EASY, ARC_CHALLENGE, PIQA, BOOLQ, WINOGRANDE, HELLASWAG, MMLU, MMLU_DEV = (register_source(s) for s in (
    Source("arc_easy", ("arc_easy_test.jsonl",), _ARC, (HubSplit("allenai/ai2_arc", "ARC-Easy", "test"),),
           _ARC_COLS, _arc_hub),
    Source("arc_challenge", ("arc_challenge_test.jsonl",), _ARC,
           (HubSplit("allenai/ai2_arc", "ARC-Challenge", "test"),), _ARC_COLS, _arc_hub),
    Source("piqa", ("piqa_validation.jsonl",), _ARC, (HubSplit("baber/piqa", None, "validation"),),
           ("goal", "sol1", "sol2", "label"), _piqa_hub),
    Source("boolq", ("boolq_validation.jsonl",), {"question": str, "passage": str, "answer": int},
           (HubSplit("aps/super_glue", "boolq", "validation"),), ("question", "passage", "idx", "label"),
           _boolq_hub),
    Source("winogrande", ("winogrande_dev.jsonl",), {"choices": list, "continuation": str, "answer": int},
           (HubSplit("allenai/winogrande", "winogrande_xl", "validation"),),
           ("sentence", "option1", "option2", "answer"), _winogrande_hub),
    Source("hellaswag", ("hellaswag_validation.jsonl", "hellaswag_val.jsonl"),
           {"ctx_a": str, "ctx_b": str, "activity_label": str, "endings": list, "label": (int, str)},
           (HubSplit("Rowan/hellaswag", None, "validation"),),
           ("ctx_a", "ctx_b", "activity_label", "endings", "label")),
    Source("mmlu", ("mmlu_test.jsonl.gz", "mmlu_test.jsonl"), _MMLU, (HubSplit("cais/mmlu", "all", "test"),),
           _MMLU_COLS),
    Source("mmlu_dev", ("mmlu_dev.jsonl",), _MMLU, (HubSplit("cais/mmlu", "all", "dev"),), _MMLU_COLS),
))


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
        d = load_rows(MMLU_DEV, data_dir)
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
    source: Source
    items: Callable[[list[dict[str, Any]], str, str | Path | None], list[Item]]
    description: str = ""
    shots_from: Source | None = None  # a second dataset the shots come from (MMLU's dev split)
    metric: str = "acc"  # the headline: acc, or acc_norm where lm-eval reports that

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.source,) if self.shots_from is None else (self.source, self.shots_from)

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
        McqTask("arc_easy", ARC_EASY, _rows_only(_arc), "ARC-Easy, 'Question: ..\\nAnswer:' + option"),
        McqTask("arc_challenge", ARC_CHALLENGE, _rows_only(_arc), "ARC-Challenge, same format"),
        McqTask("piqa", PIQA, _rows_only(_piqa), "PIQA, goal as question, two solutions"),
        McqTask("boolq", BOOLQ, _rows_only(_boolq), "BoolQ, passage + question, no/yes"),
        McqTask("winogrande", WINOGRANDE, _rows_only(_winogrande), "WinoGrande, partial scoring"),
        McqTask("hellaswag", HELLASWAG, _rows_only(_hellaswag),
                "HellaSwag, lm-eval preprocessing (HF schema: ctx_a, ctx_b, activity_label, endings, label)",
                metric="acc_norm"),
        McqTask("mmlu", MMLU, _mmlu_variant(0, True), "MMLU 0-shot, option letters scored"),
        McqTask("mmlu_5shot", MMLU, _mmlu_variant(5, True),
                "MMLU 5-shot (dev examples of the subject), option letters scored", MMLU_DEV),
        McqTask("mmlu_full", MMLU, _mmlu_variant(0, False), "MMLU 0-shot, full answer text scored"),
        McqTask("mmlu_full_5shot", MMLU, _mmlu_variant(5, False), "MMLU 5-shot, full answer text scored",
                MMLU_DEV),
    )
}


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


# --- the registered tasks ----------------------------------------------------------------------


def _evaluate(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
              modification: Any) -> TaskScore:
    r = evaluate_mcq(lm, task.name, data_dir, **run_kwargs(task, o, modification))
    return TaskScore(task.name, task.kind, task.metric, getattr(r, task.metric),
                     getattr(r, f"{task.metric}_stderr"), r.n, r.to_dict())


def item_hits(metric: str, details: dict[str, Any]) -> dict[Any, float] | None:
    """Per-question outcomes (1 right, 0 wrong) from a saved ``McqResult``, by the run's metric."""
    if not {"indices", "golds"} <= details.keys():
        return None
    preds = details.get("predictions_norm" if metric == "acc_norm" else "predictions")
    if preds is None:
        return None
    return {i: float(p == g) for i, p, g in zip(details["indices"], preds, details["golds"], strict=True)}


for _t in MCQ_TASKS.values():
    register(Task(_t.name, MULTIPLE_CHOICE, _t.metric, _t.description, _evaluate, _t.sources, hits=item_hits))
