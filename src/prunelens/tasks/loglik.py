"""Log-likelihood of continuations given contexts, with every shared token encoded once.

A request is a context and its candidate continuations (the answer options). Tokenisation follows
lm-evaluation-harness: the continuation's tokens are those of ``encode(context + continuation)``
past ``len(encode(context))`` (a trailing space of the context moves to the continuation first),
and the model sees ``context_tokens + continuation_tokens``.

Scoring packs each request as a small tree: the prefix every option's input shares, then one
branch per option, laid end to end in one row with a 4-D attention mask (a branch sees the prefix
and itself, never a sibling) and position ids that restart at the prefix's end for every branch.
Several requests share a row (block-diagonal mask), so there is no padding to speak of, each
shared token (ARC's question, PIQA's goal, WinoGrande's sentence up to the blank) runs through the
body once, and a whole batch is one forward with no KV cache to copy. The last token of an option
is never an input (nothing reads its output), so one-token options (MMLU letters, BoolQ's no/yes)
cost nothing beyond their context. The LM head runs only where an option token is predicted.
Where a model uses sliding-window attention, a row is never longer than the window (inside it the
window is a no-op), and a request longer than the window runs each option as its own unmasked
sequence, so the model's own masks apply.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.errors import PrunelensError
from prunelens.model.capture import capture
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import pad_id, right_pad
from prunelens.model.views import view_of

ROW_TOKENS = 256
"""Packed row length (longer only for a longer request): attention over a row costs ~L² while the
rest of the forward costs ~L, so rows stay short and a batch stacks several of them."""


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


@dataclass(frozen=True)
class _Tree:
    """One request as packed tokens: ``tokens`` = prefix, then each option's branch; ``where[k]``
    gives, for each scored token of option k, its id and the packed index that predicts it."""

    req: int
    options: list[int]  # the request's option index of each entry of ``where``
    tokens: list[int]
    positions: list[int]
    branch: list[int]  # 0 for the shared prefix, k + 1 for option k's branch
    where: list[list[tuple[int, int]]]


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
    """Score every continuation of every request; ``batch_size`` packed rows (each holding several
    requests) go through the model per forward."""
    pad = pad_id(lm)
    rows, alone = _plan(lm, requests)
    out_lp: list[list[float]] = [[0.0] * len(r.continuations) for r in requests]
    out_n: list[list[int]] = [[0] * len(r.continuations) for r in requests]
    out_g: list[list[bool]] = [[False] * len(r.continuations) for r in requests]

    def collect(batch: Sequence[Sequence[_Tree]], zs: Sequence[torch.Tensor]) -> None:
        for row, z in zip(batch, zs, strict=True):
            j = 0
            for t in row:
                for k, opt in zip(t.options, t.where, strict=True):
                    lp, hit = _token_logprobs(z[j:j + len(opt)], [tok for tok, _ in opt])
                    out_lp[t.req][k], out_n[t.req][k] = float(lp.sum()), len(opt)
                    out_g[t.req][k] = bool(hit.all())
                    j += len(opt)

    n_batches = -(-len(rows) // batch_size) + -(-len(alone) // batch_size)
    bar = tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress)
    with view_of(lm.adapter, modification):
        for b0 in range(0, len(rows), batch_size):
            batch = rows[b0:b0 + batch_size]
            ids, positions, mask = _row_tensors(batch, pad, lm.model.dtype, lm.device)
            at = []
            for row in batch:
                starts = itertools.accumulate((len(t.tokens) for t in row), initial=0)
                at.append([o + i for o, t in zip(starts, row, strict=False)
                           for opt in t.where for _, i in opt])
            collect(batch, _logits_at(lm, ids, at, attention_mask=mask, position_ids=positions))
            bar.update(1)
        for b0 in range(0, len(alone), batch_size):
            part = alone[b0:b0 + batch_size]
            ids, _ = right_pad([t.tokens for t in part], pad, lm.device)
            at = [[i for opt in t.where for _, i in opt] for t in part]
            collect([[t] for t in part], _logits_at(lm, ids, at))
            bar.update(1)
    bar.close()
    return [Scored(tuple(a), tuple(n), tuple(g)) for a, n, g in zip(out_lp, out_n, out_g, strict=True)]


def _plan(lm: LoadedModel, requests: Sequence[Request]) -> tuple[list[list[_Tree]], list[_Tree]]:
    """(packed rows of trees, trees run alone): a request whose options branch is packed; one with
    one-token options, or longer than the model's attention window, runs as plain sequences
    (right-padded, causal, longest first)."""
    for r in requests:
        if r.option_contexts and len(r.option_contexts) != len(r.continuations):
            raise PrunelensError("a request needs one context per option when option_contexts is given")
    split = [[split_tokens(lm.tokenizer, r.context_of(k), c) for k, c in enumerate(r.continuations)]
             for r in requests]
    window = lm.adapter.attention_window
    packed, alone = [], []
    for ri, opts in enumerate(split):
        if window is not None and max(len(c) + len(o) - 1 for c, o in opts) > window:
            alone.extend(_tree(ri, [opt], [k]) for k, opt in enumerate(opts))  # model's own window
            continue
        t = _tree(ri, opts, range(len(opts)))
        (packed if any(t.branch) else alone).append(t)  # no branch: one-token options, one sequence
    alone.sort(key=lambda t: -len(t.tokens))
    return _pack(packed, ROW_TOKENS), alone


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    """Length of the longest prefix all sequences share."""
    n, cap = 0, min(map(len, seqs))
    while n < cap and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _tree(req: int, opts: Sequence[tuple[list[int], list[int]]], options: Iterable[int]) -> _Tree:
    """Pack one request: the inputs (context + option, less its last token) share their common
    prefix; each option's remainder follows as its own branch, positioned as if right after it."""
    fulls = [c + o for c, o in opts]
    inputs = [f[:-1] for f in fulls]
    n = _common_prefix(inputs)
    tokens, positions, branch = list(inputs[0][:n]), list(range(n)), [0] * n
    where = []
    for k, ((_, o), f, x) in enumerate(zip(opts, fulls, inputs, strict=True)):
        start = len(tokens)
        rest = x[n:]
        tokens += rest
        positions += range(n, n + len(rest))
        branch += [k + 1] * len(rest)
        # token f[m] is predicted by input m - 1: in the prefix, or in this option's branch
        where.append([(f[m], m - 1 if m - 1 < n else start + m - 1 - n)
                      for m in range(len(f) - len(o), len(f))])
    return _Tree(req, list(options), tokens, positions, branch, where)


