"""Intra-layer sparsification and quantisation: definitions, exactness, quality, end to end.

- masks (magnitude, Wanda, N:M) against hand-built layers whose answers are worked out by hand;
- SparseGPT's patterns and counts on random layers, and 0 % being an exact no-op;
- reconstruction error on real layers of the default model: SparseGPT < Wanda < magnitude and
  GPTQ < RTN, with the quantisation grid respected;
- the API end to end on the real model: report, zero-copy view, skip patterns, saving a plain
  transformers checkpoint;
- one-line ``PrunelensError`` messages for bad specs, shapes and calibration text.

The column sweeps of SparseGPT/GPTQ are thousands of tiny tensor operations; on a busy 2-core
machine two intra-op threads make them 20-70x slower than one, so this module runs single-threaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from prunelens.data import calibration_ids
from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.loading import LoadedModel
from prunelens.prune.owl import outlier_ratio, owl_sparsities
from prunelens.prune.quant import QuantSpec, awq_quantize, gptq_quantize, rtn_quantize
from prunelens.prune.recipe import prune_weights, save_modified
from prunelens.prune.sparse import (
    Pattern,
    damped_inverse_cholesky,
    magnitude_mask,
    nm_violations,
    sparsegpt_prune,
    wanda_mask,
)
from prunelens.prune.weights import WeightPatch, parse_prune, parse_quant, sparsify, target_linears
from prunelens.prune.weights import parse_weight_method as weight_method
from prunelens.testing import shared_data_dir

Tensor = torch.Tensor
C4 = shared_data_dir() / "c4_calibration.jsonl"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SGPT_BLOCKS = 6  # end-to-end SparseGPT runs on the first blocks only (all 30 take ~25 s on 2 cores)


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One intra-op thread for this module (restored afterwards): see the module docstring."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _c4_or_none() -> Path | None:
    return C4 if C4.is_file() else None


def _tiny_llama(hidden: int = 64, inter: int = 128, layers: int = 2, seed: int = 0) -> nn.Module:
    """A random-weight Llama small enough to calibrate in milliseconds."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_tokenizer() -> Any:
    """Whitespace word-level tokenizer: one token per word (unknown words map to <unk>)."""
    vocab = {"<unk>": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def _recon_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """trace((W−Ŵ) H (W−Ŵ)ᵀ) = (2/n)‖WXᵀ − ŴXᵀ‖²_F for H = 2XᵀX/n, in float64."""
    d = (w - w_hat).double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


def _group_nonzeros(w: Tensor, m: int) -> Tensor:
    """Non-zeros in every group of m consecutive inputs: shape (rows, cols // m)."""
    return (w != 0).reshape(w.shape[0], -1, m).sum(-1)


def _distinct_per_group(q: Tensor, group: int) -> Tensor:
    """Number of distinct values in every (row, group of ``group`` columns) of q."""
    g = q.reshape(q.shape[0], -1, group).sort(-1).values
    return 1 + (g.diff(dim=-1) != 0).sum(-1)


def _random_layer(rows: int = 16, cols: int = 64, tokens: int = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random W and a random SPD Hessian H = XᵀX with no zero diagonal entry."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g)
    return w, x.T @ x


def _sq_norm_hook(acc: Tensor) -> Any:
    """Forward pre-hook adding Σ_tokens x_j² of a linear layer's input into ``acc`` (returns None)."""

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        acc.add_(args[0].reshape(-1, args[0].shape[-1]).float().pow(2).sum(0))

    return hook


def _mask(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# --- 1. masks equal their definitions on hand-built layers ------------------------------------

# Row 0 holds the four smallest magnitudes of the layer: a layer-wide threshold removes all of it.
W_HAND = torch.tensor([[-0.1, 0.2, -0.3, 0.4],
                       [5.0, -6.0, 7.0, -8.0]])


def test_magnitude_threshold_is_layer_wide_not_per_row() -> None:
    mask = magnitude_mask(W_HAND, Pattern(ratio=0.5))
    assert torch.equal(mask, _mask([[1, 1, 1, 1], [0, 0, 0, 0]]))
    # int(8 * 0.3) = 2: the two smallest |w| of the layer, wherever they are
    assert torch.equal(magnitude_mask(W_HAND, Pattern(ratio=0.3)), _mask([[1, 1, 0, 0], [0, 0, 0, 0]]))
    # sign does not matter: -0.1 is the smallest magnitude
    assert torch.equal(magnitude_mask(-W_HAND, Pattern(ratio=0.2)), _mask([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_wanda_uses_activation_norms_and_prunes_per_row() -> None:
    # ‖X_j‖ = [10, 6, 1, 100]: scores row 0 = [1, 1.2, .3, 40], row 1 = [50, 36, 7, 800]
    act_sq = torch.tensor([100.0, 36.0, 1.0, 1e4])
    mask = wanda_mask(W_HAND, act_sq, Pattern(ratio=0.5))
    assert torch.equal(mask, _mask([[1, 0, 1, 0], [0, 1, 1, 0]]))
    # the score uses the norm ‖X_j‖, not its square (|w|·‖X_j‖² would remove row 0's column 1)
    assert torch.equal(wanda_mask(W_HAND, act_sq ** 2, Pattern(ratio=0.5))[0], _mask([[0, 1, 1, 0]])[0])
    # the activation norm changes the decision: column 0 has the smallest |w| of both rows
    per_row_magnitude = wanda_mask(W_HAND, torch.ones(4), Pattern(ratio=0.5))
    assert torch.equal(per_row_magnitude, _mask([[1, 1, 0, 0], [1, 1, 0, 0]]))
    assert not torch.equal(mask, per_row_magnitude)
    assert not torch.equal(mask, magnitude_mask(W_HAND, Pattern(ratio=0.5)))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.99])
def test_wanda_removes_floor_cols_times_ratio_in_every_row(ratio: float) -> None:
    g = torch.Generator().manual_seed(1)
    w, act_sq = torch.randn(8, 40, generator=g), torch.rand(40, generator=g) + 0.1
    mask = wanda_mask(w, act_sq, Pattern(ratio=ratio))
    want = math.floor(Fraction(str(ratio)) * 40)
    assert mask.sum(1).tolist() == [want] * 8
    score = w.abs() * act_sq.sqrt()
    if 0 < want < 40:  # every removed score of a row is below every kept one
        removed_max = score.masked_fill(~mask, -math.inf).max(1).values
        kept_min = score.masked_fill(mask, math.inf).min(1).values
        assert bool((removed_max < kept_min).all())


def test_wanda_count_is_exact_for_decimal_ratios() -> None:
    w = torch.arange(1.0, 101.0).unsqueeze(0)
    assert int(wanda_mask(w, torch.ones(100), Pattern(ratio=0.29)).sum()) == 29


# N:M hand example. |W|: row 0 = [5, 6, 7, 8 | .1, .2, .3, .4], row 1 = [.3, 9, .1, 2 | 1, 1.5, .2, 4]
W_NM = torch.tensor([[5.0, -6.0, 7.0, 8.0, 0.1, -0.2, 0.3, -0.4],
                     [-0.3, 9.0, -0.1, 2.0, 1.0, -1.5, 0.2, -4.0]])
# ‖X_j‖ = [1, 1, 1, 1, 100, 100, 1, 1]: Wanda scores
#   row 0 = [5, 6, 7, 8 | 10, 20, .3, .4], row 1 = [.3, 9, .1, 2 | 100, 150, .2, 4]
ACT_NM = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e4, 1e4, 1.0, 1.0])
NM_EXPECTED = {
    ("magnitude", 2, 4): [[1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]],
    ("magnitude", 1, 4): [[1, 1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1, 0]],
    ("magnitude", 4, 8): [[0, 0, 0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0]],
    ("wanda", 2, 4): [[1, 1, 0, 0, 0, 0, 1, 1], [1, 0, 1, 0, 0, 0, 1, 1]],
    ("wanda", 1, 4): [[1, 1, 1, 0, 1, 0, 1, 1], [1, 0, 1, 1, 1, 0, 1, 1]],
    ("wanda", 4, 8): [[1, 1, 0, 0, 0, 0, 1, 1], [1, 0, 1, 1, 0, 0, 1, 0]],
}


@pytest.mark.parametrize("method,n,m", list(NM_EXPECTED))
def test_nm_masks_remove_the_lowest_scores_of_every_group(method: str, n: int, m: int) -> None:
    pattern = Pattern(n=n, m=m)
    if method == "magnitude":
        mask, score = magnitude_mask(W_NM, pattern), W_NM.abs()
    else:
        mask, score = wanda_mask(W_NM, ACT_NM, pattern), W_NM.abs() * ACT_NM.sqrt()
    assert torch.equal(mask, _mask(NM_EXPECTED[method, n, m]))
    assert bool((_group_nonzeros(mask, m) == m - n).all())  # m−n removed in each group
    g_mask, g_score = mask.reshape(2, -1, m), score.reshape(2, -1, m)
    removed_max = g_score.masked_fill(~g_mask, -math.inf).max(-1).values
    kept_min = g_score.masked_fill(g_mask, math.inf).min(-1).values
    assert bool((removed_max < kept_min).all())
    assert nm_violations(W_NM.masked_fill(mask, 0), n, m) == 0
    assert nm_violations(W_NM, n, m) == W_NM.numel() // m  # dense: every group violates


def test_wanda_nm_decision_differs_from_magnitude() -> None:
    p = Pattern(n=2, m=4)
    assert not torch.equal(wanda_mask(W_NM, ACT_NM, p), magnitude_mask(W_NM, p))
    # with equal activation norms Wanda's N:M mask is magnitude's
    assert torch.equal(wanda_mask(W_NM, torch.full((8,), 3.0), p), magnitude_mask(W_NM, p))


def test_nm_violations_counts_hand_built_groups() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0],
                      [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 5.0, 6.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 0.0, 8.0]])
    # non-zeros per group of 4: [3, 1], [4, 2], [0, 2]
    assert nm_violations(w, 2, 4) == 2
    assert nm_violations(w, 1, 4) == 4
    assert nm_violations(w, 3, 4) == 1
    assert nm_violations(w, 4, 4) == 0
    # groups of 8: 4, 6, 2 non-zeros
    assert nm_violations(w, 4, 8) == 1
    assert nm_violations(w, 2, 8) == 2


