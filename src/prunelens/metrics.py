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
from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def _cos_pair(a: Tensor, b: Tensor, d: Tensor | None) -> tuple[Tensor, Tensor]:
    """(cos, 1 − cos), each computed the accurate way for its range, from four reductions.

    Near cos = 1 it uses 2|a||b|(1 − cos) = |d|² − (|b| − |a|)², |b| − |a| = (2a·d + |d|²)/(|a| + |b|)
    with d = b − a: exactly 0 for identical inputs and accurate for tiny perturbations, where
    ``1 − a·b/(|a||b|)`` bottoms out at ~1e-16. Elsewhere the plain ratio is the accurate one.
    A zero vector counts as orthogonal.
    """
    a, b = _f64(a), _f64(b)
    d = b - a if d is None else _f64(d)
    aa, bb, ab = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
    ad, dd = (a * d).sum(-1), (d * d).sum(-1)
    na, nb = aa.sqrt(), bb.sqrt()
    tiny = torch.finfo(torch.float64).tiny
    direct = (ab / (na * nb).clamp_min(tiny)).clamp(-1.0, 1.0)
    gap = (2.0 * ad + dd) / (na + nb).clamp_min(tiny)
    near = ((dd - gap * gap) / (2.0 * na * nb).clamp_min(tiny)).clamp(0.0, 2.0)
    use_near = direct > 0.5
    omc = torch.where(use_near, near, 1.0 - direct)
    cos = torch.where(use_near, 1.0 - near, direct)
    zero = (aa == 0) | (bb == 0)
    return torch.where(zero, torch.zeros_like(cos), cos), torch.where(zero, torch.ones_like(omc), omc)


def one_minus_cos(a: Tensor, b: Tensor, d: Tensor | None = None) -> Tensor:
    """1 − cos(a, b) along the last axis (pass d = b − a if already computed)."""
    return _cos_pair(a, b, d)[1]


def cosine(a: Tensor, b: Tensor, d: Tensor | None = None) -> Tensor:
    """Cosine similarity along the last axis (exactly 1 for identical non-zero vectors)."""
    return _cos_pair(a, b, d)[0]


