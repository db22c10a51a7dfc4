"""Weight quantisation baselines as fake-quant (dequantised weights): pure functions of W and H.

Asymmetric min-max uniform quantisation per output row and per group of ``group_size`` input
columns (``-1``: one group per row), ``bits`` bits. RTN rounds each weight to the nearest level;
GPTQ (Frantar et al. 2022) sweeps columns over the upper Cholesky factor of the inverse damped
Hessian and pushes each column's rounding error onto the columns not yet quantised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelens.errors import PrunelensError
from prunelens.prune.sparse import damped_inverse_cholesky

Tensor = torch.Tensor


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PrunelensError(f"quantisation bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise PrunelensError(f"group size must be positive or -1, got {self.group_size}")

    def label(self) -> str:
        g = "" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{g}{'s' if self.symmetric else ''}"

    def bits_per_weight(self, in_features: int) -> float:
        """Weight bits plus the fp16 scale (and zero point, if asymmetric) of each group."""
        groups = 1 if self.group_size == -1 else -(-in_features // self.group_size)
        return self.bits + groups * (16 + (0 if self.symmetric else self.bits)) / in_features

    def check_columns(self, in_features: int, name: str = "layer") -> None:
        """Any width works: as in GPTQ, a last group narrower than ``group_size`` is allowed."""
        return None


def _params(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, int]:
    """Scale and zero point per row of x (rows, cols), so that the grid covers [min, max] ∪ {0}."""
    maxq = 2 ** spec.bits - 1
    xmin = x.min(1).values.clamp(max=0)
    xmax = x.max(1).values.clamp(min=0)
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if spec.symmetric else torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1), maxq


def _fake_quant(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def rtn_quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Round-to-nearest fake quantisation of W."""
    spec.check_columns(w.shape[1])
    W = w.detach().float()
    g = W.shape[1] if spec.group_size == -1 else spec.group_size
    out = torch.empty_like(W)
    for c in range(0, W.shape[1], g):
        scale, zero, maxq = _params(W[:, c:c + g], spec)
        out[:, c:c + g] = _fake_quant(W[:, c:c + g], scale, zero, maxq)
    return out.to(w.dtype)


def gptq_quantize(w: Tensor, h: Tensor, spec: QuantSpec, blocksize: int = 128,
                  percdamp: float = 0.01) -> Tensor:
    """GPTQ fake quantisation of W given the layer Hessian H = 2XᵀX/n."""
    spec.check_columns(w.shape[1])
    W = w.detach().float().clone()
    cols = W.shape[1]
    Hinv, dead = damped_inverse_cholesky(h, percdamp)
    Hinv = Hinv.float()
    W[:, dead] = 0
    g = cols if spec.group_size == -1 else spec.group_size
    Q = torch.zeros_like(W)
    scale = zero = None
    maxq = 2 ** spec.bits - 1
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # group parameters from the weights as updated so far
                group = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :g]
                scale, zero, maxq = _params(group, spec)
            w_col = W1[:, i]
            q = _fake_quant(w_col.unsqueeze(1), scale, zero, maxq).squeeze(1)
            Q[:, col] = q
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i + 1:].sub_(torch.outer(err, Hinv1[i, i + 1:]))
            Err1[:, i] = err
        W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])
    return Q.to(w.dtype)
