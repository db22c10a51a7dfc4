"""Step 1 of a trace: both sides read the prompts once; the residual stream is compared per layer.

Every layer's hidden state is compared over all (non-padding) prompt tokens: cosine and the
parallel/orthogonal split of Δh (``metrics.hidden_metrics``). Per-layer values are kept per batch
in ``LayerAcc`` and averaged at the end.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from prunelens.analyses.trace.forwards import Forward, Prefilled
from prunelens.analyses.trace.lens import logit_lens
from prunelens.analyses.trace.settings import TraceSettings
from prunelens.metrics import hidden_metrics
from prunelens.model.capture import resid_names

# metric name -> per layer index -> one tensor per batch
LayerAcc = defaultdict[str, list[list[torch.Tensor]]]


def layer_accumulator(n_layers: int) -> LayerAcc:
    return defaultdict(lambda: [[] for _ in range(n_layers + 1)])


def prefill_pair(reference: Forward, candidate: Forward, ids: torch.Tensor, mask: torch.Tensor,
                 settings: TraceSettings, layer_acc: LayerAcc) -> tuple[Prefilled, Prefilled]:
    """Prefill both sides, add their per-layer (and logit-lens) comparison to ``layer_acc``; the
    returned states keep only the final hidden state (the rest is freed)."""
    n_layers = reference.n_layers
    ref = reference.prefill(ids, mask, resid_names(n_layers) + ["final"])
    cand = candidate.prefill(ids, mask, resid_names(candidate.n_layers) + ["final"])
    streams = candidate.resid_map or list(range(n_layers + 1))
    valid_tok = mask.bool()
    for li in range(n_layers + 1):
        a, b = ref.states[f"resid.{li}"], cand.states[f"resid.{streams[li]}"]
        for k, v in hidden_metrics(a[valid_tok], b[valid_tok]).items():
            layer_acc[k + "_h"][li].append(v)
    if settings.logit_lens:
        logit_lens(reference, candidate, ref.states, cand.states, settings, layer_acc)
    for side in (ref, cand):
        side.states = {"final": side.states["final"]}
    return ref, cand


def layerwise(layer_acc: LayerAcc, n_layers: int) -> dict[str, list[float]]:
    """Per layer, each metric's mean over every prompt token (hidden) or prompt (lens)."""
    out: dict[str, list[float]] = {"layer": list(range(n_layers + 1))}
    for k, per_layer in layer_acc.items():
        out[k] = torch.stack([torch.cat(v).double().mean() for v in per_layer]).tolist()
    return out
