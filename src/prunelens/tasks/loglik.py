"""Log-likelihood of continuations given contexts, with each shared context encoded once.

A request is a context and its candidate continuations (the answer options). Tokenisation follows
lm-evaluation-harness: the continuation's tokens are those of ``encode(context + continuation)``
past ``len(encode(context))`` (a trailing space of the context moves to the continuation first),
and the model sees ``context_tokens + continuation_tokens``. Contexts of a batch are prefilled
once (left-padded, KV cache); the cache is then repeated once per option and all options are
scored in one right-padded forward pass. The first continuation token is scored by the context's
last-position logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..analysis import forward_cached, left_pad, pad_id
from ..errors import PrunelensError
from ..models import LoadedModel
from ..prune import view_of


@dataclass(frozen=True)
class Request:
    context: str
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class Scored:
    """Summed log-probability and greedy-match flag of each continuation."""

    logprobs: tuple[float, ...]
    n_tokens: tuple[int, ...]
    is_greedy: tuple[bool, ...]


def split_tokens(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split of the token sequence."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        ctx = [bos, *ctx]
        whole = [bos, *whole]
    cont = whole[len(ctx):]
    if not cont:
        raise PrunelensError(f"answer option {continuation!r} encodes to no tokens")
    if not ctx:  # score the first token from a BOS/EOS-only context, as lm-eval does
        ctx = [bos if bos is not None else tokenizer.eos_token_id]
    return ctx, cont


@torch.inference_mode()
def score_requests(
    lm: LoadedModel,
    requests: Sequence[Request],
    modification: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[Scored]:
    """Score every continuation of every request (contexts batched, options share the prefix)."""
    from transformers import DynamicCache

    tok, model, dev = lm.tokenizer, lm.model, lm.device
    pad = pad_id(lm)
    split = [[split_tokens(tok, r.context, c) for c in r.continuations] for r in requests]
    # Options whose context tokens differ (tokenisation across the boundary) get their own row.
    rows: list[tuple[int, list[int], list[list[int]], list[int]]] = []  # (req, ctx, conts, option idx)
    flat: list[tuple[int, list[int], list[int], int]] = []  # (req, ctx, cont, option idx)
    for ri, opts in enumerate(split):
        groups: dict[tuple[int, ...], list[int]] = {}
        for oi, (ctx, _) in enumerate(opts):
            groups.setdefault(tuple(ctx), []).append(oi)
        for ctx, ois in groups.items():
            conts = [opts[oi][1] for oi in ois]
            if len(ois) > 1 and len(ctx) >= sum(map(len, conts)) / len(conts):
                rows.append((ri, list(ctx), conts, ois))
            else:  # nothing worth sharing: each option is one sequence, scored in a single pass
                flat.extend((ri, list(ctx), c, oi) for c, oi in zip(conts, ois, strict=True))
    # similar total lengths together, so neither the contexts nor the options pad much
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][1]) + max(len(c) for c in rows[i][2])))
    flat.sort(key=lambda f: -(len(f[1]) + len(f[2])))
    out_lp: list[list[float]] = [[0.0] * len(r.continuations) for r in requests]
    out_n: list[list[int]] = [[0] * len(r.continuations) for r in requests]
    out_g: list[list[bool]] = [[False] * len(r.continuations) for r in requests]
    n_batches = (len(order) + batch_size - 1) // batch_size + (len(flat) + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress)
    with view_of(lm.adapter, modification):
        for b0 in range(0, len(flat), batch_size):
            part = flat[b0:b0 + batch_size]
            lps, greedy = _score_whole(model, [(f[1], f[2]) for f in part], pad, dev)
            for (ri, _, c, oi), lp, g in zip(part, lps, greedy, strict=True):
                out_lp[ri][oi], out_n[ri][oi], out_g[ri][oi] = lp, len(c), g
            bar.update(1)
        for b0 in range(0, len(order), batch_size):
            bar.update(1)
            batch = [rows[i] for i in order[b0:b0 + batch_size]]
            ids, mask = left_pad([b[1] for b in batch], pad, dev)
            cache = DynamicCache(config=model.config)
            z0 = forward_cached(model, ids, mask, cache)
            reps = [len(b[2]) for b in batch]
            rep_t = torch.tensor(reps, device=dev)
            _repeat_cache(cache, rep_t)
            conts = [c for b in batch for c in b[2]]
            width = max(len(c) for c in conts)
            cont_ids = torch.full((len(conts), width), pad, dtype=torch.long, device=dev)
            cont_mask = torch.zeros((len(conts), width), dtype=torch.long, device=dev)
            for r, c in enumerate(conts):
                cont_ids[r, :len(c)] = torch.tensor(c, device=dev)
                cont_mask[r, :len(c)] = 1
            full_mask = torch.cat([mask.repeat_interleave(rep_t, 0), cont_mask], 1)
            cpos = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -width:]
            logits = model(input_ids=cont_ids, attention_mask=full_mask, position_ids=cpos,
                           past_key_values=cache, use_cache=True).logits.float()
            # logits predicting cont token j: z0 for j = 0, logits[:, j-1] after
            pred = torch.cat([z0.repeat_interleave(rep_t, 0).unsqueeze(1), logits[:, :-1]], 1)
            # log p(token) = z[token] - logsumexp(z): no vocabulary-wide log-softmax tensor
            tok_lp = (pred.gather(-1, cont_ids.unsqueeze(-1)).squeeze(-1) - pred.logsumexp(-1)) * cont_mask
            greedy = ((pred.argmax(-1) == cont_ids) | (cont_mask == 0)).all(-1)
            r = 0
            for ri, _, cs, ois in batch:
                for oi, c in zip(ois, cs, strict=True):
                    out_lp[ri][oi] = float(tok_lp[r].sum())
                    out_n[ri][oi] = len(c)
                    out_g[ri][oi] = bool(greedy[r])
                    r += 1
    bar.close()
    return [Scored(tuple(a), tuple(n), tuple(g)) for a, n, g in zip(out_lp, out_n, out_g, strict=True)]


def _score_whole(model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad: int,
                 dev: torch.device) -> tuple[list[float], list[bool]]:
    """log P(cont | ctx) and greedy-ness for (context, continuation) pairs, one forward each row.

    Rows are left-padded, so every continuation ends at the last position; only the logits of the
    last (longest continuation + 1) positions are computed.
    """
    ids, mask = left_pad([c + o for c, o in pairs], pad, dev)
    width = max(len(o) for _, o in pairs)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                   logits_to_keep=width + 1).logits[:, :-1].float()  # predicts the last `width` tokens
    target = ids[:, -width:]
    cmask = torch.zeros_like(target)
    for r, (_, o) in enumerate(pairs):
        cmask[r, width - len(o):] = 1
    tok_lp = (logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)) * cmask
    greedy = ((logits.argmax(-1) == target) | (cmask == 0)).all(-1)
    return [float(x) for x in tok_lp.sum(-1)], [bool(g) for g in greedy]


def _repeat_cache(cache: Any, reps: torch.Tensor) -> None:
    """Repeat row i of every cached key/value reps[i] times (options of one context share it)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.repeat_interleave(reps, 0)
            layer.values = layer.values.repeat_interleave(reps, 0)
