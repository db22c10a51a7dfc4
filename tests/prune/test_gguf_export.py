"""`prune --format gguf`: files read back with gguf-py hold the architecture, per-layer arrays and
tensors the plan says, with the model's own weights; block drops load in transformers' GGUF loader
with the logits of prunelens's pruned view; bad input is one line.

Tiny random models (llama, and qwen2 without its sliding window, which llama.cpp's qwen2 lacks);
the bundled model's export and llama.cpp's own numbers are in the slow test and
benchmarks/llamacpp_deploy_bench.py.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelens.cli import main
from prunelens.model.loading import LoadedModel
from prunelens.prune.base import view_of
from prunelens.prune.checkpoint import load_model
from prunelens.prune.drop import DropPlan
from prunelens.prune.gguf_export import ZERO_FFN, interleave_rope_rows, save_gguf, vocab_source
from prunelens.testing import tiny_config, tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 7, 12, 3, 44, 90]])


def _vocab_gguf(path: Path) -> Path:
    """A GGUF holding only the tiny tokenizer, as llama.cpp's converter writes a vocabulary."""
    tok = tiny_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny(model_type: str, tmp: Path) -> LoadedModel:
    if model_type == "qwen2":  # Qwen2.5 as released: no sliding window, q/k/v biases
        cfg = tiny_config("qwen2")
        cfg.use_sliding_window, cfg.layer_types = False, ["full_attention"] * cfg.num_hidden_layers
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.3)
    else:
        m = tiny_model(model_type)
    d = tmp / model_type
    m.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return load_model(str(d))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _vocab_gguf(tmp_path_factory.mktemp("vocab") / "tiny-vocab.gguf")


def _read(path: Path) -> tuple[gguf.GGUFReader, dict[str, gguf.ReaderTensor]]:
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def _same_logits(lm: LoadedModel, plan: DropPlan, path: Path, ids: torch.Tensor, tol: float) -> None:
    """transformers' GGUF loader reads the file back with the logits of prunelens's pruned view."""
    with view_of(lm.adapter, plan), torch.no_grad():
        want = lm.model(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, want, atol=tol, rtol=tol), float((got - want).abs().max())


def _field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_block_drop_is_the_own_architecture_and_loads_in_transformers_with_the_pruned_logits(
        model_type: str, vocab: Path, tmp_path: Path) -> None:
    lm = _tiny(model_type, tmp_path)
    plan = DropPlan(block=(1, 2))
    out = save_gguf(lm, plan, tmp_path / "m.gguf", "f32", vocab)
    r, tensors = _read(out)
    assert _field(r, "general.architecture") == model_type and _field(r, f"{model_type}.block_count") == 2
    assert _field(r, "tokenizer.chat_template").startswith("{% for m in messages")
    assert {n.split(".")[1] for n in tensors if n.startswith("blk.")} == {"0", "1"}
    # the written layer 1 is the model's layer 3
    down = tensors["blk.1.ffn_down.weight"]
    assert np.array_equal(np.asarray(down.data), lm.model.model.layers[3].mlp.down_proj.weight.numpy())
    _same_logits(lm, plan, tmp_path / "m.gguf", IDS, 1e-4)


def test_sublayer_drops_are_deci_with_absent_attention_and_a_zero_mlp(vocab: Path, tmp_path: Path) -> None:
    lm = _tiny("qwen2", tmp_path)
    cfg = lm.adapter.config
    plan = DropPlan(attn=(0, 2), mlp=(1,), block=(3,))
    out = save_gguf(lm, plan, tmp_path / "d.gguf", "f32", vocab)
    r, tensors = _read(out)
    assert _field(r, "general.architecture") == "deci" and _field(r, "deci.block_count") == 3
    h, kv, ff = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    # layer 0's dropped attention is "linear attention" with zero weights (llama.cpp reads the head size
    # from layer 0); layer 2's has no heads and no tensors; no KV cache for either
    assert list(_field(r, "deci.attention.head_count")) == [h, h, 0]
    assert list(_field(r, "deci.attention.head_count_kv")) == [0, kv, 0]
    assert list(_field(r, "deci.feed_forward_length")) == [ff, ZERO_FFN, ff]
    blk = lambda k: sorted(n.split(".", 2)[2] for n in tensors if n.startswith(f"blk.{k}."))  # noqa: E731
    assert blk(0) == ["attn_norm.weight", "attn_output.weight", "ffn_down.weight", "ffn_gate.weight",
                      "ffn_norm.weight", "ffn_up.weight"]
    assert blk(2) == ["ffn_down.weight", "ffn_gate.weight", "ffn_norm.weight", "ffn_up.weight"]
    assert "attn_q.bias" in blk(1) and not np.any(tensors["blk.0.attn_output.weight"].data)
    zero_mlp = [np.asarray(tensors[f"blk.1.ffn_{n}.weight"].data) for n in ("norm", "gate", "down")]
    assert zero_mlp[1].shape == (ZERO_FFN, cfg.hidden_size) and not any(np.any(z) for z in zero_mlp)
    # weights are the model's, Q/K rows in llama.cpp's interleaved RoPE order (deci uses it)
    q = lm.model.model.layers[1].self_attn.q_proj
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight"].data), interleave_rope_rows(q.weight.numpy(), h))
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.bias"].data), interleave_rope_rows(q.bias.numpy(), h))
    up = lm.model.model.layers[2].mlp.up_proj.weight.numpy()
    assert np.array_equal(np.asarray(tensors["blk.2.ffn_up.weight"].data), up)


