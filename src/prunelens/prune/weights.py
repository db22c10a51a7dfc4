"""Weight-level modifications (sparsification, fake quantisation) of the decoder's linear layers.

``sparsify`` runs one method over every targeted linear layer and returns a ``WeightPatch``: the new
weights by module path, a sparsity/bit report, and a zero-copy view that swaps them in and out
(``param.data`` pointer swaps), so the dense and the modified model coexist and plug into the same
analysis as layer drops. Calibrated methods (Wanda, SparseGPT, GPTQ) process blocks sequentially:
block i is calibrated on the outputs of the already-modified blocks before it, as the reference
implementations do, so the extra memory is one block's activations and Hessians.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.memory import release_freed_memory
from prunelens.model.placement import (
    is_dispatched,
    is_offloaded,
    offload_copy,
    onloaded,
    store_weight,
    swapped,
)
from prunelens.model.replay import forward_batches, recording_blocks, run_block
from prunelens.prune.base import METHODS, Method, Spec, method_for
from prunelens.prune.quant import QuantSpec, awq_quantize, gptq_quantize, rtn_quantize
from prunelens.prune.sparse import Pattern, magnitude_mask, nm_violations, sparsegpt_prune, wanda_mask

Grid = dict[str, torch.Tensor]  # a quantiser's grid of one layer: "scale" and "zero" per row and group


@dataclass(frozen=True)
class WeightMethod:
    """A parsed weight-method spec: the method's name with its sparsity pattern or quantisation."""

    name: str
    pattern: Pattern | None = None
    quant: QuantSpec | None = None

    def label(self) -> str:
        return f"{self.name}:{self.pattern.label() if self.pattern else self.quant.label()}"  # type: ignore[union-attr]

    @property
    def method(self) -> WeightMethodDef:
        return METHODS[self.name]  # type: ignore[return-value]


@dataclass(frozen=True)
class WeightMethodDef(Method):
    """A registered weight method: which statistics of its layers' inputs it needs (none, the
    per-column squared norm, the Hessian XᵀX, or a sample of the inputs) and the pure function that
    makes the new weight."""

    stats: str = "none"  # "none", "sq_norm", "hessian" or "inputs"
    # (W, method, statistics, record) -> new W; a quantiser puts the grid it used into ``record``
    transform: Callable[[torch.Tensor, WeightMethod, _Stats | None, Grid], torch.Tensor] | None = None

    def per_block(self, adapter: Adapter, method: WeightMethod, blocks: list[list[str]], hs: list[torch.Tensor],
                  kwargs: list[list[dict[str, Any]]], park: bool) -> tuple[list[WeightMethod], dict[str, Any]]:
        """The method each block is modified with, and what the report records of the choice: the
        same everywhere, unless a method sets layer-wise amounts from the calibration (OWL)."""
        return [method] * len(blocks), {}


@dataclass(frozen=True)
class SparsityMethod(WeightMethodDef):
    nm: bool = True  # takes N:M patterns as well as ratios

    def parse(self, spec: str) -> WeightMethod:
        """``wanda:0.5`` (unstructured ratio) or ``sparsegpt:2:4`` (N:M, N kept of every M)."""
        parts = spec.strip().split(":")
        try:
            if len(parts) == 2:
                return WeightMethod(self.name, Pattern(ratio=float(parts[1])))
            if len(parts) == 3:
                return WeightMethod(self.name, Pattern(n=int(parts[1]), m=int(parts[2])))
        except ValueError:
            pass
        raise PrunelensError(f"malformed pruning spec '{spec}': expected METHOD:RATIO or METHOD:N:M "
                             "(e.g. wanda:0.5, sparsegpt:2:4)")


_QUANT = re.compile(r"^w(\d+)(?:g(-?\d+))?(s?)$")


