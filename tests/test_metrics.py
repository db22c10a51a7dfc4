"""Tests for prunelens.metrics against closed forms and hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prunelens.metrics import (
    cosine,
    hidden_metrics,
    js_div,
    kl_div,
    log_probs,
    logit_metrics,
    masked_mean,
    parallel_orthogonal,
    taylor_kl,
    taylor_one_minus_cos,
    topk_var,
    uniform_var,
    weighted_var,
)

F64 = torch.float64
LN2 = math.log(2.0)


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def logt(*probs: float) -> torch.Tensor:
    """log of a probability vector; exact zeros become -inf."""
    return torch.log(t64(*probs))


def randn(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64)


def dyadic_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Random logits on a 2**-10 grid, so adding a dyadic constant is exact in float64."""
    return torch.round(randn(rows, vocab, seed=seed) * 3.0 * 1024.0) / 1024.0


# ---------------------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------------------


def test_cosine_hand_values() -> None:
    assert cosine(t64(1, 0), t64(1, 1)).item() == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert cosine(t64(1, 2, 3), t64(-1, -2, -3)).item() == pytest.approx(-1.0, rel=1e-15)
    assert cosine(t64(1, 2, 0), t64(-2, 1, 5)).item() == 0.0
    # [3, 4] . [4, 3] = 24, |a| |b| = 25
    assert cosine(t64(3, 4), t64(4, 3)).item() == pytest.approx(24 / 25, rel=1e-15)


def test_cosine_scale_invariant_and_keeps_rows() -> None:
    a, b = randn(5, 7, seed=1), randn(5, 7, seed=2)
    base = cosine(a, b)
    assert base.shape == (5,)
    assert base.dtype == F64
    torch.testing.assert_close(cosine(3.7 * a, b), base, rtol=1e-13, atol=0)
    torch.testing.assert_close(cosine(a, 0.01 * b), base, rtol=1e-13, atol=0)
    # a negative scale flips the sign
    torch.testing.assert_close(cosine(-2.0 * a, b), -base, rtol=1e-13, atol=0)
    # cosine is symmetric
    torch.testing.assert_close(cosine(b, a), base, rtol=1e-15, atol=0)


def test_cosine_zero_vector_is_finite() -> None:
    assert cosine(t64(0, 0, 0), t64(1, 2, 3)).item() == 0.0


# ---------------------------------------------------------------------------------------
# log_probs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -0.5, -1.0])
def test_log_probs_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        log_probs(t64(1, 2, 3), temperature)


def test_log_probs_hand_values_and_temperature() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4]
    lp = log_probs(torch.tensor([0.0, math.log(3.0)], dtype=torch.float32))
    assert lp.dtype == F64
    torch.testing.assert_close(lp.exp(), t64(0.25, 0.75), rtol=1e-7, atol=0)
    # at T = 2 the logits are halved: softmax([0, ln 3 / 2]) = [1, sqrt 3] / (1 + sqrt 3)
    lp2 = log_probs(t64(0.0, math.log(3.0)), temperature=2.0)
    s3 = math.sqrt(3.0)
    torch.testing.assert_close(lp2.exp(), t64(1 / (1 + s3), s3 / (1 + s3)), rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------
# kl_div
# ---------------------------------------------------------------------------------------


def test_kl_div_hand_value() -> None:
    # KL([0.5, 0.5] || [0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert expected == pytest.approx(0.5108256237659907, rel=1e-12)
    got = kl_div(logt(0.5, 0.5), logt(0.9, 0.1)).item()
    assert got == pytest.approx(expected, rel=1e-14)


def test_kl_div_three_elements() -> None:
    # KL([0.2, 0.3, 0.5] || [0.1, 0.6, 0.3])
    expected = 0.2 * math.log(2.0) + 0.3 * math.log(0.5) + 0.5 * math.log(0.5 / 0.3)
    got = kl_div(logt(0.2, 0.3, 0.5), logt(0.1, 0.6, 0.3)).item()
    assert got == pytest.approx(expected, rel=1e-14)


def test_kl_div_is_asymmetric() -> None:
    forward = kl_div(logt(0.5, 0.5), logt(0.9, 0.1)).item()
    backward = kl_div(logt(0.9, 0.1), logt(0.5, 0.5)).item()
    assert backward == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-14)
    assert backward == pytest.approx(0.3680642071684971, rel=1e-12)
    assert abs(forward - backward) > 0.1