# --- 2. SparseGPT's patterns and counts ---------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("blocksize", [128, 10])
def test_sparsegpt_nm_pattern_holds_exactly(n: int, m: int, blocksize: int) -> None:
    w, h = _random_layer()
    out = sparsegpt_prune(w, h, Pattern(n=n, m=m), blocksize=blocksize)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert nm_violations(out, n, m) == 0
    assert bool((_group_nonzeros(out, m) == n).all())  # random weights: no accidental zeros
    # the kept weights were updated to compensate (OBS), not just copied
    kept = out != 0
    assert not torch.equal(out[kept], w[kept])


@pytest.mark.parametrize("ratio,blocksize", [(0.5, 128), (0.3, 128), (0.7, 128), (0.3, 16), (0.55, 24)])
def test_sparsegpt_unstructured_count_is_the_per_block_floor(ratio: float, blocksize: int) -> None:
    w, h = _random_layer()
    out = sparsegpt_prune(w, h, Pattern(ratio=ratio), blocksize=blocksize)
    rows, cols = w.shape
    r = Fraction(str(ratio))
    want = sum(math.floor(rows * (min(c + blocksize, cols) - c) * r) for c in range(0, cols, blocksize))
    assert int((out == 0).sum()) == want
    if blocksize >= cols:
        assert want == math.floor(rows * cols * r)


