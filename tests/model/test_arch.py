"""Every architecture in ``ARCHS`` on a tiny random-weight model: adapter paths, the zero-copy
pruned view against a hand-built reference, KV-cached decoding inside the view, saving/reloading a
pruned checkpoint, and the exactness of an empty plan through ``analyze``.

No downloads: models come from ``AutoModelForCausalLM.from_config`` and the tokenizer is a
WordLevel vocabulary of 128 words built here.
"""

from __future__ import annotations

import copy
import gc
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from prunelens.analyses.trace import AnalysisSettings, analyze
from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter, get_module, spec_for
from prunelens.model.capture import capture
from prunelens.model.kvcache import cache_keyword, forward_cached
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import left_pad
from prunelens.prune.checkpoint import (
    METADATA_KEY,
    load_model,
    plan_from_config,
    pruned_state_and_config,
    save_pruned,
)
from prunelens.prune.drop import (
    DropPlan,
    SkippedAttention,
    SkippedBlock,
    SkippedMLP,
    install_permanently,
    pruned_view,
)
from prunelens.testing import ARCH_KW, ARCH_NAMES, EOS, N_LAYERS, PAD, SLIDING, VOCAB, tiny_model

# The plan of the brief (block 3 is the last one) and one dropping a middle block, so that saving
# has to renumber the later blocks and the recorded skip indices.
PLAN_A = DropPlan(attn=(0, 2), mlp=(1,), block=(3,))
PLAN_B = DropPlan(attn=(0, 3), mlp=(2,), block=(1,))
# sublayers of a dropped block listed as well: the block wins, nothing is skipped twice
PLAN_C = DropPlan(attn=(1, 2), mlp=(0, 2), block=(2,))
PLANS = {"A": PLAN_A, "B": PLAN_B, "C": PLAN_C}


def ids_of(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


def logits(m: nn.Module, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False, **kw).logits


def softcap(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    cap = getattr(m.config, "final_logit_softcapping", None)
    return z if cap is None else torch.tanh(z / cap) * cap


def reference_pruned(m: nn.Module, plan: DropPlan) -> nn.Module:
    """Independent of prunelens' own code paths: a deep copy with dropped sublayers' output
    projections zeroed and dropped blocks deleted from the layer list."""
    ref = copy.deepcopy(m)
    spec = spec_for(m.config.model_type)
    layers = get_module(ref, spec.layers)
    with torch.no_grad():
        for kinds, out_path in ((plan.attn, spec.attn_out), (plan.mlp, spec.mlp_out)):
            for i in kinds:
                lin = get_module(layers[i], out_path)
                assert isinstance(lin, nn.Linear)
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    keep = [i for i in range(len(layers)) if i not in plan.block]
    for i in sorted(plan.block, reverse=True):
        del layers[i]
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None) is not None:
        ref.config.layer_types = [ref.config.layer_types[i] for i in keep]
    return ref


# --- 1. adapter ---------------------------------------------------------------------------------


def test_arch_table_is_the_eight_supported_families() -> None:
    assert ARCH_NAMES == sorted(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])


def test_adapter_resolves_every_part(model: nn.Module) -> None:
    ad = Adapter(model)
    spec = ad.spec
    assert ad.model_type == model.config.model_type
    assert isinstance(ad.layers, nn.ModuleList) and ad.n_layers == N_LAYERS
    assert isinstance(ad.embed, nn.Embedding) and ad.embed is model.get_input_embeddings()
    assert ad.lm_head is model.get_output_embeddings() and isinstance(ad.lm_head, nn.Linear)
    assert ad.final_norm is model.model.norm
    assert ad.num_kv_heads == 2 and ad.head_dim == 8
    for i, layer in enumerate(ad.layers):
        assert ad.layer_path(i) == f"{spec.layers}.{i}"
        assert model.get_submodule(ad.layer_path(i)) is layer
        attn = model.get_submodule(ad.sublayer_path("attn", i))
        mlp = model.get_submodule(ad.sublayer_path("mlp", i))
        assert attn is get_module(layer, spec.attn) and "Attention" in type(attn).__name__
        assert mlp is get_module(layer, spec.mlp) and "MLP" in type(mlp).__name__
        assert "Norm" in type(ad.pre_mlp_norm(i)).__name__
        for path in (*spec.linears, spec.attn_out, spec.mlp_out):
            assert isinstance(get_module(layer, path), nn.Linear), path
        assert spec.attn_out in spec.linears and spec.mlp_out in spec.linears
        # the output projections map back to the residual stream
        assert get_module(layer, spec.attn_out).out_features == model.config.hidden_size
        assert get_module(layer, spec.mlp_out).out_features == model.config.hidden_size