def test_kl_div_zero_for_identical() -> None:
    lp = log_probs(randn(3, 50, seed=3))
    assert torch.equal(kl_div(lp, lp), torch.zeros(3, dtype=F64))


def test_kl_div_handles_zeros_in_p() -> None:
    # P = [1, 0, 0] (log P has -inf), Q = [1/2, 1/4, 1/4]: KL = 1 * ln(1 / (1/2)) = ln 2
    got = kl_div(logt(1.0, 0.0, 0.0), logt(0.5, 0.25, 0.25))
    assert not torch.isnan(got).any()
    assert got.item() == pytest.approx(LN2, rel=1e-15)
    # P = [1/2, 1/2, 0], Q = [1/4, 1/4, 1/2]: KL = 2 * 0.5 * ln 2 = ln 2
    got = kl_div(logt(0.5, 0.5, 0.0), logt(0.25, 0.25, 0.5))
    assert got.item() == pytest.approx(LN2, rel=1e-15)
    # Q = 0 where P > 0 makes the divergence infinite, not nan
    assert kl_div(logt(0.5, 0.5), logt(1.0, 0.0)).item() == math.inf


def test_kl_div_rows_are_independent() -> None:
    logp = torch.stack([logt(0.5, 0.5), logt(0.9, 0.1)])
    logq = torch.stack([logt(0.9, 0.1), logt(0.9, 0.1)])
    got = kl_div(logp, logq)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(0.5108256237659907, rel=1e-12)
    assert got[1].item() == 0.0


# ---------------------------------------------------------------------------------------
# js_div
# ---------------------------------------------------------------------------------------


def test_js_div_hand_value() -> None:
    # P = [1, 0], Q = [1/2, 1/2], M = [3/4, 1/4]
    # KL(P||M) = ln(4/3); KL(Q||M) = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3); JS = 0.75 ln(4/3)
    expected = 0.75 * math.log(4.0 / 3.0)
    got = js_div(logt(1.0, 0.0), logt(0.5, 0.5)).item()
    assert got == pytest.approx(expected, rel=1e-14)


def test_js_div_symmetric_and_bounded() -> None:
    logp = log_probs(randn(6, 40, seed=4) * 2.0)
    logq = log_probs(randn(6, 40, seed=5) * 2.0)
    forward, backward = js_div(logp, logq), js_div(logq, logp)
    torch.testing.assert_close(forward, backward, rtol=1e-14, atol=0)
    assert bool((forward > 0).all())
    assert bool((forward < LN2).all())


def test_js_div_zero_for_identical() -> None:
    lp = log_probs(randn(3, 50, seed=6))
    torch.testing.assert_close(js_div(lp, lp), torch.zeros(3, dtype=F64), rtol=0, atol=1e-15)


def test_js_div_disjoint_supports_is_ln2() -> None:
    # exact one-hots with -inf log-probabilities
    got = js_div(logt(1.0, 0.0, 0.0), logt(0.0, 0.5, 0.5))
    assert got.item() == pytest.approx(LN2, rel=1e-15)
    # very peaked distributions on different tokens approach ln 2
    peaked_a = log_probs(t64(100.0, 0.0, 0.0))
    peaked_b = log_probs(t64(0.0, 0.0, 100.0))
    assert js_div(peaked_a, peaked_b).item() == pytest.approx(LN2, rel=1e-12)


