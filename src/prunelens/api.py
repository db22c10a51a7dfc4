"""The Python API the CLI is a thin shell over: load → choose drops → analyse → write a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .data import calibration_ids
from .models import LoadedModel
from .prune.drop import DropPlan, DropRequest, parse_drop
from .prune.importance import select_drop as _select_drop


def select_drop(
    lm: LoadedModel,
    *specs: str | DropRequest,
    metric: str = "cosine",
    iterative: bool = False,
    calib: str | Path | None = None,
    calib_samples: int = 8,
    calib_len: int = 128,
    seed: int = 0,
    batch_size: int = 4,
) -> DropPlan:
    """Build a drop plan from specs such as ``"attn:4"`` (4 least important) or ``"mlp@3,7"``.

    Counts are ranked by ``metric`` ('cosine' = LLM-Drop / ShortGPT block influence, 'angular' =
    Gromov et al.) on calibration text: ``calib`` (a .txt/.jsonl file) or the built-in sample.
    """
    requests = [parse_drop(s) if isinstance(s, str) else s for s in specs]
    needs_calib = any(r.count for r in requests)
    ids = calibration_ids(lm.tokenizer, calib, calib_samples, calib_len, seed) if needs_calib else None
    plan = _select_drop(lm, requests, metric, iterative, ids, batch_size)
    if ids is not None:
        plan.info["calibration"] = {"source": str(calib) if calib else "built-in",
                                    "samples": calib_samples, "seq_len": calib_len, "seed": seed}
    return plan


def parse_drops(specs: Sequence[str]) -> list[DropRequest]:
    return [parse_drop(s) for s in specs]
