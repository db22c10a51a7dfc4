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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter
from ..capture import first_output
from ..errors import PrunelensError
from ..memory import release_freed_memory
from .quant import QuantSpec, gptq_quantize, rtn_quantize
from .sparse import Pattern, magnitude_mask, nm_violations, sparsegpt_prune, wanda_mask

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq")
CALIBRATED = {"wanda", "sparsegpt", "gptq"}


@dataclass(frozen=True)
class WeightMethod:
    """A parsed ``--prune`` / ``--quant`` spec."""

    name: str
    pattern: Pattern | None = None
    quant: QuantSpec | None = None

    def label(self) -> str:
        return f"{self.name}:{self.pattern.label() if self.pattern else self.quant.label()}"  # type: ignore[union-attr]


def parse_prune(spec: str) -> WeightMethod:
    """``wanda:0.5`` (unstructured ratio) or ``sparsegpt:2:4`` (N:M, N kept of every M)."""
    parts = spec.strip().split(":")
    if parts[0] not in PRUNE_METHODS:
        raise PrunelensError(f"unknown pruning method '{parts[0]}'; choose from {', '.join(PRUNE_METHODS)}")
    try:
        if len(parts) == 2:
            return WeightMethod(parts[0], Pattern(ratio=float(parts[1])))
        if len(parts) == 3:
            return WeightMethod(parts[0], Pattern(n=int(parts[1]), m=int(parts[2])))
    except ValueError:
        pass
    raise PrunelensError(f"malformed pruning spec '{spec}': expected METHOD:RATIO or METHOD:N:M "
                         "(e.g. wanda:0.5, sparsegpt:2:4)")


_QUANT = re.compile(r"^w(\d+)(?:g(-?\d+))?(s?)$")


def parse_quant(spec: str) -> WeightMethod:
    """``gptq:w4g128`` (4 bits, groups of 128 inputs), ``rtn:w8`` (per row), suffix ``s`` symmetric."""
    name, _, rest = spec.strip().partition(":")
    if name not in QUANT_METHODS:
        raise PrunelensError(f"unknown quantisation method '{name}'; choose from {', '.join(QUANT_METHODS)}")
    m = _QUANT.match(rest)
    if not m:
        raise PrunelensError(f"malformed quantisation spec '{spec}': expected METHOD:wBITS[gGROUP][s] "
                             "(e.g. gptq:w4g128, rtn:w8)")
    bits, group, sym = m.groups()
    return WeightMethod(name, quant=QuantSpec(int(bits), int(group) if group else -1, bool(sym)))


@dataclass
class WeightPatch:
    """New weights for some linear layers, with what produced them."""

    method: WeightMethod
    weights: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return self.method.label()

    def validate(self, n_layers: int) -> None:  # weights were made for this model
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "weights", "label": self.label(), "method": self.method.name, **self.report}

    @contextlib.contextmanager
    def view(self, adapter: Adapter) -> Iterator[None]:
        params = [(adapter.model.get_submodule(p).weight, w) for p, w in self.weights.items()]
        old = [p.data for p, _ in params]
        try:
            for p, w in params:
                p.data = w
            yield
        finally:
            for (p, _), o in zip(params, old, strict=True):
                p.data = o


def target_linears(adapter: Adapter, skip: Sequence[str] = ()) -> list[list[str]]:
    """Module paths of the linear layers to modify, per block (LM head and embeddings never)."""
    out = []
    for i in range(adapter.n_layers):
        paths = [f"{adapter.layer_path(i)}.{rel}" for rel in adapter.spec.linears]
        out.append([p for p in paths if _is_linear(adapter, p)
                    and not any(fnmatch.fnmatch(p, pat) or pat == str(i) for pat in skip)])
    return out


