"""Generation fidelity: how far a modified model's greedy output drifts from the dense model's.

No labels needed, so it works on any prompt set: both models decode greedily from the same
prompts, and each pruned output is compared with the dense one by token agreement (position by
position), the first step where they differ, ROUGE-L F1 over words, and the repetition rate of each
output (the share of repeated 4-grams; degenerate loops are a typical failure of pruned models).
The ``fidelity`` task (the built-in prompts, or ``--prompts``) registers itself at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.data import builtin_prompts
from prunelens.model.generation import generate_full
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import encode_prompts
from prunelens.tasks.base import FIDELITY, Task, TaskOptions, TaskScore, register
from prunelens.tasks.data import stderr_of_mean
from prunelens.tasks.scoring import first_divergence, repetition_rate, rouge_l, token_agreement


@dataclass
class FidelityResult:
    n: int
    max_new_tokens: int
    rouge_l: float
    rouge_l_stderr: float
    token_agreement: float
    identical: float
    median_first_divergence: float | None
    repetition_dense: float
    repetition_modified: float
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        keys = ("n", "max_new_tokens", "rouge_l", "rouge_l_stderr", "token_agreement", "identical",
                "median_first_divergence", "repetition_dense", "repetition_modified", "samples")
        return {k: getattr(self, k) for k in keys}


def _median(x: list[int]) -> float | None:
    if not x:
        return None
    s = sorted(x)
    m = len(s) // 2
    return float(s[m]) if len(s) % 2 else (s[m - 1] + s[m]) / 2


def evaluate_fidelity(lm: LoadedModel, prompts: Sequence[str], modification: Any = None,
                      max_new_tokens: int = 64, batch_size: int = 8, chat_template: bool = True,
                      progress: bool = True) -> FidelityResult:
    """Dense vs modified greedy outputs on the same prompts (chat template for instruct models)."""
    ids = encode_prompts(lm.tokenizer, prompts, chat_template)
    dense = generate_full(lm, ids, max_new_tokens, (), None, batch_size, progress, "fidelity dense")
    mod = dense if modification is None else generate_full(
        lm, ids, max_new_tokens, (), modification, batch_size, progress, "fidelity modified")
    samples, rl, agree, diverged = [], [], [], []
    for p, d, m in zip(prompts, dense, mod, strict=True):
        fd = first_divergence(m.ids, d.ids)
        rl.append(rouge_l(m.text, d.text))
        agree.append(token_agreement(m.ids, d.ids))
        if fd is not None:
            diverged.append(fd)
        samples.append({"prompt": p, "dense": d.text, "modified": m.text, "rouge_l": rl[-1],
                        "token_agreement": agree[-1], "first_divergence": fd,
                        "repetition_dense": repetition_rate(d.ids),
                        "repetition_modified": repetition_rate(m.ids)})
    n = len(samples)
    return FidelityResult(
        n, max_new_tokens, sum(rl) / n, stderr_of_mean(rl), sum(agree) / n, 1 - len(diverged) / n,
        _median(diverged), sum(s["repetition_dense"] for s in samples) / n,
        sum(s["repetition_modified"] for s in samples) / n, samples)


def _evaluate(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
              modification: Any) -> TaskScore:
    prompts = list(o.prompts) if o.prompts else builtin_prompts()
    if o.limit is not None:
        prompts = prompts[:o.limit]
    f = evaluate_fidelity(lm, prompts, modification, o.new_tokens(task), o.batch_size, o.chat_template, o.progress)
    return TaskScore(task.name, task.kind, task.metric, f.rouge_l, f.rouge_l_stderr, f.n, f.to_dict())


register(Task("fidelity", FIDELITY, "rouge_l", "agreement with the dense model's own generations (no labels)",
              _evaluate, max_new_tokens=64))
