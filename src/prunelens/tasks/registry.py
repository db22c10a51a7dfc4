"""Every task behind one interface, so ``eval`` and ``sweep`` treat them alike.

A task has a *kind* — generative (free-running decoding, scored on the output), multiple-choice
(one step, scored on option log-likelihoods), retrieval (one representation), perplexity (one step
per token, teacher-forced; lower is better) or fidelity (generation compared with the dense model, no
labels) — and one headline metric; the full result of the task's own evaluator travels along in
``details``. Each task module registers its ``Task`` in ``TASKS`` (``tasks/base.py``); this module
looks tasks up by name: a registered one, ``retrieval:DIR``, or a YAML task config
(``tasks.config``: ``--tasks my_task.yaml``). ``check_task`` validates names and loads the data (a
local file, or the Hub through ``tasks.sources``) before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.tasks.base import GENERATIVE, KINDS, PERPLEXITY, TASKS, Task, TaskOptions, TaskScore
from prunelens.tasks.config import config_task
from prunelens.tasks.config_file import is_task_config
from prunelens.tasks.retrieval import retrieval_task

__all__ = ["GENERATIVE", "PERPLEXITY", "TASKS", "TaskOptions", "TaskScore", "check_task", "get_task", "item_hits",
           "run_task", "task_kind", "task_names", "tasks_help"]

def get_task(name: str) -> Task:
    """A registered task, ``retrieval:DIR`` (any BEIR-layout directory under --data-dir), or a YAML
    task config file."""
    if name in TASKS:
        return TASKS.get(name)
    if name.startswith("retrieval:") and len(name) > len("retrieval:"):
        return retrieval_task(name)
    if is_task_config(name):
        return config_task(name)
    raise PrunelensError(f"{TASKS.unknown(name)}; or retrieval:DIR or a task config .yaml")


def task_names() -> list[str]:
    return TASKS.names()


def tasks_help() -> str:
    """The tasks by kind (kinds in ``KINDS`` order, names sorted: the same text whatever order the task
    modules were imported in)."""
    kinds: dict[str, list[str]] = {k: [] for k in KINDS}
    for t in sorted(TASKS.values(), key=lambda t: t.name):
        kinds.setdefault(t.kind, []).append(t.name)
    listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items() if v)
    return f"{listed}; or retrieval:DIR, or a task config .yaml"


def task_kind(name: str) -> str:
    return get_task(name).kind


def check_task(name: str, data_dir: str | Path | None) -> dict[str, str]:
    """One-line error for an unknown task or one whose data is missing (no model needed); returns
    the identity of the data the task reads (name -> content hash, for the cell cache)."""
    return get_task(name).check(data_dir)


def item_hits(task: str, metric: str, details: dict[str, Any]) -> dict[Any, float] | None:
    """Per-question outcomes (1 right, 0 wrong) of a finished task, keyed by question, read from its
    saved details by the task's own ``hits``; None where the task keeps no per-question record
    (perplexity, retrieval, fidelity, task configs). Two runs on the same seeded questions then
    compare pairwise, whose standard error is far below that of two independent scores."""
    t = TASKS.get(task) if task in TASKS else None
    return t.hits(metric, details) if t is not None and t.hits is not None else None


_DEFAULT_OPTIONS = TaskOptions()


def run_task(lm: LoadedModel, name: str, data_dir: str | Path | None, options: TaskOptions = _DEFAULT_OPTIONS,
             modification: Any = None) -> TaskScore:
    """Score one task on the dense model (``modification=None``) or a modified one."""
    task = get_task(name)
    task.check(data_dir)
    return task.evaluate(lm, task, data_dir, options, modification)