@pytest.mark.parametrize("mt", [m for m in ARCH_NAMES if ARCH_KW[m].get("sliding_window")])
def test_tiny_sliding_window_is_active(mt: str) -> None:
    """Sanity check of the fixtures: with 9 tokens, the 4-token window changes the logits."""
    ids = ids_of(0, 9)
    wide = copy.deepcopy(ARCH_KW[mt])
    wide["sliding_window"] = 64
    m = tiny_model(mt)
    saved = ARCH_KW[mt]
    try:
        ARCH_KW[mt] = wide
        m_wide = tiny_model(mt)
    finally:
        ARCH_KW[mt] = saved
    z, z_wide = logits(m, ids), logits(m_wide, ids)
    assert torch.equal(z[:, :SLIDING], z_wide[:, :SLIDING])
    assert not torch.allclose(z[:, -1], z_wide[:, -1], atol=1e-2)


def test_pre_mlp_norm_input_is_the_mid_residual_stream(model: nn.Module) -> None:
    """mid.i (input of pre_mlp_norm) = resid.i + attention contribution; with attention dropped
    it must equal resid.i exactly, which pins down that the right norm was named."""
    ad = Adapter(model)
    ids = ids_of(1, 7)
    names = ["resid.1", "mid.1", "resid.2"]
    with pruned_view(ad, DropPlan(attn=(1,))), capture(ad, names) as s:
        logits(model, ids)
    assert torch.equal(s["mid.1"], s["resid.1"])
    with capture(ad, names) as s:
        logits(model, ids)
    assert not torch.allclose(s["mid.1"], s["resid.1"])


def test_logits_from_hidden_reproduces_model_logits(model: nn.Module) -> None:
    ad = Adapter(model)
    ids = ids_of(2, 9, batch=2)
    with capture(ad, [f"resid.{N_LAYERS}", "final"]) as s:
        z = logits(model, ids)
    lens = ad.logits_from_hidden(s[f"resid.{N_LAYERS}"])
    torch.testing.assert_close(ad.lm_head(s["final"]), lens, rtol=0, atol=0)
    # gemma2 caps its final logits (z = c * tanh(z / c)); the logit lens is documented to work
    # without the cap, so compare after applying the same cap.
    torch.testing.assert_close(softcap(model, lens), z, rtol=1e-5, atol=1e-5)
    if model.config.model_type == "gemma2":
        assert model.config.final_logit_softcapping
        assert not torch.allclose(lens, z, atol=1e-3)  # the cap really is active here


def test_unsupported_architecture_is_rejected() -> None:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    with pytest.raises(PrunelensError) as ei:
        Adapter.check_config(cfg)
    for name in ARCH_NAMES:
        assert name in str(ei.value)
    assert "gpt2" in str(ei.value)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(PrunelensError, match="unsupported architecture 'gpt2'") as ei:
        Adapter(gpt2)
    assert all(name in str(ei.value) for name in ARCH_NAMES)


# --- 2. the zero-copy view ------------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_pruned_view_matches_reference_and_restores(model: nn.Module, plan: DropPlan) -> None:
    ad = Adapter(model)
    ids = ids_of(3, 9, batch=2)  # 9 > sliding window
    dense = logits(model, ids)
    want = logits(reference_pruned(model, plan), ids)

    params_before = dict(model.named_parameters())
    ptr_before = {n: p.data_ptr() for n, p in params_before.items()}
    modules_before = dict(model.named_modules())
    dropped = [ad.layer_path(i) + "." for i in plan.block]
    dropped += [ad.sublayer_path("attn", i) + "." for i in plan.attn if i not in plan.block]
    dropped += [ad.sublayer_path("mlp", i) + "." for i in plan.mlp if i not in plan.block]

    with pruned_view(ad, plan):
        got = logits(model, ids)
        for i in plan.block:
            assert isinstance(ad.layers[i], SkippedBlock)
        for i in set(plan.attn) - set(plan.block):
            assert isinstance(get_module(model, ad.sublayer_path("attn", i)), SkippedAttention)
        for i in set(plan.mlp) - set(plan.block):
            assert isinstance(get_module(model, ad.sublayer_path("mlp", i)), SkippedMLP)
        inside = dict(model.named_parameters())
        kept = {n for n in params_before if not any(n.startswith(d) for d in dropped)}
        assert set(inside) == kept
        for n, p in inside.items():  # the very same Parameter objects, same storage
            assert p is params_before[n] and p.data_ptr() == ptr_before[n]
        assert len(inside) < len(params_before)

    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-2)  # the plan does change the output
    after = logits(model, ids)
    assert torch.equal(after, dense)
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[n] and p.data_ptr() == ptr_before[n]
               for n, p in model.named_parameters())
    assert all(m is modules_before[n] for n, m in model.named_modules())
    assert dict(model.named_modules()).keys() == modules_before.keys()


