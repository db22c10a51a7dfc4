"""The one place that knows where each architecture keeps its parts.

Everything else in prunelens speaks the canonical names used here (layers, attn, mlp, final
norm, LM head, ...). Adding an architecture is one ``ARCHS.register`` line (with an ``ArchSpec`` if
its module paths differ from Llama's) plus its tiny config in ``prunelens.testing.ARCH_KW``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunelens.errors import PrunelensError
from prunelens.registry import Registry


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one decoder family, relative to the CausalLM (or to a decoder layer)."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # relative to a decoder layer:
    attn: str = "self_attn"
    mlp: str = "mlp"
    # The norm in front of the MLP: its input is the residual stream between the two sublayers.
    pre_mlp_norm: str = "post_attention_layernorm"
    # Zeroing these (weight and bias) makes the sublayer add exactly nothing to the residual.
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    # Norms on a sublayer's output before it joins the residual (Gemma 2/3's sandwich): a linear map
    # of the contribution then cannot be merged into the output projection.
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # Linear layers of a block, in execution order (targets for weight sparsification).
    linears: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )


_LLAMA = ArchSpec()
# Gemma 2/3 wrap each sublayer in a post-norm; the MLP's own input norm is pre_feedforward_layernorm.
_GEMMA_SANDWICH = ArchSpec(pre_mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
                           mlp_post_norm="post_feedforward_layernorm")
_PHI3 = ArchSpec(
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
)

ARCHS: Registry[ArchSpec] = Registry("architecture")
for _name, _spec in (("llama", _LLAMA), ("mistral", _LLAMA), ("qwen2", _LLAMA), ("qwen3", _LLAMA),
                     ("gemma", _LLAMA), ("gemma2", _GEMMA_SANDWICH), ("gemma3_text", _GEMMA_SANDWICH),
                     ("phi3", _PHI3)):
    ARCHS.register(_name, _spec)


def spec_for(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise PrunelensError(f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS.get(model_type)


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


class Adapter:
    """Canonical access to a causal LM's parts, resolved through its ``ArchSpec``."""

    @staticmethod
    def check_config(config) -> None:
        """Fail before loading weights if the architecture is not in the table."""
        spec_for(getattr(config, "model_type", "?"))

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.model_type = getattr(self.config, "model_type", "?")
        self.spec = spec_for(self.model_type)

    @property
    def layers(self) -> nn.ModuleList:
        return get_module(self.model, self.spec.layers)  # type: ignore[return-value]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def embed(self) -> nn.Module:
        return get_module(self.model, self.spec.embed)

    @property
    def final_norm(self) -> nn.Module:
        return get_module(self.model, self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return get_module(self.model, self.spec.lm_head)

    def layer_path(self, i: int) -> str:
        return f"{self.spec.layers}.{i}"

    def sublayer_path(self, kind: str, i: int) -> str:
        """Path of layer i's 'attn' or 'mlp' module from the model root."""
        rel = {"attn": self.spec.attn, "mlp": self.spec.mlp}[kind]
        return f"{self.layer_path(i)}.{rel}"

    def pre_mlp_norm(self, i: int) -> nn.Module:
        return get_module(self.layers[i], self.spec.pre_mlp_norm)

    @property
    def num_kv_heads(self) -> int:
        c = self.config
        return int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @property
    def attention_window(self) -> int | None:
        """Sliding-window length if any layer attends through one (Gemma 2/3, Mistral), else None:
        code that hands the model its own attention mask must keep sequences within it."""
        c = self.config
        window = getattr(c, "sliding_window", None)
        if not window:
            return None
        types = getattr(c, "layer_types", None)
        if types:
            return int(window) if "sliding_attention" in types else None
        return int(window) if getattr(c, "use_sliding_window", True) else None

    def logits_from_hidden(self, h):
        """z = lm_head(final_norm(h)): the logit lens applied to a residual-stream state."""
        return self.lm_head(self.final_norm(h))

    def head_logits(self, h_normed):
        """The model's own logits from final-norm outputs: lm_head, then the final logit
        soft-capping of architectures that have one (Gemma 2), exactly as the model computes z."""
        z = self.lm_head(h_normed)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def final_logits(self, h):
        """The model's logits from the last block's output (residual stream, before the final norm)."""
        return self.head_logits(self.final_norm(h))
