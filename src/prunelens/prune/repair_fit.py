"""What a repair fits: its spec (mode and ridge), the map of one span, and the closed-form fit of that
map from the span's source outputs x, the stream without them y and the reference stream.

A map is ``x·T`` (``linear``: ridge least squares; ``cosine``: ReplaceMe's cosine objective from the
ridge solution) or ``s⊙x + b`` per channel (``scale``, ``bias``); where the source is a bias-free
projection it merges into the weight (W ← Tᵀ·W), so a repaired model is a plain checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunelens.model.placement import onloaded
from prunelens.prune.linfit import (
    NormalEquations,
    cosine_map,
    diagonal_map,
    merged_weight,
    ridge_map,
    scaled_weight,
)
from prunelens.prune.repair_spans import Span

MODES = ("linear", "cosine", "scale", "bias")
DEFAULT_RIDGE = 1e-4


@dataclass(frozen=True)
class RepairSpec:
    """A parsed ``repair:MODE[:RIDGE][:strict]`` (``strict``: refuse the repair when it raises the
    held-out KL, instead of warning)."""

    mode: str
    ridge: float = DEFAULT_RIDGE
    strict: bool = False

    def label(self) -> str:
        return (f"repair:{self.mode}" + (f":{self.ridge:g}" if self.ridge != DEFAULT_RIDGE else "")
                + (":strict" if self.strict else ""))


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


def corrected(h: torch.Tensor, x: torch.Tensor, m: SpanMap) -> torch.Tensor:
    """The stream ``h`` with the source output ``x`` (flat, float32) inside it replaced by its map."""
    delta = (m.apply(x.double()).float() - x).reshape(h.shape)
    return h + delta.to(h.device, h.dtype)


def merged_into(mod: nn.Module, m: SpanMap) -> torch.Tensor:
    """The weight of projection ``mod`` (as it computes now, on its device) with the map merged in."""
    with onloaded(mod):
        w = mod.weight.data
        return merged_weight(w, m.t) if m.t is not None else scaled_weight(w, m.s)  # type: ignore[arg-type]


def fit_span(spec: RepairSpec, span: Span, path: str, xs: list[torch.Tensor], ys: list[torch.Tensor],
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
    m.stats.update(_stream_errors(xs, ys, refs, m), tokens=eq.n)
    if m.t is not None:
        m.t = m.t.float()
    if m.s is not None:
        m.s = m.s.float()
    if m.b is not None:
        m.b = m.b.float()
    return m


def _stream_errors(xs: list[torch.Tensor], ys: list[torch.Tensor], refs: list[torch.Tensor], m: SpanMap
                   ) -> dict[str, float]:
    """The stream's squared error at the span's end, relative to the reference's energy, before and
    after the map."""
    before = after = denom = 0.0
    for x, y, ref in zip(xs, ys, refs, strict=True):
        denom += float((ref ** 2).sum())
        before += float(((y + x - ref) ** 2).sum())
        after += float(((y + m.apply(x.double()).float() - ref) ** 2).sum())
    return {"stream_error_before": before / max(denom, 1e-30), "stream_error_after": after / max(denom, 1e-30)}
