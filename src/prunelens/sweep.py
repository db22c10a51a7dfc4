"""Pruning-amount sweeps over tasks: the paper's Figure 1 / Table 1 for any model and method.

Every (amount, task) cell is written to ``cells/`` as soon as it finishes (atomically), so a sweep
that is killed and started again with the same command redoes at most the cell that was running.
Settings that change a cell's meaning (model, method, limit, seed, generation settings...) are
recorded in ``sweep.json``; resuming with different ones is refused rather than mixing results.
A failed cell is never written: the error stops the sweep and the finished cells stay cached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import PrunelensError
from .models import LoadedModel
from .runs import write_json
from .tasks.registry import TaskOptions, check_task, run_task, task_kind

DROP_METHODS = {"attn-drop": "attn", "mlp-drop": "mlp", "block-drop": "block"}
SPARSE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq")
METHODS = (*DROP_METHODS, *SPARSE_METHODS, *QUANT_METHODS)
SCHEMA = "prunelens.sweep/1"


def parse_amounts(method: str, text: str) -> list[str]:
    """Amount strings for a method; "0" (or "dense") is the unmodified model.

    Layer drops: counts (``0,2,4``). Sparsity: ratios or N:M (``0,0.3,0.5,2:4``). Quantisation:
    bit widths with an optional group (``0,8,4,w4g128``).
    """
    if method not in METHODS:
        raise PrunelensError(f"unknown sweep method '{method}'; methods: {', '.join(METHODS)}")
    amounts = [a.strip() for a in text.split(",") if a.strip()]
    if not amounts:
        raise PrunelensError("--amounts is empty")
    if len(set(amounts)) != len(amounts):
        raise PrunelensError(f"--amounts has duplicates: {text}")
    for a in amounts:
        if a in ("0", "dense"):
            continue
        spec_for(method, a)  # raises a one-line error for a malformed amount
    return amounts


def spec_for(method: str, amount: str) -> str | None:
    """The ``--drop``/``--prune``/``--quant`` spec of one amount (None for dense)."""
    from . import api

    if amount in ("0", "dense"):
        return None
    if method in DROP_METHODS:
        if not amount.isdigit():
            raise PrunelensError(f"amount '{amount}' for {method} must be a whole number of layers")
        spec = f"{DROP_METHODS[method]}:{amount}"
        api.parse_drops([spec])
        return spec
    if method in QUANT_METHODS:
        spec = f"{method}:{amount if amount.startswith('w') else 'w' + amount}"
    else:
        spec = f"{method}:{amount}"
    api.weight_method(spec)
    return spec


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

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("amounts", "tasks", "data_dir"):
            d.pop(k)
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


def _check_resume(out: Path, spec: SweepSpec, overwrite: bool) -> None:
    manifest = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise PrunelensError(f"'{out}' exists and is not a directory")
    if manifest.is_file() and not overwrite:
        try:
            old = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise PrunelensError(f"'{manifest}' is not valid JSON") from None
        if old.get("identity") != json.loads(json.dumps(spec.identity())):
            raise PrunelensError(f"'{out}' holds a sweep with different settings; use another --out or "
                                 "--overwrite")
    elif out.is_dir() and any(out.iterdir()) and not manifest.is_file():
        raise PrunelensError(f"'{out}' is not empty and is not a prunelens sweep directory")


def _build(lm: LoadedModel, spec: SweepSpec, amount: str, progress: bool):
    from .api import build_modification

    s = spec_for(spec.method, amount)
    if s is None:
        return None
    return build_modification(lm, s, spec.calib, spec.calib_samples, spec.calib_len, spec.options.seed,
                              spec.importance, progress)


def run_sweep(spec: SweepSpec, out_dir: str | Path, lm: LoadedModel | Callable[[], LoadedModel] | None = None,
              overwrite: bool = False, progress: bool = True) -> SweepResult:
    """Fill every missing (amount, task) cell, then write the tables, the figure and the report.

    ``lm`` is a loaded model or a function loading it (called only if some cell is missing).
    """
    import shutil

    from .api import footprint
    from .models import load_model
    from .sweep_report import write_outputs

    out = Path(out_dir)
    for t in spec.tasks:
        check_task(t, spec.data_dir)
    for a in spec.amounts:
        if a not in ("0", "dense"):
            spec_for(spec.method, a)
    _check_resume(out, spec, overwrite)
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", {"schema": SCHEMA, "identity": spec.identity(), "model": spec.model,
                                    "method": spec.method, "amounts": list(spec.amounts),
                                    "tasks": list(spec.tasks), "data_dir": spec.data_dir})
    todo = [(a, t) for a in spec.amounts for t in spec.tasks if not cell_path(out, a, t).is_file()]
    total = len(spec.amounts) * len(spec.tasks)
    bar = tqdm(total=total, initial=total - len(todo), desc="sweep cells", unit="cell", disable=not progress,
               position=0)
    if todo:
        lm = lm() if callable(lm) else (lm or load_model(spec.model))
    current: tuple[str, Any, float, dict[str, float]] | None = None
    for amount, task in todo:
        if current is None or current[0] != amount:
            current = None  # release the previous amount's patched weights before building the next
            t0 = time.perf_counter()
            mod = _build(lm, spec, amount, progress)
            fp = footprint(lm, mod) if mod is not None else {"removed_share": 0.0, "bits_per_weight": 16.0,
                                                                 "memory_vs_bf16": 1.0}
            current = (amount, mod, time.perf_counter() - t0, fp)
        _, mod, build_s, fp = current
        bar.set_postfix_str(f"{amount} {task}")
        t0 = time.perf_counter()
        score = run_task(lm, task, spec.data_dir, spec.options, mod)
        cell = {"amount": amount, "task": task, "kind": score.kind, "method": spec.method,
                "modification": mod.to_dict() if mod is not None else {"label": "dense"},
                "label": mod.label() if mod is not None else "dense", **score.to_dict(),
                "footprint": fp, "seconds": time.perf_counter() - t0, "build_seconds": build_s,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(cell_path(out, amount, task), cell)
        bar.update(1)
    bar.close()
    cells = [load_cell(cell_path(out, a, t)) for a in spec.amounts for t in spec.tasks]
    result = SweepResult(spec, cells, out)
    write_outputs(result)
    return result


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


def kinds_of(tasks: Sequence[str]) -> dict[str, str]:
    return {t: task_kind(t) for t in tasks}
