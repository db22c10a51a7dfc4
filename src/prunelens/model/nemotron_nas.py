"""Reading a Nemotron-NAS (DeciLM) checkpoint that prunelens wrote, without NVIDIA's remote code.

transformers has no built-in DeciLM, and prunelens never enables ``trust_remote_code``. A
nemotron-nas export of prunelens (``prune.nas_export``) is a Llama or Qwen2 model whose no-op
sublayers have no tensors; it is converted once into a plain checkpoint of its base family — the
missing sublayers as zero weights, MLP padding cut — in the model cache, and its ``prunelens``
record (the sublayers to skip) travels along, so the loaded model computes what the pruned model
computed. Checkpoints with per-layer widths (NVIDIA's own) are refused: their layers do not share one
Llama shape.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from prunelens.errors import PrunelensError
from prunelens.runs import atomic_dir

FAMILIES = ("llama", "qwen2")
# NVIDIA's DeciLM code on the Hub, by reference (nothing of it is copied here); engines ship their own
HUB = "nvidia/Llama-3_3-Nemotron-Super-49B-v1"
HUB_CODE = {"AutoConfig": f"{HUB}--configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": f"{HUB}--modeling_decilm.DeciLMForCausalLM"}
PLAIN_KEYS = ("hidden_size", "num_attention_heads", "head_dim", "num_hidden_layers", "vocab_size",
              "max_position_embeddings", "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id",
              "eos_token_id")


def ffn_width(hidden: int, ffn_mult: float) -> int:
    """The MLP width engines build from ``ffn_mult`` (a multiple of 256)."""
    return -(-int(2 * ffn_mult * hidden / 3) // 256) * 256


def is_nemotron_nas(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        return Path(path).is_dir() and json.loads(cfg.read_text()).get("model_type") == "nemotron-nas"
    except (OSError, ValueError):
        return False


def _base_config(cfg: dict[str, Any], meta: dict[str, Any]) -> Any:
    groups = {b["attention"]["n_heads_in_group"] for b in cfg["block_configs"] if not b["attention"]["no_op"]}
    heads = cfg["num_attention_heads"]
    kw = {k: cfg[k] for k in PLAIN_KEYS if cfg.get(k) is not None}
    kw.update(num_key_value_heads=heads // (groups.pop() if groups else 1), intermediate_size=meta["intermediate_size"],
              rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]})
    if meta["base_model_type"] == "qwen2":
        kw.update(use_sliding_window=False, layer_types=["full_attention"] * cfg["num_hidden_layers"])
    config = AutoConfig.for_model(meta["base_model_type"], **kw)
    config.prunelens = meta
    return config


def _read(path: Path, cfg: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    meta = cfg.get("prunelens")
    if not isinstance(meta, dict) or meta.get("base_model_type") not in FAMILIES:
        raise PrunelensError(f"'{path}' is a nemotron-nas checkpoint prunelens did not write (per-layer widths do not "
                             "fit one Llama shape); prunelens reads only its own exports")
    if len({b["attention"]["n_heads_in_group"] for b in cfg["block_configs"] if not b["attention"]["no_op"]}) > 1:
        raise PrunelensError(f"'{path}': layers with different KV-head counts do not fit one Llama shape")
    config = _base_config(cfg, meta)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = tensors.get(name)
        state[name] = torch.zeros(shape) if t is None else t[tuple(slice(0, n) for n in shape)].contiguous()
    return config, state


def nas_to_safetensors(path: str | Path, cache: Path) -> Path:
    """Convert once into ``cache/nas-<digest>`` (keyed by the config and weight files' sizes and times)."""
    path = Path(path)
    files = sorted(q for q in path.iterdir() if q.is_file())
    key = hashlib.sha256(json.dumps([[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files]).encode())
    out = cache / f"nas-{key.hexdigest()[:16]}"
    if (out / "config.json").exists():
        return out
    config, state = _read(path, json.loads((path / "config.json").read_text()))
    with atomic_dir(out) as tmp:  # a job converting the same file at once replaces it with the same content
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for q in files:  # tokenizer and generation files, as they are
            if q.name != "config.json" and not q.name.startswith("model"):
                shutil.copy2(q, tmp / q.name)
    return out