def test_sparsegpt_single_block_mask_is_lowest_w2_over_hinv_diag2() -> None:
    """One block: the removed set is the lowest w²/[U]²_jj, U = chol((H + λI)⁻¹) upper, λ = .01 mean diag."""
    w, h = _random_layer(seed=3)
    out = sparsegpt_prune(w, h, Pattern(ratio=0.5))
    hd = h.double()
    damped = hd + 0.01 * hd.diagonal().mean() * torch.eye(hd.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    score = w.double() ** 2 / u.diagonal().unsqueeze(0) ** 2
    k = w.numel() // 2
    want = torch.zeros(w.numel(), dtype=torch.bool)
    want[score.flatten().topk(k, largest=False).indices] = True
    assert torch.equal(out == 0, want.reshape(w.shape))


def test_damped_inverse_cholesky_and_dead_columns() -> None:
    w, h = _random_layer(seed=4)
    h[5, :] = 0
    h[:, 5] = 0  # input 5 never active
    u, dead = damped_inverse_cholesky(h)
    assert dead.tolist() == [j == 5 for j in range(64)]
    hd = h.double().clone()
    hd[5, 5] = 1.0
    hd += 0.01 * hd.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(hd), rtol=1e-9, atol=1e-12)
    assert torch.equal(u, u.triu())
    # the dead input's weights are irrelevant to the output and come back as zeros
    assert bool((sparsegpt_prune(w, h, Pattern(ratio=0.0))[:, 5] == 0).all())
    assert bool((gptq_quantize(w, h, QuantSpec(4, 16))[:, 5] == 0).all())


# --- 3. 0 % sparsity is an exact no-op -----------------------------------------------------------


def test_zero_sparsity_is_an_exact_noop_for_every_mask() -> None:
    w, h = _random_layer(seed=5)
    act_sq = h.diagonal().clone()
    p0 = Pattern(ratio=0.0)
    assert not magnitude_mask(w, p0).any()
    assert not wanda_mask(w, act_sq, p0).any()
    assert torch.equal(sparsegpt_prune(w, h, p0), w)  # H has no zero diagonal: no dead column
    # N = M keeps everything too
    p44 = Pattern(n=4, m=4)
    assert not magnitude_mask(w, p44).any() and not wanda_mask(w, act_sq, p44).any()
    assert torch.equal(sparsegpt_prune(w, h, p44), w)


