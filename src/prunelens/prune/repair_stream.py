"""The streamed repair fit, block by block as Wanda's calibration is: one pass of the reference model
records its stream at every span's end (and the keyword arguments each block receives), then each
block of the modified model runs once on the stream as repaired so far (twice where a kept attention
sublayer is itself corrected), so the cost is linear in depth.

A span's map is fitted where its end is reached and applied to the carried stream at once: nothing
kept lies between the source and the end, so the stream there is y + x and becomes y + map(x).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.model.arch import Adapter
from prunelens.model.capture import first_output
from prunelens.model.memory import release_freed_memory
from prunelens.model.placement import is_dispatched, is_offloaded
from prunelens.model.replay import (
    flat,
    forward_batches,
    hooked,
    output_hook,
    point_hook,
    recording_blocks,
    run_block,
    stream_points,
)
from prunelens.model.views import Modification, view_of
from prunelens.prune.repair_fit import RepairSpec, SpanMap, corrected, fit_span, merged_into
from prunelens.prune.repair_spans import Span, mapped_module

Streams = list[torch.Tensor]


def reference_pass(adapter: Adapter, ids: torch.Tensor, batch_size: int, fitted: list[Span]
                   ) -> tuple[dict[int, Streams], list[list[dict[str, Any]]]]:
    """The reference stream at every span's end, per batch (flat float32), and the keyword arguments
    (positions, masks) each block up to the last end receives, for running blocks one at a time."""
    points = sorted({s.end for s in fitted})
    last_block = (max(points) - 1) // 2
    with recording_blocks(adapter, kwargs_of=last_block + 1, inputs_of=()) as calls:
        targets = stream_points(adapter, ids, batch_size, points)
    return {s.end: [t[s.end] for t in targets] for s in fitted}, calls.kwargs


def block_zero_inputs(adapter: Adapter, ids: torch.Tensor, batch_size: int) -> Streams:
    """The stream entering block 0, per batch (the embedding's output; nothing else runs)."""
    with recording_blocks(adapter, kwargs_of=0, inputs_of=(0,), stop_at=0) as calls:
        forward_batches(adapter, ids, batch_size)
    return calls.inputs[0]


@dataclass
class _Capture:
    """What one run of block i reads: the outputs of the sources in it and, for attention's own
    correction, the stream between the sublayers (``mid``)."""

    attn_path: str | None
    mlp_path: str | None
    mid: bool
    got: dict[str, Streams] = field(default_factory=lambda: {"attn": [], "mid": [], "mlp": []})

    def keeper(self, key: str) -> Callable[[Any, torch.Tensor], None]:
        return lambda _, t: self.got[key].append(flat(t))


@dataclass
class StreamedFit:
    """The state of one streamed fit: the maps so far, and the source outputs of spans whose end is
    still ahead (``pending``)."""

    adapter: Adapter
    spec: RepairSpec
    fitted: list[Span]
    refs: dict[int, Streams]
    kwargs: list[list[dict[str, Any]]]
    park: bool
    bar: Any
    maps: list[SpanMap] = field(default_factory=list)
    pending: dict[Span, Streams] = field(default_factory=dict)

    def fit(self, span: Span, xs: Streams, streams: Streams) -> SpanMap:
        """The span's map from its source outputs and the stream at its end (toward the reference)."""
        kind, i = span.source  # type: ignore[misc]
        path, mergeable = mapped_module(self.adapter, kind, i)
        ys = [s - x for s, x in zip(streams, xs, strict=True)]
        m = fit_span(self.spec, span, path, xs, ys, self.refs[span.end])
        if mergeable:
            mod = self.adapter.model.get_submodule(path)
            new = merged_into(mod, m)  # the weight as modified (inside the modification's view)
            # an offloaded weight's replacement waits on the CPU, as the stored one does
            m.weight = new.to("cpu") if is_offloaded(mod) else new
        self.maps.append(m)
        self.bar.set_postfix_str(f"{span.name()} via {path}: stream error {m.stats['stream_error_before']:.4f} -> "
                                 f"{m.stats['stream_error_after']:.4f}")
        return m

    def correct(self, span: Span, hs: Streams) -> Streams:
        """Fit a pending span on the streams ``hs`` at its end, and apply its map to them."""
        m = self.fit(span, self.pending[span], [flat(h) for h in hs])
        return [corrected(h, x, m) for h, x in zip(hs, self.pending.pop(span), strict=True)]

    def run(self, i: int, hs: Streams, cap: _Capture, attn_map: SpanMap | None = None) -> tuple[Streams, _Capture]:
        """Block i on every batch, reading what ``cap`` asks for (a fresh copy of it is returned)."""
        cap = _Capture(cap.attn_path, cap.mlp_path, cap.mid)
        model = self.adapter.model
        with hooked() as handles:
            if attn_map is not None:  # registered first: the capture below sees the mapped output
                handles.append(model.get_submodule(cap.attn_path).register_forward_hook(
                    lambda mod, a, o: attn_map.apply(first_output(o))))
            if cap.attn_path:
                handles.append(output_hook(self.adapter, cap.attn_path, cap.keeper("attn")))
            if cap.mid and attn_map is None:
                handles.append(point_hook(self.adapter, 2 * i + 1, cap.keeper("mid")))
            if cap.mlp_path:
                handles.append(output_hook(self.adapter, cap.mlp_path, cap.keeper("mlp")))
            layer = self.adapter.layers[i]
            return [run_block(layer, h, self.kwargs[i][b], self.park) for b, h in enumerate(hs)], cap

    def block(self, i: int, hs: Streams) -> Streams:
        """Carry the stream through block i, fitting the spans that end in it."""
        ending = [s for s in self.fitted if s.end in (2 * i + 1, 2 * i + 2)]
        # spans whose every cell from the start through the end is dropped: the stream there is the
        # block's input (block i is skipped up to the end), so they are fitted before it runs
        for s in (s for s in ending if s.start <= 2 * i):
            hs = self.correct(s, hs)
        attn_src = next((s for s in self.fitted if s.start == 2 * i + 1), None)  # attention i is the source
        mlp_src = next((s for s in self.fitted if s.start == 2 * i + 2), None)  # MLP i is the source
        own = attn_src is not None and attn_src.end == 2 * i + 1  # attention i's own output is corrected
        cap = _Capture(mapped_module(self.adapter, "attn", i)[0] if attn_src else None,
                       mapped_module(self.adapter, "mlp", i)[0] if mlp_src else None, own)
        out, cap = self.run(i, hs, cap)
        if own:  # fit it on the stream between the sublayers, then run the block again with the map
            # on it, so that the MLP sees the corrected stream
            out, cap = self.run(i, hs, cap, self.fit(attn_src, cap.got["attn"], cap.got["mid"]))  # type: ignore[arg-type]
        if attn_src is not None and attn_src.end > 2 * i + 1:  # MLP i is dropped: x waits for the end
            self.pending[attn_src] = cap.got["attn"]
        if mlp_src is not None:
            self.pending[mlp_src] = cap.got["mlp"]
        for s in (s for s in ending if s.start > 2 * i and s in self.pending):  # ends at this block's output
            out = self.correct(s, out)
        return out


def fit_streamed(adapter: Adapter, modification: Modification | None, spec: RepairSpec, ids: torch.Tensor,
                 batch_size: int, reference: Modification | None, fitted: list[Span], progress: bool
                 ) -> list[SpanMap]:
    """The maps of ``fitted`` spans, in stream order (see the module's docstring)."""
    park = is_dispatched(adapter.model)
    with view_of(adapter, reference):
        refs, kwargs = reference_pass(adapter, ids, batch_size, fitted)
    last_block = (max(s.end for s in fitted) - 1) // 2
    with tqdm(total=last_block + 1, desc=spec.label(), unit="block", disable=not progress) as bar:
        state = StreamedFit(adapter, spec, fitted, refs, kwargs, park, bar)
        with view_of(adapter, modification):
            hs = block_zero_inputs(adapter, ids, batch_size)
            if park:
                hs = [h.to("cpu") for h in hs]
            for i in range(last_block + 1):
                hs = state.block(i, hs)
                release_freed_memory()
                bar.update(1)
    return state.maps
