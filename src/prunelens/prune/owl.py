"""OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"): non-uniform sparsity per block.

Layers holding more *outliers* of the Wanda score A_ij = |W_ij|·‖X_j‖₂ matter more and keep more
weights. Per block l, the outlier ratio D_l is the share (in %) of the scores of all the block's
linear layers above M times their mean. The ratios are rescaled to a band of width 2λ and shifted
so that their mean density is the target's:

    density_l = (D_l − min D)·2λ/(max D − min D) − mean(·) + (1 − s),   sparsity_l = 1 − density_l

The statistics come from one pass over the *dense* model (as the reference does), before the usual
sequential pass prunes each block with Wanda (``owl``) or SparseGPT (``owl-sparsegpt``) at its own
ratio. Defaults M = 5, λ = 0.08 are the reference's scripts for LLaMA-7B (luuyin/OWL,
``lib/prune_all.py``; its ``main.py`` default M is 3); N:M patterns are uniform by definition, so
OWL takes ratios only. All blocks must have equal size for the mean density to be
the target sparsity, which holds for the decoder stacks prunelens supports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.placement import onloaded
from prunelens.prune.sparse import Pattern
from prunelens.prune.weights import SparsityMethod, WeightMethod, collect_stats


def outlier_ratio(scores: Callable[[], Iterable[torch.Tensor]], m: float) -> float:
    """Share (in %) of all the scores above ``m`` times their mean (OWL's layerwise outlier
    distribution for one block). ``scores()`` yields them, and is called twice — once for the mean,
    once for the count — so the scores need never be held at once."""
    total, acc = 0, 0.0
    for s in scores():
        total, acc = total + s.numel(), acc + float(s.double().sum())
    mean = acc / max(total, 1)
    return 100.0 * sum(int((s > m * mean).sum()) for s in scores()) / max(total, 1)


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from outlier ratios: more outliers, lower sparsity, in a band of ±λ
    around the target whose mean is the target. As in the reference, a sparsity ≤ 0 becomes 0.01;
    one ≥ 1 becomes 0.99 (the reference has no upper bound; a layer cannot lose every weight)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = float(d.max() - d.min())
    dens = (d - d.min()) * (2 * lam / spread) if spread > 0 else torch.zeros_like(d)
    dens = dens - dens.mean() + (1 - target)
    return [min(1.0 - float(x), 0.99) if 1.0 - float(x) > 0 else 0.01 for x in dens]


def _block_outlier_ratio(adapter: Adapter, paths: list[str], stats: dict[str, Any], m: float) -> float:
    """``outlier_ratio`` of one block's Wanda scores, made on the weights' own device one layer at a
    time (an 8B block's would be 0.9 GB; moving them to the host made OWL's pre-pass 40 s on an H200)."""

    def scores() -> Iterator[torch.Tensor]:
        for p in paths:
            mod = adapter.model.get_submodule(p)
            with onloaded(mod):
                w = mod.weight.detach()
                yield w.abs().float() * stats[p].acc.to(w.device).clamp_min(0).sqrt()

    return outlier_ratio(scores, m)


@dataclass(frozen=True)
class OwlMethod(SparsityMethod):
    nm: bool = False
    base: str = "wanda"
    m: float = 5.0
    lam: float = 0.08

    def parse(self, spec: str) -> WeightMethod:
        """``owl:0.7``: a ratio only."""
        method = super().parse(spec)
        if method.pattern is None or method.pattern.structured:
            raise PrunelensError(f"'{spec}': OWL sets a sparsity ratio per layer, so it takes a ratio "
                                 f"({self.name}:0.7), not N:M")
        return method

    def per_block(self, adapter: Adapter, method: WeightMethod, blocks: list[list[str]], hs: list[torch.Tensor],
                  kwargs: list[list[dict[str, Any]]], park: bool) -> tuple[list[WeightMethod], dict[str, Any]]:
        ratios = []
        for i, paths in enumerate(blocks):
            layer = adapter.layers[i]
            outs: list[torch.Tensor] = []  # the dense block's outputs, from the same forward pass
            stats = collect_stats(adapter, layer, paths, hs, kwargs[i], "sq_norm", outs, park)
            ratios.append(_block_outlier_ratio(adapter, paths, stats, self.m) if paths else 0.0)
            hs = outs
        sparsity = owl_sparsities(ratios, method.pattern.ratio, self.lam)  # type: ignore[union-attr,arg-type]
        per = [WeightMethod(self.base, Pattern(ratio=s)) for s in sparsity]
        return per, {"owl": {"base": self.base, "m": self.m, "lambda": self.lam,
                             "outlier_ratio_pct": ratios, "block_sparsity": sparsity}}


def _owl(name: str, base: str) -> OwlMethod:
    return OwlMethod(name, "prune", f"{base} at per-layer ratios set by outlier shares (OWL)", f"{name}:0.7", True,
                     stats="sq_norm", base=base)


# registered lazily by name in ``base.METHODS``
OWL, OWL_SPARSEGPT = _owl("owl", "wanda"), _owl("owl-sparsegpt", "sparsegpt")
