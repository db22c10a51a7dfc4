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
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.analyses.trace.aggregate import (
    add_steps,
    prompt_records,
    step_accumulator,
    stepwise,
    taylor_per_mode,
)
from prunelens.analyses.trace.decode import decode_lockstep
from prunelens.analyses.trace.forwards import Forward, ModelForward
from prunelens.analyses.trace.prefill import layer_accumulator, layerwise, prefill_pair
from prunelens.analyses.trace.settings import CONVENTIONS, SCHEMA, TraceSettings
from prunelens.analyses.trace.summary import summarize
from prunelens.errors import PrunelensError
from prunelens.model.generation import decode_attention
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import encode_prompts, eos_ids, left_pad, pad_id
from prunelens.model.views import Modification
from prunelens.version import __version__


def analyze(
    lm: LoadedModel,
    plan: Modification,
    prompts: Sequence[str],
    settings: TraceSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare the dense model with ``plan`` (any modification) applied; returns a JSON-ready dict."""
    settings = settings or TraceSettings()
    settings.validate()
    if not prompts:
        raise PrunelensError("no prompts to analyse")
    plan.validate(lm.adapter.n_layers)
    t0 = time.perf_counter()
    # Seeded inside a forked RNG state: the caller's global torch random state is left untouched.
    with _seeded(settings.seed, lm.device), decode_attention(lm.device):
        measured = trace(lm, ModelForward(lm), ModelForward(lm, plan), prompts, settings, progress,
                         desc=f"analyze {plan.label()}")
    result = {
        "schema": SCHEMA,
        "prunelens_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conventions": CONVENTIONS,
        "model": lm.info,
        "pruning": plan.to_dict(),
        "settings": {**asdict(settings), "temperatures": list(settings.temperatures),
                     "n_prompts": len(prompts)},
        **measured,
        "timing": {"analysis_s": time.perf_counter() - t0},
    }
    result["summary"] = summarize(result)
    return result


def _seeded(seed: int, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """``torch.manual_seed(seed)`` for the block only (CPU and the model's GPU), restored on exit."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    torch.manual_seed(seed)
    return stack


@torch.inference_mode()
def trace(lm: LoadedModel, reference: Forward, candidate: Forward, prompts: Sequence[str], settings: TraceSettings,
          progress: bool = True, desc: str = "trace") -> dict[str, Any]:
    """The measured part of a trace result (layerwise, stepwise, taylor, per_prompt).

    ``lm`` gives the tokenizer (prompts, EOS, padding, greedy texts) and the device of the inputs;
    both forwards read the same token ids, so they must share that tokenizer.
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
        decoded = decode_lockstep(reference, candidate, ref, cand, mask, eos, settings, bar)
        add_steps(step_acc, decoded, len(batch), N)
        per_prompt += prompt_records(decoded, prompts[b0:b0 + len(batch)], [len(b) for b in batch],
                                     lm.tokenizer, eos)
    bar.close()
    return {
        "layerwise": layerwise(layer_acc, n_layers),
        "stepwise": stepwise(step_acc, N),
        "taylor": taylor_per_mode(step_acc, settings.temperatures),
        "per_prompt": per_prompt,
    }
