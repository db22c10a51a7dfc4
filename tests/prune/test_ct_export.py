"""`prune --format compressed-tensors`: RTN/GPTQ weights packed by compressed-tensors itself, loaded
back through transformers on the CPU to the very weights prunelens computed, laid out as
llm-compressor's own checkpoint (tests/fixtures/llmcompressor_gptq_w4a16_tiny), with the bits per
weight on disk the spec says; what has no compressed-tensors form is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from prunelens.cli import main
from prunelens.prune.base import view_of
from prunelens.prune.checkpoint import load_model
from prunelens.prune.ct_export import save_compressed_tensors, scheme_of
from prunelens.prune.quant import QuantSpec
from prunelens.prune.recipe import Calibration, Recipe, build
from prunelens.testing import save_tiny

LLMC = Path(__file__).parents[1] / "fixtures" / "llmcompressor_gptq_w4a16_tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ct") / "m")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _export(tiny: Path, out: Path, recipe: str) -> None:
    assert main(["prune", "--model", str(tiny), "--recipe", recipe, "--format", "compressed-tensors",
                 "--calib-samples", "4", "--calib-len", "16", "--out", str(out)]) == 0


@pytest.mark.parametrize("recipe", ["rtn:w4g32s", "rtn:w8g16", "gptq:w4g16", "block@1+gptq:w4g32s"])
def test_transformers_loads_the_very_weights_prunelens_computed(tiny: Path, tmp_path: Path, recipe: str) -> None:
    out = tmp_path / "ct"
    _export(tiny, out, recipe)
    lm = load_model(str(tiny))
    mod = build(lm, Recipe.parse(recipe), Calibration(samples=4, seq_len=16), progress=False)
    with view_of(lm.adapter, mod):
        mine = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    drop_1 = recipe.startswith("block@1")
    assert loaded.config.num_hidden_layers == (3 if drop_1 else 4)
    n = 0
    for name, p in loaded.named_parameters():
        src = name
        if drop_1 and name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            src = f"model.layers.{int(i) + (int(i) >= 1)}.{rest}"
        assert torch.equal(p, mine[src]), name
        n += "proj" in name
    assert n == 7 * loaded.config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with view_of(lm.adapter, mod), torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lm.model(ids).logits, atol=1e-5)


def test_the_layout_is_llm_compressor_s_and_the_disk_size_the_spec_s(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "ct"
    _export(tiny, out, "rtn:w4g32s")  # the fixture is llm-compressor's GPTQ W4A16 (group 32, symmetric)
    ours = json.loads((out / "config.json").read_text())["quantization_config"]
    theirs = json.loads((LLMC / "config.json").read_text())["quantization_config"]
    for key in ("format", "quant_method", "quantization_status", "ignore"):
        assert ours[key] == theirs[key], key
    w_ours, w_theirs = ours["config_groups"]["group_0"], theirs["config_groups"]["group_0"]
    assert w_ours["targets"] == w_theirs["targets"] and w_ours["format"] == w_theirs["format"]
    for key in ("num_bits", "group_size", "strategy", "symmetric", "type"):
        assert w_ours["weights"][key] == w_theirs["weights"][key], key
    mine, llmc = _tensors(out), _tensors(LLMC)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in mine.items() if "layers.0." in k and "weight_scale" not in k} == \
        {k: (v.dtype, tuple(v.shape)) for k, v in llmc.items() if "layers.0." in k and "weight_scale" not in k}
    assert mine["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32  # exact grid (docstring)
    # bits per weight on disk: packed codes + fp32 scales per group of 32, over the linear weights
    packed = sum(v.numel() * v.element_size() for k, v in mine.items() if k.endswith(("weight_packed", "weight_scale")))
    weights = sum(v.numel() for k, v in _tensors(tiny).items() if "proj" in k)
    assert 8 * packed / weights == pytest.approx(4 + 32 / 32) == QuantSpec(4, 32, True).bits_per_weight(32, 32)
    info = json.loads((out / "prunelens-export.json").read_text())
    assert info["bits_per_weight_on_disk"] == pytest.approx(8 * packed / weights)


def test_asymmetric_zero_points_are_packed_and_decompress_exactly(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "ct"
    _export(tiny, out, "rtn:w4g16")
    t = _tensors(out)
    lm = load_model(str(tiny))
    mod = build(lm, Recipe.parse("rtn:w4g16"), Calibration(), progress=False)
    with view_of(lm.adapter, mod):
        want = lm.model.model.layers[2].mlp.down_proj.weight.detach().clone()
    p = "model.layers.2.mlp.down_proj."
    state = {k[len(p):]: v for k, v in t.items() if k.startswith(p)}
    assert set(state) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
    got = PackedQuantizationCompressor.decompress(state, scheme_of(QuantSpec(4, 16, False)))["weight"]
    assert torch.equal(got.float(), want)


@pytest.mark.parametrize(("recipe", "message"), [
    ("attn:1+rtn:w4g32", "dropped attention or MLP has no form"),
    ("awq:w4g32", "AWQ keeps its channel scales"),
    ("wanda:0.5", "no longer has sparse layouts"),
])
def test_what_has_no_compressed_tensors_form_is_one_line(tiny: Path, tmp_path: Path, recipe: str, message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny), "--recipe", recipe, "--format", "compressed-tensors",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_bundled_model_packs_and_loads_back_exactly(real_lm, tmp_path: Path) -> None:
    """SmolLM2's widths (576, 1536) take groups of 64; GPTQ as `prune` runs it (default calibration)."""
    out = tmp_path / "ct"
    assert main(["prune", "--recipe", "gptq:w4g64", "--format", "compressed-tensors", "--out", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    mod = build(real_lm, Recipe.parse("gptq:w4g64"), Calibration(), progress=False)
    with view_of(real_lm.adapter, mod):
        for name, p in real_lm.model.named_parameters():
            if "proj" in name:
                assert torch.equal(loaded.get_parameter(name), p), name
    info = json.loads((out / "prunelens-export.json").read_text())
    assert info["layers_packed"] == 7 * real_lm.adapter.n_layers
    assert info["bits_per_weight_on_disk"] == pytest.approx(4 + (32 + 0) / 64 + 4 / 64)  # fp32 scale, packed zp


def test_a_bfloat16_model_packs_to_its_own_weights(tiny: Path, tmp_path: Path) -> None:
    """Weights held in bf16 (as on a GPU): the grid is checked at the model's dtype and written in fp32."""
    lm = load_model(str(tiny), dtype="bfloat16")
    mod = build(lm, Recipe.parse("gptq:w4g16"), Calibration(samples=4, seq_len=16), progress=False)
    save_compressed_tensors(lm, mod, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    with view_of(lm.adapter, mod):
        for name, p in lm.model.named_parameters():
            if "proj" in name:
                assert torch.equal(loaded.get_parameter(name), p), name
