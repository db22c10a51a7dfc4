"""Choosing which layers to drop: importance scores measured on calibration text.

- ``cosine`` (LLM-Drop, He et al.; ShortGPT's Block Influence, Men et al.): a unit's score is
  1 − cos(its input, its output) on the residual stream, averaged over all calibration tokens.
  For a sublayer the output is input + sublayer(input); for a block it is the block's output.
  Low score = the unit barely changes the stream = dropped first.
- ``angular`` (Gromov et al.): for n consecutive blocks starting at l, arccos(cos(h_l, h_{l+n}))/π
  at the last token; the window with the smallest distance is dropped whole (blocks only).

- ``kl`` (prunelens): greedy on the quantity that decides generation — the mean next-token
  KL(p_pruned ‖ p_dense) over all calibration tokens at the output. Each step tries dropping every
  remaining unit on top of the units already chosen and keeps the one with the smallest KL.
  Costs (units × drops) forwards instead of one, and is always iterative.
- ``ppl`` (SLEB, Song et al. 2024, for blocks; BlockPruner, Zhong et al. 2024, for sublayers): the
  same greedy loop scored by the perplexity of the calibration text itself. It needs no dense
  reference, so it also rewards a removal that happens to fit the calibration text better than
  the dense model did — the difference from ``kl``, which only asks for agreement with the dense model.

One-shot scores once and drops the n lowest; iterative re-scores after every drop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.metrics import chunked_kl, chunked_nll, cosine, rows_per_chunk
from prunelens.model.capture import capture, final_states, resid_names
from prunelens.model.loading import LoadedModel
from prunelens.prune.drop import DropPlan, DropRequest, pruned_view

METRICS = ("cosine", "angular", "kl", "ppl")
GREEDY = ("kl", "ppl")  # metrics that re-score every remaining unit after each removal


def _stream_states(lm: LoadedModel, plan: DropPlan, calib: torch.Tensor, batch_size: int):
    """Yield the captured residual stream for each calibration batch under ``plan``."""
    n = lm.adapter.n_layers
    names = resid_names(n) + [f"mid.{i}" for i in range(n)]
    for b0 in range(0, len(calib), batch_size):
        ids = calib[b0:b0 + batch_size].to(lm.device)
        with pruned_view(lm.adapter, plan), capture(lm.adapter, names) as st:
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        yield st


@torch.inference_mode()
def unit_scores(lm: LoadedModel, plan: DropPlan, calib: torch.Tensor, kind: str,
                batch_size: int = 4) -> dict[int, float]:
    """1 − cos(in, out) of every attention sublayer, MLP sublayer or block, under ``plan``."""
    n = lm.adapter.n_layers
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    for st in _stream_states(lm, plan, calib, batch_size):
        for i in range(n):
            pre, post = st[f"resid.{i}"], st[f"resid.{i + 1}"]
            mid = st.get(f"mid.{i}", pre)
            a, b = {"attn": (pre, mid), "mlp": (mid, post), "block": (pre, post)}[kind]
            sums[i] += float((1.0 - cosine(a, b)).sum())  # a host float: the stream may be on a GPU
        count += pre.shape[0] * pre.shape[1]
    return {i: float(sums[i] / count) for i in range(n)}


@torch.inference_mode()
def angular_scores(lm: LoadedModel, plan: DropPlan, calib: torch.Tensor, width: int,
                   batch_size: int = 4) -> dict[int, float]:
    """Angular distance between h_l and h_{l+width} at the last token, per start l."""
    n = lm.adapter.n_layers
    starts = range(0, n - width + 1)
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    for st in _stream_states(lm, plan, calib, batch_size):
        for s in starts:
            c = cosine(st[f"resid.{s}"][:, -1], st[f"resid.{s + width}"][:, -1]).clamp(-1, 1)
            sums[s] += float((torch.arccos(c) / math.pi).sum())
        count += st["resid.0"].shape[0]
    return {s: float(sums[s] / count) for s in starts}


@torch.inference_mode()
def greedy_scores(lm: LoadedModel, plan: DropPlan, calib: torch.Tensor, kind: str, candidates: Sequence[int],
                  metric: str = "kl", batch_size: int = 4) -> dict[int, float]:
    """Per candidate i, the calibration loss when ``plan`` plus unit i of ``kind`` is dropped:
    ``kl`` = mean next-token KL(p_pruned ‖ p_dense), T = 1, over every token; ``ppl`` = perplexity
    of the calibration text (next-token NLL, exponentiated). Dense final hidden states are held one
    batch at a time (batches outside, candidates inside), so memory does not grow with the text,
    and logits are made a chunk of positions at a time, so it does not grow with the vocabulary."""
    if metric not in GREEDY:
        raise PrunelensError(f"'{metric}' is not a greedy metric ({', '.join(GREEDY)})")
    sums = dict.fromkeys(candidates, 0.0)
    count = 0
    rows = rows_per_chunk(int(lm.model.config.get_text_config().vocab_size))

    def head(h: torch.Tensor) -> torch.Tensor:
        return lm.adapter.head_logits(h).float()

    for b0 in range(0, len(calib), batch_size):
        ids = calib[b0:b0 + batch_size].to(lm.device)
        h_d = final_states(lm.adapter, ids) if metric == "kl" else None  # the dense model
        for i in candidates:
            h_p = final_states(lm.adapter, ids, plan.with_unit(kind, i))
            if h_d is not None:
                sums[i] += chunked_kl(head, h_p, h_d, rows)
            else:
                sums[i] += chunked_nll(head, h_p[:, :-1], ids[:, 1:], rows)
        count += ids.shape[0] * (ids.shape[1] - (metric == "ppl"))
    if metric == "ppl":
        return {i: math.exp(v / count) for i, v in sums.items()}
    return {i: v / count for i, v in sums.items()}


def kl_scores(lm: LoadedModel, plan: DropPlan, calib: torch.Tensor, kind: str, candidates: Sequence[int],
              batch_size: int = 4) -> dict[int, float]:
    """Mean next-token KL(p_pruned ‖ p_dense) per candidate (``greedy_scores`` with ``kl``)."""
    return greedy_scores(lm, plan, calib, kind, candidates, "kl", batch_size)


def _candidates(plan: DropPlan, kind: str, n: int) -> list[int]:
    taken = set(plan.block) | (set(getattr(plan, kind)) if kind != "block" else set())
    return [i for i in range(n) if i not in taken]


def select_drop(
    lm: LoadedModel,
    requests: Sequence[DropRequest],
    metric: str = "cosine",
    iterative: bool = False,
    calib: torch.Tensor | None = None,
    batch_size: int = 4,
) -> DropPlan:
    """Turn drop requests into a plan, scoring importance on ``calib`` where counts are given."""
    if metric not in METRICS:
        raise PrunelensError(f"unknown importance metric '{metric}'; choose from {', '.join(METRICS)}")
    n = lm.adapter.n_layers
    plan = DropPlan()
    info: dict[str, Any] = {"metric": metric, "iterative": iterative, "requests": [str(r) for r in requests]}
    scores_log: dict[str, Any] = {}
    for req in requests:
        if req.layers is not None:
            for i in req.layers:
                plan = plan.with_unit(req.kind, i)
            plan.validate(n)
            continue
        assert req.count is not None
        req.check(n)
        if req.count == 0:
            continue
        if calib is None:
            raise PrunelensError(f"'{req}' needs calibration text to rank layers")
        chosen = req.metric or metric  # sleb:N is ranked by ppl whatever the calibration says
        ranked = _RANKERS.get(chosen, _rank_by_scores)
        plan, scores_log[f"{req}"] = ranked(lm, plan, req, chosen, iterative, calib, batch_size)
    info["scores"] = scores_log
    return DropPlan(plan.attn, plan.mlp, plan.block, info=info)


def _rank_angular(lm: LoadedModel, plan: DropPlan, req: DropRequest, metric: str, iterative: bool,
                  calib: torch.Tensor, batch_size: int) -> tuple[DropPlan, dict[str, Any]]:
    """The window of ``req.count`` consecutive blocks whose ends are closest in angle (Gromov et al.)."""
    if req.kind != "block":
        raise PrunelensError("the angular metric ranks windows of whole blocks; use block:N")
    sc = angular_scores(lm, plan, calib, req.count, batch_size)  # type: ignore[arg-type]
    start = min(sc, key=sc.__getitem__)
    for i in range(start, start + req.count):  # type: ignore[operator]
        plan = plan.with_unit("block", i)
    return plan, {"window_start": start, "scores": sc}


def _rank_greedy(lm: LoadedModel, plan: DropPlan, req: DropRequest, metric: str, iterative: bool,
                 calib: torch.Tensor, batch_size: int) -> tuple[DropPlan, dict[str, Any]]:
    """Units removed one at a time, each time the one whose removal hurts ``metric`` least."""
    n = lm.adapter.n_layers
    order: list[int] = []
    first: dict[int, float] | None = None
    for _ in range(req.count):  # type: ignore[arg-type]
        cand = _candidates(plan, req.kind, n)
        cand = cand[1:-1] if req.keep_ends else cand
        if not cand:
            raise PrunelensError(f"not enough {req.kind} units left to drop {req.count}")
        sc = greedy_scores(lm, plan, calib, req.kind, cand, metric, batch_size)
        first = first or sc
        pick = min(cand, key=sc.__getitem__)
        plan = plan.with_unit(req.kind, pick)
        order.append(pick)
    return plan, {"metric": metric, "order": order, "scores": first}


def _rank_by_scores(lm: LoadedModel, plan: DropPlan, req: DropRequest, metric: str, iterative: bool,
                    calib: torch.Tensor, batch_size: int) -> tuple[DropPlan, dict[str, Any]]:
    """The least important units by one scoring pass (or, ``iterative``, one unit per pass)."""
    n = lm.adapter.n_layers
    order: list[int] = []
    first: dict[int, float] | None = None
    for _ in range(req.count if iterative else 1):  # type: ignore[arg-type]
        sc = unit_scores(lm, plan, calib, req.kind, batch_size)
        first = first or sc
        cand = sorted(_candidates(plan, req.kind, n), key=sc.__getitem__)
        if len(cand) < (1 if iterative else req.count):  # type: ignore[operator]
            raise PrunelensError(f"not enough {req.kind} units left to drop {req.count}")
        picks = cand[:1] if iterative else cand[:req.count]
        for i in picks:
            plan = plan.with_unit(req.kind, i)
            order.append(i)
    return plan, {"metric": metric, "order": order, "scores": first}


_RANKERS = {"angular": _rank_angular, **{m: _rank_greedy for m in GREEDY}}
