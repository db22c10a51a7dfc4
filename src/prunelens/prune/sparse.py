"""Intra-layer sparsification of one linear layer: pure functions of W and calibration statistics.

Shapes follow ``nn.Linear``: W is (out_features, in_features); activations X are (tokens, in).
Patterns: unstructured at a ratio, or N:M — in every group of M consecutive input weights of a row,
at most N stay non-zero (2:4 and 4:8 keep half). Masks are True where a weight is *removed*.

- magnitude: remove the smallest |W| (one threshold per layer; per group of M for N:M).
- Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, removed per output row (per group for N:M).
- SparseGPT (Frantar & Alistarh 2023): OBS-style column sweep over the Cholesky factor of the
  inverse damped Hessian H = 2XᵀX/n, choosing the mask per block of columns (adaptive mask
  selection) and updating the remaining weights to compensate, with lazy batched updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunelens.errors import PrunelensError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pattern:
    """Unstructured ``ratio`` of weights removed, or N:M (``n`` kept of every ``m``)."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None:
            if not 0.0 <= self.ratio < 1.0:
                raise PrunelensError(f"sparsity must be in [0, 1), got {self.ratio:g}")
        elif self.n is None or self.m is None:
            raise PrunelensError("a pattern needs a ratio or N:M")
        elif not (self.m >= 1 and 1 <= self.n <= self.m):  # N = 0 would remove every weight
            raise PrunelensError(f"N:M pattern needs 1 <= N <= M and M >= 1, got {self.n}:{self.m}")

    @property
    def structured(self) -> bool:
        return self.ratio is None

    @property
    def density(self) -> float:
        return 1.0 - self.ratio if self.ratio is not None else self.n / self.m  # type: ignore[operator]

    def label(self) -> str:
        return f"{self.ratio:g}" if self.ratio is not None else f"{self.n}:{self.m}"

    def check_columns(self, in_features: int, name: str = "layer") -> None:
        if self.structured and in_features % self.m:  # type: ignore[operator]
            raise PrunelensError(
                f"N:M pattern {self.label()}: M={self.m} does not divide the input dimension "
                f"{in_features} of {name}")


def n_removed(count: int, ratio: float) -> int:
    """⌊count·ratio⌋ without float noise (100 · 0.29 is 28.999999999999996 in binary)."""
    return int(math.floor(count * ratio + 1e-9))


def _nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Remove the m−n lowest scores in every group of m consecutive columns."""
    rows, cols = score.shape
    g = score.reshape(rows, cols // m, m)
    idx = g.topk(m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def magnitude_mask(w: Tensor, pattern: Pattern) -> Tensor:
    """True where magnitude pruning removes a weight (layer-wide threshold for a ratio)."""
    score = w.detach().abs().float()
    pattern.check_columns(score.shape[1])
    if pattern.structured:
        return _nm_mask(score, pattern.n, pattern.m)  # type: ignore[arg-type]
    k = n_removed(score.numel(), pattern.ratio)  # type: ignore[arg-type]
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[score.flatten().topk(k, largest=False).indices] = True
    return mask.reshape(score.shape)


def wanda_mask(w: Tensor, act_sq_norm: Tensor, pattern: Pattern) -> Tensor:
    """True where Wanda removes a weight: lowest |W_ij|·‖X_j‖₂ per output row (or per N:M group).

    ``act_sq_norm`` is ‖X_j‖₂² per input feature (any positive scale: only the order matters).
    """
    score = w.detach().abs().float() * act_sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)
    pattern.check_columns(score.shape[1])
    if pattern.structured:
        return _nm_mask(score, pattern.n, pattern.m)  # type: ignore[arg-type]
    k = n_removed(score.shape[1], pattern.ratio)  # type: ignore[arg-type]
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    return mask


def damped_inverse_cholesky(h: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp·mean(diag H); and the dead columns.

    Columns never activated (H_jj = 0) get H_jj = 1 so the factorisation exists; their weights are
    irrelevant to the output and are set to zero by the callers, as in the reference algorithms.
    Computed in float64, keeping at most two d×d matrices alive (d = 8960 for a 1.5B model's
    down_proj: 640 MB each).
    """
    a = h.detach().to(torch.float64, copy=True)
    if not bool(torch.isfinite(a).all()):
        raise PrunelensError("calibration statistics are not finite (activation overflow? use float32)")
    dead = torch.diag(a) == 0
    a[dead, dead] = 1.0
    a.diagonal().add_(percdamp * torch.mean(torch.diag(a)))
    try:
        a = torch.linalg.cholesky(a)
    except torch.linalg.LinAlgError as e:
        raise PrunelensError(f"Hessian is not positive definite even after damping ({e})") from None
    a = torch.cholesky_inverse(a)
    return torch.linalg.cholesky(a, upper=True), dead


def sparsegpt_prune(w: Tensor, h: Tensor, pattern: Pattern, blocksize: int = 128,
                    percdamp: float = 0.01) -> Tensor:
    """SparseGPT's pruned and compensated W (same shape and dtype as ``w``)."""
    pattern.check_columns(w.shape[1])
    out_dtype = w.dtype
    W = w.detach().float().clone()
    rows, cols = W.shape
    Hinv, dead = damped_inverse_cholesky(h, percdamp)
    Hinv = Hinv.float()
    W[:, dead] = 0
    if pattern.structured and pattern.m > 0:  # type: ignore[operator]
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)  # type: ignore[operator]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pattern.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # adaptive mask: the block's lowest w²/[H⁻¹]²_jj
            score = W1 ** 2 / d.unsqueeze(0) ** 2
            k = n_removed(score.numel(), pattern.ratio)  # type: ignore[arg-type]
            mask1 = torch.zeros(score.numel(), dtype=torch.bool, device=W1.device)
            if k:
                mask1[score.flatten().topk(k, largest=False).indices] = True
            mask1 = mask1.reshape(score.shape)
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:  # type: ignore[operator]
                m = pattern.m
                score = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                drop = m - pattern.n  # type: ignore[operator]
                if drop:
                    mask1.scatter_(1, i + score.topk(drop, dim=1, largest=False).indices, True)
            w_col = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w_col), w_col)
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i] = q
            W1[:, i + 1:].sub_(torch.outer(err, Hinv1[i, i + 1:]))
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])
    return W.to(out_dtype)


def nm_violations(w: Tensor, n: int, m: int) -> int:
    """Number of groups of m consecutive input weights holding more than n non-zeros."""
    rows, cols = w.shape
    nz = (w != 0).reshape(rows, cols // m, m).sum(-1)
    return int((nz > n).sum())
