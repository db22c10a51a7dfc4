"""What every task is: a ``Task`` object registered in ``TASKS`` by its own module.

A task module (``tasks/mcq.py``, ``gsm8k.py``, ``code.py``, ...) holds the whole task: its data
``Source`` (local file names, Hub dataset, mapping), its ``max_new_tokens``, how it is evaluated and
how one saved question is scored, and one ``register(Task(...))`` call. ``TASKS`` discovers those
modules (every module of ``prunelens.tasks`` is imported on first use), so adding a task is one new
module and nothing else changes: no table keyed by task name, no name check elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.registry import Registry
from prunelens.tasks.sources import Source, load_rows

GENERATIVE, MULTIPLE_CHOICE, RETRIEVAL, FIDELITY = "generative", "multiple-choice", "retrieval", "fidelity"
PERPLEXITY = "perplexity"
KINDS = (MULTIPLE_CHOICE, GENERATIVE, RETRIEVAL, PERPLEXITY, FIDELITY)  # the order ``--tasks`` help lists them in


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

    def new_tokens(self, task: Task) -> int:
        """``--max-new-tokens``, else the task's own default."""
        return self.max_new_tokens or task.max_new_tokens


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


Evaluate = Callable[[LoadedModel, "Task", "str | Path | None", TaskOptions, Any], TaskScore]
Hits = Callable[[str, dict[str, Any]], "dict[Any, float] | None"]


@dataclass(frozen=True)
class Task:
    """One task: name, kind (generative, multiple-choice, retrieval, perplexity, fidelity), metric,
    the data it reads, and how it is scored. Sweep, paired, advise and the CLI read only this."""

    name: str
    kind: str
    metric: str
    description: str
    evaluate: Evaluate
    sources: tuple[Source, ...] = ()  # the datasets it reads (local file names, Hub splits)
    data: Callable[[str | Path | None], dict[str, str]] | None = None  # identity of data outside ``sources``
    needs_data_dir: bool = False  # local data only (no Hub source)
    max_new_tokens: int = 256  # generation budget unless --max-new-tokens is given
    hits: Hits | None = None  # (metric, saved details) -> per-question outcomes, or None
    config: Any = None  # the TaskConfig of a YAML task

    def identity(self, data_dir: str | Path | None) -> dict[str, str]:
        """Name -> content hash of every data file or Hub split the task reads (for cell caches)."""
        if self.data is not None:
            return self.data(data_dir)
        return {k: v for s in self.sources for k, v in load_rows(s, data_dir).identity.items()}

    def check(self, data_dir: str | Path | None) -> dict[str, str]:
        """The data's identity once it loads, or a one-line error naming what is missing (no model
        needed)."""
        if data_dir is not None and not Path(data_dir).is_dir():
            raise PrunelensError(f"data directory '{data_dir}' does not exist")
        if self.needs_data_dir and data_dir is None:
            raise PrunelensError(f"task '{self.name}' needs --data-dir (it has no Hub source)")
        return self.identity(data_dir)


# Every module of the package is imported on first use and registers its tasks here.
TASKS: Registry[Task] = Registry("task", discover=("prunelens.tasks",))


def register(task: Task) -> Task:
    """Add a task to ``TASKS`` (called by the task's own module, at import)."""
    TASKS.register(task.name, task)
    return task


def limit_for(kind: str, o: TaskOptions) -> int | None:
    return o.generative_limit if kind == GENERATIVE and o.generative_limit is not None else o.limit


def run_kwargs(task: Task, o: TaskOptions, modification: Any) -> dict[str, Any]:
    """The keyword arguments every task evaluator takes."""
    return dict(limit=limit_for(task.kind, o), seed=o.seed, modification=modification, batch_size=o.batch_size,
                progress=o.progress)


def generation_kwargs(task: Task, o: TaskOptions) -> dict[str, Any]:
    """The keyword arguments every generative evaluator takes besides ``run_kwargs``."""
    return dict(max_new_tokens=o.new_tokens(task), chat_template=o.chat_template)
