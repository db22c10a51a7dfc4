"""Does a fitted repair help? Its maps are fitted to the stream at each span's end, which need not
bring the next-token distribution closer to the dense model's: on SmolLM2 ``block:4+repair:linear``
raises the teacher-forced KL on chat prompts threefold (docs/repair.md). So each repair built by a
recipe is measured on calibration windows it was not fitted on, as the mean next-token
KL(dense ‖ modified) without and with its maps, and a repair that raises it is reported (or refused
with ``repair:MODE:strict``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.metrics import chunked_kl, rows_per_chunk
from prunelens.model.arch import Adapter
from prunelens.model.capture import final_states
from prunelens.model.placement import execution_device
from prunelens.prune.base import Modification, combine


@torch.no_grad()
def mean_next_token_kl(adapter: Adapter, ids: torch.Tensor, candidates: list[Modification | None],
                       batch_size: int = 4) -> list[float]:
    """Mean KL(dense ‖ candidate) of the next-token distribution over every position of ``ids``, for
    each candidate (one dense pass per batch, shared)."""
    sums, n = [0.0] * len(candidates), 0
    device = execution_device(adapter.model)
    rows = rows_per_chunk(int(adapter.model.config.get_text_config().vocab_size))

    def head(h: torch.Tensor) -> torch.Tensor:
        return adapter.head_logits(h).float()

    for b0 in range(0, len(ids), batch_size):
        batch = ids[b0:b0 + batch_size].to(device)
        dense = final_states(adapter, batch)
        for k, mod in enumerate(candidates):
            sums[k] += chunked_kl(head, dense, final_states(adapter, batch, mod), rows)
        n += batch.numel()
    return [s / n for s in sums]


def held_out_check(adapter: Adapter, modification: Modification, patch: Modification, held_out: torch.Tensor,
                   batch_size: int = 4) -> dict[str, Any]:
    """The repair's effect on windows it was not fitted on: the record ``to_dict`` shows."""
    without, with_ = mean_next_token_kl(adapter, held_out, [modification, combine([modification, patch])],
                                        batch_size)
    return {"held_out_windows": len(held_out), "held_out_tokens": int(held_out.numel()),
            "kl_without_repair": without, "kl_with_repair": with_, "raises_kl": with_ > without}


def judge(label: str, check: dict[str, Any], strict: bool) -> None:
    """Say so (stderr, always) when the repair raised the held-out KL; refuse it when ``strict``."""
    if not check.get("raises_kl"):
        return
    what = (f"{label} raises the next-token KL to the dense model on held-out calibration windows "
            f"({check['kl_without_repair']:.4g} without it, {check['kl_with_repair']:.4g} with it)")
    if strict:
        raise PrunelensError(f"{what}: refused (:strict); leave the repair out or try repair:scale")
    print(f"prunelens: warning: {what}: it makes this model worse here; leave it out, try repair:scale, "
          f"or add :strict to refuse such a repair", file=sys.stderr)


__all__ = ["held_out_check", "judge", "mean_next_token_kl"]
