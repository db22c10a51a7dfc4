"""Two runs of a task over the same items, paired item by item: the dense model against a
modification of itself, or a base against a separately loaded candidate (``eval --candidate``).

A candidate is scored in sequential mode: every task runs on the base first, its scores are kept,
the base's weights are released, and only then is the candidate loaded, so one model is in memory
at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_weights
from prunelens.tasks.base import FIDELITY, TaskOptions, TaskScore
from prunelens.tasks.paired import PairedTest, paired_test
from prunelens.tasks.registry import get_task, run_task

T = TypeVar("T")


@dataclass(frozen=True)
class ItemChanges:
    """The paired test of two runs and the items that changed: ``lost`` were right for the first
    run (dense, or the base) and wrong for the second, ``gained`` the reverse; ids in item order."""

    test: PairedTest
    lost: list[Any]
    gained: list[Any]

    def line(self, label: str, shown: int = 5) -> str:
        def ids(xs: list[Any]) -> str:
            more = f", … ({len(xs) - shown} more)" if len(xs) > shown else ""
            return ", ".join(map(str, xs[:shown])) + more

        lost = f"lost {len(self.lost)} (right for dense, wrong for {label})"
        lost += f": {ids(self.lost)}" if self.lost else ""
        return f"{lost}; gained {len(self.gained)}" + (f": {ids(self.gained)}" if self.gained else "")


def item_changes(task: str, first: TaskScore, second: TaskScore) -> ItemChanges | None:
    """The paired test and changed items where the task (a config too) keeps per-item outcomes."""
    hits = get_task(task).hits
    if hits is None:
        return None
    a, b = hits(first.metric, first.details), hits(second.metric, second.details)
    if not a or b is None or a.keys() != b.keys():
        return None
    return ItemChanges(paired_test(a, b), [k for k in a if a[k] > 0.5 >= b[k]],
                       [k for k in a if b[k] > 0.5 >= a[k]])


def check_candidate_tasks(tasks: Sequence[str]) -> None:
    """Before any model loads: the fidelity task compares a model's generations with those of its
    own modified view, which a separately loaded candidate is not."""
    for t in tasks:
        if get_task(t).kind == FIDELITY:
            raise PrunelensError(f"task '{t}' compares a model with a view of itself and cannot score a --candidate; "
                                 "use 'prunelens analyze --candidate' for its generations' divergence")


def score_candidate(base: LoadedModel, tasks: Sequence[str], data_dir: str | Path | None, o: TaskOptions,
                    load: Callable[[LoadedModel], T]) -> tuple[list[TaskScore], T]:
    """Sequential mode: every task on ``base``, then the base's weights released, then the
    candidate loaded (``load`` gets the weight-free base, for its tokenizer checks). Returns the
    base's scores and the candidate, which the caller scores task by task (and prints as it goes)."""
    dense = [run_task(base, t, data_dir, o) for t in tasks]
    return dense, load(release_weights(base))