def _pack(trees: Sequence[_Tree], row_tokens: int) -> list[list[_Tree]]:
    """First-fit decreasing into rows of ``max(row_tokens, longest tree)`` tokens; rows come out
    longest first, so a batch's rows pad little to one width."""
    cap = max([row_tokens, *(len(t.tokens) for t in trees)])
    rows: list[list[_Tree]] = []
    free: list[int] = []
    for t in sorted(trees, key=lambda t: -len(t.tokens)):
        for r, room in enumerate(free):
            if len(t.tokens) <= room:
                rows[r].append(t)
                free[r] -= len(t.tokens)
                break
        else:
            rows.append([t])
            free.append(cap - len(t.tokens))
    order = sorted(range(len(rows)), key=lambda r: free[r])
    return [rows[r] for r in order]


def _row_tensors(rows: Sequence[Sequence[_Tree]], pad: int, dtype: torch.dtype,
                 dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, position ids and the additive 4-D mask of packed rows. Token q may see token k
    when both belong to the same request, k comes no later, and k is in the shared prefix or in
    q's own branch; a padding token sees only itself (no empty softmax rows)."""
    width = max(sum(len(t.tokens) for t in row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.arange(width).repeat(len(rows), 1) + width  # padding: a segment of its own
    br = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        o = 0
        for s, t in enumerate(row):
            n = len(t.tokens)
            ids[r, o:o + n] = torch.tensor(t.tokens)
            pos[r, o:o + n] = torch.tensor(t.positions)
            br[r, o:o + n] = torch.tensor(t.branch)
            seg[r, o:o + n] = s
            o += n
    idx = torch.arange(width)
    ok = (seg[:, :, None] == seg[:, None, :]) & (idx[None, None, :] <= idx[None, :, None]) & (
        (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None]))
    mask = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)
    return ids.to(dev), pos.to(dev), mask.unsqueeze(1).to(dev)


def _logits_at(lm: LoadedModel, ids: torch.Tensor, at: Sequence[Sequence[int]],
               **forward_kwargs: Any) -> list[torch.Tensor]:
    """Logits (float32) at positions ``at[r]`` of row r, one forward for the batch; the LM head
    runs only at those positions. Without a mask, right-padded rows are exact under causal
    attention (no real token sees the padding after it) and keep the unmasked attention path."""
    with capture(lm.adapter, ["final"]) as store:
        lm.model(input_ids=ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
    rows = torch.tensor([r for r, a in enumerate(at) for _ in a], device=ids.device, dtype=torch.long)
    cols = torch.tensor([p for a in at for p in a], device=ids.device, dtype=torch.long)
    z = lm.adapter.head_logits(store["final"][rows, cols]).float()
    return list(z.split([len(a) for a in at]))


def _token_logprobs(z: torch.Tensor,
                    tokens: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) = z[token] − logsumexp(z) (no vocabulary-wide log-softmax tensor), and whether
    each token is the argmax; ``z`` has one vocabulary row per token (any leading shape)."""
    t = torch.as_tensor(tokens, device=z.device)
    return z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1), z.argmax(-1) == t
