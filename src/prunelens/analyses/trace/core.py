"""A trace: a reference forward and a candidate forward compared through h → z → p, per layer on
the prompts and per decoding step.

Per batch of prompts: prefill both sides once (``prefill``: per-layer comparison and logit lens),
decode both in lock-step with their KV caches (``decode``), then gather the batch's numbers
(``aggregate``). ``analyze`` is the recipe case: the dense model against the same model seen through
a modification's view (modules swapped, no weight copied).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.analyses.trace.aggregate import (
    add_steps,
    comparison,
    prompt_records,
    step_accumulator,
    stepwise,
    taylor_per_mode,
)
from prunelens.analyses.trace.decode import decode_lockstep
from prunelens.analyses.trace.forwards import Forward, ModelForward
from prunelens.analyses.trace.prefill import layer_accumulator, layerwise, prefill_pair
from prunelens.analyses.trace.sequential import (
    DEFAULT_TOPK,
    candidate_pass,
    check_reference,
    load_reference,
    reference_of,
    rescore,
    save_reference,
    sequential_result,
)
from prunelens.analyses.trace.settings import CONVENTIONS, SCHEMA, TraceSettings
from prunelens.analyses.trace.summary import summarize
from prunelens.errors import PrunelensError
from prunelens.model.generation import decode_attention
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_weights
from prunelens.model.tokens import encode_prompts, eos_ids, left_pad, pad_id
from prunelens.model.views import Modification
from prunelens.prune.candidate import Candidate, residual_streams
from prunelens.version import __version__


def analyze(
    lm: LoadedModel,
    plan: Modification,
    prompts: Sequence[str],
    settings: TraceSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare the dense model with ``plan`` (any modification) applied; returns a JSON-ready dict."""
    settings = _checked(settings, prompts)
    plan.validate(lm.adapter.n_layers)
    return _traced(lm, ModelForward(lm), ModelForward(lm, plan), plan.to_dict(), prompts, settings, progress)


