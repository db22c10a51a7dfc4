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
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prunelens import options
from prunelens.analyses.base import Analysis, register
from prunelens.analyses.cells import (
    CellCache,
    claim,
    claimed_by,
    clear_failure,
    first_difference,
    in_shard,
    parse_shard,
    record_failure,
    release,
    shard_from_slurm,
)
from prunelens.analyses.launch import add_launch_args, launch
from prunelens.analyses.sweep_data import (  # noqa: F401  (SweepSpec, SweepResult, is_dense: public here too)
    SCHEMA,
    SweepResult,
    SweepSpec,
    cell_path,
    finished_cells,
    incomplete,
    is_dense,
    load_cell,
    load_manifest,
    relative_drop,
)
from prunelens.analyses.sweep_view import markdown_table, markdown_table1, reading, write_outputs
from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.prune.base import METHODS, Method, methods
from prunelens.prune.checkpoint import load_model
from prunelens.prune.recipe import Calibration, Recipe, build, footprint
from prunelens.registry import did_you_mean
from prunelens.runs import read_json, write_json
from prunelens.tasks.registry import check_task, run_task, task_kind

# the older sweep names of the drop kinds, still accepted
ALIASES = {"attn-drop": "attn", "mlp-drop": "mlp", "block-drop": "block"}


