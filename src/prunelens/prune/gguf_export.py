"""A pruned model as a GGUF that llama.cpp (and Ollama) load and run faster, not just smaller.

Whole-block drops keep the model's own architecture with fewer layers. Sublayer drops need
per-layer shapes, which only llama.cpp's ``deci`` architecture (NVIDIA's Nemotron-NAS) has:
``head_count``/``head_count_kv``/``feed_forward_length`` are per-layer arrays there, and a layer with
``head_count = 0`` has no attention tensors and no KV cache. Two corners of llama.cpp's ``deci``
graph (src/models/deci.cpp) decide the encodings:

- ``feed_forward_length = 0`` makes the *whole layer* an identity (the attention output is
  dropped with the MLP), so an MLP drop is written as a 32-wide all-zero MLP with a zero norm:
  exactly ``x + attn(x)``, for 3·32·hidden weights instead of 3·ffn·hidden.
- the head size is read from layer 0, so a dropped attention *at layer 0* is written as "linear
  attention" with zero weights (``head_count_kv = 0``: still no KV cache, output exactly ``x``).

Weights are the modified model's (sparse weights, quantised grids and repairs as merged), written
through gguf-py's own quantisers; the tokenizer, chat template and special tokens come from a GGUF
of the base (the preset's own file, or ``vocab=``). Q/K rows are reordered for llama.cpp's
interleaved RoPE where the target architecture uses it (llama, deci), as llama.cpp's converter does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.model.placement import state_tensors
from prunelens.model.views import Modification
from prunelens.prune.checkpoint import merged
from prunelens.prune.plan import DropPlan
from prunelens.runs import atomic_write_with

Q = gguf.GGMLQuantizationType
# tensor types offered: (type of 2-D weights, type of the token embedding, llama.cpp's file type)
TENSOR_TYPES: dict[str, tuple[Any, Any, Any]] = {
    "f32": (Q.F32, Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    # llama.cpp's own Q4_0 keeps the (tied) embedding/output at higher precision (Q6_K, which
    # gguf-py cannot write); Q8_0 stands in for it
    "q4_0": (Q.Q4_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


@dataclass(frozen=True)
class Family:
    """How one transformers model type maps onto llama.cpp: its own GGUF architecture, whether that
    architecture uses interleaved ("normal") RoPE (so Q/K rows are reordered), and whether its
    sublayer drops can be written as ``deci``."""

    arch: Any
    interleaved_rope: bool
    deci: bool = True


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, interleaved_rope=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, interleaved_rope=False),  # q/k/v biases: deci loads them
}
ZERO_FFN = 32  # width of the stand-in MLP of an MLP drop: one Q8_0/Q4_0 block


@dataclass
class Layout:
    """What the file holds per layer (indices of the written layers): the source layer, and the
    per-layer arrays; ``arch`` is the family's own one or ``deci``."""

    family: Family
    arch: Any
    keep: list[int]
    attn_off: set[int] = field(default_factory=set)
    mlp_off: set[int] = field(default_factory=set)
    head_count: list[int] = field(default_factory=list)
    head_count_kv: list[int] = field(default_factory=list)
    ffn: list[int] = field(default_factory=list)

    @property
    def deci(self) -> bool:
        return self.arch == gguf.MODEL_ARCH.DECI


def family_of(config: Any) -> Family:
    fam = FAMILIES.get(getattr(config, "model_type", ""))
    if fam is None:
        raise PrunelensError(f"--format gguf supports the model types {', '.join(FAMILIES)}, not "
                             f"'{getattr(config, 'model_type', '?')}' (docs/deploy.md lists what maps onto llama.cpp)")
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if getattr(config, "use_sliding_window", False) and sliding:
        raise PrunelensError("--format gguf: this model uses sliding-window attention, which llama.cpp's "
                             f"{config.model_type} does not compute; save as a checkpoint instead")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PrunelensError(f"--format gguf: RoPE scaling '{rope.get('rope_type')}' is not written yet; "
                             "save as a checkpoint and convert with llama.cpp's convert_hf_to_gguf.py")
    return fam


def layout(config: Any, plan: DropPlan) -> Layout:
    """Which layers are written and how: a block in ``plan.block``, or dropped in both sublayers,
    is left out; other sublayer drops make the file ``deci``."""
    fam = family_of(config)
    n, heads = config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    gone = set(plan.block) | (set(plan.attn) & set(plan.mlp))
    keep = [i for i in range(n) if i not in gone]
    new = {old: k for k, old in enumerate(keep)}
    out = Layout(fam, fam.arch, keep, {new[i] for i in plan.attn if i in new}, {new[i] for i in plan.mlp if i in new})
    if out.attn_off or out.mlp_off:
        if not fam.deci:
            raise PrunelensError(f"--format gguf: {config.model_type} has no llama.cpp architecture for "
                                 "sublayer drops; drop whole blocks or save as a checkpoint")
        out.arch = gguf.MODEL_ARCH.DECI
    for k in range(len(keep)):
        off = k in out.attn_off
        out.head_count.append(0 if off and k else heads)  # layer 0 keeps its heads: "linear attention"
        out.head_count_kv.append(0 if off else kv)
        out.ffn.append(ZERO_FFN if k in out.mlp_off else config.intermediate_size)
    return out


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from transformers' half-split RoPE order to llama.cpp's interleaved one: within each
    head of size d, row 2j+s takes row s·d/2+j (s ∈ {0, 1}); a bias is reordered the same way."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _array(t: torch.Tensor, qtype: Any) -> tuple[np.ndarray, Any]:
    """The tensor in the requested type through gguf-py's own quantisers; 1-D tensors (norms,
    biases) stay F32 as llama.cpp keeps them, rows a block does not divide fall back to F16."""
    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or qtype == Q.F32:
        return a, Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        qtype = Q.F16
    return gguf.quants.quantize(a, qtype), qtype


