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
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.capture import first_output
from prunelens.model.memory import release_freed_memory
from prunelens.model.placement import execution_device, is_dispatched, is_offloaded, onloaded, swapped
from prunelens.prune.base import Method, Modification, register, view_of
from prunelens.prune.drop import DropPlan, merge
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


def _reference_pass(adapter: Adapter, ids: torch.Tensor, batch_size: int, points: Sequence[int]
                    ) -> tuple[list[dict[Any, torch.Tensor]], list[list[dict[str, Any]]]]:
    """One pass of the reference model: its stream at ``points`` per batch, and the keyword arguments
    (positions, masks) each block receives up to the last point, for running blocks one at a time."""
    last_block = (max(points) - 1) // 2
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(last_block + 1)]

    def record(i: int):
        def hook(module, args, kw):
            kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
        return hook

    handles = [adapter.layers[i].register_forward_pre_hook(record(i), with_kwargs=True)
               for i in range(last_block + 1)]
    try:
        targets = _collect(adapter, ids, batch_size, points)
    finally:
        for h in handles:
            h.remove()
    return targets, kwargs


def _block_zero_inputs(adapter: Adapter, ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The stream entering block 0, per batch (the embedding's output; nothing else runs)."""
    out: list[torch.Tensor] = []

    def hook(module, args, kw):
        out.append(args[0] if args else kw["hidden_states"])
        raise _Stop

    handle = adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b0 in range(0, len(ids), batch_size):
                with contextlib.suppress(_Stop):
                    adapter.model(input_ids=ids[b0:b0 + batch_size].to(execution_device(adapter.model)),
                                  use_cache=False)
    finally:
        handle.remove()
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().to("cpu").reshape(-1, t.shape[-1])


def _corrected(h: torch.Tensor, x: torch.Tensor, m: SpanMap) -> torch.Tensor:
    """The stream ``h`` with the source output ``x`` (flat, float32) inside it replaced by its map."""
    delta = (m.apply(x.double()).float() - x).reshape(h.shape)
    return h + delta.to(h.device, h.dtype)


def _plan(adapter: Adapter, modification: Modification | None, spec: RepairSpec | str
          ) -> tuple[RepairSpec, list[Span]]:
    """The parsed spec and the spans it fits, in stream order; refuses what it cannot repair."""
    from prunelens.prune.base import method_for

    if isinstance(spec, str):
        spec = method_for(spec).parse(spec)
    assert isinstance(spec, RepairSpec)
    drops = [p for p in (modification.parts() if modification is not None else []) if isinstance(p, DropPlan)]
    plan = functools.reduce(merge, drops, DropPlan())
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
    return spec, spans


def fit_repair(adapter: Adapter, modification: Modification | None, spec: RepairSpec | str, ids: torch.Tensor,
               batch_size: int = 4, reference: Modification | None = None, progress: bool = False) -> RepairPatch:
    """Fit ``spec`` for every dropped span of ``modification`` on calibration ``ids``, toward the model
    under ``reference`` (default: dense). Spans starting at the embedding are left alone (noted).

    Streamed, block by block as Wanda's calibration is: one pass of the reference model, then each
    block of the modified model runs once on the stream as repaired so far (twice where a kept
    attention sublayer is itself corrected), so the cost is linear in depth. A span's map is fitted
    where its end is reached and applied to the carried stream at once: nothing kept lies between the
    source and the end, so the stream there is y + x and becomes y + map(x)."""
    spec, spans = _plan(adapter, modification, spec)
    t0 = time.perf_counter()
    fitted = [s for s in spans if s.source is not None]
    skipped = [s.name() for s in spans if s.source is None]
    maps: list[SpanMap] = []
    if fitted:
        with torch.no_grad():
            maps = _fit_streamed(adapter, modification, spec, ids, batch_size, reference, fitted, progress)
    report = {"seconds": time.perf_counter() - t0, "calibration_tokens": int(ids.numel()),
              "skipped_spans": skipped}
    return RepairPatch(spec, maps, report)


def _fit_streamed(adapter: Adapter, modification: Modification | None, spec: RepairSpec, ids: torch.Tensor,
                  batch_size: int, reference: Modification | None, fitted: list[Span], progress: bool
                  ) -> list[SpanMap]:
    """The maps of ``fitted`` spans, in stream order (see ``fit_repair``)."""
    from prunelens.prune.weights import run_block

    park = is_dispatched(adapter.model)
    with view_of(adapter, reference):
        targets, kwargs = _reference_pass(adapter, ids, batch_size, sorted({s.end for s in fitted}))
    refs = {s.end: [t[s.end] for t in targets] for s in fitted}
    del targets
    maps: list[SpanMap] = []
    pending: dict[Span, list[torch.Tensor]] = {}  # source outputs of spans whose end is still ahead

    def fit(span: Span, xs: list[torch.Tensor], streams: list[torch.Tensor]) -> SpanMap:
        kind, i = span.source  # type: ignore[misc]
        path, mergeable = mapped_module(adapter, kind, i)
        m = _fit_span(spec, span, path, xs, [s - x for s, x in zip(streams, xs, strict=True)], refs[span.end])
        if mergeable:
            mod = adapter.model.get_submodule(path)
            with onloaded(mod):  # the weight as modified (inside the modification's view), on its device
                w = mod.weight.data
                new = merged_weight(w, m.t) if m.t is not None else scaled_weight(w, m.s)  # type: ignore[arg-type]
            # an offloaded weight's replacement waits on the CPU, as the stored one does
            m.weight = new.to("cpu") if is_offloaded(mod) else new
        maps.append(m)
        if progress:
            print(f"repair: {span.name()} via {path}: stream error {m.stats['stream_error_before']:.4f} -> "
                  f"{m.stats['stream_error_after']:.4f}")
        return m

    last_block = (max(s.end for s in fitted) - 1) // 2
    with view_of(adapter, modification):
        hs = _block_zero_inputs(adapter, ids, batch_size)
        if park:
            hs = [h.to("cpu") for h in hs]
        for i in range(last_block + 1):
            ending = [s for s in fitted if s.end in (2 * i + 1, 2 * i + 2)]
            # spans whose every cell from the start through the end is dropped: the stream there is the
            # block's input (block i is skipped up to the end), so they are fitted before it runs
            for s in (s for s in ending if s.start <= 2 * i):
                m = fit(s, pending[s], [_flat(h) for h in hs])
                hs = [_corrected(h, x, m) for h, x in zip(hs, pending.pop(s), strict=True)]
            attn_src = next((s for s in fitted if s.start == 2 * i + 1), None)  # attention i is the source
            mlp_src = next((s for s in fitted if s.start == 2 * i + 2), None)  # MLP i is the source
            attn_path = mapped_module(adapter, "attn", i)[0] if attn_src else None
            mlp_path = mapped_module(adapter, "mlp", i)[0] if mlp_src else None
            layer = adapter.layers[i]
            own = attn_src is not None and attn_src.end == 2 * i + 1  # attention i's own output is corrected

            def run(attn_map: SpanMap | None, layer=layer, i=i, hs=hs, attn_path=attn_path, mlp_path=mlp_path,
                    own=own):
                """Block i on every batch; the outputs of the sources in it and, for attention's own
                correction, the stream between the sublayers."""
                cap: dict[str, list[torch.Tensor]] = {"attn": [], "mid": [], "mlp": []}
                handles = []
                if attn_map is not None:  # registered first: the capture below sees the mapped output
                    handles.append(adapter.model.get_submodule(attn_path).register_forward_hook(
                        lambda mod, a, o: attn_map.apply(first_output(o))))
                if attn_path:
                    handles.append(adapter.model.get_submodule(attn_path).register_forward_hook(
                        lambda mod, a, o: cap["attn"].append(_flat(first_output(o)))))
                if own and attn_map is None:
                    handles.append(adapter.pre_mlp_norm(i).register_forward_pre_hook(
                        lambda mod, a: cap["mid"].append(_flat(a[0]))))
                if mlp_path:
                    handles.append(adapter.model.get_submodule(mlp_path).register_forward_hook(
                        lambda mod, a, o: cap["mlp"].append(_flat(first_output(o)))))
                try:
                    return [run_block(layer, h, kwargs[i][b], park) for b, h in enumerate(hs)], cap
                finally:
                    for h in handles:
                        h.remove()

            out, cap = run(None)
            if own:  # fit it on the stream between the sublayers, then run the block again with the map
                # on it, so that the MLP sees the corrected stream
                out, cap = run(fit(attn_src, cap["attn"], cap["mid"]))  # type: ignore[arg-type]
            if attn_src is not None and attn_src.end > 2 * i + 1:  # MLP i is dropped: x waits for the end
                pending[attn_src] = cap["attn"]
            if mlp_src is not None:
                pending[mlp_src] = cap["mlp"]
            for s in (s for s in ending if s.start > 2 * i and s in pending):  # ends at this block's output
                m = fit(s, pending[s], [_flat(h) for h in out])
                out = [_corrected(h, x, m) for h, x in zip(out, pending.pop(s), strict=True)]
            hs = out
            release_freed_memory()
    return maps


def fit_by_full_passes(adapter: Adapter, modification: Modification | None, spec: RepairSpec | str,
                       ids: torch.Tensor, batch_size: int = 4, reference: Modification | None = None) -> RepairPatch:
    """The definition, one span at a time: a full pass of the modified model with the maps fitted so
    far merged, reading the source's output and the stream at the span's end, fitted toward the
    reference stream. Quadratic in depth; kept as the check of ``fit_repair`` (tests, bench_repair)."""
    from prunelens.prune.base import combine

    spec, spans = _plan(adapter, modification, spec)
    fitted = [s for s in spans if s.source is not None]
    with torch.no_grad():
        with view_of(adapter, reference):
            targets = _collect(adapter, ids, batch_size, [s.end for s in fitted])
        maps: list[SpanMap] = []
        for span in fitted:
            path, mergeable = mapped_module(adapter, *span.source)  # type: ignore[misc]
            so_far = RepairPatch(spec, list(maps))
            with view_of(adapter, combine([modification, so_far]) if modification is not None else so_far):
                got = _collect(adapter, ids, batch_size, [span.end], [path])
            m = _fit_span(spec, span, path, [g[path] for g in got], [g[span.end] - g[path] for g in got],
                          [t[span.end] for t in targets])
            if mergeable:
                with view_of(adapter, modification), onloaded(mod := adapter.model.get_submodule(path)):
                    w = mod.weight.data
                    m.weight = merged_weight(w, m.t) if m.t is not None else scaled_weight(w, m.s)  # type: ignore[arg-type]
            maps.append(m)
    return RepairPatch(spec, maps)


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


__all__ = ["MODES", "RepairPatch", "RepairSpec", "Span", "SpanMap", "dropped_cells", "dropped_spans",
           "fit_by_full_passes", "fit_repair",
           "mapped_module", "weight_spans"]
