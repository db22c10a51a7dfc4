"""Compressed models made by other tools, loaded as candidates of their base and traced end to end,
offline: llm-compressor's GPTQ W4A16 (compressed-tensors), GGUF files re-quantised by gguf-py,
decoder layers deleted by a plain transformers script, and prunelens's own saved checkpoint.

The llm-compressor fixture (tests/fixtures/llmcompressor_gptq_w4a16_tiny) was made by
benchmarks/clients/make_llmcompressor_gptq.py (llm-compressor 0.14.0.1, compressed-tensors 0.19.0)
with ``--random-tokens --samples 16 --seq-len 64`` from ``save_tiny``'s model, which is
deterministic and is regenerated here; the unquantised tensors of the fixture prove it is that model.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from prunelens.analyses.trace import TraceSettings, analyze
from prunelens.analyses.trace.core import compare_models
from prunelens.cli import main
from prunelens.model.loading import DEFAULT_MODEL, PRESETS, cache_dir, file_sha256, preset_gguf
from prunelens.prune.candidate import load_candidate
from prunelens.prune.checkpoint import load_model
from prunelens.prune.recipe import Calibration, Recipe, build
from prunelens.testing import (
    delete_decoder_layers,
    requantize_gguf,
    save_tiny,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llmcompressor_gptq_w4a16_tiny"
PROMPTS = ["w5 w6 w7 w8", "w9 w10 w11", "w12 w13 w14 w15 w16"]
SETTINGS = TraceSettings(max_new_tokens=6, batch_size=3, temperatures=(1.0,))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("base") / "m")


def _prompt_file(tmp: Path) -> Path:
    f = tmp / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _finite_positive(xs: list[float]) -> bool:
    return bool(xs) and all(math.isfinite(x) and x > 0 for x in xs)


# --- llm-compressor GPTQ W4A16 (compressed-tensors) --------------------------------------------


def test_llmcompressor_fixture_is_small_and_from_the_tiny_base(base_dir: Path) -> None:
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 1_000_000
    q = json.loads((FIXTURE / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    with safe_open(FIXTURE / "model.safetensors", "pt") as fx, safe_open(base_dir / "model.safetensors", "pt") as b:
        plain = [k for k in fx.keys() if not k.rsplit(".", 1)[-1].startswith("weight_")]
        assert "model.embed_tokens.weight" in plain and "lm_head.weight" in plain
        for k in plain:  # GPTQ touched only the Linear layers: the rest is the base, bit for bit
            assert torch.equal(fx.get_tensor(k), b.get_tensor(k)), k


def test_llmcompressor_gptq_dequantises_to_its_int4_grid(base_dir: Path) -> None:
    """The candidate's weights are compressed-tensors' own unpacked int4 values times the group
    scales, and, by the definition of symmetric group-wise int4, each is scale × an integer in [-8, 7]."""
    q = json.loads((FIXTURE / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    group, bits = q["weights"]["group_size"], q["weights"]["num_bits"]
    base = load_model(str(base_dir))
    cand = load_candidate(str(FIXTURE), base)
    assert cand.lm.info["quantization"] == "compressed-tensors" and cand.layer_map.source == "identity"
    weights = dict(cand.lm.model.named_parameters())
    dense = dict(base.model.named_parameters())
    n = 0
    with safe_open(FIXTURE / "model.safetensors", "pt") as fx:
        for key in [k for k in fx.keys() if k.endswith(".weight_packed")]:
            name = key.removesuffix("_packed")
            shape = torch.Size(fx.get_tensor(name + "_shape").tolist())
            ints = unpack_from_int32(fx.get_tensor(key), bits, shape)
            scale = fx.get_tensor(name + "_scale").repeat_interleave(group, dim=1)
            w = weights[name]
            assert int(ints.min()) >= -8 and int(ints.max()) <= 7
            assert torch.equal(w, ints.float() * scale), name
            r = w / scale  # the definition, without the unpacker
            assert torch.allclose(r, r.round(), rtol=0, atol=1e-5)
            assert int(r.round().min()) >= -8 and int(r.round().max()) <= 7
            err = float((w - dense[name]).norm() / dense[name].norm())
            assert 0 < err < 0.25, (name, err)  # quantised, and still the base's weights
            n += 1
    assert n == 7 * base.adapter.n_layers


def test_llmcompressor_gptq_traced_through_the_cli(base_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["analyze", "--model", str(base_dir), "--candidate", str(FIXTURE),
               "--prompts", str(_prompt_file(tmp_path)), "--steps", "4", "--no-chat-template",
               "--out", str(out), "--quiet"])
    assert rc == 0
    assert "candidate: llmcompressor_gptq_w4a16_tiny" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["pruning"]["kind"] == "candidate"
    assert res["pruning"]["model"]["quantization"] == "compressed-tensors"
    for mode in ("teacher_forced", "free_running"):
        assert _finite_positive(res["stepwise"][mode]["kl@1"])


# --- decoder layers deleted by a plain transformers script -------------------------------------


def _deleted_tiny(out: Path, layers: list[int]) -> Path:
    delete_decoder_layers(tiny_model("llama"), layers).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def test_deleted_layers_inferred_or_from_a_file(base_dir: Path, tmp_path: Path) -> None:
    """ShortGPT-style deletion (no prunelens metadata): the map is inferred from hidden states, a
    --layer-map file overrides it, and the candidate computes exactly prunelens's own block drop."""
    out = _deleted_tiny(tmp_path / "minus2", [1, 2])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    base = load_model(str(base_dir))
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cand = load_candidate(str(out), base, calibration=ids)
    assert (cand.layer_map.source, cand.layer_map.dropped, cand.layer_map.kept) == ("inferred", [1, 2], (0, 3))
    mapfile = tmp_path / "map.json"
    mapfile.write_text(json.dumps([0, 2]))  # a deliberately different map: the file wins
    assert load_candidate(str(out), base, layer_map=mapfile).layer_map.kept == (0, 2)
    run = tmp_path / "run"
    assert main(["analyze", "--model", str(base_dir), "--candidate", str(out), "--layer-map", str(mapfile),
                 "--prompts", str(_prompt_file(tmp_path)), "--steps", "2", "--no-chat-template", "--quiet",
                 "--out", str(run)]) == 0
    lmap = json.loads((run / "results.json").read_text())["pruning"]["layer_map"]
    assert (lmap["source"], lmap["kept_layers"], lmap["dropped_layers"]) == ("file", [0, 2], [1, 3])
    got = compare_models(base, cand, PROMPTS, SETTINGS, progress=False)
    want = analyze(base, build(base, Recipe.parse("block@1,2"), progress=False), PROMPTS, SETTINGS, progress=False)
    for mode in ("teacher_forced", "free_running"):
        for key in ("kl@1", "cos_z", "cos_h"):
            assert got["stepwise"][mode][key] == pytest.approx(want["stepwise"][mode][key], abs=1e-6, nan_ok=True)
    assert got["layerwise"]["cos_h"] == pytest.approx(want["layerwise"]["cos_h"], abs=1e-6)


