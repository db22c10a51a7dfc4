"""What a sweep is and what it saves: its spec, its cells on disk and the numbers read from them.

Shared by the sweep itself (which computes cells) and its view (which draws saved cells), so the
view never imports the analysis.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunelens.analyses.cells import data_hashes, environment, model_fingerprint
from prunelens.errors import PrunelensError
from prunelens.tasks.registry import TaskOptions

SCHEMA = "prunelens.sweep/1"


def is_dense(amount: str) -> bool:
    """Amount 0 (or ``dense``) is the unpruned model, whatever the method."""
    return amount in ("0", "dense")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep measures; everything but ``amounts`` and ``tasks`` must match to resume."""

    model: str
    method: str
    amounts: tuple[str, ...]
    tasks: tuple[str, ...]
    data_dir: str | None
    options: TaskOptions = TaskOptions()
    importance: str = "cosine"
    calib: str | None = None
    calib_samples: int | None = None
    calib_len: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def identity(self) -> dict[str, Any]:
        """Everything but amounts, tasks and where the data lies; the data's content is checked per
        task (``data`` in the manifest), so tasks can be added on resume."""
        d = asdict(self)
        for k in ("amounts", "tasks", "data_dir"):
            d.pop(k)
        d["environment"] = environment(self.device, self.dtype)
        d["model_files"] = model_fingerprint(self.model)
        d["calib_files"] = data_hashes([self.calib] if self.calib else [])
        d["options"].pop("progress")
        d["options"]["prompts"] = list(d["options"]["prompts"]) if d["options"]["prompts"] else None
        return d


@dataclass
class SweepResult:
    spec: SweepSpec
    cells: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None


def cell_path(out: Path, amount: str, task: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{amount}--{task}")
    return out / "cells" / f"{safe}.json"


def load_cell(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrunelensError(f"cannot read sweep cell '{path}': {e}") from None


def relative_drop(dense: float | None, score: float | None, lower_is_better: bool = False) -> float | None:
    """(dense − score) / dense; undefined when the dense score is 0 (or missing).

    For perplexity (lower is better) 1/perplexity is the score: the drop is 1 − dense/perplexity,
    so "score relative to dense" is dense/perplexity in both cases.
    """
    if dense is None or score is None or dense == 0:
        return None
    if lower_is_better:
        return 1.0 - dense / score if score else None
    return (dense - score) / dense
