"""Training-free repair: the closed forms against their definitions (and ReplaceMe's lstsq formula),
a constructed model whose dropped block is exactly a known linear map, merged = stand-in logits,
and the saved checkpoint in plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelens.data import calibration_ids
from prunelens.errors import PrunelensError
from prunelens.metrics import kl_div
from prunelens.model.placement import swapped
from prunelens.prune.base import combine, method_for, view_of
from prunelens.prune.drop import DropPlan
from prunelens.prune.linfit import NormalEquations, cosine_loss, cosine_map, diagonal_map, ridge_map
from prunelens.prune.recipe import Calibration, Recipe, build, prune_weights, save_modified
from prunelens.prune.repair import RepairPatch, Span, dropped_spans, fit_by_full_passes, fit_repair, weight_spans
from prunelens.testing import tiny_lm


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only here; scoped per test so grad mode does not leak into other modules."""
    with torch.no_grad():
        yield


def _ids(n: int = 8, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, length), generator=g)


def test_spans_follow_the_residual_order() -> None:
    plan = DropPlan(attn=(1,), mlp=(0,), block=(3,))
    # mlp 0 = [1,2], attn 1 = [2,3] join into one span; block 3 = [6,8]
    assert dropped_spans(plan) == [Span(1, 3), Span(6, 8)]
    assert Span(1, 3).source == ("attn", 0) and Span(6, 8).source == ("mlp", 2)
    assert Span(0, 2).source is None
    assert Span(6, 8).name() == "resid.3..resid.4"