def test_pruned_view_restores_after_an_exception(model: nn.Module) -> None:
    ad = Adapter(model)
    layers_before = list(ad.layers)
    with pytest.raises(RuntimeError, match="boom"), pruned_view(ad, PLAN_B):
        raise RuntimeError("boom")
    assert list(ad.layers) == layers_before
    assert all(not isinstance(m, (SkippedAttention, SkippedBlock, SkippedMLP)) for m in model.modules())


@pytest.mark.parametrize("bad", [DropPlan(attn=(N_LAYERS,)), DropPlan(block=tuple(range(N_LAYERS)))])
def test_pruned_view_rejects_invalid_plans(model: nn.Module, bad: DropPlan) -> None:
    ad = Adapter(model)
    layers_before = list(ad.layers)
    with pytest.raises(PrunelensError), pruned_view(ad, bad):
        pass
    assert list(ad.layers) == layers_before


# --- 3. KV-cached decoding inside the view -----------------------------------------------------------


@pytest.mark.parametrize("plan", [PLAN_A, PLAN_B, DropPlan()], ids=["A", "B", "dense"])
def test_cached_decoding_in_view_matches_full_forward(model: nn.Module, plan: DropPlan) -> None:
    ad = Adapter(model)
    ids = ids_of(4, 9, batch=2)
    assert 0 in plan.attn or plan.empty  # attention dropped at layer 0: the cache length source
    with pruned_view(ad, plan), torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        kw = {cache_keyword(type(model)): cache}
        out = model(input_ids=ids[:, :6], use_cache=True, **kw)
        steps = [out.logits[:, -1]]
        for t in range(6, 9):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **kw)
            steps.append(out.logits[:, -1])
        assert cache.get_seq_length() == 9
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("plan", [PLAN_A, PLAN_B], ids=["A", "B"])
def test_left_padded_cached_decoding_in_view_matches_unpadded(model: nn.Module, plan: DropPlan) -> None:
    ad = Adapter(model)
    seqs = [ids_of(5, 9)[0].tolist(), ids_of(6, 5)[0].tolist()]  # the second row is left-padded
    cont = ids_of(7, 3, batch=2)
    with pruned_view(ad, plan), torch.no_grad(), warnings.catch_warnings():
        # the cache goes by the keyword this transformers version reads, not a deprecated one
        warnings.simplefilter("error", FutureWarning)
        ids, mask = left_pad(seqs, PAD, torch.device("cpu"))
        cache = DynamicCache(config=model.config)
        steps = [forward_cached(model, ids, mask, cache)]
        for t in range(3):
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            steps.append(forward_cached(model, cont[:, t:t + 1], mask, cache))
        got = torch.stack(steps, 1)  # (2, 4, vocab): last prompt position, then 3 decoded tokens
        for r, s in enumerate(seqs):
            row = torch.cat([torch.tensor(s), cont[r]])[None]
            full = model(input_ids=row, use_cache=False).logits[0, len(s) - 1:]
            torch.testing.assert_close(got[r], full, rtol=0, atol=1e-4)