def log_probs(z: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(z / T) in float64."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.log_softmax(_f64(z) / temperature, dim=-1)


def kl_div(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P || Q) from log-probabilities; terms with P = 0 contribute 0 (0·log 0 = 0)."""
    return (logp.exp() * (logp - logq)).nansum(-1).clamp_min(0.0)


def js_div(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen–Shannon divergence (natural log, bounded by ln 2)."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (kl_div(logp, logm) + kl_div(logq, logm))


def weighted_var(x: Tensor, w: Tensor) -> Tensor:
    """Variance of x under weights w (normalised along the last axis)."""
    x, w = _f64(x), _f64(w)
    total = w.sum(-1, keepdim=True)
    mean = (w * x).sum(-1, keepdim=True) / total
    c = x - mean
    return (w * c * c).sum(-1) / total.squeeze(-1)


def taylor_kl(dz: Tensor, p_dense: Tensor, temperature: float) -> Tensor:
    """Second-order estimate of KL between softmax(z/T) and softmax((z+Δz)/T): Var_p(Δz)/(2T²)."""
    return weighted_var(dz, p_dense) / (2.0 * temperature**2)


def taylor_one_minus_cos(dz: Tensor, p_dense: Tensor, temperature: float) -> Tensor:
    """Second-order estimate of 1 − cos(p, p'): Var_r(Δz)/(2T²) with r ∝ p²."""
    return weighted_var(dz, _f64(p_dense) ** 2) / (2.0 * temperature**2)


def uniform_var(dz: Tensor) -> Tensor:
    """Variance of Δz over the whole vocabulary with equal weights."""
    x = _f64(dz)
    c = x - x.mean(-1, keepdim=True)
    return (c * c).mean(-1)


def topk_var(dz: Tensor, z_dense: Tensor, k: int, idx: Tensor | None = None) -> Tensor:
    """Variance of Δz (equal weights) over the k tokens the dense model finds most likely.

    Ranking by dense logits equals ranking by dense probabilities at any temperature. ``idx``:
    the dense top-k indices, if already computed.
    """
    k = min(k, dz.shape[-1])
    idx = z_dense.topk(k, dim=-1).indices if idx is None else idx
    return _f64(dz).gather(-1, idx).var(-1, unbiased=False)


def topk_overlap(z_dense: Tensor, z_pruned: Tensor, k: int, idx: Tensor | None = None) -> Tensor:
    """|top-k(dense) ∩ top-k(pruned)| / k: how many of the dense model's candidates survive."""
    k = min(k, z_dense.shape[-1])
    a = z_dense.topk(k, dim=-1).indices if idx is None else idx
    b = z_pruned.topk(k, dim=-1).indices
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).to(torch.float64).mean(-1)


def _ranks(x: Tensor) -> Tensor:
    return x.argsort(-1).argsort(-1).to(torch.float64)


def topk_spearman(z_dense: Tensor, z_pruned: Tensor, k: int, idx: Tensor | None = None) -> Tensor:
    """Spearman correlation of dense and pruned logits over the dense model's top-k tokens
    (1: same order of the leading candidates; ties broken by index)."""
    k = min(k, z_dense.shape[-1])
    idx = z_dense.topk(k, dim=-1).indices if idx is None else idx
    rd, rp = _ranks(z_dense.gather(-1, idx)), _ranks(z_pruned.gather(-1, idx))
    rd, rp = rd - rd.mean(-1, keepdim=True), rp - rp.mean(-1, keepdim=True)
    den = (rd.norm(dim=-1) * rp.norm(dim=-1)).clamp_min(torch.finfo(torch.float64).tiny)
    return (rd * rp).sum(-1) / den


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
    light: bool = False,
    chunk_rows: int = 1,
) -> dict[str, Tensor]:
    """All logit- and probability-space metrics, one value per row.

    Keys: cos_z, cos_zc (centred logits), top1_agree, and per temperature T (suffix ``@T``):
    cos_p, one_minus_cos_p, kl.
    Unless ``light``: l1_dz, l2_dz, orth_frac_z, var_uniform, var_topk (top-``topk`` dense
    tokens), topk_overlap and topk_spearman (top-token stability), and per T: rkl, js, taylor_kl,
    taylor_cos.

    Rows are processed ``chunk_rows`` at a time: vocabulary-wide float64 temporaries of one row
    stay in cache (measured fastest on CPU) and do not fragment the heap in long decoding loops.
    """
    zd_all = z_dense.reshape(-1, z_dense.shape[-1])
    zp_all = z_pruned.reshape(-1, z_pruned.shape[-1])
    parts = [_logit_metrics_rows(zd_all[i:i + chunk_rows], zp_all[i:i + chunk_rows],
                                 temperatures, topk, light)
             for i in range(0, zd_all.shape[0], chunk_rows)]
    lead = z_dense.shape[:-1]
    return {k: torch.cat([p[k] for p in parts]).reshape(lead) for k in parts[0]}


