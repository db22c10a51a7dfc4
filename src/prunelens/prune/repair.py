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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.capture import first_output
from prunelens.model.placement import swapped
from prunelens.model.replay import stream_points
from prunelens.prune.base import Method, Modification, combine, method_for, view_of
from prunelens.prune.plan import DropPlan, merge
from prunelens.prune.repair_fit import DEFAULT_RIDGE, MODES, RepairSpec, SpanMap, fit_span, merged_into
from prunelens.prune.repair_spans import Span, dropped_cells, dropped_spans, mapped_module, weight_spans
from prunelens.prune.repair_stream import fit_streamed


@dataclass(frozen=True)
class RepairMethod(Method):
    def parse(self, spec: str) -> RepairSpec:
        """``repair:linear``, ``repair:cosine``, ``repair:scale``, ``repair:bias``; ``repair:linear:1e-2``
        sets the ridge (relative to the mean diagonal of XᵀX); a last ``:strict`` refuses the repair
        when it raises the next-token KL on held-out calibration windows (else it is a warning)."""
        parts = spec.strip().replace(" ", "").split(":")
        strict = len(parts) > 2 and parts[-1] == "strict"
        parts = parts[:-1] if strict else parts
        if len(parts) in (2, 3) and parts[1] in MODES:
            try:
                ridge = float(parts[2]) if len(parts) == 3 else DEFAULT_RIDGE
            except ValueError:
                ridge = -1.0
            if 0 <= ridge < float("inf"):
                return RepairSpec(parts[1], ridge, strict)
        raise PrunelensError(f"malformed repair spec '{spec}': expected repair:MODE[:RIDGE][:strict] with MODE "
                             f"in {'/'.join(MODES)} (e.g. repair:linear, repair:linear:1e-3, repair:scale:strict)")


# registered lazily by name in ``base.METHODS``
REPAIR = RepairMethod("repair", "repair", "fit a map for each dropped span, merged into the projection before it "
                      "(ReplaceMe), and with scale/bias a per-channel correction of each weight-pruned sublayer: "
                      "repair:linear|cosine|scale|bias", "repair:linear", True)


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
                "ridge": self.spec.ridge, "strict": self.spec.strict, **self.report,
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


def _plan(adapter: Adapter, modification: Modification | None, spec: RepairSpec | str
          ) -> tuple[RepairSpec, list[Span]]:
    """The parsed spec and the spans it fits, in stream order; refuses what it cannot repair."""
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

    Streamed block by block (``repair_stream``), so the cost is linear in depth."""
    spec, spans = _plan(adapter, modification, spec)
    t0 = time.perf_counter()
    fitted = [s for s in spans if s.source is not None]
    skipped = [s.name() for s in spans if s.source is None]
    maps: list[SpanMap] = []
    if fitted:
        with torch.no_grad():
            maps = fit_streamed(adapter, modification, spec, ids, batch_size, reference, fitted, progress)
    report = {"seconds": time.perf_counter() - t0, "calibration_tokens": int(ids.numel()),
              "skipped_spans": skipped}
    return RepairPatch(spec, maps, report)


def fit_by_full_passes(adapter: Adapter, modification: Modification | None, spec: RepairSpec | str,
                       ids: torch.Tensor, batch_size: int = 4, reference: Modification | None = None) -> RepairPatch:
    """The definition, one span at a time: a full pass of the modified model with the maps fitted so
    far merged, reading the source's output and the stream at the span's end, fitted toward the
    reference stream. Quadratic in depth; kept as the check of ``fit_repair`` (tests, bench_repair)."""
    spec, spans = _plan(adapter, modification, spec)
    fitted = [s for s in spans if s.source is not None]
    with torch.no_grad():
        with view_of(adapter, reference):
            targets = stream_points(adapter, ids, batch_size, [s.end for s in fitted])
        maps: list[SpanMap] = []
        for span in fitted:
            path, mergeable = mapped_module(adapter, *span.source)  # type: ignore[misc]
            so_far = RepairPatch(spec, list(maps))
            with view_of(adapter, combine([modification, so_far]) if modification is not None else so_far):
                got = stream_points(adapter, ids, batch_size, [span.end], [path])
            m = fit_span(spec, span, path, [g[path] for g in got], [g[span.end] - g[path] for g in got],
                         [t[span.end] for t in targets])
            if mergeable:
                with view_of(adapter, modification):
                    m.weight = merged_into(adapter.model.get_submodule(path), m)
            maps.append(m)
    return RepairPatch(spec, maps)


__all__ = ["DEFAULT_RIDGE", "MODES", "REPAIR", "RepairPatch", "RepairSpec", "Span", "SpanMap", "dropped_cells",
           "dropped_spans", "fit_by_full_passes", "fit_repair", "mapped_module", "weight_spans"]