@dataclass(frozen=True)
class QuantMethod(WeightMethodDef):
    def parse(self, spec: str) -> WeightMethod:
        """``gptq:w4g128`` (4 bits, groups of 128 inputs), ``rtn:w8`` (per row), suffix ``s`` symmetric."""
        m = _QUANT.match(spec.strip().partition(":")[2])
        if not m:
            raise PrunelensError(f"malformed quantisation spec '{spec}': expected METHOD:wBITS[gGROUP][s] "
                                 "(e.g. gptq:w4g128, rtn:w8)")
        bits, group, sym = m.groups()
        return WeightMethod(self.name, quant=QuantSpec(int(bits), int(group) if group else -1, bool(sym)))

    def amount_step(self, amount: str) -> Spec:
        """A sweep amount is a bit width (``4`` means w4, per row) or a full ``w4g128``."""
        return super().amount_step(amount if amount.startswith("w") else "w" + amount)


# registered lazily by name in ``base.METHODS``
MAGNITUDE = SparsityMethod("magnitude", "prune", "smallest |W| removed per layer", "magnitude:0.5", False,
                           transform=lambda w, m, s, r: w.masked_fill(magnitude_mask(w, m.pattern), 0))
WANDA = SparsityMethod("wanda", "prune", "smallest |W|·‖X‖ removed per output row (Wanda)", "wanda:0.5", True,
                       stats="sq_norm", transform=lambda w, m, s, r: w.masked_fill(wanda_mask(w, s.acc, m.pattern), 0))
SPARSEGPT = SparsityMethod("sparsegpt", "prune", "OBS pruning with weight updates (SparseGPT)", "sparsegpt:2:4", True,
                           stats="hessian", transform=lambda w, m, s, r: sparsegpt_prune(w, s.hessian(), m.pattern))
RTN = QuantMethod("rtn", "quant", "round-to-nearest fake quantisation", "rtn:w8", False,
                  transform=lambda w, m, s, r: rtn_quantize(w, m.quant, r))
GPTQ = QuantMethod("gptq", "quant", "GPTQ fake quantisation with error feedback", "gptq:w4g128", True,
                   stats="hessian", transform=lambda w, m, s, r: gptq_quantize(w, s.hessian(), m.quant, record=r))
AWQ = QuantMethod("awq", "quant", "activation-aware channel scaling and clipping, then rounding (AWQ)",
                  "awq:w4g128", True, stats="inputs", transform=lambda w, m, s, r: awq_quantize(w, s.acc, m.quant))


def parse_weight_method(spec: str) -> WeightMethod:
    """Parse any registered weight-method spec (one-line error for anything else)."""
    method = method_for(spec)
    if not isinstance(method, WeightMethodDef):
        raise PrunelensError(f"'{spec}' is a layer drop, not a weight method")
    return method.parse(spec)


def _parse_family(spec: str, family: str, what: str) -> WeightMethod:
    method = method_for(spec)
    if method.family != family:
        names = ", ".join(m.name for m in METHODS.values() if m.family == family)
        raise PrunelensError(f"unknown {what} method '{method.name}'; choose from {names}")
    return method.parse(spec)


def parse_prune(spec: str) -> WeightMethod:
    """A sparsification spec (``wanda:0.5``, ``sparsegpt:2:4``)."""
    return _parse_family(spec, "prune", "pruning")


def parse_quant(spec: str) -> WeightMethod:
    """A quantisation spec (``gptq:w4g128``, ``rtn:w8``)."""
    return _parse_family(spec, "quant", "quantisation")