def _softmax_f64(a: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(a) and logsumexp(a) per row with a single exp pass."""
    m = a.max(-1, keepdim=True).values
    e = torch.exp(a - m)
    s = e.sum(-1, keepdim=True)
    return e / s, m + s.log()


def _logit_metrics_rows(z_dense: Tensor, z_pruned: Tensor, temperatures: Sequence[float], topk: int,
                        light: bool) -> dict[str, Tensor]:
    zd, zp = _f64(z_dense), _f64(z_pruned)
    dz = zp - zd
    # softmax ignores a shift shared by all logits; cos_zc compares the centred logits, which
    # are blind to that shift exactly as p is (plain cos_z is not).
    zdc, dzc = zd - zd.mean(-1, keepdim=True), dz - dz.mean(-1, keepdim=True)
    out: dict[str, Tensor] = {
        "cos_z": cosine(zd, zp, dz),
        "cos_zc": cosine(zdc, zdc + dzc, dzc),
        "top1_agree": (zd.argmax(-1) == zp.argmax(-1)).to(torch.float64),
    }
    if not light:
        top_d = zd.topk(min(topk, zd.shape[-1]), dim=-1).indices
        par, orth = parallel_orthogonal(dz, zd)
        tot = par + orth
        out.update({
            "l1_dz": dz.abs().sum(-1),
            "l2_dz": dz.norm(dim=-1),
            "orth_frac_z": torch.where(tot > 0, orth / tot.clamp_min(1e-300), torch.zeros_like(tot)),
            "var_uniform": uniform_var(dz),
            "var_topk": topk_var(dz, zd, topk, top_d),
            "topk_overlap": topk_overlap(zd, zp, topk, top_d),
            "topk_spearman": topk_spearman(zd, zp, topk, top_d),
        })
    for t in temperatures:
        if t <= 0:
            raise ValueError(f"temperature must be positive, got {t}")
        pd, lse_d = _softmax_f64(zd / t)
        pp, lse_p = _softmax_f64(zp / t)
        # u = log p_pruned - log p_dense, exactly from dz: no log of a rounded probability, so
        # tiny perturbations keep full float64 precision.
        u = dz / t - (lse_p - lse_d)
        cos_p, omc = _cos_pair(pd, pp, pp - pd)
        out[f"cos_p@{t:g}"] = cos_p
        out[f"one_minus_cos_p@{t:g}"] = omc
        out[f"kl@{t:g}"] = (pp * u).nansum(-1).clamp_min(0.0)
        if light:
            continue
        out[f"rkl@{t:g}"] = (pd * u).nansum(-1).neg().clamp_min(0.0)
        # log p_d - log m = -log((1 + e^u) / 2), written to stay accurate for small |u|
        small = -torch.log1p(0.5 * torch.expm1(u.clamp(max=60.0)))
        t_d = torch.where(u > 60.0, math.log(2.0) - u, small)
        out[f"js@{t:g}"] = (0.5 * (pd * t_d + pp * (u + t_d))).nansum(-1).clamp_min(0.0)
        out[f"taylor_kl@{t:g}"] = taylor_kl(dz, pd, t)
        out[f"taylor_cos@{t:g}"] = taylor_one_minus_cos(dz, pd, t)
    return out


CHUNK_ELEMENTS = 1 << 22  # numbers in one vocabulary-wide chunk of rows (32 MiB in float64)


def rows_per_chunk(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one chunk of logits holds about ``elements`` numbers: metric memory
    stays bounded however large the vocabulary (Llama 3: 128k, Gemma 3: 262k) or the batch is."""
    return max(1, elements // max(vocab, 1))


def chunked_nll(head: Callable[[Tensor], Tensor], h: Tensor, targets: Tensor, rows: int) -> float:
    """Σ −log softmax(head(h))[target] over the rows of ``h`` (n × hidden), ``rows`` at a time:
    the n × vocab logits are never held at once."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    total = 0.0
    for i in range(0, h.shape[0], rows):
        z = _f64(head(h[i:i + rows]))
        total += float((torch.logsumexp(z, -1) - z.gather(-1, targets[i:i + rows, None].to(z.device))[:, 0]).sum())
    return total


def chunked_kl(head: Callable[[Tensor], Tensor], h_p: Tensor, h_d: Tensor, rows: int,
               temperature: float = 1.0) -> float:
    """Σ KL(softmax(head(h_p)/T) ‖ softmax(head(h_d)/T)) over rows, ``rows`` at a time."""
    h_p, h_d = h_p.reshape(-1, h_p.shape[-1]), h_d.reshape(-1, h_d.shape[-1])
    total = 0.0
    for i in range(0, h_p.shape[0], rows):
        total += float(kl_div(log_probs(head(h_p[i:i + rows]), temperature),
                              log_probs(head(h_d[i:i + rows]), temperature)).sum())
    return total


def token_kld(z_base: Tensor, z_mod: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per position, what llama.cpp's ``llama-perplexity --kl-divergence`` reads from a base and a
    compressed model's logits (n × vocab) over a text (``targets``: the next tokens, n):
    ``kl`` = KL(p_base ‖ p_mod), ``same_top`` = both put the same token first, ``dp`` =
    p_mod(next token) − p_base(next token), and each model's next-token NLL."""
    lb, lm = log_probs(z_base), log_probs(z_mod)
    t = targets.reshape(-1, 1).to(lb.device)
    tb, tm = lb.gather(-1, t)[:, 0], lm.gather(-1, t)[:, 0]
    return {"kl": kl_div(lb, lm), "same_top": (lb.argmax(-1) == lm.argmax(-1)).to(torch.float64),
            "dp": tm.exp() - tb.exp(), "nll_base": -tb, "nll_mod": -tm}


KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)


def kld_summary(v: dict[str, Tensor]) -> dict[str, float]:
    """llama.cpp's KL-divergence and token-probability statistics from ``token_kld`` rows: mean KL ±
    its standard error, KL percentiles, maximum and minimum, mean Δp ± s.e., RMS Δp ± s.e. (delta
    method), the share of positions with the same top token ± s.e., and both perplexities."""
    kl, dp, same = _f64(v["kl"]), _f64(v["dp"]), _f64(v["same_top"])
    n = kl.numel()
    if n < 2:
        raise ValueError("KL statistics need at least 2 positions")

    def se(x: Tensor) -> float:
        return float(x.std(unbiased=True) / math.sqrt(n))

    rms = float((dp * dp).mean().sqrt())
    out = {"positions": float(n), "mean_kld": float(kl.mean()), "mean_kld_se": se(kl),
           "max_kld": float(kl.max()), "min_kld": float(kl.min()),
           **{f"kld_p{q:g}": float(torch.quantile(kl, q / 100)) for q in KLD_PERCENTILES},
           "mean_dp": float(dp.mean()), "mean_dp_se": se(dp), "max_dp": float(dp.max()), "min_dp": float(dp.min()),
           "rms_dp": rms, "rms_dp_se": se(dp * dp) / (2 * rms) if rms > 0 else 0.0,
           "same_top": float(same.mean()), "same_top_se": se(same)}
    nb, nm = _f64(v["nll_base"]), _f64(v["nll_mod"])
    out.update(ppl_base=math.exp(float(nb.mean())), ppl_mod=math.exp(float(nm.mean())),
               mean_ln_ppl_ratio=float((nm - nb).mean()), mean_ln_ppl_ratio_se=se(nm - nb))
    return out


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D samples (nan if either is constant or too short)."""
    x, y = _f64(x).flatten(), _f64(y).flatten()
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: Tensor) -> Tensor:
        v = _f64(v).flatten()
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(v.numel(), dtype=torch.float64)
        for val in v.unique()[torch.unique(v, return_counts=True)[1] > 1]:  # average tied ranks
            tie = v == val
            r[tie] = r[tie].mean()
        return r

    return pearson(ranks(x), ranks(y))


def masked_mean(x: Tensor, mask: Tensor | None = None) -> float:
    """Mean over rows where mask is true (all rows if mask is None); nan if no row counts."""
    x = _f64(x)
    if mask is not None:
        x = x[mask.to(torch.bool)]
    return float(x.mean()) if x.numel() else float("nan")


def subspace_metrics(z_dense: Tensor, z_pruned: Tensor, idx: Tensor,
                     temperature: float = 1.0) -> dict[str, Tensor]:
    """Dense vs pruned restricted to a few answer tokens (e.g. A/B/C/D), renormalised.

    q = softmax(z[idx]/T) is p restricted to the options and renormalised (the same thing). Per row:
    ``sub_cos`` (cosine of q), ``sub_kl`` (KL(q_pruned ‖ q_dense)), ``sub_agree`` (same argmax option)
    and ``mass_dense``/``mass_pruned``: the share of p on the options before renormalising.
    """
    zd, zp = _f64(z_dense) / temperature, _f64(z_pruned) / temperature
    sd, sp = zd.gather(-1, idx), zp.gather(-1, idx)
    ld, lp = torch.log_softmax(sd, -1), torch.log_softmax(sp, -1)
    qd, qp = ld.exp(), lp.exp()
    return {
        "sub_cos": cosine(qd, qp, qp - qd),
        "sub_kl": (qp * (lp - ld)).sum(-1).clamp_min(0.0),
        "sub_agree": (sd.argmax(-1) == sp.argmax(-1)).to(torch.float64),
        "mass_dense": (torch.logsumexp(sd, -1) - torch.logsumexp(zd, -1)).exp(),
        "mass_pruned": (torch.logsumexp(sp, -1) - torch.logsumexp(zp, -1)).exp(),
    }


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[float], bins: int = 10) -> float:
    """ECE: Σ_b (n_b / n)·|accuracy_b − mean confidence_b| over equal-width confidence bins (the last
    bin closed). Pruning can keep accuracy while its probabilities stop meaning what they say."""
    c = torch.tensor(list(confidence), dtype=torch.float64)
    y = torch.tensor(list(correct), dtype=torch.float64)
    if c.numel() == 0 or c.shape != y.shape:
        raise ValueError("ECE needs one confidence per outcome, and at least one")
    b = torch.clamp((c * bins).long(), max=bins - 1)
    err = torch.zeros((), dtype=torch.float64)
    for i in range(bins):
        m = b == i
        if m.any():
            err += m.sum() / c.numel() * (y[m].mean() - c[m].mean()).abs()
    return float(err)


def rank_at_first_divergence(z: Tensor, tokens: Tensor) -> tuple[int, int] | None:
    """(step, rank) where a model teacher-forced on a reference continuation first prefers another
    token: the reference token's 1-based rank in its logits ``z`` [T, V] there (ties count against
    it); None when its top token follows the reference at every step. A rank of 2–5 means the
    answer was demoted, not erased."""
    top = z.argmax(-1)
    off = (top != tokens).nonzero()
    if off.numel() == 0:
        return None
    t = int(off[0, 0])
    return t, int((z[t] >= z[t, tokens[t]]).sum())
