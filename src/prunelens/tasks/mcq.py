"""Multiple-choice tasks scored by log-likelihood, in lm-evaluation-harness's formats.

Each task turns one JSONL row (schemas in ../shared/data/README.md and docs/tasks.md) into options
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
from prunelens.tasks.data import DATA_FILES, read_jsonl, sample_indices, stderr_of_mean
from prunelens.tasks.loglik import Request, score_requests

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    """One question: option k is (contexts[k], continuations[k]); ``gold`` is the right k."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


# --- reading rows ------------------------------------------------------------------------------


def _check_gold(path: Path, i: int, gold: int, n: int) -> None:
    if not 0 <= gold < n:
        raise PrunelensError(f"{path}: row {i + 1}: answer index {gold} outside 0..{n - 1}")


def _same_context(ctx: str, choices: Sequence[str], gold: int) -> Item:
    return Item(tuple(ctx for _ in choices), tuple(f" {c}" for c in choices), gold)


def _checked(path: Path, items: list[Item]) -> list[Item]:
    for i, it in enumerate(items):
        _check_gold(path, i, it.gold, len(it.continuations))
    return items


# --- task formats ------------------------------------------------------------------------------


def _arc(path: Path) -> list[Item]:
    rows = read_jsonl(path, {"question": str, "choices": list, "answer": int})
    out = []
    for i, r in enumerate(rows):
        _check_gold(path, i, r["answer"], len(r["choices"]))
        out.append(_same_context(f"Question: {r['question']}\nAnswer:", r["choices"], r["answer"]))
    return out


def _piqa(path: Path) -> list[Item]:
    rows = read_jsonl(path, {"question": str, "choices": list, "answer": int})
    return _checked(
        path, [_same_context(f"Question: {r['question']}\nAnswer:", r["choices"], r["answer"]) for r in rows]
    )


def _boolq(path: Path) -> list[Item]:
    rows = read_jsonl(path, {"question": str, "passage": str, "answer": int})
    return _checked(
        path,
        [
            _same_context(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], r["answer"])
            for r in rows
        ],
    )


def _winogrande(path: Path) -> list[Item]:
    """lm-eval's partial scoring: log P(rest of sentence | sentence up to the blank, option filled)."""
    rows = read_jsonl(path, {"choices": list, "continuation": str, "answer": int})
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


def _hellaswag(path: Path) -> list[Item]:
    rows = read_jsonl(
        path, {"ctx_a": str, "ctx_b": str, "activity_label": str, "endings": list, "label": (int, str)}
    )
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


def _mmlu(path: Path, shots: int, letters: bool) -> list[Item]:
    rows = read_jsonl(path, {"subject": str, "question": str, "choices": list, "answer": int})
    dev: dict[str, list[dict[str, Any]]] = {}
    if shots:
        dev_path = path.with_name(DATA_FILES["mmlu_dev"][0])
        dev_rows = read_jsonl(dev_path, {"subject": str, "question": str, "choices": list, "answer": int})
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
    files: tuple[str, ...]  # file names tried in the data directory, first found wins
    build: Callable[[Path], list[Item]]
    description: str = ""


MCQ_TASKS: dict[str, McqTask] = {
    t.name: t
    for t in (
        McqTask("arc_easy", DATA_FILES["arc_easy"], _arc, "ARC-Easy, 'Question: ..\\nAnswer:' + option"),
        McqTask("arc_challenge", DATA_FILES["arc_challenge"], _arc, "ARC-Challenge, same format"),
        McqTask("piqa", DATA_FILES["piqa"], _piqa, "PIQA, goal as question, two solutions"),
        McqTask("boolq", DATA_FILES["boolq"], _boolq, "BoolQ, passage + question, no/yes"),
        McqTask("winogrande", DATA_FILES["winogrande"], _winogrande, "WinoGrande, partial scoring"),
        McqTask(
            "hellaswag",
            DATA_FILES["hellaswag"],
            _hellaswag,
            "HellaSwag, lm-eval preprocessing (HF schema: ctx_a, ctx_b, activity_label, endings, label)",
        ),
        McqTask(
            "mmlu",
            DATA_FILES["mmlu"],
            lambda p: _mmlu(p, 0, True),
            "MMLU 0-shot, option letters scored",
        ),
        McqTask(
            "mmlu_5shot",
            DATA_FILES["mmlu"],
            lambda p: _mmlu(p, 5, True),
            "MMLU 5-shot (dev examples of the subject), option letters scored",
        ),
        McqTask(
            "mmlu_full",
            DATA_FILES["mmlu"],
            lambda p: _mmlu(p, 0, False),
            "MMLU 0-shot, full answer text scored",
        ),
        McqTask(
            "mmlu_full_5shot",
            DATA_FILES["mmlu"],
            lambda p: _mmlu(p, 5, False),
            "MMLU 5-shot, full answer text scored",
        ),
    )
}


def task_file(task: McqTask, data_dir: Path) -> Path:
    for name in task.files:
        if (data_dir / name).is_file():
            return data_dir / name
    raise PrunelensError(f"task '{task.name}' needs {' or '.join(task.files)} in {data_dir}, which is absent")


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


def evaluate_mcq(
    lm: LoadedModel,
    task: str,
    data_dir: str | Path,
    limit: int | None = None,
    seed: int = 0,
    modification: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> McqResult:
    """Accuracy (and length-normalised accuracy) with standard errors on a seeded sample."""
    if task not in MCQ_TASKS:
        raise PrunelensError(f"unknown task '{task}'; multiple-choice tasks: {', '.join(MCQ_TASKS)}")
    t = MCQ_TASKS[task]
    items = t.build(task_file(t, Path(data_dir)))
    idx = sample_indices(len(items), limit, seed)
    chosen = [items[i] for i in idx]
    pred, pred_norm = score_items(lm, chosen, modification, batch_size, progress, desc=task)
    golds = [it.gold for it in chosen]
    hits = [float(p == g) for p, g in zip(pred, golds, strict=True)]
    hits_n = [float(p == g) for p, g in zip(pred_norm, golds, strict=True)]
    return McqResult(
        task,
        len(chosen),
        sum(hits) / len(hits),
        stderr_of_mean(hits),
        sum(hits_n) / len(hits_n),
        stderr_of_mean(hits_n),
        pred,
        pred_norm,
        golds,
        idx,
    )
