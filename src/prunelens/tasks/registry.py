"""Every task behind one interface, so ``eval`` and ``sweep`` treat them alike.

A task has a *kind* — generative (free-running decoding, scored on the output), multiple-choice
(one step, scored on option log-likelihoods), retrieval (one representation), perplexity (one step
per token, teacher-forced; lower is better) or fidelity (generation compared with the dense model, no
labels) — and one headline metric; the full result
of the task's own evaluator travels along in ``details``. ``check_task`` validates names and data
before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.tasks.data import data_file, find_data_file
from prunelens.tasks.mcq import MCQ_TASKS, task_file

GENERATIVE, MULTIPLE_CHOICE, RETRIEVAL, FIDELITY = "generative", "multiple-choice", "retrieval", "fidelity"
PERPLEXITY = "perplexity"
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


@dataclass(frozen=True)
class Task:
    """One registered task: its name, kind (generative, multiple-choice, retrieval, perplexity,
    fidelity), metric, the data files it reads, and how it is scored. Sweep, paired, advise and the
    CLI read the registry; a new task is one registered object plus its module."""

    name: str
    kind: str
    metric: str
    description: str
    evaluate: Callable[[LoadedModel, Task, str | Path | None, TaskOptions, Any], TaskScore]
    files: Callable[[str | Path | None], list[Path]] = lambda data_dir: []
    needs_data_dir: bool = True

    def check(self, data_dir: str | Path | None) -> list[Path]:
        """The data files, or a one-line error naming what is missing (no model needed)."""
        if self.needs_data_dir:
            if data_dir is None:
                raise PrunelensError(f"task '{self.name}' needs --data-dir")
            if not Path(data_dir).is_dir():
                raise PrunelensError(f"data directory '{data_dir}' does not exist")
        return self.files(data_dir)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def _limit(kind: str, o: TaskOptions) -> int | None:
    return o.generative_limit if kind == GENERATIVE and o.generative_limit is not None else o.limit


def _common(task: Task, o: TaskOptions, modification: Any) -> dict[str, Any]:
    return dict(limit=_limit(task.kind, o), seed=o.seed, modification=modification, batch_size=o.batch_size,
                progress=o.progress)


def _gen(task: Task, o: TaskOptions) -> dict[str, Any]:
    return dict(max_new_tokens=o.new_tokens(task.name), chat_template=o.chat_template)


def _mcq(lm, task, data_dir, o, modification) -> TaskScore:
    from prunelens.tasks.mcq import evaluate_mcq

    r = evaluate_mcq(lm, task.name, data_dir, **_common(task, o, modification))
    return TaskScore(task.name, task.kind, task.metric, getattr(r, task.metric),
                     getattr(r, f"{task.metric}_stderr"), r.n, r.to_dict())


def _gsm8k(lm, task, data_dir, o, modification) -> TaskScore:
    from prunelens.tasks.gsm8k import evaluate_gsm8k

    g = evaluate_gsm8k(lm, data_dir, shots=o.shots, **_common(task, o, modification), **_gen(task, o))
    return TaskScore(task.name, task.kind, task.metric, g.exact_match_flexible, g.stderr_flexible, g.n,
                     g.to_dict())


def _code(lm, task, data_dir, o, modification) -> TaskScore:
    from prunelens.tasks.code import evaluate_humaneval, evaluate_mbpp

    fn = evaluate_humaneval if task.name == "humaneval" else evaluate_mbpp
    c = fn(lm, data_dir, **_common(task, o, modification), **_gen(task, o))
    return TaskScore(task.name, task.kind, task.metric, c.pass_at_1, c.stderr, c.n, c.to_dict())


def _retrieval(lm, task, data_dir, o, modification) -> TaskScore:
    from prunelens.tasks.retrieval import evaluate_retrieval, evaluate_retrieval_reference

    sub = _retrieval_dir_name(task.name)
    r = evaluate_retrieval(lm, data_dir, sub, pooling=o.pooling, **_common(task, o, modification))
    details = r.to_dict()
    if modification is None and o.retrieval_reference:
        ref = evaluate_retrieval_reference(data_dir, sub, o.limit, o.seed, o.progress)
        details["reference"] = ref.to_dict()
    return TaskScore(task.name, task.kind, task.metric, r.ndcg_at_10, r.ndcg_stderr, r.n, details)


def _perplexity(lm, task, data_dir, o, modification) -> TaskScore:
    from prunelens.tasks.perplexity import perplexity, read_corpus

    text = read_corpus(data_file(task.name, data_dir))
    res = perplexity(lm, text, modification, 1024, o.limit, progress=o.progress)  # --limit: 1024-token windows
    return TaskScore(task.name, task.kind, task.metric, res["perplexity"], float("nan"), res["windows"], res)


def _fidelity(lm, task, data_dir, o, modification) -> TaskScore:
    from prunelens.data import builtin_prompts
    from prunelens.tasks.fidelity import evaluate_fidelity

    prompts = list(o.prompts) if o.prompts else builtin_prompts()
    if o.limit is not None:
        prompts = prompts[:o.limit]
    f = evaluate_fidelity(lm, prompts, modification, o.new_tokens("fidelity"), o.batch_size, o.chat_template,
                          o.progress)
    return TaskScore(task.name, task.kind, task.metric, f.rouge_l, f.rouge_l_stderr, f.n, f.to_dict())


def _files(key: str) -> Callable[[str | Path | None], list[Path]]:
    return lambda data_dir: [data_file(key, data_dir)]


def _retrieval_files(name: str) -> Callable[[str | Path | None], list[Path]]:
    def files(data_dir: str | Path | None) -> list[Path]:
        from prunelens.tasks.retrieval import retrieval_dir

        return [retrieval_dir(data_dir, _retrieval_dir_name(name))]  # type: ignore[arg-type]
    return files


for _t in MCQ_TASKS.values():
    register(Task(_t.name, MULTIPLE_CHOICE, "acc_norm" if _t.name == "hellaswag" else "acc", _t.description, _mcq,
                  lambda data_dir, t=_t: [task_file(t, Path(data_dir))]))
register(Task("gsm8k", GENERATIVE, "exact_match", "GSM8K, 5-shot chain of thought, flexible match", _gsm8k,
              _files("gsm8k")))
register(Task("humaneval", GENERATIVE, "pass@1", "HumanEval, sandboxed tests (packaged copy unless a file is in "
              "--data-dir)", _code, lambda d: [p] if (p := find_data_file("humaneval", d)) else [],
              needs_data_dir=False))
register(Task("mbpp", GENERATIVE, "pass@1", "MBPP test split (ids 11-510), 3-shot, sandboxed tests", _code,
              _files("mbpp")))
register(Task("cranfield", RETRIEVAL, "ndcg@10", "Cranfield (BEIR layout), embeddings of the LM", _retrieval,
              _retrieval_files("cranfield")))
register(Task("wikitext", PERPLEXITY, "perplexity", "WikiText-2 raw test, 1024-token windows", _perplexity,
              _files("wikitext")))
register(Task("fidelity", FIDELITY, "rouge_l", "agreement with the dense model's own generations (no labels)",
              _fidelity, needs_data_dir=False))



def get_task(name: str) -> Task:
    """A registered task, or ``retrieval:DIR`` (any BEIR-layout directory under --data-dir)."""
    if name in TASKS:
        return TASKS[name]
    if name.startswith("retrieval:") and len(name) > len("retrieval:"):
        return Task(name, RETRIEVAL, "ndcg@10", "BEIR-layout retrieval set", _retrieval, _retrieval_files(name))
    raise PrunelensError(f"unknown task '{name}'; tasks: {', '.join(task_names())} or retrieval:DIR")


def task_names() -> list[str]:
    return list(TASKS)


def tasks_help() -> str:
    kinds: dict[str, list[str]] = {}
    for t in TASKS.values():
        kinds.setdefault(t.kind, []).append(t.name)
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items()) + "; or retrieval:DIR"


def task_kind(name: str) -> str:
    return get_task(name).kind


def _retrieval_dir_name(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith("retrieval:") else name


def check_task(name: str, data_dir: str | Path | None) -> list[Path]:
    """One-line error for an unknown task or one whose data is missing (no model needed); returns
    the data files the task reads (for the cell cache's content hashes)."""
    return get_task(name).check(data_dir)


def run_task(lm: LoadedModel, name: str, data_dir: str | Path | None, options: TaskOptions = TaskOptions(),
             modification: Any = None) -> TaskScore:
    """Score one task on the dense model (``modification=None``) or a modified one."""
    task = get_task(name)
    task.check(data_dir)
    return task.evaluate(lm, task, data_dir, options, modification)
