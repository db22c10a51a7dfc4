"""Log-likelihood of continuations given contexts, with each shared context encoded once.

A request is a context and its candidate continuations (the answer options). Tokenisation follows
lm-evaluation-harness: the continuation's tokens are those of ``encode(context + continuation)``
past ``len(encode(context))`` (a trailing space of the context moves to the continuation first),
and the model sees ``context_tokens + continuation_tokens``. Three paths, by what can be shared:
options of one token each are all read from one forward of the context; options behind a long
shared context prefill it once (left-padded, KV cache), repeat the cache once per option and score
all options in one right-padded pass; anything else runs each (context, option) as one sequence.
Single-sequence forwards are right-padded without an attention mask (exact under causal
attention) and apply the LM head only where a continuation token is predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..analysis import forward_cached, left_pad, pad_id, right_pad
from ..errors import PrunelensError
from ..models import LoadedModel
from ..prune import view_of

SHARE_RATIO = 1.0
"""Share a prefix when it is at least this × the mean per-option remainder; below it, the second
pass and the cache copies cost more than the shared tokens save (measured by bench_lmeval)."""


@dataclass(frozen=True)
class Request:
    """A context and its answer options; ``option_contexts`` gives each option its own context
    (WinoGrande puts the option inside the sentence), sharing whatever prefix they have in common."""

    context: str
    continuations: tuple[str, ...]
    option_contexts: tuple[str, ...] = ()

    def context_of(self, k: int) -> str:
        return self.option_contexts[k] if self.option_contexts else self.context


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
    for r in requests:
        if r.option_contexts and len(r.option_contexts) != len(r.continuations):
            raise PrunelensError("a request needs one context per option when option_contexts is given")
    split = [[split_tokens(tok, r.context_of(k), c) for k, c in enumerate(r.continuations)] for r in requests]
    # rows: (req, shared prefix, per-option remainder, tokens scored at the remainder's end, option idx)
    rows: list[tuple[int, list[int], list[list[int]], list[int], list[int]]] = []
    flat: list[tuple[int, list[int], list[int], int]] = []  # (req, ctx, cont, option idx)
    single: list[tuple[int, list[int], list[int], list[int]]] = []  # (req, ctx, option tokens, idx)
    for ri, opts in enumerate(split):
        ctxs, conts = [o[0] for o in opts], [o[1] for o in opts]
        if len(opts) > 1 and all(c == ctxs[0] for c in ctxs) and all(len(c) == 1 for c in conts):
            single.append((ri, ctxs[0], [c[0] for c in conts], list(range(len(opts)))))
            continue
        # the longest prefix every option's sequence shares, within the contexts: WinoGrande's
        # options differ inside the context, and tokenisation can differ at the boundary
        fulls = [c + o for c, o in opts]
        n = _common_prefix(fulls, min(map(len, ctxs)))
        rems = [f[n:] for f in fulls]
        if len(opts) > 1 and n >= SHARE_RATIO * sum(map(len, rems)) / len(rems):
            rows.append((ri, fulls[0][:n], rems, [len(c) for c in conts], list(range(len(opts)))))
        else:  # nothing worth sharing: each option is one sequence, scored in a single pass
            flat.extend((ri, c, o, oi) for oi, (c, o) in enumerate(opts))
    # similar total lengths together, so neither the contexts nor the options pad much
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][1]) + max(len(c) for c in rows[i][2])))
    flat.sort(key=lambda f: -(len(f[1]) + len(f[2])))
    single.sort(key=lambda g: -len(g[1]))
    out_lp: list[list[float]] = [[0.0] * len(r.continuations) for r in requests]
    out_n: list[list[int]] = [[0] * len(r.continuations) for r in requests]
    out_g: list[list[bool]] = [[False] * len(r.continuations) for r in requests]
    # a batch is `batch_size` questions with all their options on every path: for one-sequence-per-
    # option rows that is batch_size × (options per question) sequences
    flat_bs = batch_size * max(1, round(len(flat) / max(1, len({f[0] for f in flat}))))
    n_batches = sum((len(x) + b - 1) // b for x, b in ((order, batch_size), (flat, flat_bs),
                                                        (single, batch_size)))
    bar = tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress)
    with view_of(lm.adapter, modification):
        for b0 in range(0, len(flat), flat_bs):
            part = flat[b0:b0 + flat_bs]
            lps, greedy = _score_whole(lm, [(f[1], f[2]) for f in part], pad, dev)
            for (ri, _, c, oi), lp, g in zip(part, lps, greedy, strict=True):
                out_lp[ri][oi], out_n[ri][oi], out_g[ri][oi] = lp, len(c), g
            bar.update(1)
        for b0 in range(0, len(single), batch_size):
            part = single[b0:b0 + batch_size]
            scored = _score_single(lm, [(g[1], g[2]) for g in part], pad, dev)
            for (ri, _, _, ois), (lp, hit) in zip(part, scored, strict=True):
                for oi, x, h in zip(ois, lp.tolist(), hit.tolist(), strict=True):
                    out_lp[ri][oi], out_n[ri][oi], out_g[ri][oi] = x, 1, h
            bar.update(1)
        for b0 in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[b0:b0 + batch_size]]
            ids, mask = left_pad([b[1] for b in batch], pad, dev)
            cache = DynamicCache(config=model.config)
            z0 = forward_cached(model, ids, mask, cache)
            reps = [len(b[2]) for b in batch]
            rep_t = torch.tensor(reps, device=dev)
            _repeat_cache(cache, rep_t)
            conts = [c for b in batch for c in b[2]]
            n_scored = [k for b in batch for k in b[3]]
            cont_ids, cont_mask = right_pad(conts, pad, dev)
            width = cont_ids.shape[1]
            score_mask = torch.zeros_like(cont_mask)
            for r, (c, k) in enumerate(zip(conts, n_scored, strict=True)):
                score_mask[r, len(c) - k:len(c)] = 1  # the option's own tokens end the remainder
            full_mask = torch.cat([mask.repeat_interleave(rep_t, 0), cont_mask], 1)
            cpos = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -width:]
            logits = model(input_ids=cont_ids, attention_mask=full_mask, position_ids=cpos,
                           past_key_values=cache, use_cache=True).logits.float()
            # logits predicting cont token j: z0 for j = 0, logits[:, j-1] after
            pred = torch.cat([z0.repeat_interleave(rep_t, 0).unsqueeze(1), logits[:, :-1]], 1)
            lp, hit = _token_logprobs(pred, cont_ids)
            tok_lp = lp * score_mask
            greedy = (hit | (score_mask == 0)).all(-1)
            r = 0
            for ri, _, _, ks, ois in batch:
                for oi, k in zip(ois, ks, strict=True):
                    out_lp[ri][oi] = float(tok_lp[r].sum())
                    out_n[ri][oi] = k
                    out_g[ri][oi] = bool(greedy[r])
                    r += 1
            bar.update(1)
    bar.close()
    return [Scored(tuple(a), tuple(n), tuple(g)) for a, n, g in zip(out_lp, out_n, out_g, strict=True)]


def _common_prefix(seqs: Sequence[list[int]], cap: int) -> int:
    """Length of the longest prefix all sequences share, at most ``cap``."""
    n = 0
    while n < cap and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _logits_at(lm: LoadedModel, seqs: Sequence[list[int]], at: Sequence[Sequence[int]], pad: int,
               dev: torch.device) -> list[torch.Tensor]:
    """Logits (float32) at positions ``at[r]`` of sequence r, one forward for the batch.

    Rows are right-padded and run without an attention mask: under causal attention no real token
    sees the padding after it, so its logits are exact, and the model keeps its unmasked (fastest)
    attention path. The LM head runs only at the requested positions.
    """
    from ..capture import capture

    ids, _ = right_pad(seqs, pad, dev)
    with capture(lm.adapter, ["final"]) as store:
        lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    rows = torch.tensor([r for r, a in enumerate(at) for _ in a], device=dev)
    cols = torch.tensor([p for a in at for p in a], device=dev)
    z = lm.adapter.head_logits(store["final"][rows, cols]).float()
    return list(z.split([len(a) for a in at]))


def _token_logprobs(z: torch.Tensor,
                    tokens: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) = z[token] − logsumexp(z) (no vocabulary-wide log-softmax tensor), and whether
    each token is the argmax; ``z`` has one vocabulary row per token (any leading shape)."""
    t = torch.as_tensor(tokens, device=z.device)
    return z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1), z.argmax(-1) == t


