"""Step 1b of a trace: the logit lens, z_l = lm_head(final_norm(h_l)) at the last prompt token.

Each side's layers go through its own LM head in a few batched matmuls (about 64 rows at a time),
and the two distributions are compared with the light set of logit metrics.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from prunelens.analyses.trace.forwards import Forward
from prunelens.analyses.trace.settings import TraceSettings
from prunelens.metrics import logit_metrics


def logit_lens(reference: Forward, candidate: Forward, ref_states: dict[str, torch.Tensor],
               cand_states: dict[str, torch.Tensor], settings: TraceSettings,
               layer_acc: defaultdict[str, list[list[torch.Tensor]]]) -> None:
    """Add ``lens_<metric>`` per layer to ``layer_acc`` (each a (batch,) tensor)."""
    n_layers = reference.n_layers
    streams = candidate.resid_map or list(range(n_layers + 1))
    batch = ref_states["resid.0"].shape[0]
    per_chunk = max(1, 64 // batch)
    for l0 in range(0, n_layers + 1, per_chunk):
        ls = range(l0, min(l0 + per_chunk, n_layers + 1))
        lens_d = torch.stack([ref_states[f"resid.{li}"][:, -1] for li in ls])
        lens_p = torch.stack([cand_states[f"resid.{streams[li]}"][:, -1] for li in ls])
        lens = logit_metrics(reference.lens(lens_d).float(), candidate.lens(lens_p).float(),
                             settings.temperatures, settings.topk, light=True)
        for k, v in lens.items():  # v: (layers in chunk, batch)
            for j, li in enumerate(ls):
                layer_acc["lens_" + k][li].append(v[j])