# ---------------------------------------------------------------------------------------
# weighted_var, uniform_var, Taylor estimates
# ---------------------------------------------------------------------------------------


def test_weighted_var_hand_value() -> None:
    # w = [1, 1, 2] -> [1/4, 1/4, 1/2]; mean = 2.25; var = (1.5625 + 0.0625) / 4 + 0.5625 / 2
    x, w = t64(1, 2, 3), t64(1, 1, 2)
    assert weighted_var(x, w).item() == pytest.approx(0.6875, rel=1e-15)
    # weights need not be normalised
    assert weighted_var(x, 10.0 * w).item() == pytest.approx(0.6875, rel=1e-15)
    # a point mass has no variance
    assert weighted_var(x, t64(0, 1, 0)).item() == 0.0
    # equal weights give the population variance
    assert weighted_var(t64(1, 2, 3, 4), t64(1, 1, 1, 1)).item() == pytest.approx(1.25, rel=1e-15)


def test_uniform_var_hand_value() -> None:
    # population variance (divide by n, not n - 1)
    assert uniform_var(t64(1, 2, 3, 4)).item() == pytest.approx(1.25, rel=1e-15)
    assert uniform_var(t64(2, 4, 4, 4, 5, 5, 7, 9)).item() == pytest.approx(4.0, rel=1e-15)
    rows = torch.stack([t64(1, 2, 3, 4), t64(5, 5, 5, 5)])
    torch.testing.assert_close(uniform_var(rows), t64(1.25, 0.0), rtol=1e-15, atol=0)


def test_taylor_kl_hand_value() -> None:
    # Var_p(dz) = 0.6875 for p = [1/4, 1/4, 1/2]; divided by 2 T^2
    dz, p = t64(1, 2, 3), t64(0.25, 0.25, 0.5)
    assert taylor_kl(dz, p, 1.0).item() == pytest.approx(0.6875 / 2, rel=1e-15)
    assert taylor_kl(dz, p, 0.5).item() == pytest.approx(0.6875 / 0.5, rel=1e-15)


def test_taylor_one_minus_cos_hand_value() -> None:
    # r ∝ p^2 = [1/16, 1/16, 1/4] -> [1/6, 1/6, 2/3]; mean 2.5;
    # Var_r = (2.25 + 0.25) / 6 + (2/3) * 0.25 = 7/12
    dz, p = t64(1, 2, 3), t64(0.25, 0.25, 0.5)
    assert taylor_one_minus_cos(dz, p, 1.0).item() == pytest.approx(7 / 24, rel=1e-14)
    assert taylor_one_minus_cos(dz, p, 2.0).item() == pytest.approx(7 / 96, rel=1e-14)


# ---------------------------------------------------------------------------------------
# topk_var
# ---------------------------------------------------------------------------------------


def test_topk_var_uses_dense_top_k() -> None:
    z_dense = t64(0.1, 5.0, -1.0, 3.0, 2.0)  # top-2 tokens: 1 and 3
    dz = t64(10.0, 1.0, 20.0, 4.0, 30.0)  # dz there: [1, 4] -> var 2.25
    assert topk_var(dz, z_dense, 2).item() == pytest.approx(2.25, rel=1e-15)
    # top-3 adds token 4 (dz = 30): values [1, 4, 30]
    expected3 = torch.tensor([1.0, 4.0, 30.0], dtype=F64).var(unbiased=False).item()
    assert topk_var(dz, z_dense, 3).item() == pytest.approx(expected3, rel=1e-15)
    # k = 1 is a single value: zero variance
    assert topk_var(dz, z_dense, 1).item() == 0.0


def test_topk_var_k_larger_than_vocab_uses_all() -> None:
    z_dense, dz = t64(0.0, 1.0, 2.0), t64(1.0, 2.0, 6.0)
    assert topk_var(dz, z_dense, 100).item() == pytest.approx(uniform_var(dz).item(), rel=1e-15)


