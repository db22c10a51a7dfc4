"""Weight quantisation baselines as fake-quant (dequantised weights): pure functions of W and H.

Asymmetric min-max uniform quantisation per output row and per group of ``group_size`` input
columns (``-1``: one group per row), ``bits`` bits. RTN rounds each weight to the nearest level;
GPTQ (Frantar et al. 2022) sweeps columns over the upper Cholesky factor of the inverse damped
Hessian and pushes each column's rounding error onto the columns not yet quantised; AWQ (Lin et al.
2024) scales the input channels that carry large activations up before rounding (and back after),
then clips each group's range, both chosen on calibration inputs.
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

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Weight bits plus the scale (16-bit as deployed checkpoints store it; a compressed-tensors
        export keeps fp32, 32) and the zero point, if asymmetric, of each group."""
        groups = 1 if self.group_size == -1 else -(-in_features // self.group_size)
        return self.bits + groups * (scale_bits + (0 if self.symmetric else self.bits)) / in_features

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


def _record(record: dict[str, Tensor] | None, scales: list[Tensor], zeros: list[Tensor]) -> None:
    """The grid a fake-quantised W lies on, per output row and group: W = scale · (q − zero) with
    whole q in [0, 2^bits − 1] (what a packed export writes; codes are round(W/scale) + zero)."""
    if record is not None:
        record["scale"], record["zero"] = torch.cat(scales, 1), torch.cat(zeros, 1)


def rtn_quantize(w: Tensor, spec: QuantSpec, record: dict[str, Tensor] | None = None) -> Tensor:
    """Round-to-nearest fake quantisation of W; ``record`` receives its grid (``_record``)."""
    spec.check_columns(w.shape[1])
    W = w.detach().float()
    g = W.shape[1] if spec.group_size == -1 else spec.group_size
    out = torch.empty_like(W)
    scales, zeros = [], []
    for c in range(0, W.shape[1], g):
        scale, zero, maxq = _params(W[:, c:c + g], spec)
        out[:, c:c + g] = _fake_quant(W[:, c:c + g], scale, zero, maxq)
        scales.append(scale)
        zeros.append(zero)
    _record(record, scales, zeros)
    return out.to(w.dtype)


def gptq_quantize(w: Tensor, h: Tensor, spec: QuantSpec, blocksize: int = 128,
                  percdamp: float = 0.01, record: dict[str, Tensor] | None = None) -> Tensor:
    """GPTQ fake quantisation of W given the layer Hessian H = 2XᵀX/n; ``record`` receives its grid
    (groups in the original column order: no activation reordering, so no g_idx)."""
    spec.check_columns(w.shape[1])
    W = w.detach().float().clone()
    cols = W.shape[1]
    Hinv, dead = damped_inverse_cholesky(h, percdamp)
    Hinv = Hinv.float()
    W[:, dead] = 0
    g = cols if spec.group_size == -1 else spec.group_size
    Q = torch.zeros_like(W)
    scale = zero = None
    scales, zeros = [], []
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
                scales.append(scale)
                zeros.append(zero)
            w_col = W1[:, i]
            q = _fake_quant(w_col.unsqueeze(1), scale, zero, maxq).squeeze(1)
            Q[:, col] = q
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i + 1:].sub_(torch.outer(err, Hinv1[i, i + 1:]))
            Err1[:, i] = err
        W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])
    _record(record, scales, zeros)
    return Q.to(w.dtype)


def _output_error(x: Tensor, w: Tensor, w_new: Tensor) -> float:
    """Mean squared error of the layer's outputs on the calibration rows x (n × in)."""
    return float(((x @ (w_new - w).T) ** 2).mean())


def awq_quantize(w: Tensor, x: Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
                 clip: bool = True) -> Tensor:
    """AWQ fake quantisation of W (out × in) from calibration inputs x (n × in), as AutoAWQ does it
    for one linear layer:

    1. scale search: s = mean|x|^α per input channel, normalised so that √(max s · min s) = 1, for
       α on a grid of ``n_grid`` values in [0, 1); W' = Q(W·diag s)·diag(s)⁻¹ with the α whose outputs
       x·W'ᵀ are closest to x·Wᵀ (α = 0 is RTN, so AWQ is never worse than RTN on these rows);
    2. clip search: per output row and group, the weights are clamped to ±(1 − i/n_grid)·max|w| for
       i < max_shrink·n_grid before rounding, keeping the clamp with the least output error of that
       group's inputs.

    AutoAWQ searches one α per set of linears sharing an input, because it folds 1/s into the
    preceding norm; fake quantisation keeps 1/s in each weight, so α is searched per linear here.
    """
    W = w.detach().float()
    X = x.detach().float().to(W.device)
    act = X.abs().mean(0)
    best, best_err = rtn_quantize(W, spec), float("inf")
    best_s = torch.ones_like(act)
    for i in range(n_grid):
        a = i / n_grid
        sc = act.pow(a).clamp(min=1e-4)
        sc = sc / (sc.max() * sc.min()).sqrt()
        cand = rtn_quantize(W * sc, spec) / sc
        err = _output_error(X, W, cand)
        if err < best_err:
            best, best_err, best_s = cand, err, sc
    if not clip:
        return best.to(w.dtype)
    return (_clip_search(W * best_s, X / best_s, spec, n_grid, max_shrink) / best_s).to(w.dtype)


def _clip_search(w: Tensor, x: Tensor, spec: QuantSpec, n_grid: int, max_shrink: float) -> Tensor:
    """RTN of w with each (row, group) clamped to the shrink of ±max|w| that least changes that group's
    contribution to the outputs on x (AutoAWQ's auto_clip)."""
    g = w.shape[1] if spec.group_size == -1 else spec.group_size
    out = torch.empty_like(w)
    for c in range(0, w.shape[1], g):
        wg, xg = w[:, c:c + g], x[:, c:c + g]
        ref = xg @ wg.T  # n × out: this group's share of the outputs
        top = wg.abs().amax(1, keepdim=True)
        best = torch.full((w.shape[0],), float("inf"), device=w.device)
        chosen = torch.empty_like(wg)
        for i in range(int(max_shrink * n_grid)):
            lim = top * (1 - i / n_grid)
            cw = torch.maximum(torch.minimum(wg, lim), -lim)
            scale, zero, maxq = _params(cw, spec)
            q = _fake_quant(cw, scale, zero, maxq)
            err = ((xg @ q.T - ref) ** 2).mean(0)  # per output row
            better = err < best
            best = torch.where(better, err, best)
            chosen[better] = q[better]
        out[:, c:c + g] = chosen
    return out
