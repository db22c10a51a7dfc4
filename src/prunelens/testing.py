"""Tiny random-weight models of every supported architecture with a WordLevel tokenizer (no
downloads), and where the shared evaluation data lies. Tests, the GPU check and benchmarks share
these, so they live in the package rather than in a ``conftest``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
