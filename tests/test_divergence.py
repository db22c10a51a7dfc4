"""Tests for prunelens.divergence against hand-computed values and the definitions it cites."""

from __future__ import annotations

import math

import pytest
import torch

from prunelens.divergence import (
    Truncated,
    comparison_rows,
    comparison_summary,
    divergent_tokens,
    first_divergent_token,
    kl_by_confidence,
    label_in_topk,
    share_of_divergent_tokens,
    topk_agreement,
    truncate,
    truncated_stats,
)
from prunelens.errors import PrunelensError
from prunelens.metrics import kl_div, log_probs, logit_metrics

F64 = torch.float64


def t64(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def randn(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# Row 0: same order everywhere. Row 1: ranks 2 and 3 swapped (same top-3 *set*). Row 2: top token differs.
Z_REF = t64((5, 4, 3, 2, 1), (5, 4, 3, 2, 1), (5, 4, 3, 2, 1))
Z_CAND = t64((9, 7, 5, 3, 1), (5, 3, 4, 2, 1), (4, 5, 3, 2, 1))


def test_topk_agreement_is_ordered_list_equality() -> None:
    agree = topk_agreement(Z_REF, Z_CAND, ks=(1, 2, 3, 5))
    assert agree[1].tolist() == [1.0, 1.0, 0.0]
    assert agree[2].tolist() == [1.0, 0.0, 0.0]  # row 1: {0, 1} vs {0, 2}
    assert agree[3].tolist() == [1.0, 0.0, 0.0]  # row 1: same set {0, 1, 2}, different order -> 0
    assert agree[5].tolist() == [1.0, 0.0, 0.0]
    assert agree[1].dtype == F64


def test_topk_agreement_keeps_leading_dims() -> None:
    z = randn(2, 3, 7, seed=0)
    out = topk_agreement(z, z + 0.0, ks=(1, 4))
    assert out[4].shape == (2, 3) and bool((out[4] == 1).all())


def test_label_in_topk_hand_values() -> None:
    z = t64((0, 3, 2, 1, -1), (4, 3, 2, 1, 0))
    labels = torch.tensor([3, 4])
    hits = label_in_topk(z, labels, ks=(1, 2, 3, 5))
    # row 0 order: 1, 2, 3, 0, 4 -> label 3 enters at K = 3; row 1: label 4 is last.
    assert hits[1].tolist() == [0.0, 0.0]
    assert hits[2].tolist() == [0.0, 0.0]
    assert hits[3].tolist() == [1.0, 0.0]
    assert hits[5].tolist() == [1.0, 1.0]


def test_kl_by_confidence_buckets() -> None:
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=F64)
    conf = torch.tensor([0.1, 0.2, 0.6, 0.95, 1.0], dtype=F64)
    b = kl_by_confidence(kl, conf)
    assert [x["n"] for x in b] == [2, 0, 1, 0, 2]  # 0.95 opens the last bucket; 1.0 is inside it
    assert sum(x["n"] for x in b) == 5
    assert sum(x["share_of_rows"] for x in b) == pytest.approx(1.0)
    assert sum(x["kl_share"] for x in b) == pytest.approx(1.0)
    assert b[0]["mean_kl"] == pytest.approx(1.5) and b[0]["kl_share"] == pytest.approx(3 / 20)
    assert b[4]["mean_kl"] == pytest.approx(7.0) and b[4]["kl_share"] == pytest.approx(14 / 20)
    assert b[0]["median_kl"] == 1.0  # torch's lower median, as exllamav3
    assert math.isnan(b[1]["mean_kl"]) and b[1]["kl_share"] == 0.0
    with pytest.raises(ValueError):
        kl_by_confidence(kl, conf, edges=(0.0, 0.5, 0.5, 1.0))


def test_kl_by_confidence_random_rows_all_counted() -> None:
    z_ref, z_cand = randn(40, 8, seed=1), randn(40, 8, seed=2)
    rows = comparison_rows(z_ref, z_cand)
    b = kl_by_confidence(rows["rkl"], rows["p_top_ref"])
    assert sum(x["n"] for x in b) == 40
    assert sum(x["kl_share"] for x in b) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------
# FDT / SDT (who-what-benchmark)
# ---------------------------------------------------------------------------------------


def test_fdt_sdt_hand_values() -> None:
    ref, cand = [7, 8, 9, 10, 11], [7, 8, 5, 10, 11, 12]
    assert first_divergent_token(ref, cand) == 2  # two shared leading tokens: 0-based index 2
    # difflib matches 7 8 | 10 11: 4 of 6 candidate tokens, so 2 to correct
    assert divergent_tokens(ref, cand) == 2
    assert share_of_divergent_tokens(ref, cand) == pytest.approx(2 / 6)
    assert first_divergent_token([1, 2], [3, 1, 2]) == 0  # first block does not start both


def test_fdt_sdt_identical_empty_and_different_lengths() -> None:
    s = [4, 5, 6, 7]
    assert (first_divergent_token(s, s), divergent_tokens(s, s), share_of_divergent_tokens(s, s)) == (4, 0, 0.0)
    assert (first_divergent_token([], []), divergent_tokens([], []), share_of_divergent_tokens([], [])) == (0, 0, 0.0)
    assert (first_divergent_token(s, []), divergent_tokens(s, []), share_of_divergent_tokens(s, [])) == (0, 4, 1.0)
    assert (first_divergent_token([], s), divergent_tokens([], s), share_of_divergent_tokens([], s)) == (0, 4, 1.0)
    # candidate a strict prefix of the reference: no token to correct, FDT = its length
    assert (first_divergent_token(s, s[:2]), divergent_tokens(s, s[:2])) == (2, 0)
    # reference a prefix of a longer candidate: the extra tokens are divergent
    assert (first_divergent_token(s[:2], s), divergent_tokens(s[:2], s), share_of_divergent_tokens(s[:2], s)) \
        == (2, 2, 0.5)
    assert first_divergent_token(torch.tensor(s), torch.tensor(s)) == 4


def test_fdt_follows_difflib_not_the_common_prefix() -> None:
    """WWB's quirk: difflib aligns the longest block first, so a shared prefix can be missed."""
    assert first_divergent_token([1, 2, 1, 2, 3], [1, 2, 3]) == 0
    assert divergent_tokens([1, 2, 1, 2, 3], [1, 2, 3]) == 0


# ---------------------------------------------------------------------------------------
# Truncated reference distributions (mlx-lm kld)
# ---------------------------------------------------------------------------------------


def test_truncate_hand_values() -> None:
    p = torch.tensor([[0.5, 0.1, 0.3, 0.1]], dtype=F64)
    tr = truncate(p.log(), 2, dtype=F64)
    assert tr.idx.tolist() == [[0, 2]] and tr.idx.dtype == torch.int32
    assert tr.logp[0].exp().tolist() == pytest.approx([0.5, 0.3], abs=1e-15)
    assert tr.log_tail.exp().item() == pytest.approx(0.2, abs=1e-15)
    assert truncate(p.log(), 4, dtype=F64).log_tail.item() == -math.inf
    with pytest.raises(PrunelensError):
        truncate(p.log(), 5)
    with pytest.raises(PrunelensError):
        truncate(p.log(), 0)


def test_truncated_kl_closed_form() -> None:
    """Reference (0.5, 0.3 | 0.1, 0.1), candidate (0.42, 0.38 | 0.1, 0.1): cells (.5, .3, .2) vs (.42, .38, .2)."""
    p = torch.tensor([[0.5, 0.1, 0.3, 0.1]], dtype=F64)
    q = torch.tensor([[0.42, 0.1, 0.38, 0.1]], dtype=F64)
    s = truncated_stats(truncate(p.log(), 2, dtype=F64), q.log(), ks=(1, 2))
    rkl = 0.5 * math.log(0.5 / 0.42) + 0.3 * math.log(0.3 / 0.38)
    kl = 0.42 * math.log(0.42 / 0.5) + 0.38 * math.log(0.38 / 0.3)
    assert s["rkl"].item() == pytest.approx(rkl, rel=1e-12)
    assert s["kl"].item() == pytest.approx(kl, rel=1e-12)
    # here the tails are proportional, so coarse-graining loses nothing: equal to the full KL
    assert s["rkl"].item() == pytest.approx(kl_div(p.log(), q.log()).item(), rel=1e-12)
    assert s["p_top_ref"].item() == pytest.approx(0.5)
    assert s["tail_ref"].item() == pytest.approx(0.2) and s["tail_cand"].item() == pytest.approx(0.2)
    assert s["top1_agree"].item() == 1.0  # both order tokens 0, 2
    assert s["top2_agree"].item() == 1.0


@pytest.mark.parametrize("truncated", ["ref", "cand"])
def test_truncated_kl_is_a_lower_bound_that_becomes_exact(truncated: str) -> None:
    vocab = 8
    z_ref, z_cand = randn(3, vocab, seed=3), randn(3, vocab, seed=4)
    full_kl = kl_div(log_probs(z_cand), log_probs(z_ref))
    full_rkl = kl_div(log_probs(z_ref), log_probs(z_cand))
    trunc_z = z_ref if truncated == "ref" else z_cand
    z_full = z_cand if truncated == "ref" else z_ref
    prev_kl, prev_rkl = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    for k in range(1, vocab + 1):
        s = truncated_stats(truncate(trunc_z, k, dtype=F64), z_full, truncated=truncated)
        assert bool((s["kl"] <= full_kl + 1e-12).all()) and bool((s["rkl"] <= full_rkl + 1e-12).all())
        # nested partitions: refining never lowers a divergence
        assert bool((s["kl"] >= prev_kl - 1e-12).all()) and bool((s["rkl"] >= prev_rkl - 1e-12).all())
        prev_kl, prev_rkl = s["kl"], s["rkl"]
    assert torch.allclose(s["kl"], full_kl, rtol=0, atol=1e-12)
    assert torch.allclose(s["rkl"], full_rkl, rtol=0, atol=1e-12)
    assert bool((truncated_stats(truncate(trunc_z, 2, dtype=F64), z_full, truncated=truncated)["rkl"]
                 < full_rkl - 1e-6).any())  # strictly below at small k on random logits
    # the same KL as prunelens.metrics computes from full logits (kl = KL(p_cand || p_ref))
    assert torch.allclose(s["kl"], logit_metrics(z_ref, z_cand, light=True)["kl@1"], rtol=0, atol=1e-12)


def test_truncated_float32_storage_error_is_rounding_only() -> None:
    z_ref, z_cand = randn(4, 6, seed=5), randn(4, 6, seed=6)
    s = truncated_stats(truncate(z_ref, 6), z_cand)
    full_rkl = kl_div(log_probs(z_ref), log_probs(z_cand))
    assert torch.allclose(s["rkl"], full_rkl, rtol=1e-5, atol=1e-6)


def test_truncated_agreement_labels_and_temperature() -> None:
    z_ref, z_cand = randn(5, 7, seed=7), randn(5, 7, seed=8)
    z_ref[:, 3] += 20.0  # both put token 3 first, the rest of the order is random
    z_cand[:, 3] += 20.0
    labels = torch.tensor([3, 0, 1, 2, 3])
    full = comparison_rows(z_ref, z_cand, labels, ks=range(1, 5), temperature=0.7)
    for truncated, z_t, z_f in (("ref", z_ref, z_cand), ("cand", z_cand, z_ref)):
        s = truncated_stats(truncate(z_t, 4, temperature=0.7), z_f, temperature=0.7, truncated=truncated,
                            ks=range(1, 11), labels=labels)
        assert "top5_agree" not in s  # only K up to the stored k
        for key in [f"top{k}_agree" for k in range(1, 5)] + [f"label_top{k}_{m}" for k in range(1, 5)
                                                              for m in ("ref", "cand")]:
            assert torch.equal(s[key], full[key]), (truncated, key)
        assert torch.allclose(s["p_top_ref"], full["p_top_ref"], rtol=1e-6)
    assert bool((full["top1_agree"] == 1).all())
    with pytest.raises(PrunelensError, match="temperature"):
        truncated_stats(truncate(z_ref, 4), z_cand, temperature=0.7)
    with pytest.raises(PrunelensError, match="vocabulary"):
        truncated_stats(truncate(z_ref, 4), z_cand[:, :6])


def test_truncated_nbytes() -> None:
    tr = truncate(randn(2, 3, 50, seed=9), 4)
    assert isinstance(tr, Truncated) and tr.k == 4
    assert tr.nbytes() == 6 * (4 * 4 + 4 * 4 + 4)
    assert tr.full_nbytes() == 6 * 50 * 4


# ---------------------------------------------------------------------------------------
# comparison_rows / comparison_summary
# ---------------------------------------------------------------------------------------


def test_comparison_rows_match_definitions() -> None:
    labels = torch.tensor([0, 2, 1])
    rows = comparison_rows(Z_REF, Z_CAND, labels, ks=(1, 2, 3))
    assert rows["top3_agree"].tolist() == [1.0, 0.0, 0.0]
    assert rows["label_top1_ref"].tolist() == [1.0, 0.0, 0.0]
    assert rows["label_top2_cand"].tolist() == [1.0, 1.0, 1.0]  # row 1 cand order 0, 2, ...; row 2: 1, 0
    assert torch.allclose(rows["kl"], logit_metrics(Z_REF, Z_CAND, light=True)["kl@1"], atol=1e-14)
    assert torch.allclose(rows["rkl"], kl_div(log_probs(Z_REF), log_probs(Z_CAND)), atol=0)
    assert rows["p_top_ref"][0].item() == pytest.approx(1 / sum(math.exp(-i) for i in range(5)))


def test_comparison_summary_means_and_standard_errors() -> None:
    rows = {"kl": torch.tensor([1.0, 2.0, 3.0, 6.0]), "top1_agree": torch.tensor([1.0, 0.0, 1.0, 1.0]),
            "rkl": torch.tensor([0.5, 0.5, 1.0, 2.0]), "p_top_ref": torch.tensor([0.1, 0.3, 0.8, 0.99])}
    s = comparison_summary(rows)
    assert s["positions"] == 4
    assert s["kl"] == pytest.approx(3.0)
    # sample s.d. of (1, 2, 3, 6): sqrt(14 / 3); s.e. = that / 2
    assert s["kl_se"] == pytest.approx(math.sqrt(14 / 3) / 2)
    assert s["top1_agree"] == pytest.approx(0.75) and s["top1_agree_se"] == pytest.approx(0.25)
    buckets = s["kl_by_confidence"]
    assert [b["n"] for b in buckets] == [1, 1, 0, 1, 1]
    assert sum(b["kl_share"] for b in buckets) == pytest.approx(1.0)
    assert buckets[4]["kl_share"] == pytest.approx(0.5)  # rkl 2 of a total 4
    assert math.isnan(comparison_summary({"kl": torch.tensor([1.0])})["kl_se"])
    assert "kl_by_confidence" not in comparison_summary({"kl": torch.tensor([1.0, 2.0])})
    with pytest.raises(ValueError):
        comparison_summary({"kl": torch.tensor([1.0, 2.0]), "rkl": torch.tensor([1.0])})
