"""Step 2 of a trace: both sides decode with their KV caches in lock-step.

Rows (2i, 2i+1) are (teacher-forced, free-running) of prompt i: the candidate's teacher-forced row
is fed the reference's greedy tokens, its free-running row its own. The reference runs both rows
too (the same tokens), so both sides see the same batch shapes: CPU kernels round by batch shape,
and this keeps an empty modification exactly equal to the reference (KL = 0, cos = 1). Per-step
metrics stay on the device until the batch ends (one copy, no synchronisation per metric and step).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelens.analyses.trace.forwards import Forward, Prefilled
from prunelens.analyses.trace.settings import TraceSettings
from prunelens.divergence import step_comparison
from prunelens.metrics import hidden_metrics, logit_metrics
from prunelens.model.memory import release_freed_memory

MODES = ("teacher_forced", "free_running")


def metric_chunk_rows(z: torch.Tensor) -> int:
    """Rows per vocabulary-wide metric pass: one on the CPU (its float64 temporaries stay in cache,
    measured fastest), on an accelerator as many as keep each temporary near 2^23 numbers, since
    there a pass per row is one kernel launch per op per row and launches dominate."""
    return 1 if z.device.type == "cpu" else max(1, (1 << 23) // max(1, z.shape[-1]))


def step_metrics(hd: torch.Tensor, hp: torch.Tensor, zd: torch.Tensor, zp: torch.Tensor,
                 settings: TraceSettings) -> dict[str, torch.Tensor]:
    m = {f"{k}_h": v for k, v in hidden_metrics(hd, hp).items()}
    m.update(logit_metrics(zd, zp, settings.temperatures, settings.topk, chunk_rows=metric_chunk_rows(zd)))
    m.update(step_comparison(zd, zp, temperature=settings.temperatures[0]))
    return m


@dataclass
class Decoded:
    """One batch's decoding: per mode, metric -> one (batch,) tensor per step done (plus ``valid``),
    and each side's greedy tokens per step."""

    rows: dict[str, defaultdict[str, list[torch.Tensor]]] = field(
        default_factory=lambda: {m: defaultdict(list) for m in MODES})
    toks_d: list[torch.Tensor] = field(default_factory=list)
    toks_p: list[torch.Tensor] = field(default_factory=list)

    def record(self, m: dict[str, torch.Tensor], zd2: torch.Tensor, zp2: torch.Tensor, ended_d: torch.Tensor,
               ended_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep one step's metrics and greedy tokens; returns (reference token, candidate free-running token)."""
        tok_d, tok_p = zd2[0::2].argmax(-1), zp2[1::2].argmax(-1)
        valid_tf, valid_fr = ~ended_d, ~(ended_d | ended_p)
        for mode, sl, valid in (("teacher_forced", slice(0, None, 2), valid_tf),
                                ("free_running", slice(1, None, 2), valid_fr)):
            for k, v in m.items():
                self.rows[mode][k].append(v[sl])
            self.rows[mode]["valid"].append(valid)
        self.rows["free_running"]["token_agree"].append((tok_d == tok_p).double())
        self.toks_d.append(tok_d)
        self.toks_p.append(tok_p)
        return tok_d, tok_p


def _repeat_rows(ref: Prefilled, cand: Prefilled, ref_rows: int) -> tuple[torch.Tensor, ...]:
    """Each prompt's row twice (teacher-forced, free-running), caches included; the reference's
    only when it runs both rows (``ref_rows`` = 2)."""
    for c in (ref.cache, cand.cache) if ref_rows == 2 else (cand.cache,):
        c.batch_repeat_interleave(2)
    hd, hp = ref.states["final"][:, -1], cand.states["final"][:, -1]
    return (ref.z.repeat_interleave(2, 0), cand.z.repeat_interleave(2, 0),
            hd.repeat_interleave(2, 0), hp.repeat_interleave(2, 0))


def decode_lockstep(reference: Forward, candidate: Forward, ref: Prefilled, cand: Prefilled, mask: torch.Tensor,
                    eos: torch.Tensor, settings: TraceSettings, bar: Any, ref_rows: int = 2) -> Decoded:
    """Decode up to ``settings.max_new_tokens`` steps, or until every prompt has ended on both sides.

    ``ref_rows`` = 1 runs the reference once per prompt (its two rows hold the same tokens): a
    quarter fewer forward rows, for a candidate that is a separate model, where bit-equal batch
    shapes buy nothing (an empty modification of the same model needs 2 to give KL = 0 exactly)."""
    dev, B, N = mask.device, mask.shape[0], settings.max_new_tokens
    zd2, zp2, hd2, hp2 = _repeat_rows(ref, cand, ref_rows)
    mask2, mask_d = mask.repeat_interleave(2, 0), mask
    out = Decoded()
    ended_d = torch.zeros(B, dtype=torch.bool, device=dev)
    ended_p = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(1, N + 1):
        tok_d, tok_p = out.record(step_metrics(hd2, hp2, zd2, zp2, settings), zd2, zp2, ended_d, ended_p)
        ended_d |= torch.isin(tok_d, eos)
        ended_p |= torch.isin(tok_p, eos)
        bar.update(1)
        if t == N or bool((ended_d & ended_p).all()):
            bar.update(N - t)
            break
        feed_p = torch.stack([tok_d, tok_p], 1).reshape(-1, 1)
        mask2 = torch.cat([mask2, mask2.new_ones(2 * B, 1)], 1)
        if ref_rows == 2:
            zd2, hd2 = reference.step(feed_p[0::2].repeat_interleave(2, 0), mask2, ref.cache)
        else:
            mask_d = torch.cat([mask_d, mask_d.new_ones(B, 1)], 1)
            zd, hd = reference.step(tok_d[:, None], mask_d, ref.cache)
            zd2, hd2 = zd.repeat_interleave(2, 0), hd.repeat_interleave(2, 0)
        zp2, hp2 = candidate.step(feed_p, mask2, cand.cache)
        if dev.type == "cpu":  # the KV cache grows on the CPU heap only there
            release_freed_memory()
    return out
