"""Pruning-amount sweeps over tasks: the paper's Figure 1 / Table 1 for any model and method.

Every (amount, task) cell is written to ``cells/`` as soon as it finishes (atomically), so a sweep
that is killed and started again with the same command redoes at most the cell that was running.
Settings that change a cell's meaning (model, method, limit, seed, generation settings...) are
recorded in ``sweep.json``; resuming with different ones is refused rather than mixing results.
A failed cell is never written: the error stops the sweep and the finished cells stay cached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.analyses.cells import (
    CellCache,
    claim,
    claimed_by,
    data_hashes,
    environment,
    first_difference,
    in_shard,
    model_fingerprint,
    parse_shard,
    release,
)
from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.prune.base import REGISTRY, Method, methods
from prunelens.runs import read_json, write_json
from prunelens.tasks.registry import TaskOptions, check_task, run_task, task_kind

# the older sweep names of the drop kinds, still accepted
ALIASES = {"attn-drop": "attn", "mlp-drop": "mlp", "block-drop": "block"}


def sweep_method(name: str) -> Method:
    """The registered method a sweep's ``--method`` names (``attn``, ``wanda``, ``gptq``, …)."""
    found = REGISTRY.get(ALIASES.get(name, name)) if methods() else None
    if found is None:
        names = [*ALIASES, *(m.name for m in methods())]
        raise PrunelensError(f"unknown sweep method '{name}'; methods: {', '.join(names)}")
    return found


SCHEMA = "prunelens.sweep/1"


def parse_amounts(method: str, text: str) -> list[str]:
    """Amount strings for a method; "0" (or "dense") is the unmodified model.

    Layer drops: counts (``0,2,4``). Sparsity: ratios or N:M (``0,0.3,0.5,2:4``). Quantisation:
    bit widths with an optional group (``0,8,4,w4g128``). An amount may carry further recipe steps
    after ``+`` (``8+repair:scale``), so a repaired model sits beside the same pruning unrepaired.
    """
    sweep_method(method)
    amounts = [a.strip() for a in text.split(",") if a.strip()]
    if not amounts:
        raise PrunelensError("--amounts is empty")
    if len(set(amounts)) != len(amounts):
        raise PrunelensError(f"--amounts has duplicates: {text}")
    for a in amounts:
        spec_for(method, a)  # raises a one-line error for a malformed amount
    return amounts


def is_dense(amount: str) -> bool:
    """Amount 0 (or ``dense``) is the unpruned model, whatever the method."""
    return amount in ("0", "dense")


def spec_for(method: str, amount: str) -> str | None:
    """The recipe spec of one amount (None for dense), as the method itself maps amounts; steps
    after a ``+`` are appended as they are (the recipe checks them)."""
    if is_dense(amount):
        return None
    head, plus, steps = amount.partition("+")
    spec = sweep_method(method).amount_spec(head.strip())
    if not plus:
        return spec
    if not steps.strip():
        raise PrunelensError(f"amount '{amount}' has no recipe step after '+'")
    from prunelens.prune.recipe import Recipe

    return "+".join(Recipe.parse(spec, steps).specs)


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


def _build(lm: LoadedModel, spec: SweepSpec, amount: str, progress: bool):
    from prunelens.prune.recipe import Calibration, build

    s = spec_for(spec.method, amount)
    if s is None:
        return None
    cal = Calibration(spec.calib, spec.calib_samples, spec.calib_len, spec.options.seed, spec.importance)
    return build(lm, s, cal, progress=progress)


