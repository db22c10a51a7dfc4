"""Training-free repair of layer drops: for every dropped span of the residual stream, a map of the
contribution of the kept sublayer right before it, fitted in closed form on calibration tokens so
that the repaired stream at the span's end matches the dense one.

Why there: a dropped span adds nothing, so the stream at its end is y + x, where x is what the
preceding sublayer added; replacing x by x·T (ReplaceMe, Shopkhoev et al. 2025) lets T absorb the
span's average linear effect, and T merges into that sublayer's output projection (W ← Tᵀ·W), so
the repaired model is a plain checkpoint with no extra parameters. A span is a run of dropped units
in residual order (attention of block i, MLP of block i, attention of block i+1, ...), so ReplaceMe's
consecutive blocks and single attention or MLP sublayers are one case.

Modes (``repair:MODE[:RIDGE]``): ``linear`` (ridge least squares, ReplaceMe's lstsq), ``cosine``
(ReplaceMe's cosine objective on the full stream, from the ridge solution), ``scale`` (one scale per
channel: keeps a sparse projection sparse) and ``bias`` (scale and bias per channel; the bias has no
place in a plain Llama/Qwen checkpoint, so it is analysed, not saved). Spans are fitted in order,
each on the model as modified and repaired so far, toward the dense model's stream.

After a weight method (Wanda, SparseGPT, a quantiser), ``scale`` and ``bias`` also correct every kept
sublayer whose weights it changed, as a zero-length span: its own output, per channel, toward the
dense stream right after it (bias correction as in quantisation). ``linear`` and ``cosine`` leave those
alone: a dense map merged into a sparse projection would undo the pruning.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.capture import first_output
from prunelens.model.placement import execution_device, is_offloaded, onloaded, swapped
from prunelens.prune.base import Method, Modification, combine, register, view_of
from prunelens.prune.drop import DropPlan
from prunelens.prune.linfit import (
    NormalEquations,
    cosine_map,
    diagonal_map,
    merged_weight,
    ridge_map,
    scaled_weight,
)

MODES = ("linear", "cosine", "scale", "bias")
DEFAULT_RIDGE = 1e-4


@dataclass(frozen=True)
class RepairSpec:
    mode: str
    ridge: float = DEFAULT_RIDGE

    def label(self) -> str:
        return f"repair:{self.mode}" + (f":{self.ridge:g}" if self.ridge != DEFAULT_RIDGE else "")


@dataclass(frozen=True)
class RepairMethod(Method):
    def parse(self, spec: str) -> RepairSpec:
        """``repair:linear``, ``repair:cosine``, ``repair:scale``, ``repair:bias``; ``repair:linear:1e-2``
        sets the ridge (relative to the mean diagonal of XᵀX)."""
        parts = spec.strip().replace(" ", "").split(":")
        if len(parts) in (2, 3) and parts[1] in MODES:
            try:
                ridge = float(parts[2]) if len(parts) == 3 else DEFAULT_RIDGE
            except ValueError:
                ridge = -1.0
            if ridge >= 0:
                return RepairSpec(parts[1], ridge)
        raise PrunelensError(f"malformed repair spec '{spec}': expected repair:MODE[:RIDGE] with MODE in "
                             f"{'/'.join(MODES)} (e.g. repair:linear, repair:linear:1e-3)")


register(RepairMethod("repair", "repair", "fit a map for each dropped span, merged into the projection before "
                      "it (ReplaceMe), and with scale/bias a per-channel correction of each weight-pruned "
                      "sublayer: repair:linear|cosine|scale|bias", "repair:linear", True))


# --- spans of the residual stream ----------------------------------------------------------------
# Residual point 2i is the stream before block i, 2i+1 the stream between its attention and its MLP;
# attention i spans [2i, 2i+1], MLP i [2i+1, 2i+2], block i [2i, 2i+2].


@dataclass(frozen=True)
class Span:
    start: int
    end: int

    @property
    def source(self) -> tuple[str, int] | None:
        """The kept sublayer whose output joins the stream at ``start`` (None at the embedding)."""
        if self.start == 0:
            return None
        k = self.start - 1
        return ("attn" if k % 2 == 0 else "mlp"), k // 2

    def name(self) -> str:
        def point(p: int) -> str:
            return f"resid.{p // 2}" if p % 2 == 0 else f"mid.{p // 2}"
        if self.start == self.end:  # a kept, weight-modified sublayer's own output
            kind, i = self.source  # type: ignore[misc]
            return f"{kind}.{i}"
        return f"{point(self.start)}..{point(self.end)}"


def dropped_cells(plan: DropPlan) -> set[int]:
    """Stream cells of the dropped units: attention i is cell 2i, MLP i cell 2i+1, block i both."""
    return {2 * i for i in (*plan.attn, *plan.block)} | {2 * i + 1 for i in (*plan.mlp, *plan.block)}


def dropped_spans(plan: DropPlan) -> list[Span]:
    """Maximal runs of dropped units, in stream order."""
    spans: list[Span] = []
    for c in sorted(dropped_cells(plan)):
        if spans and spans[-1].end == c:
            spans[-1] = Span(spans[-1].start, c + 1)
        else:
            spans.append(Span(c, c + 1))
    return spans


def weight_spans(adapter: Adapter, modification: Modification | None, plan: DropPlan,
                 drops: Sequence[Span] | None = None) -> list[Span]:
    """Zero-length spans for the kept sublayers whose weights a weight method changed (Wanda, SparseGPT,
    a quantiser): each one's own output is corrected toward the dense stream right after it, the
    training-free analogue of quantisation bias correction. Sublayers that are dropped, or that already
    feed a dropped span (their map covers them), get none."""
    from prunelens.prune.weights import WeightPatch

    paths = {p for part in (modification.parts() if modification is not None else [])
             if isinstance(part, WeightPatch) for p in part.weights}
    taken = {s.start for s in (dropped_spans(plan) if drops is None else drops)}
    cells = dropped_cells(plan)
    out = []
    for i in range(adapter.n_layers):
        for c, kind in ((2 * i, "attn"), (2 * i + 1, "mlp")):
            prefix = adapter.sublayer_path(kind, i) + "."
            if c not in cells and c + 1 not in taken and any(p.startswith(prefix) for p in paths):
                out.append(Span(c + 1, c + 1))
    return out


def mapped_module(adapter: Adapter, kind: str, i: int) -> tuple[str, bool]:
    """(path of the module whose output is the sublayer's contribution, whether a map on it merges into
    a weight): the output projection, or the post-norm of sandwich-norm architectures (no merge)."""
    spec = adapter.spec
    post = spec.attn_post_norm if kind == "attn" else spec.mlp_post_norm
    if post:
        return f"{adapter.layer_path(i)}.{post}", False
    path = f"{adapter.layer_path(i)}.{spec.attn_out if kind == 'attn' else spec.mlp_out}"
    mod = adapter.model.get_submodule(path)
    return path, isinstance(mod, nn.Linear) and mod.bias is None


# --- the modification ------------------------------------------------------------------------------


@dataclass
class SpanMap:
    """The fitted map of one span's source: ``x·T`` (linear, cosine) or ``s⊙x + b`` (scale, bias)."""

    span: Span
    module: str
    t: torch.Tensor | None = None
    s: torch.Tensor | None = None
    b: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # the merged projection weight, when it merges
    stats: dict[str, float] = field(default_factory=dict)

    def apply(self, out: torch.Tensor) -> torch.Tensor:
        if self.t is not None:
            return out @ self.t.to(out.device, out.dtype)
        y = out * self.s.to(out.device, out.dtype)  # type: ignore[union-attr]
        return y + self.b.to(out.device, out.dtype) if self.b is not None else y

    @property
    def has_bias(self) -> bool:
        return self.b is not None and bool(self.b.abs().max() > 0)