def test_topk_var_per_row() -> None:
    z_dense = torch.stack([t64(9, 8, 0, 0), t64(0, 0, 8, 9)])
    dz = torch.stack([t64(1, 3, 100, 100), t64(100, 100, 0, 10)])
    torch.testing.assert_close(topk_var(dz, z_dense, 2), t64(1.0, 25.0), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------
# parallel_orthogonal and hidden_metrics
# ---------------------------------------------------------------------------------------


def test_parallel_orthogonal_parallel_delta() -> None:
    ref = t64(1, 2, 2)  # |ref|^2 = 9
    par, orth = parallel_orthogonal(2.0 * ref, ref)
    assert par.item() == 36.0  # 4 |ref|^2
    assert orth.item() == 0.0


def test_parallel_orthogonal_orthogonal_delta() -> None:
    ref = t64(1, 2, 2)
    par, orth = parallel_orthogonal(t64(2, -1, 0), ref)
    assert par.item() == 0.0
    assert orth.item() == pytest.approx(5.0, rel=1e-15)


def test_parallel_orthogonal_mixed_hand_value() -> None:
    # delta = [3, 4] + [-4, 3] with ref = [3, 4]: par 25, orth 25
    par, orth = parallel_orthogonal(t64(-1, 7), t64(3, 4))
    assert par.item() == pytest.approx(25.0, rel=1e-15)
    assert orth.item() == pytest.approx(25.0, rel=1e-14)


def test_parallel_orthogonal_sums_to_total() -> None:
    delta, ref = randn(8, 64, seed=7), randn(8, 64, seed=8)
    par, orth = parallel_orthogonal(delta, ref)
    total = (delta * delta).sum(-1)
    torch.testing.assert_close(par + orth, total, rtol=1e-13, atol=0)
    assert bool((par >= 0).all()) and bool((orth >= 0).all())
    # par = (delta . ref_hat)^2 computed independently
    ref_hat = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(par, (delta * ref_hat).sum(-1) ** 2, rtol=1e-12, atol=1e-12)


def test_hidden_metrics_hand_values() -> None:
    h_dense = t64(3, 4)
    h_pruned = t64(2, 11)  # delta = [-1, 7] = [3, 4] + [-4, 3]
    m = hidden_metrics(h_dense, h_pruned)
    assert m["par_sq"].item() == pytest.approx(25.0, rel=1e-15)
    assert m["orth_sq"].item() == pytest.approx(25.0, rel=1e-14)
    assert m["orth_frac"].item() == pytest.approx(0.5, rel=1e-14)
    assert m["rel_l2"].item() == pytest.approx(math.sqrt(50.0) / 5.0, rel=1e-15)
    # 3*2 + 4*11 = 50; |h_pruned| = sqrt(125)
    assert m["cos"].item() == pytest.approx(50.0 / (5.0 * math.sqrt(125.0)), rel=1e-15)


def test_hidden_metrics_pure_scaling_and_identity() -> None:
    h = torch.stack([t64(1, 2, 2), t64(0, 3, 4)])
    scaled = hidden_metrics(h, 1.5 * h)
    torch.testing.assert_close(scaled["orth_frac"], t64(0.0, 0.0), rtol=0, atol=1e-15)
    torch.testing.assert_close(scaled["rel_l2"], t64(0.5, 0.5), rtol=1e-15, atol=0)
    same = hidden_metrics(h, h.clone())
    assert torch.equal(same["orth_frac"], t64(0.0, 0.0))  # 0/0 is defined as 0
    assert torch.equal(same["rel_l2"], t64(0.0, 0.0))
    # purely orthogonal change of the first row: orth_frac = 1
    orth = hidden_metrics(t64(1, 2, 2), t64(3, 1, 2))  # delta [2, -1, 0]
    assert orth["orth_frac"].item() == 1.0


# ---------------------------------------------------------------------------------------
# logit_metrics
# ---------------------------------------------------------------------------------------


def test_logit_metrics_keys_and_shapes() -> None:
    z = randn(4, 20, seed=9)
    m = logit_metrics(z, z + 0.1 * randn(4, 20, seed=10), temperatures=(1.0, 0.5, 2.0), topk=5)
    per_t = ("cos_p", "one_minus_cos_p", "kl", "rkl", "js", "taylor_kl", "taylor_cos")
    expected = {
        "cos_z",
        "cos_zc",
        "l1_dz",
        "l2_dz",
        "orth_frac_z",
        "var_uniform",
        "var_topk",
        "topk_overlap",
        "topk_spearman",
        "top1_agree",
    }
    expected |= {f"{k}@{t}" for k in per_t for t in ("1", "0.5", "2")}
    assert set(m) == expected
    for key, value in m.items():
        assert value.shape == (4,), key
        assert value.dtype == F64, key


def test_logit_metrics_direction_of_kl_hand_values() -> None:
    # dense p = [1/2, 1/2]; pruned q = softmax([ln 9, 0]) = [0.9, 0.1]
    z_dense, z_pruned = t64(0.0, 0.0), t64(math.log(9.0), 0.0)
    m = logit_metrics(z_dense, z_pruned)
    # "kl" is KL(pruned || dense), "rkl" is KL(dense || pruned)
    assert m["kl@1"].item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-13)
    assert m["rkl@1"].item() == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-13
    )
    # cos([1/2, 1/2], [0.9, 0.1]) = 0.5 / (sqrt(0.5) sqrt(0.82))
    cos_p = 0.5 / (math.sqrt(0.5) * math.sqrt(0.82))
    assert m["cos_p@1"].item() == pytest.approx(cos_p, rel=1e-14)
    assert m["one_minus_cos_p@1"].item() == pytest.approx(1 - cos_p, rel=1e-12)
    # dz = [ln 9, 0]: uniform var = (ln 9 / 2)^2; Taylor KL = Var_p / 2 with p uniform
    assert m["var_uniform"].item() == pytest.approx((math.log(9.0) / 2) ** 2, rel=1e-14)
    assert m["taylor_kl@1"].item() == pytest.approx((math.log(9.0) / 2) ** 2 / 2, rel=1e-14)
    # the all-zero dense logits have no direction: the zero-norm guard gives cos_z = 0
    assert m["cos_z"].item() == 0.0
    assert m["l1_dz"].item() == pytest.approx(math.log(9.0), rel=1e-15)
    assert m["top1_agree"].item() == 1.0  # both argmaxes are token 0 (tie -> first)


