"""Named places to read the residual stream, and the definition of the three spaces.

Names (TransformerLens-style):
- ``resid.{l}`` for l = 0..L: the residual stream *before* block l (l = 0 is the embedding output)
  and, for l = L, after the last block (before the final norm).
- ``mid.{i}``: the residual stream between block i's attention and its MLP.
- ``final``: the final-norm output h, so that the logits are z = lm_head(h) and p = softmax(z/T).

Hooks are attached to whatever module sits in each slot when the context is entered, so enter
``capture`` *inside* a pruned view (a dropped block's stand-in is captured as the identity).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from prunelens.model.arch import Adapter
from prunelens.model.views import Modification, view_of


def first_output(x):
    """A decoder layer's hidden states, whether it returns a tensor or a tuple (older transformers)."""
    return x[0] if isinstance(x, tuple) else x


@contextlib.contextmanager
def capture(adapter: Adapter, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the named activations of the next forward pass(es) into the yielded dict."""
    wanted = set(names)
    store: dict[str, torch.Tensor] = {}
    handles = []
    layers = adapter.layers
    n = len(layers)

    def keep(name: str, t: torch.Tensor) -> None:
        store[name] = t.detach()

    if "resid.0" in wanted:
        handles.append(layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: keep("resid.0", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
    for i in range(n):
        if f"resid.{i + 1}" in wanted:
            handles.append(layers[i].register_forward_hook(
                lambda m, a, out, i=i: keep(f"resid.{i + 1}", first_output(out))))
        if f"mid.{i}" in wanted:
            try:
                norm = adapter.pre_mlp_norm(i)
            except AttributeError:  # a dropped block has no MLP norm: mid = resid before it
                continue
            handles.append(norm.register_forward_pre_hook(
                lambda m, args, i=i: keep(f"mid.{i}", args[0])))
    if "final" in wanted:
        handles.append(adapter.final_norm.register_forward_hook(
            lambda m, a, out: keep("final", first_output(out))))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def resid_names(n_layers: int) -> list[str]:
    return [f"resid.{i}" for i in range(n_layers + 1)]


def final_states(adapter: Adapter, ids: torch.Tensor, modification: Modification | None = None) -> torch.Tensor:
    """Final-norm outputs h of every position of ``ids`` under ``modification`` (dense without one),
    with the LM head skipped: callers make the logits a chunk of positions at a time
    (``metrics.chunked_kl``/``chunked_nll``), so batch × length × vocabulary never exists at once."""
    with view_of(adapter, modification), capture(adapter, ["final"]) as st:
        adapter.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return st["final"]