@dataclass
class RepairPatch:
    """Fitted maps by module; the view merges them into the projections' weights (a weight swap, as
    weight patches do) or, where that is impossible or ``merged`` is False, applies them as forward
    hooks on the modules (the stand-in form, for sandwich norms and for checking the merge)."""

    spec: RepairSpec
    maps: list[SpanMap]
    report: dict[str, Any] = field(default_factory=dict)
    merged: bool = True

    view_order: ClassVar[int] = 0

    def label(self) -> str:
        return self.spec.label()

    def parts(self) -> list[RepairPatch]:
        return [self]

    def validate(self, n_layers: int) -> None:  # fitted on this model
        return None

    def footprint(self, adapter: Adapter, share_removed: float) -> tuple[float, None]:
        """Adds no parameters (merged) and removes none."""
        return share_removed, None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "repair", "label": self.label(), "method": "repair", "mode": self.spec.mode,
                "ridge": self.spec.ridge, **self.report,
                "spans": [{"span": m.span.name(), "module": m.module, "merged": m.weight is not None,
                           **m.stats} for m in self.maps]}

    def saved_meta(self) -> dict[str, Any]:
        """What a saved checkpoint records; refuses maps that a plain checkpoint cannot hold."""
        for m in self.maps:
            if m.weight is None:
                raise PrunelensError(f"{self.label()} maps the output of {m.module}, which has no weight to merge "
                                     "into (a post-sublayer norm or a projection with a bias); it can be analysed "
                                     "but not saved as a plain checkpoint")
            if m.has_bias:
                raise PrunelensError(f"{self.label()} adds a bias to {m.module}, which plain checkpoints of this "
                                     "architecture have no place for; save repair:scale or repair:linear instead")
        return self.to_dict()

    def hooked(self) -> RepairPatch:
        """The same maps applied as forward hooks (no merged weights)."""
        return replace(self, merged=False)

    @contextlib.contextmanager
    def view(self, adapter: Adapter) -> Iterator[None]:
        weights = {m.module: m.weight for m in self.maps if self.merged and m.weight is not None}
        handles = []
        for m in self.maps:
            if m.module in weights:
                if m.has_bias:
                    handles.append(adapter.model.get_submodule(m.module).register_forward_hook(
                        lambda mod, a, out, b=m.b: out + b.to(out.device, out.dtype)))
            else:
                handles.append(adapter.model.get_submodule(m.module).register_forward_hook(
                    lambda mod, a, out, m=m: m.apply(first_output(out))))
        try:
            with swapped(adapter.model, weights):  # type: ignore[arg-type]
                yield
        finally:
            for h in handles:
                h.remove()