@pytest.mark.parametrize("spec", ["wanda:0", "magnitude:0", "sparsegpt:0"])
def test_sparsify_at_zero_gives_the_dense_weights_on_a_tiny_llama(spec: str) -> None:
    model = _tiny_llama()
    ad = Adapter(model)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = sparsify(ad, parse_prune(spec), calib, progress=False)
    assert set(patch.weights) == {f"model.layers.{i}.{r}" for i in range(2) for r in LINEARS}
    for path, w in patch.weights.items():
        assert torch.equal(w, dense[f"{path}.weight"]), path
    assert patch.report["zero_frac"] == patch.report["dense_zero_frac"]
    assert patch.report["added_frac_of_dense_nonzeros"] == 0.0
    with torch.inference_mode():
        ref = model(input_ids=calib).logits
        with patch.view(ad):
            got = model(input_ids=calib).logits
    assert torch.equal(ref, got)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())


# --- 4. reconstruction error on real layers of the default model --------------------------------


@pytest.fixture(scope="module")
def lm(real_lm: LoadedModel) -> LoadedModel:
    return real_lm


@pytest.fixture(scope="module")
def real_layers(lm: LoadedModel) -> dict[str, tuple[Tensor, Tensor]]:
    """(W, X) of block 5's q_proj and up_proj, X their real inputs on 16 windows of 128 tokens."""
    ids = calibration_ids(lm.tokenizer, _c4_or_none(), 16, 128)
    names = {"q_proj": "model.layers.5.self_attn.q_proj", "up_proj": "model.layers.5.mlp.up_proj"}
    xs: dict[str, list[Tensor]] = {k: [] for k in names}
    handles = [lm.model.get_submodule(p).register_forward_pre_hook(
        lambda _m, a, k=k: xs[k].append(a[0].reshape(-1, a[0].shape[-1]).float().clone()))
        for k, p in names.items()]
    try:
        with torch.inference_mode():
            for b in range(0, len(ids), 4):
                lm.model(input_ids=ids[b:b + 4], use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    out = {k: (lm.model.get_submodule(p).weight.detach().float().clone(), torch.cat(xs[k]))
           for k, p in names.items()}
    assert all(x.shape[0] == 16 * 128 for _, x in out.values())
    return out


@pytest.mark.parametrize("layer", ["q_proj", "up_proj"])
@pytest.mark.parametrize("pattern", [Pattern(ratio=0.5), Pattern(n=2, m=4)], ids=["50pct", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_a_real_layer(
        real_layers: dict[str, tuple[Tensor, Tensor]], layer: str, pattern: Pattern) -> None:
    w, x = real_layers[layer]
    h = 2.0 * x.T @ x / x.shape[0]
    w_mag = w.masked_fill(magnitude_mask(w, pattern), 0)
    w_wanda = w.masked_fill(wanda_mask(w, (x * x).sum(0), pattern), 0)
    w_sgpt = sparsegpt_prune(w, h, pattern)
    for pruned in (w_mag, w_wanda, w_sgpt):  # all three reach the same sparsity
        assert abs(float((pruned == 0).float().mean()) - 0.5) < 1e-3
    e_mag, e_wanda, e_sgpt = (_recon_error(w, p, h) for p in (w_mag, w_wanda, w_sgpt))
    assert 0 < e_sgpt < e_wanda < e_mag
    # same as ‖WXᵀ − ŴXᵀ‖²_F·2/n, computed the direct way
    direct = 2.0 * float(((w - w_sgpt).double() @ x.double().T).pow(2).sum()) / x.shape[0]
    assert direct == pytest.approx(e_sgpt, rel=1e-6)
    # the OBS update, not only the mask choice, is what makes SparseGPT better
    assert e_sgpt < _recon_error(w, w.masked_fill(w_sgpt == 0, 0), h)


@pytest.mark.parametrize("layer", ["q_proj", "up_proj"])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_and_both_stay_on_the_grid(
        real_layers: dict[str, tuple[Tensor, Tensor]], layer: str, bits: int) -> None:
    w, x = real_layers[layer]
    h = 2.0 * x.T @ x / x.shape[0]
    spec = QuantSpec(bits=bits, group_size=64)
    q_rtn, q_gptq = rtn_quantize(w, spec), gptq_quantize(w, h, spec)
    assert 0 < _recon_error(w, q_gptq, h) < _recon_error(w, q_rtn, h)
    for q in (q_rtn, q_gptq):
        distinct = _distinct_per_group(q, 64)
        assert distinct.shape == (w.shape[0], w.shape[1] // 64)
        assert int(distinct.max()) <= 2 ** bits
    assert int(_distinct_per_group(q_rtn, 64).max()) == 2 ** bits  # min-max grid is used in full
    # RTN: nearest level of an asymmetric min-max grid that contains 0: error ≤ half a step
    g = w.reshape(w.shape[0], -1, 64)
    step = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / (2 ** bits - 1)
    err = (w - q_rtn).abs().reshape_as(g)
    assert bool((err <= step.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all())


def _out_mse(w: Tensor, q: Tensor, x: Tensor) -> float:
    return float(((x.double() @ (q - w).double().T) ** 2).mean())


@pytest.mark.parametrize("layer", ["q_proj", "up_proj"])
def test_awq_beats_rtn_on_a_real_layer_and_clipping_helps(
        real_layers: dict[str, tuple[Tensor, Tensor]], layer: str) -> None:
    """On SmolLM2's own activations AWQ's output error is below RTN's at 4 and 3 bits (α = 0 of its
    search is RTN, so the scale search alone can never be worse on these rows); the clip search
    lowers it further."""
    w, x = real_layers[layer]
    for bits in (4, 3):
        spec = QuantSpec(bits=bits, group_size=64)
        e_rtn = _out_mse(w, rtn_quantize(w, spec), x)
        e_scale = _out_mse(w, awq_quantize(w, x, spec, clip=False), x)
        e_awq = _out_mse(w, awq_quantize(w, x, spec), x)
        assert e_awq < e_scale <= e_rtn, (bits, e_awq, e_scale, e_rtn)


def test_awq_protects_the_salient_channel() -> None:
    """Inputs whose channel 0 is 50x larger than the rest: rounding that channel's weights dominates
    RTN's output error; AWQ scales it up before rounding and cuts the error; with all channels alike
    the scale is 1 for every α and AWQ without clipping is exactly RTN."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g)
    x[:, 0] *= 50
    spec = QuantSpec(4, 64)
    assert _out_mse(w, awq_quantize(w, x, spec, clip=False), x) < 0.5 * _out_mse(w, rtn_quantize(w, spec), x)
    flat = torch.ones(16, 64)
    assert torch.equal(awq_quantize(w, flat, spec, clip=False), rtn_quantize(w, spec))


def test_gptq_with_a_diagonal_hessian_is_rtn() -> None:
    """No correlation between inputs: nothing to compensate, so GPTQ rounds exactly like RTN."""
    w, _ = _random_layer(seed=6)
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(7)) + 0.5)
    for spec in (QuantSpec(4, 16), QuantSpec(3, -1), QuantSpec(4, 32, symmetric=True)):
        assert torch.equal(gptq_quantize(w, h, spec), rtn_quantize(w, spec))


def test_gptq_compensates_within_one_block() -> None:
    """Correlated inputs, one block of columns: the error feedback alone must beat RTN."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g)
    x += 0.1 * torch.randn(512, 64, generator=g)  # low-rank plus noise: strongly correlated inputs
    h = 2.0 * x.T @ x / x.shape[0]
    spec = QuantSpec(3, 32)
    assert _recon_error(w, gptq_quantize(w, h, spec), h) < 0.8 * _recon_error(w, rtn_quantize(w, spec), h)


@pytest.mark.parametrize("blocksize", [8, 12, 32])
def test_lazy_batched_updates_do_not_depend_on_the_block_size(blocksize: int) -> None:
    """Lazy batching is exact algebra: GPTQ and SparseGPT N:M give the same W for any block size."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g)
    h = 2.0 * x.T @ x / x.shape[0] + 0.01 * torch.eye(64)
    sgpt_ref, sgpt = (sparsegpt_prune(w, h, Pattern(n=2, m=4), blocksize=b) for b in (128, blocksize))
    assert torch.equal(sgpt == 0, sgpt_ref == 0)
    torch.testing.assert_close(sgpt, sgpt_ref, atol=1e-5, rtol=0)
    if 32 % blocksize == 0 or blocksize % 32 == 0:  # groups of 32 start on block boundaries
        spec = QuantSpec(3, 32)
        torch.testing.assert_close(gptq_quantize(w, h, spec, blocksize=blocksize), gptq_quantize(w, h, spec),
                                   atol=1e-5, rtol=0)


# --- 5. the API end to end on the real model ----------------------------------------------------


@pytest.fixture(scope="module")
def sgpt(lm: LoadedModel) -> tuple[WeightPatch, dict[str, Tensor]]:
    """SparseGPT 2:4 of the first ``SGPT_BLOCKS`` blocks, and a copy of the dense weights."""
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    skip = [str(i) for i in range(SGPT_BLOCKS, lm.adapter.n_layers)]
    patch = prune_weights(lm, "sparsegpt:2:4", calib=_c4_or_none(), calib_samples=4, calib_len=64,
                          skip=skip, progress=False)
    return patch, dense


def test_prune_weights_sparsegpt_report(lm: LoadedModel, sgpt: tuple[WeightPatch, dict[str, Tensor]]) -> None:
    patch, dense = sgpt
    rep = patch.report
    assert set(patch.weights) == {f"model.layers.{i}.{r}" for i in range(SGPT_BLOCKS) for r in LINEARS}
    assert rep["n_modules"] == SGPT_BLOCKS * 7 and rep["pattern"] == "2:4" and rep["target_sparsity"] == 0.5
    assert rep["nm_violations"] == 0
    assert rep["calibration"]["samples"] == 4 and rep["calibration"]["seq_len"] == 64
    numel = sum(w.numel() for w in patch.weights.values())
    z_dense = sum(int((dense[f"{p}.weight"] == 0).sum()) for p in patch.weights)
    z_new = sum(int((w == 0).sum()) for w in patch.weights.values())
    assert rep["n_weights"] == numel
    assert rep["dense_zero_frac"] == z_dense / numel > 0  # the dequantised GGUF has exact zeros
    assert rep["zero_frac"] == z_new / numel
    assert 0.5 <= rep["zero_frac"] < 0.5 + 1e-3  # exactly 2 of every 4 removed, a few extra dense 0s
    assert rep["added_frac_of_dense_nonzeros"] == pytest.approx((z_new - z_dense) / (numel - z_dense))
    for row in rep["layers"]:
        w = patch.weights[row["module"]]
        assert row["numel"] == w.numel() and row["nm_violations"] == nm_violations(w, 2, 4) == 0
        zd, zn = row["dense_zero_frac"] * row["numel"], row["zero_frac"] * row["numel"]
        assert row["added_frac_of_dense_nonzeros"] == pytest.approx((zn - zd) / (row["numel"] - zd))


def test_patch_view_swaps_weights_in_and_out(lm: LoadedModel,
                                             sgpt: tuple[WeightPatch, dict[str, Tensor]]) -> None:
    patch, dense = sgpt
    params = dict(lm.model.named_parameters())
    assert all(torch.equal(p, dense[n]) for n, p in params.items())  # pruning left the model dense
    ids = torch.tensor([[1, 504, 3458, 314, 1345, 30, 216, 2]])
    with torch.inference_mode():
        ref = lm.model(input_ids=ids).logits
        with patch.view(lm.adapter):
            for path, w in patch.weights.items():
                assert lm.model.get_submodule(path).weight.data_ptr() == w.data_ptr()
            untouched = "model.layers.6.mlp.up_proj.weight"
            assert torch.equal(params[untouched], dense[untouched])
            got = lm.model(input_ids=ids).logits
        assert not torch.allclose(ref, got)
        assert torch.equal(lm.model(input_ids=ids).logits, ref)
    assert all(torch.equal(p, dense[n]) for n, p in params.items())
    with pytest.raises(RuntimeError, match="boom"), patch.view(lm.adapter):  # restored on errors too
        raise RuntimeError("boom")
    assert all(torch.equal(p, dense[n]) for n, p in params.items())


def test_skip_patterns_leave_block_zero_and_down_proj_out(lm: LoadedModel) -> None:
    skip = ["0", "*.mlp.down_proj"]
    want = {f"model.layers.{i}.{r}" for i in range(1, lm.adapter.n_layers) for r in LINEARS
            if r != "mlp.down_proj"}
    assert {p for ps in target_linears(lm.adapter, skip) for p in ps} == want  # "0" is not "10"
    patch = prune_weights(lm, "magnitude:2:4", skip=skip, progress=False)
    assert set(patch.weights) == want
    assert patch.report["skip"] == skip and patch.report["nm_violations"] == 0
    assert "model.layers.10.self_attn.q_proj" in patch.weights


def test_calibration_is_sequential_through_the_pruned_blocks() -> None:
    """Block i's Wanda masks come from activations computed with blocks < i already pruned."""
    model = _tiny_llama(layers=3, seed=1)
    ad = Adapter(model)
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))
    method = parse_prune("wanda:0.5")
    patch = sparsify(ad, method, calib, batch_size=4, progress=False)
    differs = False
    for i, paths in enumerate(target_linears(ad)):
        for upstream_pruned in (True, False):
            earlier = {p: w for p, w in patch.weights.items() if int(p.split(".")[2]) < i}
            acts = {p: torch.zeros(model.get_submodule(p).in_features) for p in paths}
            handles = [model.get_submodule(p).register_forward_pre_hook(_sq_norm_hook(acts[p]))
                       for p in paths]
            view = WeightPatch(method, earlier if upstream_pruned else {}).view(ad)
            with torch.inference_mode(), view:
                for b in range(0, 6, 4):
                    model(input_ids=calib[b:b + 4], use_cache=False)
            for hd in handles:
                hd.remove()
            for p in paths:
                w = model.get_submodule(p).weight
                want = w.masked_fill(wanda_mask(w, acts[p], method.pattern), 0)  # type: ignore[arg-type]
                if upstream_pruned:
                    assert torch.equal(patch.weights[p], want), p
                else:
                    differs |= not torch.equal(patch.weights[p], want)
    assert differs  # the dense-activation masks would have been different


def test_owl_allocation_is_the_reference_formula() -> None:
    """Mean density is the target, the band is 2λ wide, more outliers → lower sparsity."""
    s = owl_sparsities([1.0, 3.0, 2.0, 6.0], 0.7, 0.08)
    assert sum(s) / 4 == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-12)
    assert s[3] == min(s) and s[0] == max(s) and s[1] < s[2]
    # by hand: (D − 1)·0.16/5 = [0, .064, .032, .16], mean .064; density = that − .064 + .3
    assert s == pytest.approx([0.764, 0.7, 0.732, 0.604], abs=1e-12)
    assert owl_sparsities([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]  # no spread: uniform
    assert owl_sparsities([1.0, 2.0], 0.05, 0.08) == pytest.approx([0.13, 0.01])  # reference: ≤ 0 → 0.01
    # 2 of 8 scores exceed 3× the mean 1.25 (3.75): 25 %
    assert outlier_ratio(lambda: [torch.tensor([0.0, 0, 0, 0, 0, 0]), torch.tensor([5.0, 5.0])], 3.0) == 25.0


def test_owl_prunes_each_block_with_wanda_at_its_ratio_from_dense_statistics() -> None:
    model = _tiny_llama(layers=4, seed=3)
    block = model.model.layers[1]
    with torch.no_grad():  # outlier inputs into block 1 (raw outlier ratio 0.57 % → 4.3 %): it keeps the most
        for m in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.mlp.gate_proj,
                  block.mlp.up_proj):
            m.weight[:, :8].mul_(8)
    ad = Adapter(model)
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))
    patch = sparsify(ad, weight_method("owl:0.6"), calib, batch_size=4, progress=False)
    rep = patch.report["owl"]
    sp = rep["block_sparsity"]
    assert patch.label() == "owl:0.6" and sum(sp) / 4 == pytest.approx(0.6, abs=1e-9)
    assert min(sp) == sp[1] and max(sp) - min(sp) == pytest.approx(0.16, abs=1e-9)
    # the outlier ratios come from the dense model's activations
    blocks = target_linears(ad)
    acts = {p: torch.zeros(model.get_submodule(p).in_features) for ps in blocks for p in ps}
    handles = [model.get_submodule(p).register_forward_pre_hook(_sq_norm_hook(acts[p])) for p in acts]
    with torch.inference_mode():
        for b in range(0, 6, 4):
            model(input_ids=calib[b:b + 4], use_cache=False)
    for hd in handles:
        hd.remove()
    for i, paths in enumerate(blocks):
        scores = [model.get_submodule(p).weight.abs() * acts[p].sqrt() for p in paths]
        assert rep["outlier_ratio_pct"][i] == pytest.approx(outlier_ratio(lambda s=scores: s, 5.0), rel=1e-6)
        for p in paths:  # every row of every layer loses exactly floor(cols · s_i) weights
            w = patch.weights[p]
            assert ((w == 0).sum(1) == math.floor(w.shape[1] * sp[i] + 1e-9)).all(), p
    for p in blocks[0]:  # block 0 sees the dense input: Wanda's mask at block 0's ratio, exactly
        w = model.get_submodule(p).weight
        assert torch.equal(patch.weights[p], w.masked_fill(wanda_mask(w, acts[p], Pattern(ratio=sp[0])), 0))
    with pytest.raises(PrunelensError, match="not N:M"):
        weight_method("owl:2:4")
    sg = sparsify(ad, weight_method("owl-sparsegpt:0.6"), calib, batch_size=4, progress=False)
    assert sg.report["owl"]["block_sparsity"] == pytest.approx(sp)  # same dense pre-pass
    assert sg.report["zero_frac"] == pytest.approx(0.6, abs=0.01)


