"""Every task behind one interface, so ``eval`` and ``sweep`` treat them alike.

A task has a *kind* — generative (free-running decoding, scored on the output), multiple-choice
(one step, scored on option log-likelihoods), retrieval (one representation), perplexity (one step
per token, teacher-forced; lower is better) or fidelity (generation compared with the dense model, no
labels) — and one headline metric; the full result
of the task's own evaluator travels along in ``details``. ``check_task`` validates names and data
before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrunelensError
from ..models import LoadedModel
from .mcq import MCQ_TASKS, task_file

GENERATIVE, MULTIPLE_CHOICE, RETRIEVAL, FIDELITY = "generative", "multiple-choice", "retrieval", "fidelity"
PERPLEXITY = "perplexity"
PERPLEXITY_TASKS = {"wikitext": "wikitext2_raw_test.jsonl"}  # --limit = number of 1024-token windows
GENERATIVE_TASKS = {"gsm8k": "exact_match", "humaneval": "pass@1", "mbpp": "pass@1"}
RETRIEVAL_TASKS = {"cranfield": "ndcg@10"}
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "humaneval": 512, "mbpp": 512, "fidelity": 64}


@dataclass(frozen=True)
class TaskOptions:
    limit: int | None = None
    generative_limit: int | None = None  # generative tasks only (they cost far more per question)
    seed: int = 0
    batch_size: int = 8
    shots: int = 5
    max_new_tokens: int | None = None  # None: the task's default
    chat_template: bool = True
    pooling: str = "mean"
    prompts: tuple[str, ...] | None = None  # fidelity prompts (default: the built-in set)
    retrieval_reference: bool = True  # also score all-MiniLM-L6-v2 on the dense run
    progress: bool = True

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task, 256)


@dataclass
class TaskScore:
    task: str
    kind: str
    metric: str
    score: float
    stderr: float
    n: int
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "kind": self.kind, "metric": self.metric, "score": self.score,
                "stderr": self.stderr, "n": self.n, "details": self.details}


def task_names() -> list[str]:
    return [*MCQ_TASKS, *GENERATIVE_TASKS, *RETRIEVAL_TASKS, *PERPLEXITY_TASKS, "fidelity"]


def task_kind(name: str) -> str:
    if name in GENERATIVE_TASKS:
        return GENERATIVE
    if name in MCQ_TASKS:
        return MULTIPLE_CHOICE
    if name in RETRIEVAL_TASKS or name.startswith("retrieval:"):
        return RETRIEVAL
    if name == "fidelity":
        return FIDELITY
    if name in PERPLEXITY_TASKS:
        return PERPLEXITY
    raise PrunelensError(f"unknown task '{name}'; tasks: {', '.join(task_names())} or retrieval:DIR")


def _retrieval_dir_name(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith("retrieval:") else name


def check_task(name: str, data_dir: str | Path | None) -> None:
    """One-line error for an unknown task or one whose data is missing (no model needed)."""
    kind = task_kind(name)
    if kind == FIDELITY or name == "humaneval":
        return  # built-in prompts / the packaged HumanEval (a HumanEval file in data_dir wins)
    if data_dir is None:
        raise PrunelensError(f"task '{name}' needs --data-dir")
    d = Path(data_dir)
    if not d.is_dir():
        raise PrunelensError(f"data directory '{d}' does not exist")
    if kind == MULTIPLE_CHOICE:
        task_file(MCQ_TASKS[name], d)
    elif name in ("gsm8k", "mbpp", *PERPLEXITY_TASKS):
        fname = {"gsm8k": "gsm8k_test.jsonl", "mbpp": "mbpp.jsonl", **PERPLEXITY_TASKS}[name]
        if not (d / fname).is_file():
            raise PrunelensError(f"task '{name}' needs {fname} in {d}, which is absent")
    elif kind == RETRIEVAL:
        from .retrieval import retrieval_dir

        retrieval_dir(d, _retrieval_dir_name(name))


def run_task(lm: LoadedModel, name: str, data_dir: str | Path | None, options: TaskOptions = TaskOptions(),
             modification: Any = None) -> TaskScore:
    """Score one task on the dense model (``modification=None``) or a modified one."""
    check_task(name, data_dir)
    kind = task_kind(name)
    o = options
    limit = o.generative_limit if kind == GENERATIVE and o.generative_limit is not None else o.limit
    common = dict(limit=limit, seed=o.seed, modification=modification, batch_size=o.batch_size,
                  progress=o.progress)
    gen = dict(max_new_tokens=o.new_tokens(name), chat_template=o.chat_template)
    if kind == MULTIPLE_CHOICE:
        from .mcq import evaluate_mcq

        r = evaluate_mcq(lm, name, data_dir, **common)
        metric = "acc_norm" if name == "hellaswag" else "acc"
        return TaskScore(name, kind, metric, getattr(r, metric), getattr(r, f"{metric}_stderr"), r.n,
                         r.to_dict())
    if name == "gsm8k":
        from .gsm8k import evaluate_gsm8k

        g = evaluate_gsm8k(lm, data_dir, shots=o.shots, **common, **gen)
        return TaskScore(name, kind, "exact_match", g.exact_match_flexible, g.stderr_flexible, g.n,
                         g.to_dict())
    if name in ("humaneval", "mbpp"):
        from .code import evaluate_humaneval, evaluate_mbpp

        c = (evaluate_humaneval if name == "humaneval" else evaluate_mbpp)(lm, data_dir, **common, **gen)
        return TaskScore(name, kind, "pass@1", c.pass_at_1, c.stderr, c.n, c.to_dict())
    if kind == RETRIEVAL:
        from .retrieval import evaluate_retrieval, evaluate_retrieval_reference

        sub = _retrieval_dir_name(name)
        r = evaluate_retrieval(lm, data_dir, sub, pooling=o.pooling, **common)
        details = r.to_dict()
        if modification is None and o.retrieval_reference:
            ref = evaluate_retrieval_reference(data_dir, sub, o.limit, o.seed, o.progress)
            details["reference"] = ref.to_dict()
        return TaskScore(name, kind, "ndcg@10", r.ndcg_at_10, r.ndcg_stderr, r.n, details)
    if kind == PERPLEXITY:
        from ..evaluate import perplexity, read_corpus

        text = read_corpus(Path(data_dir) / PERPLEXITY_TASKS[name])
        res = perplexity(lm, text, modification, 1024, o.limit, progress=o.progress)
        return TaskScore(name, kind, "perplexity", res["perplexity"], float("nan"), res["windows"], res)
    from ..data import builtin_prompts
    from .fidelity import evaluate_fidelity

    prompts = list(o.prompts) if o.prompts else builtin_prompts()
    if o.limit is not None:
        prompts = prompts[:o.limit]
    f = evaluate_fidelity(lm, prompts, modification, o.new_tokens("fidelity"), o.batch_size, o.chat_template,
                          o.progress)
    return TaskScore(name, kind, "rouge_l", f.rouge_l, f.rouge_l_stderr, f.n, f.to_dict())