# --- fitting -----------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _point_hook(adapter: Adapter, p: int, keep, last: bool):
    """Register a hook recording the stream at residual point ``p`` (raising _Stop after it if
    ``last``)."""
    i = p // 2
    if p % 2 == 0:  # the stream before block i = the output of block i-1
        def fwd(module, args, out):
            keep(p, first_output(out))
            if last:
                raise _Stop
        return adapter.layers[i - 1].register_forward_hook(fwd)

    def pre(module, args):
        keep(p, args[0])
        if last:
            raise _Stop
    return adapter.pre_mlp_norm(i).register_forward_pre_hook(pre)


def _collect(adapter: Adapter, ids: torch.Tensor, batch_size: int, points: Sequence[int],
             modules: Sequence[str] = ()) -> list[dict[Any, torch.Tensor]]:
    """Per calibration batch, the stream at ``points`` and the outputs of ``modules`` (float32, CPU)."""
    out: list[dict[Any, torch.Tensor]] = []
    cur: dict[Any, torch.Tensor] = {}

    def keep(key: Any, t: torch.Tensor) -> None:
        cur[key] = t.detach().float().to("cpu").reshape(-1, t.shape[-1])

    last = max(points)
    handles = [_point_hook(adapter, p, keep, p == last) for p in points]
    for path in modules:
        handles.append(adapter.model.get_submodule(path).register_forward_hook(
            lambda m, a, o, path=path: keep(path, first_output(o))))
    try:
        with torch.no_grad():
            for b0 in range(0, len(ids), batch_size):
                cur = {}
                try:
                    adapter.model(input_ids=ids[b0:b0 + batch_size].to(execution_device(adapter.model)),
                                  use_cache=False)
                except _Stop:
                    pass
                out.append(cur)
    finally:
        for h in handles:
            h.remove()
    return out