def test_pruned_in_place_model_can_be_fine_tuned() -> None:
    model = _tiny_llama()
    model.requires_grad_(True)
    sparsify(Adapter(model), parse_prune("magnitude:0.5"), inplace=True, progress=False)
    w = model.get_submodule("model.layers.0.mlp.up_proj").weight
    assert float((w == 0).float().mean()) == 0.5
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert w.grad is not None and w.grad.shape == w.shape


# --- 6. saving a plain transformers checkpoint ----------------------------------------------------


def test_save_modified_roundtrip(lm: LoadedModel, sgpt: tuple[WeightPatch, dict[str, Tensor]],
                                 tmp_path: Path) -> None:
    patch, dense = sgpt
    out = save_modified(lm, patch, tmp_path / "ckpt")
    assert torch.equal(lm.model.get_submodule("model.layers.0.mlp.up_proj").weight,
                       dense["model.layers.0.mlp.up_proj.weight"])  # saving left the model dense
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.prunelens["weights"][0]["label"] == "sparsegpt:2:4"
    assert reloaded.config.prunelens["weights"][0]["nm_violations"] == 0
    for path in ("model.layers.0.mlp.up_proj", "model.layers.5.self_attn.k_proj"):
        w = reloaded.get_submodule(path).weight
        assert nm_violations(w, 2, 4) == 0 and torch.equal(w, patch.weights[path])
    assert torch.equal(reloaded.get_submodule("model.layers.6.self_attn.q_proj").weight,
                       dense["model.layers.6.self_attn.q_proj.weight"])
    ids = lm.tokenizer("The capital of France is Paris, and the capital of Italy is",
                       return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        with patch.view(lm.adapter):
            want = lm.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# --- 7. one-line errors -------------------------------------------------------------------------


@pytest.mark.parametrize("spec,fragment", [
    ("wanda:1", "sparsity must be in [0, 1)"),
    ("wanda:-0.1", "sparsity must be in [0, 1)"),
    ("sparsegpt:nan", "sparsity must be in [0, 1)"),
    ("wanda:5:4", "N:M pattern needs 1 <= N <= M"),
    ("magnitude:0:4", "N:M pattern needs 1 <= N <= M"),  # N = 0 would remove every weight
    ("magnitude:2:0", "M >= 1"),
    ("wanda", "malformed pruning spec 'wanda'"),
    ("wanda:x", "malformed pruning spec 'wanda:x'"),
    ("wanda:0.5:4", "malformed pruning spec"),
    ("gptq:4bit", "malformed quantisation spec 'gptq:4bit'"),
    ("obs:0.5", "unknown method 'obs'"),
    ("hqq:w4", "unknown method 'hqq'"),
    ("rtn:w1", "bits must be in 2..8, got 1"),
    ("gptq:w9", "bits must be in 2..8, got 9"),
    ("rtn:w4g0", "group size must be positive"),
])
def test_bad_specs_raise_one_line_errors(spec: str, fragment: str) -> None:
    with pytest.raises(PrunelensError) as exc:
        weight_method(spec)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_good_specs_parse() -> None:
    m = weight_method("sparsegpt:2:4")
    assert (m.name, m.pattern, m.quant, m.label()) == ("sparsegpt", Pattern(n=2, m=4), None, "sparsegpt:2:4")
    assert weight_method(" wanda:0.5 ").pattern == Pattern(ratio=0.5)
    a = weight_method("awq:w4g128")
    assert (a.name, a.quant, a.method.stats, a.method.calibrated) == ("awq", QuantSpec(4, 128), "inputs", True)
    assert parse_quant("gptq:w4g128").quant == QuantSpec(4, 128, False)
    assert parse_quant("rtn:w8").quant == QuantSpec(8, -1, False)
    assert weight_method("rtn:w3g64s").label() == "rtn:w3g64s"
    with pytest.raises(PrunelensError, match="unknown quantisation method"):
        parse_quant("sparsegpt:w4")


def test_nm_m_not_dividing_the_input_dimension_names_the_module() -> None:
    model = _tiny_llama(hidden=48, inter=96)
    ad = Adapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PrunelensError) as exc:
        sparsify(ad, parse_prune("magnitude:2:5"), progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and "M=5" in msg and "48" in msg
    assert "model.layers.0.self_attn.q_proj" in msg
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(PrunelensError, match="of layer"):  # the bare function says 'layer'
        magnitude_mask(torch.ones(2, 48), Pattern(n=2, m=5))
    # 4 divides 48 and 96: the same model sparsifies fine at 2:4
    assert sparsify(ad, parse_prune("magnitude:2:4"), progress=False).report["nm_violations"] == 0


def test_calibrated_methods_need_calibration() -> None:
    with pytest.raises(PrunelensError, match="wanda needs calibration text"):
        sparsify(Adapter(_tiny_llama()), parse_prune("wanda:0.5"), None, progress=False)


def test_calibration_text_must_hold_one_window(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    f = tmp_path / "calib.txt"
    f.write_text("the cat sat\non the\n")  # joined with a blank line: 5 words, 5 tokens
    assert calibration_ids(tok, f, 3, 5).tolist() == [[1, 2, 3, 4, 1]] * 3
    with pytest.raises(PrunelensError) as exc:
        calibration_ids(tok, f, 1, 6)
    assert "has 5 tokens, fewer than the requested length 6" in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(PrunelensError, match="built-in calibration sample"):
        calibration_ids(tok, None, 1, 100_000)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.txt", "\n  \n"),
                                          ("blank.jsonl", '{"text": "  "}\n\n')])
def test_empty_calibration_file(tmp_path: Path, name: str, content: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PrunelensError) as exc:
        calibration_ids(tiny_tokenizer(), f, 1, 2)
    assert "is empty" in str(exc.value) and str(f) in str(exc.value) and "\n" not in str(exc.value)


def test_c4_calibration_windows(lm: LoadedModel) -> None:
    if not C4.is_file():
        pytest.skip(f"calibration file {C4} is absent (shared data not checked out)")
    ids = calibration_ids(lm.tokenizer, C4, 16, 128, seed=0)
    assert ids.shape == (16, 128) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_ids(lm.tokenizer, C4, 16, 128, seed=0))
    assert not torch.equal(ids, calibration_ids(lm.tokenizer, C4, 16, 128, seed=1))
