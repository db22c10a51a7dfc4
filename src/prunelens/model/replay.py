"""Block replay: record what each decoder block receives in a forward pass, run one block again on
recorded inputs, and read the residual stream at chosen points, stopping the pass as soon as the
last wanted point is reached.

Weight methods calibrate block by block on recorded inputs, repairs run the modified model block by
block toward the reference stream, the counterfactual replaces one layer and runs the rest from its
recorded inputs, and the ReplaceMe check reads a span's streams: all four use this one pipeline.

Residual points (as ``repair`` numbers them): point 2i is the stream before block i (2L after the
last block), point 2i+1 the stream between block i's attention and its MLP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prunelens.model.arch import Adapter
from prunelens.model.capture import first_output
from prunelens.model.placement import execution_device

Keep = Callable[[Any, torch.Tensor], None]


class Stop(Exception):
    """Raised by a hook to end a forward pass early: everything wanted has been recorded."""


@contextlib.contextmanager
def hooked(handles: Sequence[RemovableHandle] = ()) -> Iterator[list[RemovableHandle]]:
    """Hook handles (the given ones and any appended inside) removed on exit, whatever happens."""
    live = list(handles)
    try:
        yield live
    finally:
        for h in live:
            h.remove()


def forward_batches(adapter: Adapter, ids: torch.Tensor, batch_size: int,
                    before: Callable[[], None] | None = None, after: Callable[[], None] | None = None) -> None:
    """The model on ``ids`` in batches (no KV cache), each pass ending where a hook raises ``Stop``;
    ``before``/``after`` run around each batch (to start and keep a batch's records)."""
    for b0 in range(0, len(ids), batch_size):
        if before is not None:
            before()
        with contextlib.suppress(Stop):
            adapter.model(input_ids=ids[b0:b0 + batch_size].to(execution_device(adapter.model)), use_cache=False)
        if after is not None:
            after()


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden state a decoder block is called with, positional or by keyword."""
    return args[0] if args else kwargs["hidden_states"]


def block_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The other keyword arguments of a block's call (position embeddings, masks, ...)."""
    return {k: v for k, v in kwargs.items() if k != "hidden_states"}


@dataclass
class BlockCalls:
    """Per block, the hidden states and keyword arguments of each recorded call (one per batch)."""

    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)


@contextlib.contextmanager
def recording_blocks(adapter: Adapter, kwargs_of: int | None = None, inputs_of: Collection[int] = (0,),
                     stop_at: int | None = None) -> Iterator[BlockCalls]:
    """Record, during the forward passes run inside, the keyword arguments of blocks ``0..kwargs_of-1``
    (all by default) and the hidden states entering the blocks ``inputs_of``; with ``stop_at``, the
    pass ends (``Stop``) as block ``stop_at`` is entered, after its records."""
    n = adapter.n_layers
    n_kw = n if kwargs_of is None else kwargs_of
    calls = BlockCalls([[] for _ in range(n)], [[] for _ in range(n)])

    def pre(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if i in inputs_of:
                calls.inputs[i].append(block_input(args, kw))
            if i < n_kw:
                calls.kwargs[i].append(block_kwargs(kw))
            if i == stop_at:
                raise Stop
        return hook

    wanted = sorted({*range(n_kw), *inputs_of, *(() if stop_at is None else (stop_at,))})
    with hooked([adapter.layers[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in wanted]):
        yield calls


def point_hook(adapter: Adapter, p: int, keep: Keep, stop: bool = False) -> RemovableHandle:
    """Register a hook handing the stream at residual point ``p`` to ``keep(p, tensor)`` (then raising
    ``Stop`` with ``stop``); returns its handle."""
    i = p // 2
    if p == 0:  # the stream entering block 0
        def first(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            keep(p, block_input(args, kw))
            if stop:
                raise Stop
        return adapter.layers[0].register_forward_pre_hook(first, with_kwargs=True)
    if p % 2 == 0:  # the stream before block i = the output of block i-1
        def fwd(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            keep(p, first_output(out))
            if stop:
                raise Stop
        return adapter.layers[i - 1].register_forward_hook(fwd)

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        keep(p, args[0])
        if stop:
            raise Stop
    return adapter.pre_mlp_norm(i).register_forward_pre_hook(pre)


def output_hook(adapter: Adapter, path: str, keep: Keep) -> RemovableHandle:
    """Register a hook handing the output of module ``path`` to ``keep(path, tensor)``."""
    return adapter.model.get_submodule(path).register_forward_hook(
        lambda m, a, o: keep(path, first_output(o)))


def flat(t: torch.Tensor) -> torch.Tensor:
    """A stream as float32 rows on the CPU, the form fits read."""
    return t.detach().float().to("cpu").reshape(-1, t.shape[-1])


def stream_points(adapter: Adapter, ids: torch.Tensor, batch_size: int, points: Sequence[int],
                  modules: Sequence[str] = (), convert: Callable[[torch.Tensor], torch.Tensor] = flat
                  ) -> list[dict[Any, torch.Tensor]]:
    """Per batch of ``ids``, the stream at residual ``points`` and the outputs of ``modules`` (by point
    and path, each through ``convert``: flat float32 on the CPU by default); each pass stops at the
    last point."""
    out: list[dict[Any, torch.Tensor]] = []
    cur: dict[Any, torch.Tensor] = {}

    def keep(key: Any, t: torch.Tensor) -> None:
        cur[key] = convert(t)

    def start() -> None:
        nonlocal cur
        cur = {}

    last = max(points)
    with torch.no_grad(), hooked([point_hook(adapter, p, keep, p == last) for p in points]) as handles:
        handles += [output_hook(adapter, path, keep) for path in modules]
        forward_batches(adapter, ids, batch_size, before=start, after=lambda: out.append(cur))
    return out


def run_block(layer: nn.Module, h: torch.Tensor, kw: dict[str, Any], park: bool = False) -> torch.Tensor:
    """One block on one recorded input; with ``park`` its output returns to the CPU (a device map's
    hook moved the input to the block's execution device)."""
    out = first_output(layer(h, **kw))
    return out.to("cpu") if park else out


def run_from(adapter: Adapter, start: int, x: torch.Tensor, kwargs: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Blocks ``start`` to the last on ``x``, each with its recorded keyword arguments."""
    for j in range(start, adapter.n_layers):
        x = run_block(adapter.layers[j], x, kwargs[j])
    return x
