"""Shared fixtures: tiny random-weight models of every supported architecture with a WordLevel
tokenizer (no downloads), and the real bundled default model (tests using it carry ``slow``)."""

from __future__ import annotations

import os

# Tests never reach a model or data hub: datasets and huggingface_hub read these at import, so they
# are set before anything imports them (subprocesses of the CLI tests inherit them).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunelens.model.arch import ARCHS, Adapter
from prunelens.model.loading import DEFAULT_MODEL, LoadedModel
from prunelens.prune.drop import SkippedAttention, SkippedBlock, SkippedMLP

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


def _tiny_tokenizer() -> Any:
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return _tiny_tokenizer()


_MODELS: dict[str, nn.Module] = {}


@pytest.fixture(params=ARCH_NAMES)
def model(request: pytest.FixtureRequest) -> Iterator[nn.Module]:
    """One tiny model per architecture, built once per module; tests must leave it unchanged."""
    mt = request.param
    if mt not in _MODELS:
        _MODELS[mt] = tiny_model(mt)
    m = _MODELS[mt]
    before = {n: p.data_ptr() for n, p in m.named_parameters()}
    yield m
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == before, "test left the model modified"
    assert not any(isinstance(x, (SkippedAttention, SkippedBlock, SkippedMLP)) for x in m.modules())


def tiny_lm(model_type: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny model of one architecture with the tiny tokenizer, ready for any analysis."""
    m = tiny_model(model_type, seed)
    return LoadedModel(m, _tiny_tokenizer(), Adapter(m), {"name": f"tiny-{model_type}"})


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The real bundled default model, loaded once per session (tests using it are ``slow``)."""
    from prunelens.model.loading import load_model

    return load_model(DEFAULT_MODEL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that loads the real model (through ``real_lm``) carries the ``slow`` marker."""
    for item in items:
        if "real_lm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def save_tiny(path: Any, model_type: str = "llama", nan: bool = False) -> Any:
    """A tiny model and its tokenizer saved as a Hugging Face directory (safetensors), so the CLI
    can run on it in seconds; ``nan`` plants one NaN weight."""
    m = tiny_model(model_type)
    if nan:
        with torch.no_grad():
            next(p for n, p in m.named_parameters() if "mlp" in n).view(-1)[0] = float("nan")
    m.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))