def test_interleaving_rope_rows_is_llama_cpp_s_rotation() -> None:
    """transformers rotates (x_j, x_{j+d/2}); llama.cpp's normal RoPE rotates (x_{2j}, x_{2j+1}): the
    same rotation once rows are interleaved, so q·k is unchanged."""
    d, pos = 8, 5
    q, k = torch.randn(d), torch.randn(d)
    theta = 10000.0 ** (-torch.arange(0, d, 2) / d) * pos
    cos, sin = torch.cos(theta), torch.sin(theta)

    def half_split(x):
        a, b = x[: d // 2], x[d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin])

    def interleaved(x):
        a, b = x[0::2], x[1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], 1).flatten()

    qi, ki = (torch.from_numpy(interleave_rope_rows(x.numpy(), 1)) for x in (q, k))
    assert torch.allclose(half_split(q) @ half_split(k), interleaved(qi) @ interleaved(ki), atol=1e-5)


@pytest.mark.parametrize(("kind", "weights", "embed"), [("q8_0", "Q8_0", "Q8_0"), ("q4_0", "Q4_0", "Q8_0"),
                                                         ("f16", "F16", "F16")])
def test_tensor_types_go_through_gguf_py_s_quantisers(kind: str, weights: str, embed: str, vocab: Path,
                                                      tmp_path: Path) -> None:
    lm = _tiny("llama", tmp_path)
    r, tensors = _read(save_gguf(lm, DropPlan(attn=(2,)), tmp_path / "q.gguf", kind, vocab))
    t = tensors["blk.1.ffn_up.weight"]
    assert t.tensor_type.name == weights and tensors["token_embd.weight"].tensor_type.name == embed
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    w = lm.model.model.layers[1].mlp.up_proj.weight.numpy()
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert np.array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(w, t.tensor_type), t.tensor_type))
    assert 0 < np.abs(got - w).max() < 0.1 * np.abs(w).max()


def test_bad_input_is_one_line(vocab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lm_dir = tmp_path / "llama"
    _tiny("llama", tmp_path)
    base = ["prune", "--model", str(lm_dir), "--recipe", "attn:1", "--format", "gguf", "--gguf-vocab", str(vocab)]
    (tmp_path / "exists.gguf").write_bytes(b"x")
    gemma = tmp_path / "gemma"
    tiny_model("gemma").save_pretrained(gemma)
    tiny_tokenizer().save_pretrained(gemma)
    cases = [
        (["--out", str(tmp_path / "exists.gguf")], "already exists"),
        (["--out", str(tmp_path / "dir")], "must end in .gguf"),
        (["--out", str(tmp_path / "a.gguf"), "--gguf-type", "q4_k"], "offered are f32, f16, q8_0, q4_0"),
        (["--out", str(tmp_path / "b.gguf"), "--model", str(gemma)], "supports the model types llama, qwen2"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["prune", "--model", str(lm_dir), "--recipe", "attn:1", "--format", "gguf",
                 "--out", str(tmp_path / "c.gguf")]) == 2
    assert "--gguf-vocab" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "c.gguf").exists()


@pytest.mark.slow
def test_the_bundled_model_exports_with_its_tokenizer_and_loads_with_the_pruned_logits(real_lm: LoadedModel,
                                                                                       tmp_path: Path) -> None:
    plan = DropPlan(block=(20, 22, 25))
    out = tmp_path / "m.gguf"
    assert main(["prune", "--recipe", "block@20,22,25", "--format", "gguf", "--gguf-type", "f32",
                 "--out", str(out)]) == 0
    r, tensors = _read(out)
    src = gguf.GGUFReader(vocab_source(real_lm, None))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "tokenizer.ggml.pre"):
        assert r.fields[key].contents() == src.fields[key].contents(), key
    assert _field(r, "llama.block_count") == real_lm.adapter.n_layers - 3
    ids = real_lm.tokenizer("The capital of France is Paris; of Italy,", return_tensors="pt").input_ids
    _same_logits(real_lm, plan, out, ids, 1e-3)
    # attention drops of the same model: deci, no attention tensors in the dropped layers
    assert main(["prune", "--recipe", "attn@0,9", "--format", "gguf", "--gguf-type", "q8_0",
                 "--out", str(tmp_path / "a.gguf")]) == 0
    r, tensors = _read(tmp_path / "a.gguf")
    heads = list(_field(r, "deci.attention.head_count_kv"))
    assert heads[0] == heads[9] == 0 and set(heads[1:9]) == {real_lm.adapter.config.num_key_value_heads}
    assert not [n for n in tensors if n.startswith("blk.9.attn")]


def test_a_bfloat16_model_exports_its_weights(vocab: Path, tmp_path: Path) -> None:
    _tiny("llama", tmp_path)
    lm = load_model(str(tmp_path / "llama"), dtype="bfloat16")
    _, tensors = _read(save_gguf(lm, DropPlan(attn=(1,)), tmp_path / "b.gguf", "f32", vocab))
    q = lm.model.model.layers[2].self_attn.q_proj.weight.float().numpy()
    assert np.array_equal(np.asarray(tensors["blk.2.attn_q.weight"].data), interleave_rope_rows(q, 4))