def compare_models(
    base: LoadedModel,
    candidate: Candidate,
    prompts: Sequence[str],
    settings: TraceSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare ``base`` with a separately loaded candidate model (any tool's output, both in memory):
    the same trace as ``analyze``, with the candidate's layer correspondence for the h-space metrics."""
    settings = _checked(settings, prompts)
    if candidate.layer_map is None:
        raise PrunelensError("a trace needs the candidate's layer correspondence (load it with align=True)")
    cand = ModelForward(candidate.lm, resid_map=candidate.layer_map.resid_map())
    return _traced(base, ModelForward(base), cand, candidate.to_dict(), prompts, settings, progress, ref_rows=1)


def _checked(settings: TraceSettings | None, prompts: Sequence[str]) -> TraceSettings:
    settings = settings or TraceSettings()
    settings.validate()
    if not prompts:
        raise PrunelensError("no prompts to analyse")
    return settings


def _traced(lm: LoadedModel, reference: Forward, candidate: Forward, pruning: dict[str, Any],
            prompts: Sequence[str], settings: TraceSettings, progress: bool, ref_rows: int = 2) -> dict[str, Any]:
    t0 = time.perf_counter()
    # Seeded inside a forked RNG state: the caller's global torch random state is left untouched.
    with _seeded(settings.seed, lm.device), decode_attention(lm.device):
        measured = trace(lm, reference, candidate, prompts, settings, progress, desc=f"analyze {pruning['label']}",
                         ref_rows=ref_rows)
    return _result(lm.info, pruning, settings, len(prompts), measured, t0)


def _result(info: dict[str, Any], pruning: dict[str, Any], settings: TraceSettings, n_prompts: int,
            measured: dict[str, Any], t0: float) -> dict[str, Any]:
    result = {
        "schema": SCHEMA,
        "prunelens_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conventions": CONVENTIONS,
        "model": info,
        "pruning": pruning,
        "settings": {**asdict(settings), "temperatures": list(settings.temperatures), "n_prompts": n_prompts},
        **measured,
        "timing": {"analysis_s": time.perf_counter() - t0},
    }
    result["summary"] = summarize(result)
    return result


def compare_sequential(
    load_base: Callable[[], LoadedModel],
    load_cand: Callable[[LoadedModel, list[torch.Tensor] | None], Candidate],
    prompts: Sequence[str],
    settings: TraceSettings | None = None,
    *,
    k: int = DEFAULT_TOPK,
    reference_cache: str | Path | None = None,
    calibration: Callable[[LoadedModel], torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The candidate against its base with one model in memory at a time (``sequential``): the base's
    reference (read from ``reference_cache`` when it holds this base, prompts and settings, else made
    and saved there), the base freed, the candidate run and freed, the base back to re-score the
    candidate's free-running tokens. ``load_cand(base, base_states)`` gets the freed base (tokenizer
    and info) and, given ``calibration`` (the base → token windows), the base's residual streams on
    those windows, to infer a shallower candidate's layer correspondence."""
    settings = _checked(settings, prompts)
    t0, cache = time.perf_counter(), Path(reference_cache) if reference_cache else None
    base = load_base()
    with _seeded(settings.seed, base.device), decode_attention(base.device):
        if cache is not None and cache.is_file():
            ref = load_reference(cache)
            check_reference(ref, base, prompts, settings, k)
        else:
            ref = reference_of(base, prompts, settings, k, progress)
            if cache is not None:
                save_reference(ref, cache)
        states = residual_streams(base, calibration(base)) if calibration is not None else None
        info = dict(base.info)
        release_weights(base)
        cand = load_cand(base, states)
        del states
        layer_acc = layer_accumulator(int(info["n_layers"]))
        stats, run = candidate_pass(cand, ref, settings, layer_acc, progress)
        release_weights(cand.lm)
        base = load_base()
        rescored = rescore(base, ref, run, settings, progress)
    measured = sequential_result(base, ref, (layer_acc, stats, rescored, run))
    return _result(info, {**cand.to_dict(), "sequential": True}, settings, len(prompts), measured, t0)


def _seeded(seed: int, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """``torch.manual_seed(seed)`` for the block only (CPU and the model's GPU), restored on exit."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    torch.manual_seed(seed)
    return stack


@torch.inference_mode()
def trace(lm: LoadedModel, reference: Forward, candidate: Forward, prompts: Sequence[str], settings: TraceSettings,
          progress: bool = True, desc: str = "trace", ref_rows: int = 2) -> dict[str, Any]:
    """The measured part of a trace result (layerwise, stepwise, taylor, per_prompt).

    ``lm`` gives the tokenizer (prompts, EOS, padding, greedy texts) and the device of the inputs;
    both forwards read the same token ids, so they must share that tokenizer. ``ref_rows``: see
    ``decode.decode_lockstep``.
    """
    n_layers, N, dev = reference.n_layers, settings.max_new_tokens, lm.device
    pad = pad_id(lm)
    eos = torch.tensor(sorted(eos_ids(lm)) or [-1], device=dev)
    encoded = encode_prompts(lm.tokenizer, prompts, settings.chat_template)
    layer_acc, step_acc = layer_accumulator(n_layers), step_accumulator()
    per_prompt: list[dict[str, Any]] = []
    n_batches = math.ceil(len(encoded) / settings.batch_size)
    bar = tqdm(total=n_batches * N, desc=desc, unit="step", disable=not progress)
    for b0 in range(0, len(encoded), settings.batch_size):
        batch = encoded[b0:b0 + settings.batch_size]
        ids, mask = left_pad(batch, pad, dev)
        ref, cand = prefill_pair(reference, candidate, ids, mask, settings, layer_acc)
        decoded = decode_lockstep(reference, candidate, ref, cand, mask, eos, settings, bar, ref_rows)
        add_steps(step_acc, decoded, len(batch), N)
        per_prompt += prompt_records(decoded, prompts[b0:b0 + len(batch)], [len(b) for b in batch],
                                     lm.tokenizer, eos)
    bar.close()
    return {
        "layerwise": layerwise(layer_acc, n_layers),
        "stepwise": stepwise(step_acc, N),
        "taylor": taylor_per_mode(step_acc, settings.temperatures),
        "comparison": comparison(step_acc, settings.temperatures[0]),
        "per_prompt": per_prompt,
    }
