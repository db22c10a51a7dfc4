"""`prune --format nemotron-nas`: the config engines read (block_configs, no-op sublayers without any
tensor, MLP widths from ffn_mult) and prunelens reading its own export back with the logits of the
pruned model; tiny llama and qwen2 (biases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from prunelens.cli import main
from prunelens.model.nemotron_nas import ffn_width
from prunelens.prune.base import view_of
from prunelens.prune.checkpoint import load_model
from prunelens.prune.recipe import Calibration, Recipe, build
from prunelens.testing import save_tiny, tiny_config, tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7]])


def _qwen2(path: Path) -> Path:
    cfg = tiny_config("qwen2")
    cfg.use_sliding_window, cfg.layer_types = False, ["full_attention"] * cfg.num_hidden_layers
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    m.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _names(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_no_op_sublayers_have_no_tensors_and_the_export_reloads_with_the_pruned_logits(
        family: str, tmp_path: Path) -> None:
    base = save_tiny(tmp_path / "base") if family == "llama" else _qwen2(tmp_path / "base")
    recipe = "attn@0,2+mlp@1+block@3+rtn:w8"  # drops of every kind, and changed weights
    out = tmp_path / "nas"
    assert main(["prune", "--model", str(base), "--recipe", recipe, "--format", "nemotron-nas", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["num_hidden_layers"] == 3 and cfg["num_key_value_heads"] is None
    blocks = cfg["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [True, False, True]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, True, False]
    assert blocks[1]["attention"]["n_heads_in_group"] == 2 and blocks[0]["attention"]["n_heads_in_group"] is None
    assert ffn_width(cfg["hidden_size"], blocks[0]["ffn"]["ffn_mult"]) == 256  # 64 padded to a multiple of 256
    names = _names(out)
    assert not [n for n in names if n.startswith("model.layers.0.") and ("self_attn" in n or "input_layernorm" in n)]
    assert not [n for n in names if n.startswith("model.layers.1.") and ("mlp" in n or "post_attention" in n)]
    assert "model.layers.1.self_attn.q_proj.weight" in names and "model.layers.3.mlp.up_proj.weight" not in names
    assert ("model.layers.1.self_attn.o_proj.bias" in names) == (family == "qwen2") == cfg["attention_bias"]
    lm = load_model(str(base))
    mod = build(lm, Recipe.parse(recipe), Calibration(), progress=False)
    with view_of(lm.adapter, mod), torch.no_grad():
        want = lm.model(IDS).logits
    back = load_model(str(out))
    assert back.info["format"] == "nemotron-nas" and back.adapter.n_layers == 3
    with torch.no_grad():
        got = back.model(IDS).logits
    assert torch.equal(got, want)  # the same weights and the same skipped sublayers


def test_other_families_and_foreign_nemotron_checkpoints_are_one_line(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    gemma = tmp_path / "gemma"
    AutoModelForCausalLM.from_config(tiny_config("gemma")).save_pretrained(gemma)
    tiny_tokenizer().save_pretrained(gemma)
    capsys.readouterr()
    assert main(["prune", "--model", str(gemma), "--recipe", "attn:1", "--format", "nemotron-nas",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "supports llama, qwen2 models" in err and len(err.splitlines()) == 1
    foreign = tmp_path / "nvidia"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "nemotron-nas", "block_configs": []}))
    assert main(["analyze", "--model", str(foreign), "--drop", "attn:1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "prunelens did not write" in err and len(err.splitlines()) == 1