def fit_repair(adapter: Adapter, modification: Modification | None, spec: RepairSpec | str, ids: torch.Tensor,
               batch_size: int = 4, reference: Modification | None = None, progress: bool = False) -> RepairPatch:
    """Fit ``spec`` for every dropped span of ``modification`` on calibration ``ids``, toward the model
    under ``reference`` (default: dense). Spans starting at the embedding are left alone (noted)."""
    from prunelens.prune.base import method_for

    if isinstance(spec, str):
        spec = method_for(spec).parse(spec)
    assert isinstance(spec, RepairSpec)
    drops = [p for p in (modification.parts() if modification is not None else []) if isinstance(p, DropPlan)]
    plan = DropPlan()
    for d in drops:
        plan = DropPlan(attn=tuple(sorted({*plan.attn, *d.attn})), mlp=tuple(sorted({*plan.mlp, *d.mlp})),
                        block=tuple(sorted({*plan.block, *d.block})))
    spans = dropped_spans(plan)
    corrected = weight_spans(adapter, modification, plan, spans)
    if spec.mode in ("scale", "bias"):
        spans = sorted([*spans, *corrected], key=lambda s: (s.start, s.end))
    elif corrected and not spans:
        raise PrunelensError(f"{spec.label()} would merge a dense map into the projections the weight method "
                             "pruned or quantised, undoing it: after a weight method use repair:scale or "
                             "repair:bias (per-channel correction)")
    if not spans:
        raise PrunelensError(f"{spec.label()} repairs layer drops or weight-modified sublayers: put a drop or a "
                             "weight method before it in the recipe (e.g. block:4+repair:linear, "
                             "wanda:0.5+repair:scale)")
    t0 = time.perf_counter()
    fitted = [s for s in spans if s.source is not None]
    skipped = [s.name() for s in spans if s.source is None]
    with view_of(adapter, reference):
        targets = _collect(adapter, ids, batch_size, [s.end for s in fitted]) if fitted else []
    maps: list[SpanMap] = []
    for span in fitted:
        kind, i = span.source  # type: ignore[misc]
        path, mergeable = mapped_module(adapter, kind, i)
        so_far = RepairPatch(spec, list(maps))
        with view_of(adapter, combine([modification, so_far]) if modification is not None else so_far):
            got = _collect(adapter, ids, batch_size, [span.end], [path])
        xs = [g[path] for g in got]
        ys = [g[span.end] - g[path] for g in got]
        refs = [t[span.end] for t in targets]
        m = _fit_span(spec, span, path, xs, ys, refs)
        if mergeable:
            mod = adapter.model.get_submodule(path)
            # the weight as modified so far (e.g. a pruning's swapped-in sparse weight), on its execution device
            with view_of(adapter, modification), onloaded(mod):
                w = mod.weight.data
                new = merged_weight(w, m.t) if m.t is not None else scaled_weight(w, m.s)  # type: ignore[arg-type]
            # an offloaded weight's replacement waits on the CPU, as the stored one does
            m.weight = new.to("cpu") if is_offloaded(mod) else new
        maps.append(m)
        if progress:
            print(f"repair: {span.name()} via {path}: stream error {m.stats['stream_error_before']:.4f} -> "
                  f"{m.stats['stream_error_after']:.4f}")
    report = {"seconds": time.perf_counter() - t0, "calibration_tokens": int(ids.numel()),
              "skipped_spans": skipped}
    return RepairPatch(spec, maps, report)


def _fit_span(spec: RepairSpec, span: Span, path: str, xs: list[torch.Tensor], ys: list[torch.Tensor],
              refs: list[torch.Tensor]) -> SpanMap:
    """One span's map from its source outputs x, the stream without them y and the reference stream."""
    eq = NormalEquations()
    full = spec.mode in ("linear", "cosine")
    for x, y, ref in zip(xs, ys, refs, strict=True):
        eq.add(x, ref - y, full=full)
    m = SpanMap(span, path)
    if full:
        m.t = ridge_map(eq.xtx, eq.xtr, spec.ridge)  # type: ignore[arg-type]
        if spec.mode == "cosine":
            x, y, ref = torch.cat(xs), torch.cat(ys), torch.cat(refs)
            m.t, info = cosine_map(x, y, ref, m.t)
            m.stats.update(info)
    else:
        m.s, m.b = diagonal_map(eq.sums, eq.n, bias=spec.mode == "bias")
        if spec.mode != "bias":
            m.b = None
    before = after = denom = 0.0
    for x, y, ref in zip(xs, ys, refs, strict=True):
        denom += float((ref ** 2).sum())
        before += float(((y + x - ref) ** 2).sum())
        after += float(((y + m.apply(x.double()).float() - ref) ** 2).sum())
    m.stats.update(stream_error_before=before / max(denom, 1e-30), stream_error_after=after / max(denom, 1e-30),
                   tokens=eq.n)
    if m.t is not None:
        m.t = m.t.float()
    if m.s is not None:
        m.s = m.s.float()
    if m.b is not None:
        m.b = m.b.float()
    return m


__all__ = ["MODES", "RepairPatch", "RepairSpec", "Span", "SpanMap", "dropped_cells", "dropped_spans", "fit_repair",
           "mapped_module", "weight_spans"]