# --- 4. saving and reloading -----------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_save_pruned_reloads_in_plain_transformers(
    model: nn.Module, plan: DropPlan, tokenizer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ad = Adapter(model)
    ids = ids_of(8, 9, batch=2)
    with pruned_view(ad, plan):
        want = logits(model, ids)
    dense = logits(model, ids)
    out = save_pruned(ad, plan, tmp_path / "pruned", tokenizer=tokenizer)
    assert torch.equal(logits(model, ids), dense)  # saving leaves the live model alone
    assert model.config.num_hidden_layers == N_LAYERS and not hasattr(model.config, METADATA_KEY)
    assert plan_from_config(model.config) is None

    keep = [i for i in range(N_LAYERS) if i not in plan.block]
    new_index = {old: new for new, old in enumerate(keep)}
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    cfg = plain.config
    assert type(plain) is type(model)
    assert cfg.num_hidden_layers == N_LAYERS - len(plan.block) == len(Adapter(plain).layers)
    if getattr(model.config, "layer_types", None) is not None:
        assert cfg.layer_types == [model.config.layer_types[i] for i in keep]
    meta = getattr(cfg, METADATA_KEY)
    assert isinstance(meta, dict)
    assert meta["dense_num_hidden_layers"] == N_LAYERS and meta["kept_layers"] == keep
    assert DropPlan.from_dict(meta["dropped"]) == plan
    assert json.loads((out / "prunelens.json").read_text()) == meta
    skip = DropPlan(attn=tuple(new_index[i] for i in plan.attn if i in new_index),
                    mlp=tuple(new_index[i] for i in plan.mlp if i in new_index))
    assert plan_from_config(cfg) == skip
    # zeroed output projections were saved as zeros, other weights as they are
    spec = ad.spec
    for i in skip.attn:
        assert not get_module(plain.model.layers[i], spec.attn_out).weight.any()
    for i in skip.mlp:
        assert not get_module(plain.model.layers[i], spec.mlp_out).weight.any()
    for new, old in enumerate(keep):
        for path in spec.linears:
            if (old in plan.attn and path == spec.attn_out) or (old in plan.mlp and path == spec.mlp_out):
                continue
            assert torch.equal(get_module(plain.model.layers[new], path).weight,
                               get_module(ad.layers[old], path).weight), (old, path)
    torch.testing.assert_close(logits(plain, ids), want, rtol=0, atol=1e-5)

    capsys.readouterr()
    lm = load_model(str(out))
    printed = capsys.readouterr()
    assert printed.out == "" and "prunelens" not in printed.err  # nothing to fetch or convert
    assert lm.info["path"] == str(out) and lm.info["device"] == "cpu" and lm.info["dtype"] == "float32"
    assert lm.info["n_layers"] == len(keep) and lm.info["model_type"] == model.config.model_type
    assert DropPlan.from_dict(lm.info["skipped_from_checkpoint"]) == skip
    # (whether the skipped sublayers really are stand-ins: test_load_model_skips_zeroed_sublayers)
    torch.testing.assert_close(logits(lm.model, ids), want, rtol=0, atol=1e-5)
    # the saved tokenizer comes back (for qwen2, transformers picks Qwen2Tokenizer by model_type and
    # re-splits text its own way, so only the vocabulary and special tokens are compared)
    assert lm.tokenizer.convert_ids_to_tokens([5, EOS]) == ["w5", "<eos>"]
    assert (lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id) == (EOS, PAD)


def test_install_permanently_keeps_the_stand_ins() -> None:
    m = tiny_model("llama")  # a private model: the shared one must not be altered for good
    ad = Adapter(m)
    install_permanently(ad, DropPlan(attn=(0,), mlp=(2,)))
    gc.collect()
    assert isinstance(ad.layers[0].self_attn, SkippedAttention)
    assert isinstance(ad.layers[2].mlp, SkippedMLP)


def test_load_model_skips_zeroed_sublayers(model: nn.Module, tokenizer: Any, tmp_path: Path) -> None:
    ad = Adapter(model)
    out = save_pruned(ad, PLAN_B, tmp_path / "pruned", tokenizer=tokenizer)
    lm = load_model(str(out))
    gc.collect()
    skip = plan_from_config(lm.model.config)
    assert skip == DropPlan(attn=(0, 2), mlp=(1,))  # PLAN_B in the saved model's indexing
    for i in range(lm.adapter.n_layers):
        attn = get_module(lm.model, lm.adapter.sublayer_path("attn", i))
        mlp = get_module(lm.model, lm.adapter.sublayer_path("mlp", i))
        assert isinstance(attn, SkippedAttention) == (i in skip.attn), i
        assert isinstance(mlp, SkippedMLP) == (i in skip.mlp), i


