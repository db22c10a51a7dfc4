"""Closed-form maps between activations: pure functions of X (what a kept sublayer adds to the
residual stream) and R (what it should add so that the stream matches the reference).

Row convention, as activations are stored (tokens × hidden): the repaired contribution is X·T.
Merged into a projection y = W·a (``nn.Linear``, W: hidden × in) this is y' = Tᵀ·W·a, so the new
weight is Tᵀ·W.

- ``ridge_map``: argmin_T ‖X·T − R‖² + α‖T‖², T = (XᵀX + αI)⁻¹XᵀR, with α given relative to the
  mean diagonal of XᵀX (scale-free). α = 0 is ReplaceMe's ``lstsq`` (Shopkhoev et al. 2025, eq. 5).
- ``diagonal_map``: per channel, the 1-D least squares r_j ≈ s_j·x_j (+ b_j): the training-free
  scale and bias correction (the analogue of quantisation bias correction).
- ``cosine_map``: argmin_T mean_t 1 − cos(y_t + x_t·T, l_t), the cosine objective on the full
  residual stream (y = the stream without the contribution, l = the reference stream): ReplaceMe's
  ``accurate: True`` mode (its default compares x·T with l − y instead), solved by full-batch
  L-BFGS from the ridge solution (ReplaceMe: 10 epochs of Adam from the identity).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class NormalEquations:
    """Running XᵀX, XᵀR and the per-channel sums, in float64, so a fit never holds all tokens."""

    def __init__(self) -> None:
        self.n = 0
        self.xtx: Tensor | None = None
        self.xtr: Tensor | None = None
        self.sums: dict[str, Tensor] = {}

    def add(self, x: Tensor, r: Tensor, full: bool = True) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        r = r.reshape(-1, r.shape[-1]).double()
        parts = {"x": x.sum(0), "xx": (x * x).sum(0), "r": r.sum(0), "xr": (x * r).sum(0)}
        for k, v in parts.items():
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        if full:
            self.xtx = x.T @ x if self.xtx is None else self.xtx.add_(x.T @ x)
            self.xtr = x.T @ r if self.xtr is None else self.xtr.add_(x.T @ r)
        self.n += x.shape[0]


def ridge_map(xtx: Tensor, xtr: Tensor, ridge: float = 0.0) -> Tensor:
    """T = (XᵀX + αI)⁻¹XᵀR with α = ridge · mean(diag XᵀX); float64, solved, never inverted."""
    d = xtx.shape[0]
    alpha = ridge * float(torch.diagonal(xtx).mean())
    a = xtx + alpha * torch.eye(d, dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(a, xtr)


def diagonal_map(sums: dict[str, Tensor], n: int, bias: bool) -> tuple[Tensor, Tensor]:
    """Per-channel (s, b) minimising Σ_t (s_j·x_tj + b_j − r_tj)²; b = 0 without ``bias``.
    A channel that never varies keeps s = 1 (there is nothing to fit)."""
    sx, sxx, sr, sxr = sums["x"], sums["xx"], sums["r"], sums["xr"]
    if bias:
        var = sxx - sx * sx / n
        cov = sxr - sx * sr / n
        ok = var > 1e-12 * sxx.clamp_min(1e-300)
        s = torch.where(ok, cov / var.where(ok, torch.ones_like(var)), torch.ones_like(var))
        b = (sr - s * sx) / n
        return s, b
    ok = sxx > 0
    s = torch.where(ok, sxr / sxx.where(ok, torch.ones_like(sxx)), torch.ones_like(sxx))
    return s, torch.zeros_like(s)


def cosine_loss(x: Tensor, y: Tensor, ref: Tensor, t: Tensor) -> Tensor:
    """mean_t 1 − cos(y_t + x_t·T, ref_t)."""
    return 1 - torch.nn.functional.cosine_similarity(y + x @ t, ref, dim=-1).mean()


def cosine_map(x: Tensor, y: Tensor, ref: Tensor, init: Tensor, max_iter: int = 100) -> tuple[Tensor, dict]:
    """T minimising ``cosine_loss`` (L-BFGS with strong Wolfe line search, from ``init``); returns T
    and the loss before and after, the iterations run, and whether it fell back to ``init``.

    In float64: residual streams reach norms of 10⁴, so the loss's gradient is ~10⁻⁵ and in float32
    the line search sees no change after one step and stops (T moved 4·10⁻⁵ relative on SmolLM2,
    checked against ReplaceMe's estimator by ``benchmarks/replaceme_check.py``). Memory: the
    activations plus 2 × 10 history vectors of d² doubles (2.7 GB at d = 4096, 11 GB at 8192)."""
    x, y, ref = x.double(), y.double(), ref.double()
    t = init.double().contiguous().clone().requires_grad_(True)  # LBFGS views grads flat
    opt = torch.optim.LBFGS([t], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = cosine_loss(x, y, ref, t)
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(cosine_loss(x, y, ref, t))
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        after = float(cosine_loss(x, y, ref, t))
    info = {"cosine_loss_before": before, "lbfgs_iterations": int(opt.state[t].get("n_iter", 0))}
    if not after <= before:  # never worse than the start, and said so
        return init.double(), {**info, "cosine_loss_after": before, "cosine_fallback": True}
    return t.detach(), {**info, "cosine_loss_after": after, "cosine_fallback": False}


def merged_weight(w: Tensor, t: Tensor) -> Tensor:
    """The projection weight that outputs (W·a)ᵀ·T: Tᵀ·W (in float64, cast back to W's dtype)."""
    return (t.T.to(w.device, torch.float64) @ w.double()).to(w.dtype)


def scaled_weight(w: Tensor, s: Tensor) -> Tensor:
    """diag(s)·W: each output channel scaled (zeros of a sparse W stay zeros)."""
    return (w.double() * s.to(w.device, torch.float64)[:, None]).to(w.dtype)