def vocab_source(lm: LoadedModel, vocab: str | Path | None) -> Path:
    """The GGUF whose tokenizer metadata the export carries: ``vocab``, else the GGUF the base was
    converted from (presets and .gguf bases)."""
    if vocab is not None:
        p = Path(vocab)
        if not p.is_file() or p.suffix != ".gguf":
            raise PrunelensError(f"--gguf-vocab {vocab}: not a .gguf file")
        return p
    marker = Path(str(lm.info.get("source", ""))) / "prunelens-source.json"
    if marker.is_file():
        src = Path(json.loads(marker.read_text()).get("gguf", ""))
        if src.is_file():
            return src
    raise PrunelensError("--format gguf needs the base's tokenizer as GGUF metadata: this base was not loaded "
                         "from a GGUF; pass --gguf-vocab BASE.gguf (any GGUF of the base model, e.g. made by "
                         "llama.cpp's convert_hf_to_gguf.py --vocab-only)")


SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def _copy_vocab(w: gguf.GGUFWriter, src: Path, base_arch: str) -> None:
    """The tokenizer (vocabulary, merges, special tokens, chat template) and the ``general.*``
    description of the base's GGUF; architecture keys are written from the config instead."""
    reader = gguf.GGUFReader(src)
    for key, f in reader.fields.items():
        if key.startswith(SKIP_KEYS) or key.startswith(f"{base_arch}.") or not f.types:
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)


def _hparams(w: gguf.GGUFWriter, config: Any, lay: Layout, file_type: Any) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    w.add_block_count(len(lay.keep))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    per_layer = lay.deci  # the family's own architectures take one value for every layer
    w.add_feed_forward_length(lay.ffn if per_layer else lay.ffn[0])
    w.add_head_count(lay.head_count if per_layer else heads)
    w.add_head_count_kv(lay.head_count_kv if per_layer else lay.head_count_kv[0])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    theta = getattr(config, "rope_theta", None) or rope.get("rope_theta")
    if theta:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)


def _tensors(lm: LoadedModel, lay: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of every tensor the file holds, the stand-in zeros included."""
    config, prefix = lm.adapter.config, lm.adapter.spec.layers + "."
    names = gguf.get_tensor_name_map(lay.arch, len(lay.keep))
    new = {old: k for k, old in enumerate(lay.keep)}
    rope_rows = lay.family.interleaved_rope or lay.deci
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    tied = getattr(config, "tie_word_embeddings", False)
    for name, t in state_tensors(lm.model):
        if name == "lm_head.weight" and tied:
            continue
        k = None
        if name.startswith(prefix):
            old, rest = name[len(prefix):].split(".", 1)
            if int(old) not in new:
                continue
            k = new[int(old)]
            name = f"{prefix}{k}.{rest}"
            if k in lay.mlp_off and ".mlp." in name or k in lay.attn_off and ".self_attn." in name:
                continue
            if k in lay.mlp_off and "post_attention_layernorm" in name:
                continue
            if k in lay.attn_off and "input_layernorm" in name:
                continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise PrunelensError(f"--format gguf: no llama.cpp name for tensor '{name}'")
        if rope_rows and (".q_proj." in name or ".k_proj." in name):  # fp32: numpy has no bfloat16
            t = torch.from_numpy(interleave_rope_rows(t.float().numpy(), heads if ".q_proj." in name else kv))
        yield target, t
    yield from _stand_ins(config, lay)


def _stand_ins(config: Any, lay: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """Zero tensors that make llama.cpp compute a dropped sublayer as nothing (module docstring)."""
    h = config.hidden_size
    for k in sorted(lay.mlp_off):
        yield f"blk.{k}.ffn_norm.weight", torch.zeros(h)
        yield f"blk.{k}.ffn_gate.weight", torch.zeros(ZERO_FFN, h)
        yield f"blk.{k}.ffn_up.weight", torch.zeros(ZERO_FFN, h)
        yield f"blk.{k}.ffn_down.weight", torch.zeros(h, ZERO_FFN)
    if 0 in lay.attn_off:
        yield "blk.0.attn_norm.weight", torch.zeros(h)
        yield "blk.0.attn_output.weight", torch.zeros(h, h)


def save_gguf(lm: LoadedModel, modification: Modification | None, out: str | Path, tensor_type: str = "f16",
              vocab: str | Path | None = None) -> Path:
    """Write the modified model as one GGUF file (atomically: a temp file renamed at the end)."""
    if tensor_type not in TENSOR_TYPES:
        raise PrunelensError(f"--gguf-type {tensor_type}: offered are {', '.join(TENSOR_TYPES)}")
    src = vocab_source(lm, vocab)
    weight_type, embed_type, file_type = TENSOR_TYPES[tensor_type]

    def write(tmp: Path) -> None:
        with merged(lm.adapter, modification) as plan:
            lay = layout(lm.adapter.config, plan)
            w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[lay.arch], use_temp_file=True)
            _copy_vocab(w, src, gguf.MODEL_ARCH_NAMES[lay.family.arch])
            _hparams(w, lm.adapter.config, lay, file_type)
            for name, t in _tensors(lm, lay):
                data, qtype = _array(t, embed_type if name.startswith("token_embd") else weight_type)
                w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write_with(Path(out), write)
