"""Spans of the residual stream that a repair fits: the runs of dropped units, and the kept sublayers
whose weights a weight method changed (zero-length spans).

Residual point 2i is the stream before block i, 2i+1 the stream between its attention and its MLP
(``model.replay`` numbers them alike); attention i spans [2i, 2i+1], MLP i [2i+1, 2i+2], block i
[2i, 2i+2].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from prunelens.model.arch import Adapter
from prunelens.model.views import Modification
from prunelens.prune.plan import DropPlan
from prunelens.prune.weights import WeightPatch


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