def test_ridge_map_is_least_squares_and_replaceme_lstsq() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g, dtype=torch.float64)
    t_true = torch.randn(16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(400, 16, generator=g, dtype=torch.float64)  # the stream without x
    noise = 0.01 * torch.randn(400, 16, generator=g, dtype=torch.float64)
    ln = y + x @ t_true + noise  # the reference stream at the span's end
    t = ridge_map(x.T @ x, x.T @ (ln - y), 0.0)
    assert torch.allclose(t, torch.linalg.lstsq(x, ln - y).solution, atol=1e-10)
    # ReplaceMe (eq. 5, lstsq.py): a1 = M, a2 = L_n + M − L_i with L_i = y + M the block output
    li = y + x
    alpha = 3.0
    replaceme = torch.linalg.inv(x.T @ x + alpha * torch.eye(16, dtype=torch.float64)) @ x.T @ (ln + x - li)
    ours = ridge_map(x.T @ x, x.T @ (ln - y), alpha / float(torch.diagonal(x.T @ x).mean()))
    assert torch.allclose(ours, replaceme, atol=1e-10)
    assert torch.allclose(ridge_map(x.T @ x, x.T @ (x @ t_true), 0.0), t_true, atol=1e-9)


def test_diagonal_map_is_per_channel_regression() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    r = 1.7 * x + 0.3 + 0.05 * torch.randn(300, 5, generator=g, dtype=torch.float64)
    sums = {"x": x.sum(0), "xx": (x * x).sum(0), "r": r.sum(0), "xr": (x * r).sum(0)}
    s, b = diagonal_map(sums, 300, bias=True)
    for j in range(5):
        a = torch.stack([x[:, j], torch.ones(300, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, r[:, j:j + 1]).solution[:, 0]
        assert torch.allclose(torch.stack([s[j], b[j]]), sol, atol=1e-10)
    s0, b0 = diagonal_map(sums, 300, bias=False)
    assert torch.allclose(s0, (x * r).sum(0) / (x * x).sum(0)) and not b0.any()


def test_cosine_map_lowers_the_cosine_loss() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = torch.randn(200, 8, generator=g)
    ref = y + x @ torch.randn(8, 8, generator=g)
    init = torch.eye(8, dtype=torch.float64)
    t, info = cosine_map(x, y, ref, init)
    assert info["cosine_loss_after"] < 1e-6 < info["cosine_loss_before"]
    assert float(cosine_loss(x.double(), y.double(), ref.double(), t)) < 1e-6


def test_cosine_map_moves_from_the_ridge_start_on_streams_of_large_norm() -> None:
    """Residual streams of norm ~10⁴ make the gradient tiny: in float32 the line search stalled after
    one step and returned the ridge solution (the SmolLM2 run where cosine == linear)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g) * 300
    y = torch.randn(400, 16, generator=g) * 1e4
    ref = (y + x @ torch.randn(16, 16, generator=g)) * (1 + torch.rand(400, 1, generator=g) * 3)
    eq = NormalEquations()
    eq.add(x, ref - y)
    init = ridge_map(eq.xtx, eq.xtr)  # least squares: the cosine optimum differs (rows rescaled)
    t, info = cosine_map(x, y, ref, init)
    assert not info["cosine_fallback"] and info["lbfgs_iterations"] > 2
    assert info["cosine_loss_after"] < 0.5 * info["cosine_loss_before"]
    assert float((t - init).abs().max() / init.abs().max()) > 1e-2


class _Reference:
    """The same model with other weights for some modules (the target a repair is fitted toward)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    def parts(self):
        return [self]

    def view(self, adapter):
        return swapped(adapter.model, self.weights)


def test_a_dropped_block_that_is_a_linear_map_is_recovered_exactly() -> None:
    """Reference: block 2 adds nothing and block 1's down-projection is Tᵀ·W, so the stream after
    block 2 is exactly y + M·T for M the original block 1's MLP output; dropping block 2 of the
    original model and fitting must find T, and the repaired model must equal the reference."""
    lm = tiny_lm("llama")
    model, ad = lm.model, lm.adapter
    g = torch.Generator().manual_seed(3)
    t_true = torch.eye(32) + 0.3 * torch.randn(32, 32, generator=g)
    down1 = model.get_submodule("model.layers.1.mlp.down_proj").weight
    ref = _Reference({"model.layers.1.mlp.down_proj": (t_true.T @ down1).contiguous(),
                      "model.layers.2.self_attn.o_proj": torch.zeros(32, 32),
                      "model.layers.2.mlp.down_proj": torch.zeros(32, 64)})
    plan = DropPlan(block=(2,))
    ids = _ids()
    patch = fit_repair(ad, plan, "repair:linear:0", ids, reference=ref)
    (m,) = patch.maps
    assert m.module == "model.layers.1.mlp.down_proj" and m.span == Span(4, 6)
    assert torch.allclose(m.t, t_true, atol=1e-3)
    assert m.stats["stream_error_after"] < 1e-8 < m.stats["stream_error_before"]
    test = _ids(seed=9)
    with view_of(ad, ref):
        want = model(test).logits
    with view_of(ad, combine([plan, patch])):
        got = model(test).logits
    with view_of(ad, plan):
        unrepaired = model(test).logits
    assert torch.allclose(got, want, atol=1e-3)
    assert (unrepaired - want).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["linear", "cosine", "scale", "bias"])
def test_merged_equals_stand_in_and_the_dense_model_is_untouched(mode: str) -> None:
    lm = tiny_lm("llama")
    model, ad = lm.model, lm.adapter
    ids, test = _ids(), _ids(seed=5)
    dense = model(test).logits
    plan = DropPlan(attn=(3,), block=(1,))  # two spans: block 1 (after mlp 0), attn 3 (after mlp 2)
    patch = fit_repair(ad, plan, f"repair:{mode}", ids)
    assert [m.module for m in patch.maps] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert [m.span for m in patch.maps] == dropped_spans(plan)
    assert all(m.weight is not None for m in patch.maps)
    with view_of(ad, combine([plan, patch])):
        merged = model(test).logits
    with view_of(ad, combine([plan, patch.hooked()])):
        hooked = model(test).logits
    assert torch.allclose(merged, hooked, atol=1e-4)
    for m in patch.maps:
        assert m.stats["stream_error_after"] < m.stats["stream_error_before"]
    assert torch.equal(model(test).logits, dense)


def test_saved_repair_reloads_in_plain_transformers(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    mod = build(lm, "block@2+attn@1+repair:linear", progress=False)
    test = _ids(seed=7)
    with view_of(lm.adapter, mod):
        want = lm.model(test).logits
    out = save_modified(lm, mod, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3
    got = reloaded(test).logits
    # the saved attn@1 keeps its zeroed o_proj, so plain transformers computes the same stream
    assert torch.allclose(got, want, atol=1e-4)


def test_repair_composes_in_recipes_and_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    assert method_for("repair:linear").family == "repair"
    assert Recipe.parse("block:1+repair:cosine").specs == ("block:1", "repair:cosine")
    for bad in ("repair", "repair:quadratic", "repair:linear:-1", "repair:linear:x"):
        with pytest.raises(PrunelensError, match="malformed repair spec"):
            Recipe.parse(bad)
    lm = tiny_lm("llama")
    with pytest.raises(PrunelensError, match="put a drop or a weight method before it"):
        build(lm, "repair:linear", progress=False)
    # a pruned-then-repaired model is fitted toward the dense model, with the pruned weight merged
    mod = build(lm, "block@2+wanda:0.5+repair:scale", progress=False)
    (rp,) = [p for p in mod.parts() if isinstance(p, RepairPatch)]
    w = rp.maps[0].weight
    assert w is not None and (w == 0).float().mean() >= 0.49  # scale keeps the sparse weight sparse
    bias = build(lm, "block@2+repair:bias", progress=False)
    with pytest.raises(PrunelensError, match="adds a bias"):
        save_modified(lm, bias, tmp_path / "b")


def test_a_repair_that_raises_the_held_out_kl_is_said_or_refused(capsys: pytest.CaptureFixture[str]) -> None:
    lm = tiny_lm("llama")
    # ridge 0 on one window of 4 tokens: an underdetermined map that fits those tokens and nothing else
    few = Calibration(samples=1, seq_len=4)
    bad = build(lm, "block@2+repair:linear:0", few, progress=False).parts()[-1].to_dict()
    check = bad["held_out_check"]
    assert check["raises_kl"] and check["kl_with_repair"] > check["kl_without_repair"]
    assert check["held_out_windows"] == 1 and bad["calibration"]["samples"] == 1  # fitted on the 1 asked for
    err = capsys.readouterr().err
    assert "repair:linear:0 raises the next-token KL" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(PrunelensError, match=r"refused \(:strict\)"):
        build(lm, "block@2+repair:linear:0:strict", few, progress=False)
    assert Recipe.parse("attn@1+repair:scale:strict").steps[1].value.strict
    # enough calibration: the same map lowers the held-out KL, and nothing is said
    good = build(lm, "block@2+repair:linear:0:strict", Calibration(samples=8, seq_len=32), progress=False)
    check = good.parts()[-1].to_dict()["held_out_check"]
    assert not check["raises_kl"] and check["kl_with_repair"] < check["kl_without_repair"]
    assert check["held_out_windows"] == 2 and capsys.readouterr().err == ""

def test_sandwich_norms_repair_by_stand_in_and_refuse_to_save(tmp_path: Path) -> None:
    lm = tiny_lm("gemma3_text")
    plan = DropPlan(block=(2,))
    patch = fit_repair(lm.adapter, plan, "repair:linear", _ids())
    (m,) = patch.maps
    assert m.module.endswith("post_feedforward_layernorm") and m.weight is None
    assert m.stats["stream_error_after"] < m.stats["stream_error_before"]
    with view_of(lm.adapter, combine([plan, patch])):
        lm.model(_ids(seed=2))
    with pytest.raises(PrunelensError, match="no weight to merge"):
        save_modified(lm, combine([plan, patch]), tmp_path / "g")


def test_repair_lowers_the_next_token_kl_on_the_real_model(real_lm) -> None:
    """On held-out text, block:4+repair:linear is closer to the dense model than block:4."""
    lm = real_lm
    drop = build(lm, "block:4", progress=False)
    repaired = combine([drop, build(lm, ["block:4", "repair:linear"], progress=False).parts()[-1]])
    test = calibration_ids(lm.tokenizer, None, 4, 128, seed=123)
    dense = lm.model(test).logits.double().log_softmax(-1)
    kls = {}
    for name, mod in (("drop", drop), ("repaired", repaired)):
        with view_of(lm.adapter, mod):
            kls[name] = float(kl_div(dense, lm.model(test).logits.double().log_softmax(-1)).mean())
    assert kls["repaired"] < 0.8 * kls["drop"], kls


def test_scale_correction_after_a_weight_method_is_the_per_channel_fit_and_keeps_sparsity() -> None:
    """wanda:0.5+repair:scale corrects every pruned sublayer's output toward the dense stream right
    after it; the first one's scale is the closed-form per-channel regression on captured activations."""
    lm = tiny_lm("llama")
    model, ad = lm.model, lm.adapter
    ids, test = _ids(), _ids(seed=5)
    wanda = prune_weights(lm, "wanda:0.5", progress=False)
    assert weight_spans(ad, wanda, DropPlan()) == [Span(c, c) for c in range(1, 2 * ad.n_layers + 1)]
    patch = fit_repair(ad, wanda, "repair:scale", ids)
    assert [m.module for m in patch.maps][:2] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    assert patch.maps[0].span.name() == "attn.0"
    # closed form for attn.0: x = its pruned output, r = dense stream after it − (stream − x)
    cap: dict[str, torch.Tensor] = {}
    o_proj = model.get_submodule("model.layers.0.self_attn.o_proj")
    h = o_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("x", o.reshape(-1, o.shape[-1])))
    h2 = ad.pre_mlp_norm(0).register_forward_pre_hook(
        lambda m, a: cap.__setitem__("s", a[0].reshape(-1, a[0].shape[-1])))
    model(ids)
    dense_stream = cap["s"].clone()
    with view_of(ad, wanda):
        model(ids)
    h.remove(), h2.remove()
    x, r = cap["x"].double(), (dense_stream - (cap["s"] - cap["x"])).double()
    want = (x * r).sum(0) / (x * x).sum(0)
    assert torch.allclose(patch.maps[0].s.double(), want, rtol=1e-4, atol=1e-6)
    for m in patch.maps:
        assert m.stats["stream_error_after"] <= m.stats["stream_error_before"] + 1e-9
        pruned = wanda.weights[m.module]
        assert ((m.weight == 0) >= (pruned == 0)).all()  # a scale keeps every pruned zero
    # merged equals the stand-in, and the corrected model is closer to dense on held-out ids
    mod = combine([wanda, patch])
    with view_of(ad, mod):
        merged = model(test).logits
    with view_of(ad, combine([wanda, patch.hooked()])):
        hooked = model(test).logits
    assert torch.allclose(merged, hooked, atol=1e-4)
    dense = model(test).logits
    with view_of(ad, wanda):
        plain = model(test).logits
    assert (merged - dense).pow(2).mean() < (plain - dense).pow(2).mean()


def test_dense_maps_after_a_weight_method_are_refused() -> None:
    lm = tiny_lm("llama")
    for mode in ("linear", "cosine"):
        with pytest.raises(PrunelensError, match="undoing it"):
            build(lm, f"wanda:0.5+repair:{mode}", progress=False)
    # with a drop as well, the drop's span is fitted and the pruned sublayers left alone
    mod = build(lm, "block@2+wanda:0.5+repair:linear", progress=False)
    (rp,) = [p for p in mod.parts() if isinstance(p, RepairPatch)]
    assert [m.span for m in rp.maps] == [Span(4, 6)]


@pytest.mark.parametrize(("drops", "weights", "mode"), [
    (DropPlan(block=(1, 2)), None, "linear"),  # one span across two blocks, its source two blocks back
    (DropPlan(attn=(2,), mlp=(1,)), None, "linear"),  # mlp 1 + attn 2: source attention 1, end mid-block 2
    (DropPlan(attn=(1,), mlp=(2,)), "wanda:0.5", "scale"),  # drops interleaved with sublayers' own corrections
    (DropPlan(attn=(3,)), "wanda:0.5", "bias"),
])
def test_the_streamed_fit_equals_fitting_each_span_on_full_passes(drops: DropPlan, weights: str | None,
                                                                    mode: str) -> None:
    """fit_repair runs each block once (twice for a corrected attention) instead of one full pass per span;
    its maps must equal the span-by-span definition."""
    lm = tiny_lm("llama")
    mod = combine([drops, prune_weights(lm, weights, progress=False)]) if weights else drops
    ids = _ids()
    patch = fit_repair(lm.adapter, mod, f"repair:{mode}", ids)
    want = fit_by_full_passes(lm.adapter, mod, f"repair:{mode}", ids)
    assert [m.span for m in patch.maps] == [m.span for m in want.maps]
    assert len(want.maps) >= (1 if weights is None else 4)
    for m, r in zip(patch.maps, want.maps, strict=True):
        got, w = (m.t, r.t) if m.t is not None else (m.s, r.s)
        assert torch.allclose(got, w, rtol=1e-3, atol=1e-4), (m.span, (got - w).abs().max())
