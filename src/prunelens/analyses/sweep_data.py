"""What a sweep is and what it saves: its spec, its cells on disk and the numbers read from them.

Shared by the sweep itself (which computes cells) and its view (which draws saved cells), so the
view never imports the analysis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from prunelens.analyses.base import read_checked
from prunelens.analyses.cells import (
    claim_path,
    claimed_by,
    data_hashes,
    environment,
    failure,
    first_difference,
    model_fingerprint,
)
from prunelens.analyses.launch import shell_line
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
    saved_identity: dict[str, Any] | None = None  # as the manifest recorded it, or as this run computed it once

    def identity(self) -> dict[str, Any]:
        """The settings the cells were computed with: the manifest's record where there is one (the
        calibration file or model may have moved since), else the spec's."""
        return self.saved_identity if self.saved_identity is not None else self.spec.identity()


def cell_path(out: Path, amount: str, task: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{amount}--{task}")
    return out / "cells" / f"{safe}.json"


def finished_cells(out: Path, spec: SweepSpec, identity: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The cells of ``spec``'s grid whose files are written, checked, in grid order. With the
    sweep's ``identity``, a cell recording other settings (another shard's run with other options,
    a copied file) is refused, naming the setting: such cells must never be merged into one table."""
    cells = [load_cell(cell_path(out, a, t)) for a in spec.amounts for t in spec.tasks
             if cell_path(out, a, t).is_file()]
    for c in cells if identity is not None else ():
        diff = c.get("settings") is not None and first_difference(identity, c["settings"], names=(
            "in sweep.json", "in the cell"))
        if diff:
            raise PrunelensError(f"'{out}': cell {c['amount']}/{c['task']} was computed with other settings than "
                                 f"the sweep ({diff}); not merging it: delete "
                                 f"{cell_path(out, c['amount'], c['task'])} and rerun, or keep it in another --out")
    return cells


def incomplete(out: Path, spec: SweepSpec, command: list[str] | None) -> list[str]:
    """Lines saying which cells of the grid are not finished, why (failed with its error, held by a
    worker, never run) and the command computing only them (finished cells are kept)."""
    lines = []
    for a in spec.amounts:
        for t in spec.tasks:
            p = cell_path(out, a, t)
            if p.is_file():
                continue
            why = failure(p)
            held = claimed_by(p)
            lines.append(f"  {a}/{t}: " + (
                f"failed: {why}" if why else
                f"claimed by {held} (if that job is gone, delete {claim_path(p)})" if held else
                "missing (never finished)"))
    if not lines:
        return []
    n = len(spec.amounts) * len(spec.tasks)
    rerun = (f"`{shell_line(command)}` computes only these (add --launch slurm to run them as a job "
             f"array)" if command else "rerun the sweep's command without --shard: it computes only these")
    return [f"{out}: {len(lines)} of {n} cells not finished:", *lines, rerun]


# what a sweep's manifest and cells must hold to be read back (by its view, ``report`` and ``families``)
MANIFEST_FIELDS = {"model": "str", "method": "str", "amounts[]": "str", "tasks[]": "str", "data_dir": "str?",
                   "identity.options": "dict", "identity.options.prompts[]?": "str", "identity.importance": "str",
                   "identity.calib": "str?", "identity.calib_samples": "int?", "identity.calib_len": "int?",
                   "identity.device?": "str", "identity.dtype?": "str", "data?": "dict"}
CELL_FIELDS = {"amount": "str", "task": "str", "kind": "str", "metric": "str", "label": "str", "score": "num",
               "stderr": "num?", "n": "int", "details?": "dict"}


def load_cell(path: Path) -> dict[str, Any]:
    """A saved cell, checked to hold what the views read (one line naming the file and field if not)."""
    return read_checked(path, CELL_FIELDS)


def load_manifest(path: Path) -> tuple[dict[str, Any], SweepSpec]:
    """A sweep's manifest (sweep.json), checked, and the spec it records."""
    m = read_checked(path, MANIFEST_FIELDS)
    ident = m["identity"]
    known = {f.name for f in fields(TaskOptions)}
    opts = {k: v for k, v in ident["options"].items() if k in known}
    opts["prompts"] = tuple(ident["options"].get("prompts") or ()) or None
    spec = SweepSpec(m["model"], m["method"], tuple(m["amounts"]), tuple(m["tasks"]), m["data_dir"],
                     TaskOptions(**opts), ident["importance"], ident["calib"], ident["calib_samples"],
                     ident["calib_len"], ident.get("device") or "cpu", ident.get("dtype") or "float32")
    return m, spec


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