def _is_linear(adapter: Adapter, path: str) -> bool:
    """False for layers inside a dropped (swapped-out) sublayer or block."""
    try:
        return isinstance(adapter.model.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


# --- calibration plumbing ----------------------------------------------------------------------


class _Stop(Exception):
    pass


def _block_inputs(adapter: Adapter, calib: torch.Tensor, batch_size: int):
    """Hidden states entering block 0 per batch, and the keyword arguments each block receives."""
    layers, n = adapter.layers, adapter.n_layers
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    def record(i: int):
        def hook(module, args, kw):
            if i == 0:
                inputs.append(args[0] if args else kw["hidden_states"])
            kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if i == n - 1:
                raise _Stop
        return hook

    handles = [layers[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(n)]
    try:
        for b0 in range(0, len(calib), batch_size):
            try:
                adapter.model(input_ids=calib[b0:b0 + batch_size].to(adapter.model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return inputs, kwargs


class _Stats:
    """Per-input statistics of a linear layer: ‖X_j‖² (Wanda) or XᵀX (SparseGPT/GPTQ)."""

    def __init__(self, need_hessian: bool):
        self.need_hessian, self.n, self.acc = need_hessian, 0, None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        part = x.T @ x if self.need_hessian else (x * x).sum(0)
        self.acc = part if self.acc is None else self.acc.add_(part)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2XᵀX/n, scaled in place (the accumulator is not used afterwards)."""
        return self.acc.mul_(2.0 / max(self.n, 1))  # type: ignore[union-attr]


def _modify(method: WeightMethod, w: torch.Tensor, stats: _Stats | None) -> torch.Tensor:
    if method.name == "magnitude":
        return w.masked_fill(magnitude_mask(w, method.pattern), 0)  # type: ignore[arg-type]
    if method.name == "wanda":
        return w.masked_fill(wanda_mask(w, stats.acc, method.pattern), 0)  # type: ignore[union-attr,arg-type]
    if method.name == "sparsegpt":
        return sparsegpt_prune(w, stats.hessian(), method.pattern)  # type: ignore[union-attr,arg-type]
    if method.name == "rtn":
        return rtn_quantize(w, method.quant)  # type: ignore[arg-type]
    if method.name == "gptq":
        return gptq_quantize(w, stats.hessian(), method.quant)  # type: ignore[union-attr,arg-type]
    raise PrunelensError(f"unknown method '{method.name}'")


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
    blocks = target_linears(adapter, skip)
    for paths in blocks:  # fail before any work on an incompatible shape
        for p in paths:
            cols = adapter.model.get_submodule(p).weight.shape[1]
            if method.pattern is not None:
                method.pattern.check_columns(cols, p)
            else:
                method.quant.check_columns(cols, p)  # type: ignore[union-attr]
    calibrated = method.name in CALIBRATED
    if calibrated and calib is None:
        raise PrunelensError(f"{method.name} needs calibration text")
    t0 = time.perf_counter()
    new: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    timings: list[float] = []
    if calibrated:
        hs, kwargs = _block_inputs(adapter, calib, batch_size)  # type: ignore[arg-type]
    bar = tqdm(total=len(blocks), desc=f"{method.label()}", unit="block", disable=not progress)
    for i, paths in enumerate(blocks):
        tb = time.perf_counter()
        layer = adapter.layers[i]
        stats: dict[str, _Stats] = {}
        if calibrated and paths:
            need_h = method.name != "wanda"
            # q/k/v (and gate/up) receive one and the same input tensor: its statistics are
            # computed once. The memo holds the tensor itself, so that no later activation can
            # be allocated at the same address during this forward pass and be mistaken for it.
            memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
            handles = []
            for p in paths:
                stats[p] = _Stats(need_h)

                def hook(module, args, p=p, memo=memo, stats=stats, need_h=need_h):
                    x = args[0]
                    key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                    if key not in memo:
                        tmp = _Stats(need_h)
                        tmp.add(x)
                        memo[key] = (x, tmp.acc)
                    part = memo[key][1]
                    s = stats[p]
                    s.acc = part.clone() if s.acc is None else s.acc.add_(part)
                    s.n += x.reshape(-1, x.shape[-1]).shape[0]

                handles.append(adapter.model.get_submodule(p).register_forward_pre_hook(hook))
            try:
                for b, h in enumerate(hs):
                    memo.clear()
                    layer(h, **kwargs[i][b])
            finally:
                for hd in handles:
                    hd.remove()
        for p in paths:
            mod = adapter.model.get_submodule(p)
            new[p] = _modify(method, mod.weight.data, stats.pop(p, None)).to(mod.weight.dtype)
            rows.append(_report_row(p, mod.weight.data, new[p], method))
        if calibrated:  # the next block sees this block's modified outputs
            patch = WeightPatch(method, {p: new[p] for p in paths})
            with patch.view(adapter):
                hs = [first_output(layer(h, **kwargs[i][b])) for b, h in enumerate(hs)]
        if inplace:  # write into the existing storage: memory stays at one model
            for p in paths:
                w = adapter.model.get_submodule(p).weight.data
                w.copy_(new[p])
                new[p] = w
        release_freed_memory()
        timings.append(time.perf_counter() - tb)
        bar.update(1)
    bar.close()
    patch = WeightPatch(method, new)
    patch.report = weight_report(adapter, rows, method)
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