@dataclass
class WeightPatch:
    """New weights for some linear layers, with what produced them."""

    method: WeightMethod
    weights: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)
    # per layer, the quantisation grid (scale and zero point per row and group) the new weights lie
    # on, for writing them packed; empty for sparsity and AWQ (whose channel scales stay in W)
    grids: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    view_order: ClassVar[int] = 0

    def label(self) -> str:
        return self.method.label()

    def parts(self) -> list[WeightPatch]:
        return [self]

    def validate(self, n_layers: int) -> None:  # weights were made for this model
        return None

    def saved_meta(self) -> dict[str, Any]:
        """What a saved checkpoint records of this patch (not the per-layer rows)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("layers", "seconds_per_block")}

    def footprint(self, adapter: Adapter, share_removed: float) -> tuple[float, float | None]:
        """(share of the decoder's linear weights removed, bits per weight or None), given the
        share already removed by earlier parts."""
        r = self.report
        added = r.get("added_frac_of_dense_nonzeros", 0.0) * (1 - share_removed)
        bits = float(r["bits_per_weight"]) if "bits_per_weight" in r else None
        return share_removed + added, bits

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "weights", "label": self.label(), "method": self.method.name, **self.report}

    def view(self, adapter: Adapter) -> contextlib.AbstractContextManager[None]:
        """The new weights swapped in (pointer swaps; through the weight map for offloaded modules)."""
        return swapped(adapter.model, self.weights)


def _skips(pattern: str, block: int, path: str) -> bool:
    """The one reading of a --prune-skip pattern: a block index or a glob on the module path."""
    return pattern == str(block) or fnmatch.fnmatch(path, pattern)


def target_linears(adapter: Adapter, skip: Sequence[str] = ()) -> list[list[str]]:
    """Module paths of the linear layers to modify, per block (LM head and embeddings never)."""
    out = []
    for i in range(adapter.n_layers):
        paths = [f"{adapter.layer_path(i)}.{rel}" for rel in adapter.spec.linears]
        out.append([p for p in paths if _is_linear(adapter, p) and not any(_skips(pat, i, p) for pat in skip)])
    return out


def check_skip(adapter: Adapter, skip: Sequence[str]) -> None:
    """Every --prune-skip pattern leaves some linear layer alone: one that matches nothing (a typo, a
    layer past the last) would otherwise be accepted and the layer meant modified all the same."""
    linears = [(i, p) for i, paths in enumerate(target_linears(adapter)) for p in paths]
    for pat in skip:
        if not any(_skips(pat, i, p) for i, p in linears):
            raise PrunelensError(f"--prune-skip '{pat}' matches no linear layer of this model (layer numbers "
                                 f"0..{adapter.n_layers - 1}, or a glob on module paths such as "
                                 f"'{linears[0][1] if linears else adapter.layer_path(0)}')")


def _is_linear(adapter: Adapter, path: str) -> bool:
    """False for layers inside a dropped (swapped-out) sublayer or block."""
    try:
        return isinstance(adapter.model.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


# --- calibration plumbing ----------------------------------------------------------------------


def _block_inputs(adapter: Adapter, calib: torch.Tensor, batch_size: int, park: bool
                  ) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Hidden states entering block 0 per batch (on the CPU with ``park``), and the keyword arguments
    each block receives; each pass stops as the last block is entered."""
    with recording_blocks(adapter, stop_at=adapter.n_layers - 1) as calls:
        forward_batches(adapter, calib, batch_size)
    inputs = calls.inputs[0]
    if park:  # big models: activations wait on the CPU, not the compute device
        inputs = [x.to("cpu") for x in inputs]
    return inputs, calls.kwargs


INPUT_ROWS = 2048
"""Calibration rows a method that reads the inputs themselves (AWQ) keeps per linear layer."""


class _Stats:
    """Per-input statistics of a linear layer: ‖X_j‖² (Wanda), XᵀX (SparseGPT/GPTQ), or a sample of
    the input rows themselves, the first ``INPUT_ROWS`` (AWQ)."""

    def __init__(self, kind: str):
        self.kind, self.n, self.acc = kind, 0, None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        part = x if self.kind == "inputs" else x.T @ x if self.kind == "hessian" else (x * x).sum(0)
        self.merge(part, x.shape[0], copy=False)

    def merge(self, part: torch.Tensor, rows: int, copy: bool = True) -> None:
        """Fold in the statistics of ``rows`` more input rows (``part`` is copied unless ``copy`` is
        False: shared statistics must not be accumulated into); an input sample stops at ``INPUT_ROWS``."""
        if self.kind == "inputs":
            part = part[: max(0, INPUT_ROWS - (0 if self.acc is None else len(self.acc)))]
            self.acc = (part.clone() if copy else part) if self.acc is None else torch.cat([self.acc, part])
        else:
            self.acc = (part.clone() if copy else part) if self.acc is None else self.acc.add_(part)
        self.n += rows

    def hessian(self) -> torch.Tensor:
        """H = 2XᵀX/n, scaled in place (the accumulator is not used afterwards)."""
        return self.acc.mul_(2.0 / max(self.n, 1))  # type: ignore[union-attr]


def collect_stats(adapter: Adapter, layer: nn.Module, paths: list[str], hs: list[torch.Tensor],
                  kwargs: list[dict[str, Any]], kind: str, outputs: list[torch.Tensor] | None = None,
                  park: bool = False) -> dict[str, _Stats]:
    """Statistics of each listed linear layer's input while ``layer`` runs on every batch of ``hs``;
    with ``outputs``, the layer's outputs of that same pass are appended to it (as ``run_block``
    returns them), for a caller that needs both and would otherwise run the layer twice."""
    stats: dict[str, _Stats] = {}
    # q/k/v (and gate/up) receive one and the same input tensor: its statistics are computed
    # once. The memo holds the tensor itself, so that no later activation can be allocated at the
    # same address during this forward pass and be mistaken for it.
    memo: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
    handles = []
    for p in paths:
        stats[p] = _Stats(kind)

        def hook(module, args, p=p):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key not in memo:
                tmp = _Stats(kind)
                tmp.add(x)
                memo[key] = (x, tmp.acc, tmp.n)
            stats[p].merge(memo[key][1], memo[key][2])

        handles.append(adapter.model.get_submodule(p).register_forward_pre_hook(hook))
    try:
        for b, h in enumerate(hs):
            memo.clear()
            if outputs is None:
                layer(h, **kwargs[b])  # a device map's hook moves h
            else:
                outputs.append(run_block(layer, h, kwargs[b], park))
    finally:
        for hd in handles:
            hd.remove()
    return stats


def _modify(method: WeightMethod, w: torch.Tensor, stats: _Stats | None, record: dict[str, torch.Tensor]
            ) -> torch.Tensor:
    return method.method.transform(w, method, stats, record)  # type: ignore[misc]


def _check_columns(adapter: Adapter, method: WeightMethod, blocks: list[list[str]]) -> None:
    """Fail before any work on a layer whose input width the pattern or the groups do not divide."""
    for paths in blocks:
        for p in paths:
            cols = adapter.model.get_submodule(p).weight.shape[1]
            if method.pattern is not None:
                method.pattern.check_columns(cols, p)
            else:
                method.quant.check_columns(cols, p)  # type: ignore[union-attr]


def _new_weights(adapter: Adapter, paths: list[str], method: WeightMethod, stats: dict[str, _Stats],
                 rows: list[dict[str, Any]], grids: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One block's new weights by path (a report row appended for each, a quantiser's grid put in
    ``grids``); ``stats`` are used up."""
    new: dict[str, torch.Tensor] = {}
    for p in paths:
        mod = adapter.model.get_submodule(p)
        with onloaded(mod):  # an offloaded layer's weight is read on its execution device
            w = mod.weight.data
            record: dict[str, torch.Tensor] = {}
            new[p] = _modify(method, w, stats.pop(p, None), record).to(w.dtype)
            if record:
                grids[p] = {k: v.cpu() for k, v in record.items()}
            rows.append(_report_row(p, w, new[p], method))
        if is_offloaded(mod):  # kept where the dense weight waits (CPU or disk), not on the compute device
            new[p] = offload_copy(mod, new[p])
    return new


@torch.no_grad()  # not inference_mode: the new weights must stay usable for fine-tuning
def sparsify(
    adapter: Adapter,
    method: WeightMethod,
    calib: torch.Tensor | None = None,
    skip: Sequence[str] = (),
    batch_size: int = 4,
    inplace: bool = False,
    progress: bool = True,
) -> WeightPatch:
    """Apply ``method`` to every targeted linear layer; returns the patch and its report.

    With ``inplace`` the model keeps the new weights (no dense copy is held: use it to prune and
    save); otherwise the model stays dense and the patch holds the new weights.
    """
    check_skip(adapter, skip)
    blocks = target_linears(adapter, skip)
    _check_columns(adapter, method, blocks)
    calibrated = method.method.calibrated
    if calibrated and calib is None:
        raise PrunelensError(f"{method.name} needs calibration text")
    t0 = time.perf_counter()
    new: dict[str, torch.Tensor] = {}
    grids: dict[str, dict[str, torch.Tensor]] = {}
    rows: list[dict[str, Any]] = []
    timings: list[float] = []
    park = is_dispatched(adapter.model)
    per_block, allocation = [method] * len(blocks), {}
    if calibrated:
        hs, kwargs = _block_inputs(adapter, calib, batch_size, park)  # type: ignore[arg-type]
        per_block, allocation = method.method.per_block(adapter, method, blocks, hs, kwargs, park)
    bar = tqdm(total=len(blocks), desc=f"{method.label()}", unit="block", disable=not progress)
    for i, paths in enumerate(blocks):
        tb = time.perf_counter()
        layer = adapter.layers[i]
        bm = per_block[i]
        stats = collect_stats(adapter, layer, paths, hs, kwargs[i], bm.method.stats) if calibrated and paths else {}
        new.update(_new_weights(adapter, paths, bm, stats, rows, grids))
        if calibrated:  # the next block sees this block's modified outputs
            patch = WeightPatch(bm, {p: new[p] for p in paths})
            with patch.view(adapter):
                hs = [run_block(layer, h, kwargs[i][b], park) for b, h in enumerate(hs)]
        if inplace:  # write into the existing storage: memory stays at one model
            for p in paths:
                new[p] = store_weight(adapter.model.get_submodule(p), new[p])
        release_freed_memory()
        timings.append(time.perf_counter() - tb)
        bar.update(1)
    bar.close()
    patch = WeightPatch(method, new, grids=grids)
    patch.report = weight_report(adapter, rows, method)
    patch.report.update(allocation)
    patch.report.update(seconds=time.perf_counter() - t0, seconds_per_block=timings,
                        skip=list(skip), calibration_batches=len(hs) if calibrated else 0,
                        inplace=inplace)
    return patch


def _report_row(path: str, dense: torch.Tensor, new: torch.Tensor, method: WeightMethod) -> dict[str, Any]:
    numel, z_dense, z_new = new.numel(), int((dense == 0).sum()), int((new == 0).sum())
    row: dict[str, Any] = {"module": path, "numel": numel, "in_features": int(new.shape[1]),
                           "dense_zeros": z_dense, "zeros": z_new,
                           "dense_zero_frac": z_dense / numel, "zero_frac": z_new / numel,
                           "added_frac_of_dense_nonzeros": (z_new - z_dense) / max(numel - z_dense, 1)}
    if method.pattern is not None and method.pattern.structured:
        row["nm_violations"] = nm_violations(new, method.pattern.n, method.pattern.m)  # type: ignore[arg-type]
    return row


def weight_report(adapter: Adapter, rows: list[dict[str, Any]], method: WeightMethod) -> dict[str, Any]:
    """Achieved sparsity per layer and overall, relative to the dense baseline; N:M check; bits."""
    tot = sum(r["numel"] for r in rows)
    z_dense = sum(r["dense_zeros"] for r in rows)
    z_new = sum(r["zeros"] for r in rows)
    out: dict[str, Any] = {"layers": rows, "n_modules": len(rows), "n_weights": tot}
    if method.pattern is not None:
        out.update(pattern=method.pattern.label(), target_sparsity=1 - method.pattern.density,
                   dense_zero_frac=z_dense / max(tot, 1), zero_frac=z_new / max(tot, 1),
                   added_frac_of_dense_nonzeros=(z_new - z_dense) / max(tot - z_dense, 1))
        if method.pattern.structured:
            out["nm_violations"] = sum(r["nm_violations"] for r in rows)
    else:
        q = method.quant
        assert q is not None
        mean_bpw = sum(q.bits_per_weight(r["in_features"]) * r["numel"] for r in rows) / max(tot, 1)
        out.update(quant=q.label(), bits=q.bits, group_size=q.group_size, bits_per_weight=mean_bpw,
                   effective_mb=tot * mean_bpw / 8 / 2**20, fp16_mb=tot * 16 / 8 / 2**20)
    return out