def run_sweep(spec: SweepSpec, out_dir: str | Path, lm: LoadedModel | Callable[[], LoadedModel] | None = None,
              overwrite: bool = False, progress: bool = True, shard: tuple[int, int] | None = None) -> SweepResult:
    """Fill every missing (amount, task) cell, then write the tables, the figure and the report.

    ``lm`` is a loaded model or a function loading it (called only if some cell is missing).
    ``shard=(K, N)`` takes only cells K, K+N, … of the grid; cells another live worker has claimed
    are skipped, so concurrent workers on one directory compute every cell once. The outputs then
    cover the cells finished so far; ``prunelens report DIR`` rebuilds them once all are in.
    """
    from prunelens.analyses.sweep_view import write_outputs
    from prunelens.model.loading import load_model
    from prunelens.prune.recipe import Recipe, footprint

    out = Path(out_dir)
    for a in spec.amounts:
        spec_for(spec.method, a)
    if overwrite and shard is not None:
        raise PrunelensError("--overwrite with --shard would let one shard delete the others' cells; "
                             "clear the directory once before starting the shards")
    # data content per task (file name or Hub dataset -> hash): a resumed sweep may add tasks, never
    # swap a task's data
    data = {t: check_task(t, spec.data_dir) for t in spec.tasks}
    cache = CellCache(out, "sweep.json", "sweep", spec.identity(), overwrite)
    old = read_json(cache.manifest).get("data", {}) if cache.manifest.is_file() and not overwrite else {}
    for t, hashes in data.items():
        # an empty identity was HumanEval's packaged copy before it was hashed
        if old.get(t) and old[t] != hashes:
            raise PrunelensError(f"'{out}' holds a sweep with different settings: its {t} cells were computed "
                                 f"on other data ({first_difference(old[t], hashes)}); use another --out or "
                                 "--overwrite")
    grid = [(a, t) for a in spec.amounts for t in spec.tasks]
    mine = [c for i, c in enumerate(grid) if in_shard(i, shard)]
    todo = [(a, t) for a, t in mine if overwrite or not cell_path(out, a, t).is_file()]
    if todo:  # the model loads, and every amount fits it, before anything is written
        lm = lm() if callable(lm) else (lm or load_model(spec.model))
        if hasattr(lm, "adapter"):
            for a in spec.amounts:
                s = spec_for(spec.method, a)
                if s is not None:
                    Recipe.parse(s).check(lm.adapter.n_layers)
    cache.open(schema=SCHEMA, model=spec.model, method=spec.method, amounts=list(spec.amounts),
               tasks=list(spec.tasks), data_dir=spec.data_dir, data={**old, **data})
    clock = _Clock(out, grid)
    if progress and todo:
        print(f"sweep: {len(todo)} of {len(grid)} cells to compute{clock.eta(todo)}", file=sys.stderr)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="sweep cells", unit="cell",
               disable=not progress, position=0)
    current: tuple[str, Any, float, dict[str, float]] | None = None
    skipped: list[str] = []
    for n, (amount, task) in enumerate(todo):
        path = cell_path(out, amount, task)
        if not claim(path):
            skipped.append(f"{amount}/{task}")
            bar.update(1)
            continue
        try:
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
            write_json(path, cell)
        finally:
            release(path)
        clock.done(cell)
        bar.update(1)
        if progress and n + 1 < len(todo):
            bar.write(f"sweep: {amount}/{task} took {cell['seconds']:.0f} s; "
                      f"{len(todo) - n - 1} cells left{clock.eta(todo[n + 1:])}")
    bar.close()
    cells = [load_cell(cell_path(out, a, t)) for a, t in grid if cell_path(out, a, t).is_file()]
    result = SweepResult(spec, cells, out)
    if cells:
        write_outputs(result)
    if progress and len(cells) < len(grid):
        held = [f"{a}/{t} ({w})" for a, t in grid if (w := claimed_by(cell_path(out, a, t)))]
        print(f"sweep: {len(cells)} of {len(grid)} cells finished"
              + (f"; held by other workers: {', '.join(held)}" if held else "")
              + (f"; skipped (claimed elsewhere): {', '.join(skipped)}" if skipped else "")
              + f"; `prunelens report {out}` rebuilds the outputs once all are in", file=sys.stderr)
    return result


