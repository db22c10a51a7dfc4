"""KV-cache surgery for batched decoding: a cache that grows in place, a prefix computed once and
shared, rows merged into a running batch and rows dropped from it, and the one cached forward.
transformers' cache classes are imported on first use: importing prunelens stays fast for the CLI's
pre-load checks."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from prunelens.errors import PrunelensError


@functools.cache
def growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer that writes new keys/values into spare room: DynamicLayer
        concatenates, copying the whole cache every step (O(context) per token, ~40 % of a decode step
        at 800 tokens). Reads are views of the filled part; assigning ``keys``/``values`` replaces it."""

        def __init__(self, **kwargs: Any) -> None:
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None
            self._n = 0
            super().__init__(**kwargs)

        @property
        def keys(self) -> torch.Tensor | None:  # type: ignore[override]
            return None if self._k is None else self._k[..., :self._n, :]

        @keys.setter
        def keys(self, t: torch.Tensor | None) -> None:
            self._k, self._n = t, (0 if t is None or t.dim() < 2 else t.shape[-2])

        @property
        def values(self) -> torch.Tensor | None:  # type: ignore[override]
            return None if self._v is None else self._v[..., :self._n, :]

        @values.setter
        def values(self, t: torch.Tensor | None) -> None:
            self._v = t

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized or self._k is None or self._k.dim() < 2:
                self.device, self.is_initialized = key_states.device, True
                self._k = self._v = None
                self._n = 0
            n, m = self._n, key_states.shape[-2]
            if self._k is None or self._v is None or n + m > self._k.shape[-2]:
                cap = n + m + max(64, (n + m) // 4)
                self._k, self._v = (self._room(old, new, n, cap) for old, new in
                                    ((self._k, key_states), (self._v, value_states)))
            self._k[..., n:n + m, :] = key_states
            self._v[..., n:n + m, :] = value_states
            self._n = n + m
            return self.keys, self.values  # type: ignore[return-value]

        @staticmethod
        def _room(old: torch.Tensor | None, new: torch.Tensor, n: int, cap: int) -> torch.Tensor:
            out = new.new_empty(*new.shape[:-2], cap, new.shape[-1])
            if old is not None and n:
                out[..., :n, :] = old[..., :n, :]
            return out

    return GrowingLayer


def new_cache(model: Any) -> Any:
    """A DynamicCache for ``model`` whose plain full-attention layers grow in place (sliding-window
    and other special layers are kept as transformers builds them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    cache.layers = [growing_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt shares, leaving each at least one token of its own."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


MIN_SHARED = 16  # below this, computing the prefix once saves less than the extra forward costs


def _stored(layer: Any, width: int) -> int:
    """How many of the last ``width`` positions a cache layer keeps (a sliding layer: its window)."""
    window = getattr(layer, "sliding_window", None)
    return width if window is None else min(width, window - 1)


def _left_pad_kv(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if n == 0 else torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


def merge_caches(a: Any, mask_a: torch.Tensor, b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Rows of ``b`` appended to ``a``'s batch (in place in ``a``): right-aligned, the narrower side
    left-padded with zero keys/values under a zero mask, which attention never reads."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    masks = [torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], 1) for m in (mask_a, mask_b)]
    for la, lb in zip(a.layers, b.layers, strict=True):
        keep = _stored(la, width)
        parts = []
        for layer in (la, lb):
            k, v = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
            parts.append((_left_pad_kv(k, keep - k.shape[-2]), _left_pad_kv(v, keep - v.shape[-2])))
        la.keys = torch.cat([parts[0][0], parts[1][0]], 0)
        la.values = torch.cat([parts[0][1], parts[1][1]], 0)
        if hasattr(la, "cumulative_length"):
            la.cumulative_length = width
    return a, torch.cat(masks, 0)


def select_rows(cache: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows ``keep`` (in place in ``cache``), then drop the leading positions no row
    attends to any more; returns the new mask."""
    idx = torch.tensor(keep, device=mask.device)
    mask = mask[idx]
    cut = int(mask.any(0).to(torch.int8).argmax()) if bool(mask.any()) else 0
    width = mask.shape[1] - cut
    for layer in cache.layers:
        keys, values = layer.keys[idx], layer.values[idx]
        stored = min(keys.shape[-2], _stored(layer, width))
        layer.keys, layer.values = keys[..., keys.shape[-2] - stored:, :], values[..., values.shape[-2] - stored:, :]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return mask[:, cut:]


def forward_cached(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """One cached forward over ``ids`` (left-padded rows); returns the last position's logits.

    ``mask`` covers the cached tokens plus ``ids``; positions come from it, so padding is skipped.
    """
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_keyword(type(model)): cache})
    z = out.logits[:, -1].float()
    if not bool(torch.isfinite(z).all()):
        raise PrunelensError("the model produced NaN or infinite logits (a modification broke its numerics)")
    return z


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The forward's KV-cache argument: ``cache`` from transformers 5.24 (where the old name is
    deprecated, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
