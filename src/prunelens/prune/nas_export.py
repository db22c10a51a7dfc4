"""A pruned model as NVIDIA's Nemotron-NAS (DeciLM) checkpoint: sublayer drops that GPU engines skip.

A plain checkpoint cannot say "this layer has no attention": every engine would compute it. The
``nemotron-nas`` config can: per layer, ``block_configs[i].attention.no_op`` / ``ffn.no_op``, and
vLLM (``DeciLMForCausalLM``), SGLang, TensorRT-LLM, mlx-lm and exllamav3 then skip the sublayer and,
for attention, its KV cache. A no-op sublayer has no tensors at all, its norm included (vLLM
refuses extra tensors). The widths engines rebuild from ``ffn_mult`` are multiples of 256
(``find_multiple(int(2·ffn_mult·hidden/3), 256)``), so an MLP whose width is not is padded with zero
units (exact: silu(0)·0 = 0). Qwen2's q/k/v biases need ``attention_bias``, which engines also
apply to o_proj: a zero o_proj bias is written. Only the config's ``auto_map`` points at NVIDIA's
code on the Hub (transformers has no built-in DeciLM); none of those engines runs on this machine.

The config also records prunelens's own description (``prunelens``: the base model type, the
dropped units, the sublayers to skip), from which ``model.nemotron_nas`` loads the file back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.model.nemotron_nas import FAMILIES, HUB_CODE, ffn_width
from prunelens.model.placement import is_dispatched
from prunelens.model.views import Modification
from prunelens.prune.checkpoint import METADATA_KEY, merged, pruned_state_and_config, save_tensors
from prunelens.prune.plan import DropPlan
from prunelens.runs import atomic_dir


def _block_config(attn_off: bool, mlp_off: bool, group: int, mult: float) -> dict[str, Any]:
    return {"attention": {"no_op": attn_off, "replace_with_linear": False,
                          "n_heads_in_group": None if attn_off else group},
            "ffn": {"no_op": mlp_off, "replace_with_linear": False, "ffn_mult": None if mlp_off else mult}}


def nas_config(config: Any, skip: DropPlan, n_layers: int, meta: dict[str, Any], dtype: torch.dtype = torch.float32
               ) -> tuple[dict[str, Any], int]:
    """The nemotron-nas config.json for the pruned base, and the (padded) MLP width it declares."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    width = -(-config.intermediate_size // 256) * 256
    mult = round(3 * width / (2 * hidden), 6)
    if ffn_width(hidden, mult) != width:
        raise PrunelensError(f"--format nemotron-nas: no ffn_mult gives an MLP width of {width} at hidden "
                             f"size {hidden}")
    bias = config.model_type == "qwen2"
    rope = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", None) or rope.get("rope_theta")
    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "auto_map": HUB_CODE,
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": None, "intermediate_size": None,
        "head_dim": getattr(config, "head_dim", None) or hidden // heads, "num_hidden_layers": n_layers,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": theta,
        "rope_scaling": None, "hidden_act": config.hidden_act, "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": bias, "o_proj_bias": bias, "mlp_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "block_configs": [_block_config(i in skip.attn, i in skip.mlp, heads // kv, mult) for i in range(n_layers)],
        METADATA_KEY: {**meta, "base_model_type": config.model_type, "intermediate_size": config.intermediate_size},
    }, width


def _nas_state(state: dict[str, torch.Tensor], skip: DropPlan, n_layers: int, prefix: str, width: int,
               bias: bool, tied: bool) -> dict[str, torch.Tensor]:
    """The pruned checkpoint's tensors without those of no-op sublayers, MLPs zero-padded to ``width``
    and a zero o_proj bias where the config declares attention biases."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        if name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            attn = rest.startswith(("self_attn.", "input_layernorm."))
            mlp = rest.startswith(("mlp.", "post_attention_layernorm."))
            if attn and int(i) in skip.attn or mlp and int(i) in skip.mlp:
                continue
            if rest.startswith("mlp.down_proj."):
                t = torch.nn.functional.pad(t, (0, width - t.shape[1]))
            elif rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                t = torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[0]))
        out[name] = t.contiguous()
    for i in range(n_layers) if bias else ():
        if i not in skip.attn:
            w = out[f"{prefix}{i}.self_attn.o_proj.weight"]
            out[f"{prefix}{i}.self_attn.o_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def check_model(lm: LoadedModel) -> None:
    """Refusals before any pruning work: another family, RoPE scaling or sliding windows, biases
    DeciLM cannot declare, and a model spread over devices (the export reads it whole)."""
    config = lm.adapter.config
    if is_dispatched(lm.model):
        raise PrunelensError("--format nemotron-nas reads the whole model at once: load it on one device "
                             "(no --device auto / --offload-dir)")
    if getattr(config, "mlp_bias", False) or config.model_type == "llama" and getattr(config, "attention_bias", False):
        raise PrunelensError("--format nemotron-nas: MLP or o_proj biases of this Llama have no DeciLM form")
    check_family(config)


def check_family(config: Any) -> None:
    if config.model_type not in FAMILIES:
        raise PrunelensError(f"--format nemotron-nas supports {', '.join(FAMILIES)} models (DeciLM is Llama's "
                             f"block), not '{config.model_type}'")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if getattr(config, "use_sliding_window", False) or rope != "default":
        raise PrunelensError("--format nemotron-nas: sliding windows and RoPE scaling are not written yet")


def save_nemotron_nas(lm: LoadedModel, modification: Modification, out: str | Path) -> Path:
    """Write the modified model as a nemotron-nas checkpoint directory (atomically)."""
    adapter, out = lm.adapter, Path(out)
    config = adapter.config
    check_model(lm)
    with merged(adapter, modification) as plan:
        state, pruned = pruned_state_and_config(adapter, plan)
        meta = getattr(pruned, METADATA_KEY)
        skip = DropPlan(attn=tuple(meta["skip"]["attn"]), mlp=tuple(meta["skip"]["mlp"]))
        n = pruned.num_hidden_layers
        cfg, width = nas_config(config, skip, n, meta, next(iter(state.values())).dtype)
        tensors = _nas_state(state, skip, n, adapter.spec.layers + ".", width, cfg["attention_bias"],
                             bool(config.tie_word_embeddings))
        with atomic_dir(out) as tmp:
            save_tensors(tensors, tmp)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
            lm.tokenizer.save_pretrained(tmp)
    return out
