"""Tiny random-weight models of every supported architecture with a WordLevel tokenizer (no
downloads), where the shared evaluation data lies, and compressed models as other tools make them
(a GGUF re-quantised by gguf-py, decoder layers deleted by plain transformers code). Tests, the GPU
check and benchmarks share these, so they live in the package rather than in a ``conftest``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunelens.model.arch import ARCHS, Adapter
from prunelens.model.loading import LoadedModel

VOCAB, N_LAYERS = 128, 4
PAD, BOS, EOS = 0, 1, 2
ARCH_NAMES = sorted(ARCHS)
SLIDING = 4  # shorter than the test sequences, so sliding-window layers really differ from full ones

# per-architecture config overrides on top of the common tiny shape
ARCH_KW: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": SLIDING},
    "qwen2": {"use_sliding_window": True, "sliding_window": SLIDING,
              "layer_types": ["full_attention", "sliding_attention"] * 2},
    "qwen3": {"use_sliding_window": True, "sliding_window": SLIDING,
              "layer_types": ["sliding_attention", "full_attention"] * 2},
    "gemma": {},
    "gemma2": {"sliding_window": SLIDING, "query_pre_attn_scalar": 8,
               "layer_types": ["sliding_attention", "full_attention"] * 2},
    "gemma3_text": {"sliding_window": SLIDING, "query_pre_attn_scalar": 8,
                    "layer_types": ["sliding_attention", "full_attention"] * 2},
    "phi3": {"sliding_window": None},
}


def shared_data_dir() -> Path:
    """The real evaluation sets in ``shared/data`` beside the checkout (read there, never copied into
    the repository); ``PRUNELENS_SHARED_DATA`` overrides."""
    env = os.environ.get("PRUNELENS_SHARED_DATA")
    if env:
        return Path(env)
    for start in (Path(__file__).resolve(), Path.cwd().resolve() / "x"):
        for parent in start.parents:
            if (parent / "shared" / "data").is_dir():
                return parent / "shared" / "data"
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def tiny_config(model_type: str) -> Any:
    cfg = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        **ARCH_KW[model_type])
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager")
    # Default init (std 0.02) gives near-uniform logits; larger random weights (norms included)
    # make every sublayer matter, so a wrong skip cannot hide below the tolerances.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return model.eval().requires_grad_(False)


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over ``w3`` … ``w127`` with pad/bos/eos, matching the tiny models."""
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>")


def tiny_lm(model_type: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny model of one architecture with the tiny tokenizer, ready for any analysis."""
    m = tiny_model(model_type, seed)
    return LoadedModel(m, tiny_tokenizer(), Adapter(m), {"name": f"tiny-{model_type}"})


def save_tiny(path: Any, model_type: str = "llama", nan: bool = False) -> Any:
    """A tiny model and its tokenizer saved as a Hugging Face directory (safetensors), so the CLI
    can run on it in seconds; ``nan`` plants one NaN weight."""
    m = tiny_model(model_type)
    if nan:
        with torch.no_grad():
            next(p for n, p in m.named_parameters() if "mlp" in n).view(-1)[0] = float("nan")
    m.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


# --- compressed models as other tools make them (tests and benchmarks/clients/ share these) ---------

GGUF_QTYPES = {"F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
               "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
               "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
               "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}


def _target_type(t: Any, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """llama.cpp's rule: vectors (norms, biases) stay F32; a matrix whose rows do not split into whole
    blocks stays F32 too."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if len(t.shape) < 2 or int(t.shape[0]) % block:
        return gguf.GGMLQuantizationType.F32
    return qtype


def requantize_gguf(src: str | Path, dst: str | Path, qtype: str) -> Path:
    """Re-quantise every matrix of a GGUF file to ``qtype`` (F32, F16, Q8_0, Q4_0) with gguf-py's own
    quantisers, every metadata key copied (``general.file_type`` set to the new type): what
    ``llama-quantize`` makes, without building llama.cpp, so a candidate of the bundled model can be
    made offline. Each tensor is dequantised from its stored type first, so a re-quantised file
    carries both roundings. Written to a temporary name, then renamed."""
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype {qtype!r} not in {sorted(GGUF_QTYPES)}")
    ggml_type, file_type = GGUF_QTYPES[qtype]
    reader = gguf.GGUFReader(src)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(tmp, str(reader.fields["general.architecture"].contents()))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer writes these itself
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        value = int(file_type) if key == "general.file_type" else f.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        target = _target_type(t, ggml_type)
        data = gguf.quants.quantize(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)), target)
        writer.add_tensor(t.name, data, raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def delete_decoder_layers(model: Any, layers: Iterable[int]) -> Any:
    """ShortGPT-style layer removal as third-party scripts write it, in plain transformers: delete the
    decoder blocks, renumber the remaining attention modules' ``layer_idx`` (their KV-cache slot) and
    lower ``num_hidden_layers``; no record of what was deleted is kept."""
    gone = sorted(set(layers))
    for i in reversed(gone):
        del model.model.layers[i]
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in gone]
    cfg.num_hidden_layers = len(model.model.layers)
    return model
