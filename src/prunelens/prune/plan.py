"""A drop plan and its zero-copy view: which sublayers and blocks are dropped, and the stand-ins that
take their place while the view is entered.

The pruned view swaps the dropped modules for stand-ins that add nothing to the residual stream
and are never computed, then puts the originals back: dense and pruned share every weight.
A dropped attention sublayer still appends (zero) keys/values to the KV cache, because
transformers derives positions and mask sizes from the cache length; without it, decoding after
prefill would place tokens at the wrong positions.

Kept apart from the drop *methods* (``drop``) so that ``base.combine`` can make the empty plan
without importing the modules that register methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter, get_module, set_module
from prunelens.model.views import Modification

KINDS = ("attn", "mlp", "block")
# Layer indices are 0-based positions in the original (dense) model's layer list.
LAYER_INDEXING = "0-based index into the dense model's decoder layers"


@dataclass(frozen=True)
class DropPlan:
    """Which sublayers and blocks are dropped, with how they were chosen."""

    view_order: ClassVar[int] = 1

    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    block: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def empty(self) -> bool:
        return not (self.attn or self.mlp or self.block)

    def units(self) -> list[tuple[str, int]]:
        return [(k, i) for k in KINDS for i in getattr(self, k)]

    def with_unit(self, kind: str, i: int) -> DropPlan:
        cur = getattr(self, kind)
        return DropPlan(**{**self._fields(), kind: tuple(sorted({*cur, i}))}, info=self.info)

    def _fields(self) -> dict[str, tuple[int, ...]]:
        return {"attn": self.attn, "mlp": self.mlp, "block": self.block}

    def label(self) -> str:
        parts = [f"{k}@{','.join(map(str, v))}" for k, v in self._fields().items() if v]
        return "+".join(parts) or "dense"

    def view(self, adapter: Adapter) -> contextlib.AbstractContextManager[None]:
        return pruned_view(adapter, self)

    def parts(self) -> list[DropPlan]:
        return [self]

    def layer_indices(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self._fields().items()}

    def footprint(self, adapter: Adapter, share_removed: float) -> tuple[float, None]:
        """(share of the decoder's linear weights removed, no change of bits), given the share
        earlier parts removed: the linear weights inside the dropped units."""
        dropped = {(adapter.layer_path(i) if k == "block" else adapter.sublayer_path(k, i)) + "."
                   for k, i in self.units()}
        total = removed = 0
        for name, m in adapter.model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                total += m.weight.numel()
                removed += m.weight.numel() if any(name.startswith(d) for d in dropped) else 0
        return share_removed + removed / max(total, 1), None

    def validate(self, n_layers: int) -> None:
        for kind, i in self.units():
            if not 0 <= i < n_layers:
                raise PrunelensError(
                    f"cannot drop {kind} {i}: the model has layers 0..{n_layers - 1}"
                )
        if len(self.block) >= n_layers:
            raise PrunelensError(f"cannot drop all {n_layers} blocks")

    def to_dict(self) -> dict[str, Any]:
        return {**{k: list(v) for k, v in self._fields().items()}, "label": self.label(),
                "layer_indexing": LAYER_INDEXING, **({"selection": self.info} if self.info else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DropPlan:
        return cls(attn=tuple(d.get("attn", ())), mlp=tuple(d.get("mlp", ())),
                   block=tuple(d.get("block", ())), info=d.get("selection", {}))


def merge(a: DropPlan, b: DropPlan) -> DropPlan:
    return DropPlan(
        attn=tuple(sorted({*a.attn, *b.attn})),
        mlp=tuple(sorted({*a.mlp, *b.mlp})),
        block=tuple(sorted({*a.block, *b.block})),
        info={**a.info, **b.info},
    )


# --- stand-ins for dropped modules -------------------------------------------------------------


class _CacheKeeper(nn.Module):
    """Appends zero keys/values so the KV cache of a skipped layer keeps the right length."""

    def __init__(self, layer_idx: int, n_kv: int, head_dim: int):
        super().__init__()
        self.layer_idx, self.n_kv, self.head_dim = layer_idx, n_kv, head_dim

    def _keep_cache(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        # the keyword is `cache` from transformers 5.24, `past_key_values`/`past_key_value` before
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if k in kwargs), None)
        if cache is not None:
            b, t = hidden.shape[:2]
            kv = hidden.new_zeros(b, self.n_kv, t, self.head_dim)
            cache.update(kv, kv, self.layer_idx)


class SkippedAttention(_CacheKeeper):
    """A dropped attention sublayer: contributes zero, computes nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._keep_cache(hidden_states, kwargs)
        return torch.zeros_like(hidden_states), None


class SkippedBlock(_CacheKeeper):
    """A dropped decoder block: the identity on the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._keep_cache(hidden_states, kwargs)
        return hidden_states


class SkippedMLP(nn.Module):
    """A dropped MLP sublayer: contributes zero."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _swap_in(adapter: Adapter, plan: DropPlan) -> list[tuple[str, nn.Module]]:
    """Replace the plan's units by stand-ins; returns what was replaced, for restoring."""
    plan.validate(adapter.n_layers)
    root = adapter.model
    saved: list[tuple[str, nn.Module]] = []
    n_kv, hd = adapter.num_kv_heads, adapter.head_dim

    def swap(path: str, new: nn.Module) -> None:
        saved.append((path, get_module(root, path)))
        set_module(root, path, new)

    try:
        for i in plan.block:
            swap(adapter.layer_path(i), SkippedBlock(i, n_kv, hd))
        for i in plan.attn:
            if i not in plan.block:
                swap(adapter.sublayer_path("attn", i), SkippedAttention(i, n_kv, hd))
        for i in plan.mlp:
            if i not in plan.block:
                swap(adapter.sublayer_path("mlp", i), SkippedMLP())
    except BaseException:
        _restore(adapter, saved)
        raise
    return saved


def _restore(adapter: Adapter, saved: list[tuple[str, nn.Module]]) -> None:
    for path, module in reversed(saved):
        set_module(adapter.model, path, module)


@contextlib.contextmanager
def pruned_view(adapter: Adapter, plan: Modification) -> Iterator[None]:
    """Inside the block, the model computes as if ``plan`` (any modification) were applied.

    No weight is copied: the dropped modules are swapped out for stand-ins and restored on exit.
    Any other modification (a weight method, a recipe) enters its own ``view``, so the documented
    ``pl.pruned_view(lm.adapter, plan)`` works for whatever ``pl.build`` returned.
    """
    if not isinstance(plan, DropPlan):
        if not callable(getattr(plan, "view", None)):
            raise PrunelensError(f"pruned_view needs a modification (a DropPlan or what pl.build returns), "
                                 f"not {type(plan).__name__}")
        with plan.view(adapter):
            yield
        return
    saved = _swap_in(adapter, plan)
    try:
        yield
    finally:
        _restore(adapter, saved)


def install_permanently(adapter: Adapter, plan: DropPlan) -> None:
    """Skip a loaded checkpoint's zeroed sublayers for good (used when reading prunelens metadata)."""
    _swap_in(adapter, plan)