class _Clock:
    """Estimates the time of the cells left from those done (the same task's cells where there are
    some: a generative task's cells take far longer than a multiple-choice one's)."""

    def __init__(self, out: Path, grid: Sequence[tuple[str, str]]) -> None:
        self.seconds: dict[str, list[float]] = {}
        for a, t in grid:
            p = cell_path(out, a, t)
            if p.is_file():
                with contextlib.suppress(PrunelensError):
                    self.done(load_cell(p))

    def done(self, cell: dict[str, Any]) -> None:
        if isinstance(cell.get("seconds"), (int, float)):
            self.seconds.setdefault(cell["task"], []).append(float(cell["seconds"]))

    def eta(self, left: Sequence[tuple[str, str]]) -> str:
        every = [s for v in self.seconds.values() for s in v]
        if not every:
            return ""
        mean = {t: sum(v) / len(v) for t, v in self.seconds.items()}
        fallback = sum(every) / len(every)
        total = sum(mean.get(t, fallback) for _, t in left)
        h, m = divmod(int(total / 60 + 0.5), 60)
        when = f"{h} h {m:02d} min" if h else f"{m} min"
        return f", about {when} by the cells done so far"


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


# --- the subcommand ------------------------------------------------------------------------------


def _arguments(sw: argparse.ArgumentParser) -> None:
    options.add_model_args(sw)
    sw.add_argument("--method", "--prune", required=True, dest="method", metavar="METHOD",
                    help="a registered method: attn, mlp, block (amounts = layer counts; attn-drop etc. also "
                         "accepted), magnitude, wanda, sparsegpt (ratios or N:M), rtn, gptq (bits, e.g. 4 or "
                         "w4g128)")
    sw.add_argument("--amounts", required=True,
                    help="comma-separated, 0 = dense (e.g. 0,2,4,6,8); for drops also fixed layers "
                         "(@23-26, @3;7); steps after + are added to that amount's recipe (8+repair:scale)")
    options.add_calibration_args(sw)
    options.add_task_args(sw)
    sw.add_argument("--out", help="sweep directory (default runs/sweep-<model>-<method>); rerun to resume")
    sw.add_argument("--overwrite", action="store_true", help="discard cached cells and start again")
    sw.add_argument("--shard", metavar="K/N", help="take every N-th cell of the grid, starting at the K-th "
                    "(1-based), e.g. one job of a SLURM array per shard with --out on shared storage; "
                    "concurrent shards never compute a cell twice; `prunelens report DIR` merges them")


def _run(args: argparse.Namespace) -> int:
    from prunelens.analyses.sweep_view import markdown_table, markdown_table1, reading

    amounts = parse_amounts(args.method, args.amounts)
    shard = parse_shard(args.shard)
    tasks, opts = options.task_setup(args)
    options.calibration(args)
    spec = SweepSpec(args.model, args.method, tuple(amounts), tuple(tasks), args.data_dir, opts,
                     args.importance, args.calib, args.calib_samples, args.calib_len, args.device, args.dtype)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{Path(args.model).name}-{args.method}")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{safe}"
    res = run_sweep(spec, out, lambda: options.load(args), overwrite=args.overwrite, progress=not args.quiet,
                    shard=shard)
    if not res.cells:
        print(f"sweep: no cell finished yet in {out}")
        return 0
    print(markdown_table(res))
    print(markdown_table1(res))
    for line in reading(res):
        print(line)
    print(f"report: {out / 'report.html'}")
    return 0


def load_sweep(d: Path) -> SweepResult:
    """A saved sweep from its manifest and finished cells (nothing recomputed)."""
    m = read_json(d / "sweep.json")
    ident = m["identity"]
    opts = {**ident["options"], "prompts": tuple(ident["options"]["prompts"] or ()) or None}
    spec = SweepSpec(m["model"], m["method"], tuple(m["amounts"]), tuple(m["tasks"]), m["data_dir"],
                     TaskOptions(**opts), ident["importance"], ident["calib"], ident["calib_samples"],
                     ident["calib_len"], ident.get("device", "cpu"), ident.get("dtype", "float32"))
    cells = [load_cell(cell_path(d, a, t)) for a in spec.amounts for t in spec.tasks
             if cell_path(d, a, t).is_file()]
    return SweepResult(spec, cells, d)


def _rebuild(d: Path) -> str:
    from prunelens.analyses.sweep_view import write_outputs

    write_outputs(load_sweep(d))
    return (d / "report.html").read_text(encoding="utf-8")


register(Analysis("sweep", "scores over pruning amounts: Figure-1 plot, tables and report (resumable)",
                  _arguments, _run, schema=SCHEMA, marker="sweep.json", rebuild=_rebuild))