def test_logit_metrics_top1_agree() -> None:
    z_dense = torch.stack([t64(0, 3, 1), t64(0, 3, 1)])
    z_pruned = torch.stack([t64(0, 2, 1), t64(5, 2, 1)])
    m = logit_metrics(z_dense, z_pruned)
    assert torch.equal(m["top1_agree"], t64(1.0, 0.0))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_softmax_perturbation_cosine_identity(temperature: float) -> None:
    """cos(p, q) = E_r[u] / sqrt(E_r[u^2]) with u = exp(dz/T), r ∝ p^2, exactly."""
    z = 3.0 * randn(4, 1000, seed=11)
    # dz is not small: the identity is exact, not a Taylor expansion
    dz = randn(4, 1000, seed=12)
    p = torch.softmax(z / temperature, dim=-1)
    q = torch.softmax((z + dz) / temperature, dim=-1)
    u = torch.exp(dz / temperature)
    r = p**2 / (p**2).sum(-1, keepdim=True)
    closed_form = (r * u).sum(-1) / torch.sqrt((r * u**2).sum(-1))
    assert bool((closed_form < 0.999).all())  # a genuinely non-trivial perturbation
    torch.testing.assert_close(cosine(p, q), closed_form, rtol=1e-12, atol=0)
    m = logit_metrics(z, z + dz, temperatures=(temperature,))
    torch.testing.assert_close(m[f"cos_p@{temperature:g}"], closed_form, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_exact_kl_matches_direct_formula(temperature: float) -> None:
    z = 3.0 * randn(4, 1000, seed=13)
    zp = z + 0.3 * randn(4, 1000, seed=14)
    p = torch.softmax(z / temperature, dim=-1)
    q = torch.softmax(zp / temperature, dim=-1)
    m = logit_metrics(z, zp, temperatures=(temperature,))
    t = f"{temperature:g}"
    torch.testing.assert_close(m[f"kl@{t}"], (q * (q / p).log()).sum(-1), rtol=1e-10, atol=0)
    torch.testing.assert_close(m[f"rkl@{t}"], (p * (p / q).log()).sum(-1), rtol=1e-10, atol=0)
    mid = 0.5 * (p + q)
    js = 0.5 * ((p * (p / mid).log()).sum(-1) + (q * (q / mid).log()).sum(-1))
    torch.testing.assert_close(m[f"js@{t}"], js, rtol=1e-10, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_taylor_estimates_converge(temperature: float) -> None:
    """taylor_kl / KL(q||p) -> 1 and taylor_cos / (1 - cos) -> 1 with error O(eps)."""
    z = 3.0 * randn(4, 1000, seed=15)
    direction = randn(4, 1000, seed=16)
    t = f"{temperature:g}"
    eps_values = (1e-1, 1e-2, 1e-3)
    errors: dict[str, list[torch.Tensor]] = {"kl": [], "cos": []}
    for eps in eps_values:
        m = logit_metrics(z, z + eps * direction, temperatures=(temperature,))
        errors["kl"].append((m[f"taylor_kl@{t}"] / m[f"kl@{t}"] - 1.0).abs())
        errors["cos"].append((m[f"taylor_cos@{t}"] / m[f"one_minus_cos_p@{t}"] - 1.0).abs())
    for name, errs in errors.items():
        # close to 1 at the smallest eps
        assert bool((errs[-1] < 1e-2).all()), (name, errs[-1])
        # at eps = 0.1 the expansion is visibly inexact (so the test has teeth)
        assert errs[0].max().item() > 1e-2, (name, errs[0])
        for big, small in itertools.pairwise(errs):
            # the error is first order: a 10x smaller eps gives a ~10x smaller error
            # (worst row; a second-order error would shrink 100x)
            slope = torch.log10(big.max() / small.max()).item()
            assert 0.8 < slope < 1.2, (name, slope)
            # and every row shrinks by at least 5x, at most 60x per decade
            factor = big / small
            assert bool(((factor > 5.0) & (factor < 60.0)).all()), (name, factor)


def test_constant_shift_leaves_probabilities_unchanged() -> None:
    vocab, c = 1000, 0.75
    z = dyadic_logits(4, vocab, seed=17)
    z_pruned = z + c
    assert bool(((z_pruned - z) == c).all())  # dz is exactly constant
    m = logit_metrics(z, z_pruned, temperatures=(1.0, 0.5), topk=10)
    for t in ("1", "0.5"):
        for key in ("kl", "rkl", "js"):
            torch.testing.assert_close(m[f"{key}@{t}"], torch.zeros(4, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(m[f"cos_p@{t}"], torch.ones(4, dtype=F64), rtol=0, atol=1e-14)
        # Var of a constant: zero up to the rounding of the normalised weights (~(c * 1e-16)^2)
        for key in ("taylor_kl", "taylor_cos"):
            assert bool((m[f"{key}@{t}"].abs() < 1e-30).all()), (key, m[f"{key}@{t}"])
    assert torch.equal(m["var_uniform"], torch.zeros(4, dtype=F64))
    assert torch.equal(m["var_topk"], torch.zeros(4, dtype=F64))
    assert torch.equal(m["top1_agree"], torch.ones(4, dtype=F64))
    # logit-space metrics do see the shift
    assert bool((m["cos_z"] < 1.0 - 1e-3).all())
    torch.testing.assert_close(
        m["l2_dz"],
        torch.full((4,), c * math.sqrt(vocab), dtype=F64),
        rtol=1e-14,
        atol=0,
    )
    torch.testing.assert_close(m["l1_dz"], torch.full((4,), c * vocab, dtype=F64), rtol=1e-14, atol=0)


def test_identical_logits_give_exact_zeros() -> None:
    z = randn(4, 1000, seed=18) * 3.0
    m = logit_metrics(z, z.clone(), temperatures=(1.0, 0.5, 2.0), topk=10)
    zeros, ones = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    exact_zero = ["l1_dz", "l2_dz", "orth_frac_z", "var_uniform", "var_topk"]
    for t in ("1", "0.5", "2"):
        exact_zero += [f"kl@{t}", f"rkl@{t}", f"taylor_kl@{t}", f"taylor_cos@{t}"]
    for key in exact_zero:
        assert torch.equal(m[key], zeros), (key, m[key])
    assert torch.equal(m["top1_agree"], ones)
    # cosines are exactly 1; JS is 0 up to a few ulps of rounding
    for t in ("1", "0.5", "2"):
        assert torch.equal(m[f"cos_p@{t}"], ones)
        torch.testing.assert_close(m[f"js@{t}"], zeros, rtol=0, atol=1e-15)
    assert torch.equal(m["cos_z"], ones)


def test_identical_logits_cos_exactly_one() -> None:
    z = randn(4, 1000, seed=18) * 3.0
    m = logit_metrics(z, z.clone(), temperatures=(1.0, 0.5, 2.0), topk=10)
    for t in ("1", "0.5", "2"):
        assert torch.equal(m[f"cos_p@{t}"], torch.ones(4, dtype=F64)), m[f"cos_p@{t}"]
        assert torch.equal(m[f"one_minus_cos_p@{t}"], torch.zeros(4, dtype=F64))
    assert bool((m["cos_z"] <= 1.0).all()), m["cos_z"]


def test_one_minus_cos_accurate_for_tiny_perturbations() -> None:
    z = 3.0 * randn(4, 1000, seed=15)
    dz = 1e-6 * randn(4, 1000, seed=16)
    m = logit_metrics(z, z + dz)
    # at this eps the Taylor estimate is within ~1e-5 relative of the true value
    ratio = m["taylor_cos@1"] / m["one_minus_cos_p@1"]
    torch.testing.assert_close(ratio, torch.ones(4, dtype=F64), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------
# masked_mean
# ---------------------------------------------------------------------------------------


def test_masked_mean() -> None:
    x = t64(1, 2, 3, 4)
    assert masked_mean(x) == 2.5
    assert masked_mean(x, torch.tensor([True, False, True, False])) == 2.0
    assert masked_mean(x, torch.tensor([1, 0, 0, 1])) == 2.5  # non-bool masks are cast
    assert isinstance(masked_mean(x), float)


def test_masked_mean_empty_selection_is_nan() -> None:
    x = t64(1, 2, 3, 4)
    assert math.isnan(masked_mean(x, torch.zeros(4, dtype=torch.bool)))
    assert math.isnan(masked_mean(torch.empty(0, dtype=F64)))


def test_centred_logit_cosine_ignores_a_constant_shift_like_p() -> None:
    z = 3.0 * randn(3, 500, seed=21)
    m = logit_metrics(z, z + 7.0)
    assert bool((m["cos_z"] < 1.0).all())  # the plain cosine sees the shift...
    # ...the centred one does not
    torch.testing.assert_close(m["cos_zc"], torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    dz = 0.3 * randn(3, 500, seed=22)
    shifted = logit_metrics(z, z + dz + 5.0)
    torch.testing.assert_close(shifted["cos_zc"], logit_metrics(z, z + dz)["cos_zc"], rtol=1e-12, atol=0)


def test_top_token_stability_hand_cases() -> None:
    from prunelens.metrics import topk_overlap, topk_spearman

    zd = t64(5, 4, 3, 2, 1, 0).unsqueeze(0)
    assert topk_overlap(zd, zd, 3).item() == 1.0 and topk_spearman(zd, zd, 3).item() == pytest.approx(1.0)
    reordered = t64(3, 4, 5, 2, 1, 0).unsqueeze(0)  # same top-3 set, order reversed
    assert topk_overlap(zd, reordered, 3).item() == 1.0
    assert topk_spearman(zd, reordered, 3).item() == pytest.approx(-1.0)
    swapped = t64(5, 4, 0, 2, 1, 3).unsqueeze(0)  # candidate 2 falls out, candidate 5 comes in
    assert topk_overlap(zd, swapped, 3).item() == pytest.approx(2 / 3)
    # on the dense top-3 (tokens 0, 1, 2) the pruned logits 5, 4, 0 keep the order: rho = 1
    assert topk_spearman(zd, swapped, 3).item() == pytest.approx(1.0)
    m = logit_metrics(zd, swapped, topk=3)
    assert m["topk_overlap"].item() == pytest.approx(2 / 3)
    assert m["topk_spearman"].item() == pytest.approx(1.0)


def test_pearson_and_spearman_hand_values() -> None:
    from prunelens.metrics import pearson, spearman

    x = t64(1, 2, 3, 4)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0) and pearson(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, x**3) < 1.0
    # ties get the average rank: (1, 2, 2, 3) ranks as (0, 1.5, 1.5, 3)
    a, b = t64(1, 2, 2, 3), t64(0, 1, 2, 3)
    ra, rb = t64(0, 1.5, 1.5, 3) - 1.5, t64(0, 1, 2, 3) - 1.5
    assert spearman(a, b) == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())))
    assert math.isnan(pearson(t64(1, 1, 1), t64(1, 2, 3)))


def test_token_kld_and_its_summary_against_closed_forms() -> None:
    """Base p = (½, ½), modified p = (¾, ¼), next token 0: KL(base‖mod) = ½ ln(4/3), Δp = +¼,
    the top token differs only where the modified model breaks the tie the other way."""
    from prunelens.metrics import kld_summary, token_kld

    zb = torch.zeros(4, 2, dtype=torch.float64)
    zm = torch.tensor([[math.log(3), 0.0]] * 4, dtype=torch.float64)
    v = token_kld(zb, zm, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(v["kl"], torch.full((4,), 0.5 * math.log(4 / 3), dtype=torch.float64))
    assert torch.allclose(v["dp"], torch.tensor([0.25, 0.25, -0.25, -0.25], dtype=torch.float64))
    assert torch.equal(v["same_top"], torch.ones(4, dtype=torch.float64))  # argmax of a tie is token 0
    s = kld_summary(v)
    assert s["mean_kld"] == pytest.approx(0.5 * math.log(4 / 3)) and s["mean_kld_se"] == pytest.approx(0, abs=1e-15)
    assert s["rms_dp"] == pytest.approx(0.25) and s["mean_dp"] == pytest.approx(0.0, abs=1e-15)
    assert s["ppl_base"] == pytest.approx(2.0)
    assert s["ppl_mod"] == pytest.approx(math.exp(-(2 * math.log(0.75) + 2 * math.log(0.25)) / 4))
    assert s["same_top"] == 1 and s["same_top_se"] == 0
    same = token_kld(zm, zm.clone(), torch.tensor([0, 1, 0, 1]))
    assert float(same["kl"].abs().max()) == 0 and float(same["dp"].abs().max()) == 0
