"""Counterfactual layerwise transition on tiny random models: restarting from the recorded dense
block input gives exactly what a full forward with that one layer replaced gives; an identity
replacement gives similarity 1 everywhere; weight patches are split per layer.
"""

from __future__ import annotations

import pytest
import torch

from prunelens.analyses.counterfactual import (
    CounterfactualSettings,
    counterfactual,
    layer_patch,
    single_layer,
)
from prunelens.errors import PrunelensError
from prunelens.metrics import cosine, logit_metrics
from prunelens.model.arch import Adapter
from prunelens.model.capture import capture
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import encode_prompts
from prunelens.prune import view_of
from prunelens.prune.weights import WeightPatch, parse_quant
from prunelens.testing import tiny_model, tiny_tokenizer

PROMPTS = ["w5 w6 w7 w8 w9 w10", "w11 w12 w13"]


def _lm(mt: str) -> LoadedModel:
    m = tiny_model(mt)
    return LoadedModel(m, tiny_tokenizer(), Adapter(m), {"name": f"tiny-{mt}"})


@pytest.mark.parametrize("mt", ["llama", "gemma3_text", "qwen2"])
def test_prefix_reuse_equals_a_full_forward_with_one_layer_replaced(mt: str) -> None:
    lm = _lm(mt)
    s = CounterfactualSettings(kinds=("attn", "mlp", "block"), chat_template=False)
    res = counterfactual(lm, PROMPTS[:1], s, progress=False)  # one prompt: no padding
    ids = torch.tensor(encode_prompts(lm.tokenizer, PROMPTS[:1], False))
    with torch.no_grad():
        z_d = lm.model(ids).logits[0].float()
        for kind in ("attn", "mlp", "block"):
            for i in range(lm.adapter.n_layers):
                with view_of(lm.adapter, single_layer(kind, i, lm.adapter)):
                    z_p = lm.model(ids).logits[0].float()
                want = logit_metrics(z_d, z_p, (1.0,), 10, light=True)
                got = res["kinds"][kind]
                assert got["cos_p"][i] == pytest.approx(float(want["cos_p@1"].mean()), abs=1e-6)
                assert got["kl"][i] == pytest.approx(float(want["kl@1"].mean()), abs=1e-6)
                assert got["cos_z"][i] == pytest.approx(float(cosine(z_d, z_p).mean()), abs=1e-6)


def test_padding_in_a_batch_does_not_change_the_numbers() -> None:
    lm = _lm("llama")
    s1 = CounterfactualSettings(chat_template=False)
    s2 = CounterfactualSettings(chat_template=False, batch_size=2)
    one = [counterfactual(lm, [p], s1, progress=False) for p in PROMPTS]
    both = counterfactual(lm, PROMPTS, s2, progress=False)
    n = [r["settings"]["n_tokens"] for r in one]
    for i in range(lm.adapter.n_layers):
        want = (one[0]["kinds"]["attn"]["kl"][i] * n[0] + one[1]["kinds"]["attn"]["kl"][i] * n[1]) / sum(n)
        assert both["kinds"]["attn"]["kl"][i] == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_identity_replacement_is_similarity_one_everywhere() -> None:
    lm = _lm("llama")
    same = {n: m.weight.data.clone() for n, m in lm.model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}
    patch = WeightPatch(parse_quant("rtn:w8"), same)
    s = CounterfactualSettings(kinds=(), chat_template=False)
    res = counterfactual(lm, PROMPTS, s, patch, progress=False)
    c = res["kinds"]["weights"]
    assert all(x == 1.0 for s in ("h", "z", "p") for x in c[f"cos_{s}"])
    assert all(x == 0.0 for x in c["kl"]) and all(x == 1.0 for x in c["top1_agree"])
    # a patch is split by block: layer 1's part holds only layer 1's linears
    part = layer_patch(patch, lm.adapter, 1)
    assert part.weights and all(".layers.1." in p for p in part.weights)


@pytest.mark.parametrize("mt", ["llama", "gemma2"])  # gemma2 soft-caps its final logits
def test_final_logits_match_the_model_including_softcapping(mt: str) -> None:
    lm = _lm(mt)
    L = lm.adapter.n_layers
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), capture(lm.adapter, [f"resid.{L}"]) as store:
        z = lm.model(ids).logits
    torch.testing.assert_close(lm.adapter.final_logits(store[f"resid.{L}"]), z, atol=1e-5, rtol=1e-5)
    if mt == "gemma2":
        assert lm.model.config.final_logit_softcapping


def test_bad_kinds_and_missing_patch() -> None:
    lm = _lm("llama")
    with pytest.raises(PrunelensError, match="unknown counterfactual kind"):
        counterfactual(lm, PROMPTS, CounterfactualSettings(kinds=("heads",)), progress=False)
    with pytest.raises(PrunelensError, match="needs a weight patch"):
        counterfactual(lm, PROMPTS, CounterfactualSettings(kinds=("weights",)), progress=False)
