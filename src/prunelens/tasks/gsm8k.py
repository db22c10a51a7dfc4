"""GSM8K: few-shot chain of thought, greedy, answer extraction, exact match.

Exemplars are the first ``shots`` rows of the file (never evaluated); their reference solutions,
calculator annotations ``<<...>>`` removed, end in ``#### N`` as the model is asked to. With a chat
template the exemplars are given as earlier user/assistant turns. Two extractions, as in
lm-evaluation-harness: *strict* reads the number after ``####``; *flexible* takes the last number
in the output. ``format_rate`` is the share of outputs with a strict answer at all, which tells a
formatting failure apart from a wrong answer.

Data: ``gsm8k_test.jsonl`` in the data directory, else openai/gsm8k (main, test) from the Hub.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.generation import generate
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import render
from prunelens.tasks.base import GENERATIVE, Task, TaskOptions, TaskScore, generation_kwargs, register, run_kwargs
from prunelens.tasks.data import sample_indices, stderr_of_mean
from prunelens.tasks.sources import HubSplit, Source, load_rows, register_source

STOP = ("Question:", "</s>", "<|im_end|>")
_STRICT = re.compile(r"#### *(-?[$0-9.,]+)")
_NUMBER = re.compile(r"-?[$0-9][0-9.,]*")


def _from_hub(r: dict[str, Any]) -> dict[str, Any]:
    if "####" not in r["answer"]:
        raise ValueError("answer has no '####' final line")
    target = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    return {"question": r["question"], "answer": r["answer"], "target": target}


GSM8K = register_source(Source("gsm8k", ("gsm8k_test.jsonl",), {"question": str, "answer": str, "target": str},
                               (HubSplit("openai/gsm8k", "main", "test"),), ("question", "answer"), _from_hub))


def normalise(num: str) -> float | None:
    s = num.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def matches(answer: float | None, target: float | None) -> bool:
    """An extracted answer counts when it equals the normalised target (floats: 0.1+0.2 is 0.3)."""
    return answer is not None and target is not None and math.isclose(answer, target)


def sample_hit(sample: dict[str, Any]) -> float:
    """1.0 when a saved sample's flexible answer is right: per-question outcomes of an old run are
    recomputed from what it kept, so two runs on the same questions can be compared pairwise."""
    return float(matches(sample.get("flexible"), normalise(str(sample["target"]))))


def extract_strict(text: str) -> float | None:
    m = _STRICT.search(text)
    return normalise(m.group(1)) if m else None


def extract_flexible(text: str) -> float | None:
    for m in reversed(_NUMBER.findall(text)):
        v = normalise(m)
        if v is not None:
            return v
    return None


def exemplar_answer(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def _question(q: str) -> str:
    return f"Question: {q.strip()}\nAnswer:"


@dataclass
class GsmResult:
    n: int
    exact_match_flexible: float
    exact_match_strict: float
    format_rate: float
    stderr_flexible: float
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("n", "exact_match_flexible", "exact_match_strict",
                                              "format_rate", "stderr_flexible", "samples")}


def conversations_for(data_dir: str | Path | None, limit: int | None, seed: int, shots: int
                      ) -> tuple[list[dict[str, Any]], list[int], list[list[dict[str, str]]]]:
    """(rows, sampled row indices, one conversation each): the exemplars as earlier turns (the
    first ``shots`` rows, never asked), then the question."""
    rows = load_rows(GSM8K, data_dir).rows
    if shots < 0 or shots >= len(rows):
        raise PrunelensError(f"--shots must be in 0..{len(rows) - 1}, got {shots}")
    turns: list[dict[str, str]] = []
    for ex in rows[:shots]:
        turns += [{"role": "user", "content": _question(ex["question"])},
                  {"role": "assistant", "content": exemplar_answer(ex["answer"])}]
    pool = list(range(shots, len(rows)))
    chosen = [pool[i] for i in sample_indices(len(pool), limit, seed)]
    return rows, chosen, [[*turns, {"role": "user", "content": _question(rows[i]["question"])}] for i in chosen]


def evaluate_gsm8k(lm: LoadedModel, data_dir: str | Path | None, limit: int | None = None, seed: int = 0,
                   shots: int = 5, modification: Any = None, batch_size: int = 8, max_new_tokens: int = 256,
                   chat_template: bool = True, progress: bool = True) -> GsmResult:
    rows, chosen, conversations = conversations_for(data_dir, limit, seed, shots)
    prompts = [render(lm.tokenizer, c, chat_template) for c in conversations]
    outs = generate(lm, prompts, max_new_tokens, STOP, modification, batch_size, progress, desc="gsm8k")
    samples, hits, hits_strict, formatted = [], [], [], []
    for i, text in zip(chosen, outs, strict=True):
        target = normalise(rows[i]["target"])
        flex, strict = extract_flexible(text), extract_strict(text)
        hits.append(float(matches(flex, target)))
        hits_strict.append(float(matches(strict, target)))
        formatted.append(float(strict is not None))
        samples.append({"index": i, "target": rows[i]["target"], "output": text, "flexible": flex,
                        "strict": strict})
    n = len(hits)
    return GsmResult(n, sum(hits) / n, sum(hits_strict) / n, sum(formatted) / n, stderr_of_mean(hits),
                     samples)


def _evaluate(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
              modification: Any) -> TaskScore:
    g = evaluate_gsm8k(lm, data_dir, shots=o.shots, **run_kwargs(task, o, modification),
                       **generation_kwargs(task, o))
    return TaskScore(task.name, task.kind, task.metric, g.exact_match_flexible, g.stderr_flexible, g.n,
                     g.to_dict())


def item_hits(metric: str, details: dict[str, Any]) -> dict[Any, float] | None:
    """Per-question outcomes recomputed from a saved run's samples (``sample_hit``)."""
    if "samples" not in details:
        return None
    return {s["index"]: sample_hit(s) for s in details["samples"]}


register(Task("gsm8k", GENERATIVE, "exact_match", "GSM8K, 5-shot chain of thought, flexible match", _evaluate,
              (GSM8K,), max_new_tokens=256, hits=item_hits))
