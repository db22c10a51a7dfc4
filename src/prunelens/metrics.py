"""Pure metric math for comparing a dense and a pruned model in the three spaces.

Everything here is a function of tensors only: no models, no hooks. The last dimension is
the feature axis (hidden size for h, vocabulary for z and p); leading dimensions are rows
(token positions, decoding steps, prompts) and are kept, so callers decide how to average.

Conventions (stated once, recorded in every result file):
- z are the model's output logits; h is the final-norm output, so z = lm_head(h).
- p = softmax(z / T). KL is KL(p_pruned || p_dense) ("kl"); "rkl" is KL(p_dense || p_pruned).
- Δz = z_pruned − z_dense. Taylor estimates use the *dense* distribution as the expansion point:
  KL ≈ Var_p(Δz) / (2T²) and 1 − cos(p) ≈ Var_r(Δz) / (2T²) with r ∝ p².
- Metrics are computed in float64 so that tiny perturbations are not drowned in rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def one_minus_cos(a: Tensor, b: Tensor) -> Tensor:
    """1 − cos(a, b) along the last axis, computed as ½‖â − b̂‖².

    Exactly 0 for identical inputs and free of the ~1e-16 cancellation floor of ``1 − a·b``, so
    tiny perturbations keep their relative accuracy. A zero vector counts as orthogonal.
    """
    a, b = _f64(a), _f64(b)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny
    d = 0.5 * ((a / na.clamp_min(tiny) - b / nb.clamp_min(tiny)) ** 2).sum(-1)
    zero = (na.squeeze(-1) == 0) | (nb.squeeze(-1) == 0)
    return torch.where(zero, torch.ones_like(d), d).clamp(0.0, 2.0)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last axis (exactly 1 for identical non-zero vectors)."""
    return 1.0 - one_minus_cos(a, b)


def log_probs(z: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(z / T) in float64."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.log_softmax(_f64(z) / temperature, dim=-1)


def kl_div(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P || Q) from log-probabilities; terms with P = 0 contribute 0."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def js_div(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen–Shannon divergence (natural log, bounded by ln 2)."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (kl_div(logp, logm) + kl_div(logq, logm))


def weighted_var(x: Tensor, w: Tensor) -> Tensor:
    """Variance of x under weights w (normalised along the last axis)."""
    x, w = _f64(x), _f64(w)
    w = w / w.sum(-1, keepdim=True)
    mean = (w * x).sum(-1, keepdim=True)
    return (w * (x - mean) ** 2).sum(-1)


def taylor_kl(dz: Tensor, p_dense: Tensor, temperature: float) -> Tensor:
    """Second-order estimate of KL between softmax(z/T) and softmax((z+Δz)/T): Var_p(Δz)/(2T²)."""
    return weighted_var(dz, p_dense) / (2.0 * temperature**2)


def taylor_one_minus_cos(dz: Tensor, p_dense: Tensor, temperature: float) -> Tensor:
    """Second-order estimate of 1 − cos(p, p'): Var_r(Δz)/(2T²) with r ∝ p²."""
    return weighted_var(dz, _f64(p_dense) ** 2) / (2.0 * temperature**2)


def uniform_var(dz: Tensor) -> Tensor:
    """Variance of Δz over the whole vocabulary with equal weights."""
    return _f64(dz).var(-1, unbiased=False)


def topk_var(dz: Tensor, z_dense: Tensor, k: int) -> Tensor:
    """Variance of Δz (equal weights) over the k tokens the dense model finds most likely.

    Ranking by dense logits equals ranking by dense probabilities at any temperature.
    """
    k = min(k, dz.shape[-1])
    idx = z_dense.topk(k, dim=-1).indices
    return _f64(dz).gather(-1, idx).var(-1, unbiased=False)


def parallel_orthogonal(delta: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Split ‖Δ‖² into the part along the dense vector `ref` and the part orthogonal to it."""
    delta, ref = _f64(delta), _f64(ref)
    ref_sq = (ref * ref).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    par_sq = (delta * ref).sum(-1) ** 2 / ref_sq
    total = (delta * delta).sum(-1)
    return par_sq, (total - par_sq).clamp_min(0.0)


def hidden_metrics(h_dense: Tensor, h_pruned: Tensor) -> dict[str, Tensor]:
    """Cosine and norm decomposition of Δh for hidden states (any space without a softmax)."""
    delta = _f64(h_pruned) - _f64(h_dense)
    par, orth = parallel_orthogonal(delta, h_dense)
    total = par + orth
    return {
        "cos": cosine(h_dense, h_pruned),
        "rel_l2": delta.norm(dim=-1) / _f64(h_dense).norm(dim=-1).clamp_min(1e-300),
        "par_sq": par,
        "orth_sq": orth,
        "orth_frac": torch.where(total > 0, orth / total.clamp_min(1e-300), torch.zeros_like(total)),
    }


def logit_metrics(
    z_dense: Tensor,
    z_pruned: Tensor,
    temperatures: Sequence[float] = (1.0,),
    topk: int = 10,
) -> dict[str, Tensor]:
    """All logit- and probability-space metrics, one value per row.

    Keys: cos_z, l1_dz, l2_dz, orth_frac_z, var_uniform, var_topk (top-``topk`` dense tokens),
    top1_agree, and per temperature
    T (suffix ``@T``): cos_p, one_minus_cos_p, kl, rkl, js, taylor_kl, taylor_cos.
    """
    zd, zp = _f64(z_dense), _f64(z_pruned)
    dz = zp - zd
    par, orth = parallel_orthogonal(dz, zd)
    tot = par + orth
    out: dict[str, Tensor] = {
        "cos_z": cosine(zd, zp),
        "l1_dz": dz.abs().sum(-1),
        "l2_dz": dz.norm(dim=-1),
        "orth_frac_z": torch.where(tot > 0, orth / tot.clamp_min(1e-300), torch.zeros_like(tot)),
        "var_uniform": uniform_var(dz),
        "var_topk": topk_var(dz, zd, topk),
        "top1_agree": (zd.argmax(-1) == zp.argmax(-1)).to(torch.float64),
    }
    for t in temperatures:
        lpd, lpp = log_probs(zd, t), log_probs(zp, t)
        pd, pp = lpd.exp(), lpp.exp()
        omc = one_minus_cos(pd, pp)
        out[f"cos_p@{t:g}"] = 1.0 - omc
        out[f"one_minus_cos_p@{t:g}"] = omc
        out[f"kl@{t:g}"] = kl_div(lpp, lpd)
        out[f"rkl@{t:g}"] = kl_div(lpd, lpp)
        out[f"js@{t:g}"] = js_div(lpp, lpd)
        out[f"taylor_kl@{t:g}"] = taylor_kl(dz, pd, t)
        out[f"taylor_cos@{t:g}"] = taylor_one_minus_cos(dz, pd, t)
    return out


def masked_mean(x: Tensor, mask: Tensor | None = None) -> float:
    """Mean over rows where mask is true (all rows if mask is None); nan if no row counts."""
    x = _f64(x)
    if mask is not None:
        x = x[mask.to(torch.bool)]
    return float(x.mean()) if x.numel() else float("nan")