# --- GGUF re-quantised by gguf-py --------------------------------------------------------------


def _tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A GGUF file with metadata of every kind, a norm vector, a Q4_1 matrix and a matrix whose rows do
    not split into 32-blocks; returns its tensors, dequantised."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_float32("llama.rope.freq_base", 1e4)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    w.add_token_list(["<s>", "a", "b"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 1])
    tensors = {"blk.0.attn_norm.weight": rng.normal(size=64).astype(np.float32),
               "blk.0.odd.weight": rng.normal(size=(4, 48)).astype(np.float32)}
    q41 = gguf.quants.quantize(rng.normal(size=(8, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    tensors["blk.0.attn_q.weight"] = gguf.quants.dequantize(q41, gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.attn_norm.weight", tensors["blk.0.attn_norm.weight"])
    w.add_tensor("blk.0.attn_q.weight", q41, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.odd.weight", tensors["blk.0.odd.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_requantize_gguf_follows_each_format(tmp_path: Path, qtype: str) -> None:
    src = tmp_path / "src.gguf"
    x = _tiny_gguf(src)
    r0, r = gguf.GGUFReader(src), gguf.GGUFReader(requantize_gguf(src, tmp_path / "out.gguf", qtype))
    keys = [k for k in r0.fields if not k.startswith("GGUF.")]
    assert [k for k in r.fields if not k.startswith("GGUF.")] == keys
    for k in keys:
        want = int(gguf.LlamaFileType[{"F32": "ALL_F32"}.get(qtype, f"MOSTLY_{qtype}")]) \
            if k == "general.file_type" else r0.fields[k].contents()
        assert r.fields[k].contents() == want, k
    got = {t.name: t for t in r.tensors}
    assert got["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # vectors stay F32
    odd = got["blk.0.odd.weight"].tensor_type  # rows of 48 are not whole 32-blocks: kept F32 then
    assert odd == (gguf.GGMLQuantizationType[qtype] if qtype in ("F32", "F16") else gguf.GGMLQuantizationType.F32)
    t = got["blk.0.attn_q.weight"]
    assert t.tensor_type.name == qtype and list(t.shape) == [64, 8]
    y, xs = gguf.quants.dequantize(t.data, t.tensor_type), x["blk.0.attn_q.weight"]
    if qtype in ("F32", "F16"):
        assert np.array_equal(y, xs.astype(np.float16 if qtype == "F16" else np.float32).astype(np.float32))
        return
    # Q8_0: each block of 32 is d·q, q in [-127, 127], d = amax/127; Q4_0: d·q, q in [-8, 7], the
    # largest-magnitude value at ±8·d (stored as -8)
    qmax = 127 if qtype == "Q8_0" else 8
    yb, xb = y.reshape(-1, 32).astype(np.float64), xs.reshape(-1, 32).astype(np.float64)
    d = np.abs(yb).max(axis=1, keepdims=True) / qmax
    ints = yb / d
    assert np.allclose(ints, np.round(ints), atol=1e-4) and np.abs(np.round(ints)).max() <= qmax
    assert np.all(np.abs(yb - xb) <= (0.6 if qtype == "Q8_0" else 1.01) * d + 1e-6)
    assert not np.array_equal(yb, xb)


@functools.cache
def _requantised(qtype: str) -> Path:
    """The bundled model's GGUF re-quantised to ``qtype``, kept in the prunelens cache (as its
    dequantised safetensors copy is): made once, in about 8 s."""
    src = preset_gguf(PRESETS[DEFAULT_MODEL])
    out = cache_dir() / "clients" / f"{src.stem}-{file_sha256(src)[:12]}-{qtype}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        requantize_gguf(src, out, qtype)
    return out


_KL: dict[str, float] = {}


def _gguf_trace(qtype: str, out: Path) -> dict:
    rc = main(["analyze", "--candidate", str(_requantised(qtype)), "--limit", "2", "--steps", "4",
               "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    _KL[qtype] = res["summary"]["teacher_forced_mean"]["kl@1"]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_requantised_gguf_of_the_default_model(real_lm, qtype: str, tmp_path: Path) -> None:
    """transformers' GGUF loader reads gguf-py's Q8_0/Q4_0 (dequantised), as a candidate of the base."""
    path = _requantised(qtype)
    cand = load_candidate(str(path), real_lm)
    assert cand.lm.info["gguf"] == path.name and cand.layer_map.source == "identity"
    res = _gguf_trace(qtype, tmp_path / "run")
    assert res["pruning"]["kind"] == "candidate" and len(res["per_prompt"]) == 2
    for mode in ("teacher_forced", "free_running"):
        assert _finite_positive(res["stepwise"][mode]["kl@1"])


@pytest.mark.slow
def test_q8_0_is_closer_to_the_base_than_q4_0(real_lm, tmp_path: Path) -> None:
    for q in ("Q8_0", "Q4_0"):
        if q not in _KL:  # run alone: trace it here (the conversions are cached after a first run)
            _gguf_trace(q, tmp_path / q)
    assert 0 < _KL["Q8_0"] < _KL["Q4_0"]


# --- bitsandbytes 4-bit (optional: its CPU backend loads here, bitsandbytes 0.50.2) ------------


def _bnb_4bit(src: str | Path, out: Path) -> Path:
    """``src`` quantised by bitsandbytes on loading (NF4, float32 compute) and saved as a 4-bit checkpoint."""
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32).save_pretrained(out)
    return out


def _check_bnb(base, cand) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    assert cand.lm.info["quantization"] == "bitsandbytes"
    dense = dict(base.model.named_parameters())
    n = 0
    for name, mod in cand.lm.model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):  # the base's weight rounded by bitsandbytes itself, bit for bit
            st, ref = mod.weight.quant_state, dense[name + ".weight"].detach()
            w = bnb.functional.dequantize_4bit(mod.weight.data, st)
            own = bnb.functional.quantize_4bit(ref, blocksize=st.blocksize, quant_type=st.quant_type,
                                               compress_statistics=False)  # as transformers quantised it
            assert torch.equal(w, bnb.functional.dequantize_4bit(*own)) and not torch.equal(w, ref), name
            n += 1
    assert n == 7 * base.adapter.n_layers


def _wide_tiny(path: Path) -> Path:
    """The tiny llama at 64 wide: bitsandbytes' CPU 4-bit matmul (0.50) needs every input width to
    hold a whole quantisation block of 64 (real models' widths always do; the tiny's 32 does not)."""
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 64, 128, 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_bitsandbytes_4bit_candidate(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (pip install bitsandbytes)")
    base_dir = _wide_tiny(tmp_path / "base")
    out = _bnb_4bit(base_dir, tmp_path / "nf4")
    tiny_tokenizer().save_pretrained(out)
    base = load_model(str(base_dir))
    cand = load_candidate(str(out), base)
    _check_bnb(base, cand)
    res = compare_models(base, cand, PROMPTS, SETTINGS, progress=False)
    assert _finite_positive(res["stepwise"]["teacher_forced"]["kl@1"])


@pytest.mark.slow
def test_bitsandbytes_4bit_of_the_default_model(real_lm, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (pip install bitsandbytes)")
    out = _bnb_4bit(real_lm.info["source"], tmp_path / "nf4")
    real_lm.tokenizer.save_pretrained(out)
    cand = load_candidate(str(out), real_lm)
    _check_bnb(real_lm, cand)
    assert main(["analyze", "--candidate", str(out), "--limit", "2", "--steps", "4", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert _finite_positive(res["stepwise"]["teacher_forced"]["kl@1"])


# --- the real model: deleted layers, and prunelens's own checkpoint ----------------------------


@pytest.mark.slow
def test_three_deleted_layers_of_the_default_model(real_lm, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(real_lm.info["source"], dtype=torch.float32)
    out = tmp_path / "minus3"
    delete_decoder_layers(model, [20, 21, 22]).save_pretrained(out)
    real_lm.tokenizer.save_pretrained(out)
    del model
    ids, _ = Calibration().ids(real_lm, (8, 128))  # what analyze --candidate infers the map from
    cand = load_candidate(str(out), real_lm, calibration=ids)
    assert (cand.layer_map.source, cand.layer_map.dropped) == ("inferred", [20, 21, 22])
    mapfile = tmp_path / "map.json"
    mapfile.write_text(json.dumps([i for i in range(30) if i not in (19, 20, 21)]))
    via_file = load_candidate(str(out), real_lm, layer_map=mapfile)
    assert (via_file.layer_map.source, via_file.layer_map.dropped) == ("file", [19, 20, 21])


@pytest.mark.slow
def test_wanda_saved_then_compared_equals_analyze_on_the_default_model(real_lm, tmp_path: Path) -> None:
    """The consistency check on the real model: ``prune`` saves wanda:0.5, ``analyze --candidate`` of
    the saved model gives the numbers ``analyze --recipe wanda:0.5`` gives (same prompts, steps,
    calibration)."""
    common = ["--limit", "2", "--steps", "4", "--quiet"]
    cal = ["--calib-samples", "4", "--calib-len", "64"]
    saved = tmp_path / "wanda"
    assert main(["prune", "--recipe", "wanda:0.5", *cal, "--out", str(saved)]) == 0
    assert main(["analyze", "--candidate", str(saved), *common, "--out", str(tmp_path / "cand")]) == 0
    assert main(["analyze", "--recipe", "wanda:0.5", *cal, *common, "--out", str(tmp_path / "recipe")]) == 0
    got, want = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cand", "recipe"))
    assert got["pruning"]["layer_map"]["source"] == "identity"
    # float32 logits of two separately computed forwards: equal to float32 rounding (relative 1e-5)
    for mode in ("teacher_forced", "free_running"):
        for key in ("kl@1", "rkl@1", "cos_z", "cos_h", "top1_agree"):
            assert got["stepwise"][mode][key] == pytest.approx(want["stepwise"][mode][key], rel=1e-5, abs=1e-6,
                                                               nan_ok=True)
    assert got["layerwise"]["cos_h"] == pytest.approx(want["layerwise"]["cos_h"], rel=1e-5, abs=1e-6)
    assert [p["pruned_text"] for p in got["per_prompt"]] == [p["pruned_text"] for p in want["per_prompt"]]
    assert got["stepwise"]["teacher_forced"]["kl@1"][0] > 0
