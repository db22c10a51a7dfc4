"""The two sides a trace compares, each one "forward": token ids in, hidden states and logits out.

A trace compares a *reference* forward with a *candidate* forward and knows nothing of how either is
made. Today's candidate is the reference model seen through a modification's view (modules swapped,
weights shared); a separately loaded checkpoint is the same ``ModelForward`` over another model.
Both sides read the same token ids (one tokenizer). The per-layer comparison pairs stream l of the
reference with stream ``resid_map[l]`` of the candidate: the identity at equal depth, else the
candidate's layer correspondence (a shallower candidate's stream after its last kept block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from prunelens.model.capture import capture
from prunelens.model.kvcache import forward_cached
from prunelens.model.loading import LoadedModel
from prunelens.model.views import Modification, view_of


@dataclass
class Prefilled:
    """One side after the prompt: last-position logits, the recorded activations and the KV cache
    that decoding continues from."""

    z: torch.Tensor
    states: dict[str, torch.Tensor]
    cache: Any


class Forward(Protocol):
    """What a trace needs of one side (the reference or the candidate)."""

    @property
    def n_layers(self) -> int: ...

    @property
    def resid_map(self) -> list[int] | None:
        """This side's residual stream for each reference stream 0..n (None: the same index)."""
        ...

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, names: list[str]) -> Prefilled:
        """Run the prompt (left-padded ``ids``) into a new KV cache, recording the ``names`` activations."""
        ...

    def step(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One cached decoding step: the last position's logits and final hidden state."""
        ...

    def lens(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states through this side's final norm and LM head (the logit lens)."""
        ...


@dataclass
class ModelForward:
    """A loaded model, run as it is or inside a modification's view."""

    lm: LoadedModel
    modification: Modification | None = None
    resid_map: list[int] | None = None

    @property
    def n_layers(self) -> int:
        return self.lm.adapter.n_layers

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.model.config)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, names: list[str]) -> Prefilled:
        cache = self.new_cache()
        with view_of(self.lm.adapter, self.modification), capture(self.lm.adapter, names) as states:
            z = forward_cached(self.lm.model, ids, mask, cache)
        return Prefilled(z, states, cache)

    def step(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with view_of(self.lm.adapter, self.modification), capture(self.lm.adapter, ["final"]) as s:
            z = forward_cached(self.lm.model, ids, mask, cache)
        return z, s["final"][:, -1]

    def lens(self, h: torch.Tensor) -> torch.Tensor:
        # outside the view, as the trace has always done: the lens reads the loaded model's head
        return self.lm.adapter.logits_from_hidden(h)