def _score_whole(lm: LoadedModel, pairs: Sequence[tuple[list[int], list[int]]], pad: int,
                 dev: torch.device) -> tuple[list[float], list[bool]]:
    """log P(cont | ctx) and greedy-ness for (context, continuation) pairs, one sequence per row."""
    at = [range(len(c) - 1, len(c) - 1 + len(o)) for c, o in pairs]
    zs = _logits_at(lm, [c + o for c, o in pairs], at, pad, dev)
    lps, greedy = [], []
    for z, (_, o) in zip(zs, pairs, strict=True):
        lp, hit = _token_logprobs(z, o)
        lps.append(float(lp.sum()))
        greedy.append(bool(hit.all()))
    return lps, greedy


def _score_single(lm: LoadedModel, groups: Sequence[tuple[list[int], list[int]]], pad: int,
                  dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Options that are one token each (MMLU letters, BoolQ's no/yes): all read from the one
    next-token distribution after the context, so a single forward of the context suffices."""
    zs = _logits_at(lm, [c for c, _ in groups], [[len(c) - 1] for c, _ in groups], pad, dev)
    out = []
    for z, (_, toks) in zip(zs, groups, strict=True):  # z: the one next-token row, (1, vocab)
        t = torch.as_tensor(toks, device=z.device)
        out.append((z[0, t] - z[0].logsumexp(-1), z[0].argmax() == t))
    return out


def _repeat_cache(cache: Any, reps: torch.Tensor) -> None:
    """Repeat row i of every cached key/value reps[i] times (options of one context share it)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.repeat_interleave(reps, 0)
            layer.values = layer.values.repeat_interleave(reps, 0)