def sweep_method(name: str) -> Method:
    """The registered method a sweep's ``--method`` names (``attn``, ``wanda``, ``gptq``, …)."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        names = [*ALIASES, *(m.name for m in methods())]
        raise PrunelensError(f"unknown sweep method '{name}'{did_you_mean(name, names)}; methods: {', '.join(names)}")
    return METHODS[key]


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


@functools.cache
def recipe_for(method: str, amount: str) -> Recipe | None:
    """The recipe of one amount (None for dense), as the method itself maps amounts; steps after a
    ``+`` are appended as they are (the recipe checks them). Parsed once per amount: checking the
    amounts, checking them against the model and building each cell reuse it."""
    if is_dense(amount):
        return None
    head, plus, steps = amount.partition("+")
    step = sweep_method(method).amount_step(head.strip())
    if not plus:
        return Recipe((step,))
    if not steps.strip():
        raise PrunelensError(f"amount '{amount}' has no recipe step after '+'")
    return Recipe.parse(step, steps)


def spec_for(method: str, amount: str) -> str | None:
    """The recipe spec of one amount as text (None for dense)."""
    recipe = recipe_for(method, amount)
    return None if recipe is None else recipe.label()


def _build(lm: LoadedModel, spec: SweepSpec, amount: str, progress: bool):
    s = recipe_for(spec.method, amount)
    if s is None:
        return None
    cal = Calibration(spec.calib, spec.calib_samples, spec.calib_len, spec.options.seed, spec.importance)
    return build(lm, s, cal, progress=progress)


def run_sweep(spec: SweepSpec, out_dir: str | Path, lm: LoadedModel | Callable[[], LoadedModel] | None = None,
              overwrite: bool = False, progress: bool = True, shard: tuple[int, int] | None = None,
              command: list[str] | None = None) -> SweepResult:
    """Fill every missing (amount, task) cell, then write the tables, the figure and the report.

    ``lm`` is a loaded model or a function loading it (called only if some cell is missing).
    ``shard=(K, N)`` takes only cells K, K+N, … of the grid; cells another live worker has claimed
    are skipped, so concurrent workers on one directory compute every cell once. The outputs then
    cover the cells finished so far; ``prunelens report DIR`` rebuilds them once all are in.
    ``command`` (the CLI's arguments) is recorded so ``report`` can say how to rerun missing cells.
    """
    out = Path(out_dir)
    if overwrite and shard is not None:
        raise PrunelensError("--overwrite with --shard would let one shard delete the others' cells; "
                             "clear the directory once before starting the shards")
    ident, grid, opened = plan_sweep(spec, out, overwrite, command)
    mine = [c for i, c in enumerate(grid) if in_shard(i, shard)]
    todo = [(a, t) for a, t in mine if overwrite or not cell_path(out, a, t).is_file()]
    if todo:  # the model loads, and every amount fits it, before anything is written
        lm = _load_checked(spec, lm)
    opened()
    skipped = _compute_cells(spec, out, lm, grid, len(mine), todo, progress, ident)
    cells = finished_cells(out, spec, ident)
    result = SweepResult(spec, cells, out, saved_identity=ident)
    if cells:
        write_outputs(result)
    if progress and len(cells) < len(grid):
        held = [f"{a}/{t} ({w})" for a, t in grid if (w := claimed_by(cell_path(out, a, t)))]
        print(f"sweep: {len(cells)} of {len(grid)} cells finished"
              + (f"; held by other workers: {', '.join(held)}" if held else "")
              + (f"; skipped (claimed elsewhere): {', '.join(skipped)}" if skipped else "")
              + f"; `prunelens report {out}` rebuilds the outputs once all are in", file=sys.stderr)
    return result


def plan_sweep(spec: SweepSpec, out: Path, overwrite: bool = False, command: list[str] | None = None
               ) -> tuple[dict[str, Any], list[tuple[str, str]], Callable[[], None]]:
    """The sweep's identity and grid, checked against what ``out`` holds, and a function writing
    its manifest (called once the model is known to fit, or before launching jobs)."""
    for a in spec.amounts:
        spec_for(spec.method, a)
    ident = spec.identity()  # hashes the calibration file and reads the model: once per run
    cache, data, old = _open_cache(spec, ident, out, overwrite)
    grid = [(a, t) for a in spec.amounts for t in spec.tasks]
    if command is None and cache.manifest.is_file() and not overwrite:
        command = read_json(cache.manifest).get("command")

    def opened() -> None:
        cache.open(schema=SCHEMA, model=spec.model, method=spec.method, amounts=list(spec.amounts),
                   tasks=list(spec.tasks), data_dir=spec.data_dir, data={**old, **data}, command=command)
    return cache.identity, grid, opened


def _open_cache(spec: SweepSpec, ident: dict[str, Any], out: Path, overwrite: bool
                ) -> tuple[CellCache, dict[str, Any], dict[str, Any]]:
    """The sweep's cell cache, each task's data hashes now and those its manifest recorded; a task
    whose data changed is refused (a resumed sweep may add tasks, never swap a task's data)."""
    # data content per task (file name or Hub dataset -> hash)
    data = {t: check_task(t, spec.data_dir) for t in spec.tasks}
    cache = CellCache(out, "sweep.json", "sweep", ident, overwrite)
    old = read_json(cache.manifest).get("data", {}) if cache.manifest.is_file() and not overwrite else {}
    for t, hashes in data.items():
        # an empty identity was HumanEval's packaged copy before it was hashed
        if old.get(t) and old[t] != hashes:
            raise PrunelensError(f"'{out}' holds a sweep with different settings: its {t} cells were computed "
                                 f"on other data ({first_difference(old[t], hashes)}); use another --out or "
                                 "--overwrite")
    return cache, data, old


def _load_checked(spec: SweepSpec, lm: LoadedModel | Callable[[], LoadedModel] | None) -> Any:
    """The model (loaded now if it was not given), every amount checked to fit it."""
    lm = lm() if callable(lm) else (lm or load_model(spec.model))
    if hasattr(lm, "adapter"):
        for a in spec.amounts:
            r = recipe_for(spec.method, a)
            if r is not None:
                r.check(lm.adapter.n_layers)
    return lm


def _compute_cells(spec: SweepSpec, out: Path, lm: Any, grid: list[tuple[str, str]], n_mine: int,
                   todo: list[tuple[str, str]], progress: bool, ident: dict[str, Any]) -> list[str]:
    """Compute and write the ``todo`` cells in order (one build per amount); returns the cells
    skipped because another worker had claimed them."""
    clock = _Clock(out, grid)
    if progress and todo:
        print(f"sweep: {len(todo)} of {len(grid)} cells to compute{clock.eta(todo)}", file=sys.stderr)
    bar = tqdm(total=n_mine, initial=n_mine - len(todo), desc="sweep cells", unit="cell",
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
                current = _built(spec, lm, amount, progress)
            bar.set_postfix_str(f"{amount} {task}")
            cell = {**_cell(spec, lm, amount, task, current), "settings": ident}
            write_json(path, cell)
            clear_failure(path)
        except Exception as e:  # the error stays in the run folder for `report`; the sweep stops
            record_failure(path, e)
            raise
        finally:
            release(path)
        clock.done(cell)
        bar.update(1)
        if progress and n + 1 < len(todo):
            bar.write(f"sweep: {amount}/{task} took {cell['seconds']:.0f} s; "
                      f"{len(todo) - n - 1} cells left{clock.eta(todo[n + 1:])}")
    bar.close()
    return skipped


def _built(spec: SweepSpec, lm: Any, amount: str, progress: bool) -> tuple[str, Any, float, dict[str, float]]:
    """One amount's modification, with the seconds it took to build and its footprint."""
    t0 = time.perf_counter()
    mod = _build(lm, spec, amount, progress)
    fp = footprint(lm, mod) if mod is not None else {"removed_share": 0.0, "bits_per_weight": 16.0,
                                                         "memory_vs_bf16": 1.0}
    return amount, mod, time.perf_counter() - t0, fp


def _cell(spec: SweepSpec, lm: Any, amount: str, task: str,
          current: tuple[str, Any, float, dict[str, float]]) -> dict[str, Any]:
    """One (amount, task) cell: the task's score with the amount's modification, and how it was made."""
    _, mod, build_s, fp = current
    t0 = time.perf_counter()
    score = run_task(lm, task, spec.data_dir, spec.options, mod)
    return {"amount": amount, "task": task, "kind": score.kind, "method": spec.method,
            "modification": mod.to_dict() if mod is not None else {"label": "dense"},
            "label": mod.label() if mod is not None else "dense", **score.to_dict(),
            "footprint": fp, "seconds": time.perf_counter() - t0, "build_seconds": build_s,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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
                    "(1-based), e.g. one job of a Slurm array per shard with --out on shared storage (inside "
                    "an array job the default comes from SLURM_ARRAY_TASK_ID/COUNT); concurrent shards never "
                    "compute a cell twice; `prunelens report DIR` merges them")
    add_launch_args(sw)


def _shard(args: argparse.Namespace) -> tuple[int, int] | None:
    """``--shard``, else this job's share of a Slurm job array it runs in (said on the first line)."""
    if args.shard is not None or args.launch:
        return parse_shard(args.shard)
    shard = shard_from_slurm(os.environ)
    if shard is not None:
        print(f"sweep: shard {shard[0]}/{shard[1]} from the Slurm array (SLURM_ARRAY_TASK_ID="
              f"{os.environ['SLURM_ARRAY_TASK_ID']}); --shard K/N overrides it", file=sys.stderr)
    return shard


def _launch(args: argparse.Namespace, spec: SweepSpec, out: Path) -> int:
    """Submit the sweep's unfinished cells as one job array; local launches wait and merge."""
    if args.overwrite:
        raise PrunelensError("--overwrite with --launch would let jobs delete each other's cells; clear the "
                             "directory once before launching")
    command = list(args.argv)
    _, grid, opened = plan_sweep(spec, out, command=command)
    left = [i for i, (a, t) in enumerate(grid) if not cell_path(out, a, t).is_file()]
    if not left:
        print(f"sweep: every cell is finished; `prunelens report {out}` shows them")
        return 0
    n = args.jobs or (len(left) if args.launch == "slurm" else 2)
    if n < 1:
        raise PrunelensError(f"--jobs must be at least 1, got {n}")
    if n >= len(left):  # a job per cell: shard K of the grid is cell K
        shards = [f"{i + 1}/{len(grid)}" for i in left]
        how = "one cell each"
    else:  # fewer jobs than cells: every job walks the whole grid and claims the next free cell, so a
        # slow (generative) cell never leaves the other jobs idle as a fixed split would
        shards = ["1/1"] * n
        how = "each taking the next unclaimed cell"
    opened()
    print(f"sweep: {len(left)} of {len(grid)} cells to compute in {len(shards)} {args.launch} jobs ({how}); "
          f"logs in {out / 'launch'}", file=sys.stderr)
    job = launch(command, shards, args, out / "launch")
    print(f"submitted job {job.job_id} ({len(shards)} array tasks)")
    if args.launch == "slurm":
        print(f"when it ends: prunelens report {out}")
        return 0
    failed = job.wait()
    for line in failed:
        print(f"sweep: {line}", file=sys.stderr)
    res = load_sweep(out)
    if res.cells:
        write_outputs(res)
        print(markdown_table(res))
    lines = incomplete(out, res.spec, command)
    if lines:
        print("\n".join(lines), file=sys.stderr)
    print(f"report: {out / 'report.html'}")
    return 1 if lines or failed else 0


def _run(args: argparse.Namespace) -> int:
    amounts = parse_amounts(args.method, args.amounts)
    shard = _shard(args)
    tasks, opts = options.task_setup(args)
    options.calibration(args)
    spec = SweepSpec(args.model, args.method, tuple(amounts), tuple(tasks), args.data_dir, opts,
                     args.importance, args.calib, args.calib_samples, args.calib_len, args.device, args.dtype)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{Path(args.model).name}-{args.method}")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{safe}"
    if args.launch:
        return _launch(args, spec, out)
    res = run_sweep(spec, out, lambda: options.load(args), overwrite=args.overwrite, progress=not args.quiet,
                    shard=shard, command=list(getattr(args, "argv", None) or []) or None)
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
    return read_sweep(d)[0]


def read_sweep(d: Path) -> tuple[SweepResult, dict[str, Any]]:
    """``load_sweep`` and the manifest it was read from (sweep.json read and checked once); cells of
    other settings than the manifest's are refused."""
    manifest, spec = load_manifest(d / "sweep.json")
    return SweepResult(spec, finished_cells(d, spec, manifest["identity"]), d, manifest["identity"]), manifest


def _rebuild(d: Path) -> str:
    write_outputs(load_sweep(d))
    return (d / "report.html").read_text(encoding="utf-8")


def _unfinished(d: Path) -> list[str]:
    manifest, spec = load_manifest(d / "sweep.json")
    return incomplete(d, spec, manifest.get("command"))


ANALYSIS = register(Analysis("sweep", "scores over pruning amounts: Figure-1 plot, tables and report (resumable)",
                             _arguments, _run, schema=SCHEMA, marker="sweep.json", rebuild=_rebuild,
                             unfinished=_unfinished))