def test_pruned_state_shares_weights_with_live_model(model: nn.Module) -> None:
    ad = Adapter(model)
    state, cfg = pruned_state_and_config(ad, PLAN_B)
    live = model.state_dict()
    # block 1 removed, block 2 -> 1, block 3 -> 2; untouched tensors are the live ones
    q = ad.spec.linears[0]
    assert state[f"model.layers.1.{q}.weight"].data_ptr() == live[f"model.layers.2.{q}.weight"].data_ptr()
    assert not any(k.startswith("model.layers.3.") for k in state)
    assert not state[f"model.layers.2.{ad.spec.attn_out}.weight"].any()
    assert live[f"model.layers.3.{ad.spec.attn_out}.weight"].any()
    assert cfg is not model.config and cfg.num_hidden_layers == 3


# --- 5. analysis ------------------------------------------------------------------------------------

PROMPTS = ["w5 w9 w17 w33 w65 w100 w7", "w11 w12", "w40 w41 w42 w43 w44"]


def _valid(series: list[float | None], counts: list[int]) -> list[float]:
    return [v for v, c in zip(series, counts, strict=True) if c > 0 and v is not None]


def test_analyze_empty_plan_is_exact(model: nn.Module, tokenizer: Any) -> None:
    lm = LoadedModel(model, tokenizer, Adapter(model), {})
    res = analyze(lm, DropPlan(), PROMPTS,
                  AnalysisSettings(max_new_tokens=4, temperatures=(1.0, 0.5), chat_template=False),
                  progress=False)
    lw = res["layerwise"]
    assert len(lw["cos_h"]) == N_LAYERS + 1
    assert all(c == 1.0 for c in lw["cos_h"]), lw["cos_h"]
    for key in ("kl@1", "kl@0.5"):
        assert all(v == 0.0 for v in lw["lens_" + key]), lw["lens_" + key]
    for mode in ("teacher_forced", "free_running"):
        st = res["stepwise"][mode]
        assert st["n"][0] == len(PROMPTS)
        cos = _valid(st["cos_h"], st["n"])
        assert cos and all(c == 1.0 for c in cos), (mode, st["cos_h"])
        for key in ("kl@1", "kl@0.5"):
            kl = _valid(st[key], st["n"])
            assert kl and all(v == 0.0 for v in kl), (mode, key, st[key])
    assert all(p["first_divergence"] is None for p in res["per_prompt"])
    assert all(p["dense_text"] == p["pruned_text"] for p in res["per_prompt"])


def test_analyze_nonempty_plan_shows_divergence(model: nn.Module, tokenizer: Any) -> None:
    lm = LoadedModel(model, tokenizer, Adapter(model), {})
    res = analyze(lm, PLAN_B, PROMPTS,
                  AnalysisSettings(max_new_tokens=4, temperatures=(1.0, 0.5), chat_template=False),
                  progress=False)
    lw = res["layerwise"]
    # before block 0 nothing differs; attention of layer 0 is dropped, so resid.1 on differs
    assert lw["cos_h"][0] == 1.0
    assert all(c < 1.0 for c in lw["cos_h"][1:])
    tf = res["stepwise"]["teacher_forced"]
    kls = _valid(tf["kl@1"], tf["n"])
    assert kls and any(v > 0 for v in kls)
    assert res["pruning"]["block"] == [1]


def test_analyze_spans_several_batches(model: nn.Module, tokenizer: Any) -> None:
    """More prompts than one batch (the main job once crashed on the second batch): every prompt is
    analysed, and per-prompt texts and step counts match a run with all prompts in one batch."""
    lm = LoadedModel(model, tokenizer, Adapter(model), {})
    prompts = PROMPTS * 3  # 9 prompts, batches of 2 → 5 batches, the last one short
    kw = dict(max_new_tokens=4, chat_template=False)
    small = analyze(lm, PLAN_B, prompts, AnalysisSettings(batch_size=2, **kw), progress=False)
    whole = analyze(lm, PLAN_B, prompts, AnalysisSettings(batch_size=16, **kw), progress=False)
    assert small["settings"]["n_prompts"] == len(prompts) == len(small["per_prompt"])
    assert [p["prompt"] for p in small["per_prompt"]] == prompts
    for a, b in zip(small["per_prompt"], whole["per_prompt"], strict=True):
        assert a["dense_text"] == b["dense_text"]
        assert a["valid_steps_free_running"] == b["valid_steps_free_running"]
    for mode in ("teacher_forced", "free_running"):
        assert small["stepwise"][mode]["n"] == whole["stepwise"][mode]["n"]
        np.testing.assert_allclose(
            np.array(small["stepwise"][mode]["kl@1"], dtype=float),
            np.array(whole["stepwise"][mode]["kl@1"], dtype=float), rtol=1e-3, atol=1e-5)
