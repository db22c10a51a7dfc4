"""Batched greedy generation with the KV cache and early stop on stop sequences.

Rows of a batch are left-padded; a row stops when its decoded continuation contains a stop string
(the text is cut before it) or it emits EOS. The default engine batches continuously: a finished row
leaves the batch and its KV cache at once, and waiting prompts are prefilled and merged into the
running batch (right-aligned, the narrower side left-padded with masked zeros), so no step computes
a finished row; stop strings are checked on the newly decoded text only (incremental detokenising).
``engine="static"`` keeps the older fixed batches (each runs until its longest row ends). Instruct models
get their chat template (a single user turn, or the few-shot turns given) unless disabled: without
it, answers of chat-tuned models are mostly formatting failures, not the model's knowledge.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_freed_memory
from prunelens.prune import view_of

Message = dict[str, str]


def render(tokenizer: Any, turns: Sequence[Message], chat_template: bool = True) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's reply.

    Without a chat template (or with it disabled) the turns are joined as plain text: user turns as
    they are, assistant turns after a space, separated by blank lines.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    parts = [t["content"] if t["role"] != "assistant" else " " + t["content"] for t in turns]
    text = "".join(p if i == 0 or parts[i].startswith(" ") else "\n\n" + p for i, p in enumerate(parts))
    return tokenizer(text)["input_ids"]


@dataclass(frozen=True)
class Generation:
    """Decoded text (cut at the first stop string) and every generated token id (EOS excluded)."""

    text: str
    ids: tuple[int, ...]


def generate(*args: Any, **kwargs: Any) -> list[str]:
    """Greedy continuation of each token-id prompt, cut at the first stop string (texts only);
    the arguments are those of ``generate_full``."""
    return [g.text for g in generate_full(*args, **kwargs)]


@contextlib.contextmanager
def decode_attention(device: torch.device) -> Iterator[None]:
    """SDPA without the cuDNN backend on CUDA devices, for KV-cached decoding loops.

    cuDNN's attention plans once per shape, and in decoding the key length grows every step: on an
    H200 (torch 2.11) that planning was 1.8 ms of host time per call, and leaving cuDNN out doubled
    both ``analyze`` and HF ``generate`` (benchmarks/RESULTS.md, GPU check). Flash, memory-efficient
    and math kernels remain. Only prunelens's own loops are affected; elsewhere a no-op."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


ENGINES = ("continuous", "static")


@torch.inference_mode()
def generate_full(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    modification: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
    until: Callable[[str], bool] | None = None,
    engine: str = "continuous",
) -> list[Generation]:
    """Greedy generation keeping the token ids; ``until(text)`` is an extra stop test per row."""
    if max_new_tokens < 1:
        raise PrunelensError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if engine not in ENGINES:
        raise PrunelensError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    run = _generate_continuous if engine == "continuous" else _generate_static
    with view_of(lm.adapter, modification), decode_attention(lm.device):
        return run(lm, prompts, max_new_tokens, tuple(stop), batch_size, progress, desc, until)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    return text[:min((text.find(s) for s in stop if s in text), default=len(text))]


def _finish(tok: Any, ids: list[int], stop: Sequence[str]) -> Generation:
    return Generation(cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop), tuple(ids))


def _generate_static(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str],
                     batch_size: int, progress: bool, desc: str, until: Callable[[str], bool] | None
                     ) -> list[Generation]:
    from transformers import DynamicCache

    tok, model, dev = lm.tokenizer, lm.model, lm.device
    pad = pad_id(lm)
    eos = torch.tensor(sorted(eos_ids(lm)) or [-1], device=dev)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together
    out: list[Generation] = [Generation("", ())] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    check_text = bool(stop) or until is not None
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad, dev)
        cache = DynamicCache(config=model.config)
        z = forward_cached(model, ids, mask, cache)
        gen: list[list[int]] = [[] for _ in idx]
        done = torch.zeros(len(idx), dtype=torch.bool, device=dev)
        for step in range(max_new_tokens):
            nxt = z.argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if bool(torch.isin(nxt[r], eos)):
                    done[r] = True
                    continue
                gen[r].append(t)
                if check_text:
                    text = tok.decode(gen[r], skip_special_tokens=True)
                    if any(s in text for s in stop) or (until is not None and until(text)):
                        done[r] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(len(idx), 1)], 1)
            z = forward_cached(model, nxt.unsqueeze(1), mask, cache)
        for r, i in enumerate(idx):
            out[i] = _finish(tok, gen[r], stop)
        bar.update(len(idx))
        release_freed_memory()
    bar.close()
    return out


@dataclass
class _Row:
    """A prompt being decoded: its generated ids and the text decoded so far, kept incrementally
    (``prefix``/``read`` offsets, as streaming detokenisers do) so a step decodes a few tokens only."""

    index: int
    ids: list[int]
    text: str = ""
    prefix: int = 0
    read: int = 0

    def advance(self, tok: Any) -> str:
        """Decode the new token(s); returns the text they added ('' while a character is incomplete)."""
        new = tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if new.endswith("\ufffd"):
            return ""
        old = tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        delta = new[len(old):] if new.startswith(old) else new
        self.text += delta
        # the next window starts at the first token not yet a window start, unless that token decodes
        # to nothing (a skipped special token): a window starting there would lose the separator
        # some tokenizers put between tokens
        if tok.decode(self.ids[self.read:self.read + 1], skip_special_tokens=True):
            self.prefix = self.read
        self.read = len(self.ids)
        return delta


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer that writes new keys/values into spare room: DynamicLayer
        concatenates, copying the whole cache every step (O(context) per token, ~40 % of a decode step
        at 800 tokens). Reads are views of the filled part; assigning ``keys``/``values`` replaces it."""

        def __init__(self, **kwargs: Any) -> None:
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None
            self._n = 0
            super().__init__(**kwargs)

        @property
        def keys(self) -> torch.Tensor | None:  # type: ignore[override]
            return None if self._k is None else self._k[..., :self._n, :]

        @keys.setter
        def keys(self, t: torch.Tensor | None) -> None:
            self._k, self._n = t, (0 if t is None or t.dim() < 2 else t.shape[-2])

        @property
        def values(self) -> torch.Tensor | None:  # type: ignore[override]
            return None if self._v is None else self._v[..., :self._n, :]

        @values.setter
        def values(self, t: torch.Tensor | None) -> None:
            self._v = t

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized or self._k is None or self._k.dim() < 2:
                self.device, self.is_initialized = key_states.device, True
                self._k = self._v = None
                self._n = 0
            n, m = self._n, key_states.shape[-2]
            if self._k is None or self._v is None or n + m > self._k.shape[-2]:
                cap = n + m + max(64, (n + m) // 4)
                self._k, self._v = (self._room(old, new, n, cap) for old, new in
                                    ((self._k, key_states), (self._v, value_states)))
            self._k[..., n:n + m, :] = key_states
            self._v[..., n:n + m, :] = value_states
            self._n = n + m
            return self.keys, self.values  # type: ignore[return-value]

        @staticmethod
        def _room(old: torch.Tensor | None, new: torch.Tensor, n: int, cap: int) -> torch.Tensor:
            out = new.new_empty(*new.shape[:-2], cap, new.shape[-1])
            if old is not None and n:
                out[..., :n, :] = old[..., :n, :]
            return out

    return GrowingLayer


def new_cache(model: Any) -> Any:
    """A DynamicCache for ``model`` whose plain full-attention layers grow in place (sliding-window
    and other special layers are kept as transformers builds them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    cache.layers = [_growing_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt shares, leaving each at least one token of its own."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


MIN_SHARED = 16  # below this, computing the prefix once saves less than the extra forward costs


def _stored(layer: Any, width: int) -> int:
    """How many of the last ``width`` positions a cache layer keeps (a sliding layer: its window)."""
    window = getattr(layer, "sliding_window", None)
    return width if window is None else min(width, window - 1)


def _left_pad_kv(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if n == 0 else torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


def merge_caches(a: Any, mask_a: torch.Tensor, b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Rows of ``b`` appended to ``a``'s batch (in place in ``a``): right-aligned, the narrower side
    left-padded with zero keys/values under a zero mask, which attention never reads."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    masks = [torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], 1) for m in (mask_a, mask_b)]
    for la, lb in zip(a.layers, b.layers, strict=True):
        keep = _stored(la, width)
        parts = []
        for layer in (la, lb):
            k, v = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
            parts.append((_left_pad_kv(k, keep - k.shape[-2]), _left_pad_kv(v, keep - v.shape[-2])))
        la.keys = torch.cat([parts[0][0], parts[1][0]], 0)
        la.values = torch.cat([parts[0][1], parts[1][1]], 0)
        if hasattr(la, "cumulative_length"):
            la.cumulative_length = width
    return a, torch.cat(masks, 0)


def select_rows(cache: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows ``keep`` (in place in ``cache``), then drop the leading positions no row
    attends to any more; returns the new mask."""
    idx = torch.tensor(keep, device=mask.device)
    mask = mask[idx]
    cut = int(mask.any(0).to(torch.int8).argmax()) if bool(mask.any()) else 0
    width = mask.shape[1] - cut
    for layer in cache.layers:
        keys, values = layer.keys[idx], layer.values[idx]
        stored = min(keys.shape[-2], _stored(layer, width))
        layer.keys, layer.values = keys[..., keys.shape[-2] - stored:, :], values[..., values.shape[-2] - stored:, :]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return mask[:, cut:]


def _generate_continuous(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         stop: Sequence[str], batch_size: int, progress: bool, desc: str,
                         until: Callable[[str], bool] | None) -> list[Generation]:

    tok, model, dev = lm.tokenizer, lm.model, lm.device
    pad, eos = pad_id(lm), eos_ids(lm)
    # a prefix all prompts share (few-shot exemplars, a system prompt) is computed once; exact only
    # where every layer attends to the whole context (a sliding window would count the mask's holes)
    n_shared = shared_prefix(prompts) if len(prompts) > 1 else 0
    prefix_cache = new_cache(model) if n_shared >= MIN_SHARED else None
    if prefix_cache is not None and all(isinstance(la, _growing_layer_class()) for la in prefix_cache.layers):
        ids1 = torch.tensor([list(prompts[0][:n_shared])], device=dev)
        forward_cached(model, ids1, torch.ones_like(ids1), prefix_cache)
    else:
        prefix_cache = None
    queue = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together
    queue.reverse()  # pop() takes the longest first
    out: list[Generation] = [Generation("", ())] * len(prompts)
    tail = max((len(s) for s in stop), default=0)
    refill = max(1, batch_size // 4)  # admit waiting prompts once this many slots are free
    active: list[_Row] = []
    cache: Any = None
    mask = z = None
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    made, t0 = 0, time.perf_counter()
    while active or queue:
        free = batch_size - len(active)
        if queue and (not active or free >= min(refill, len(queue))):
            new = [queue.pop() for _ in range(min(free, len(queue)))]
            wave = new_cache(model)
            if prefix_cache is None:
                ids, new_mask = left_pad([prompts[i] for i in new], pad, dev)
            else:  # [shared prefix][holes][own tokens]: positions come from the mask, so stay exact
                ids, own = left_pad([prompts[i][n_shared:] for i in new], pad, dev)
                new_mask = torch.cat([own.new_ones(len(new), n_shared), own], 1)
                for j, layer in enumerate(prefix_cache.layers):
                    shape = (len(new), *layer.keys.shape[1:])
                    wave.layers[j].update(layer.keys.expand(shape), layer.values.expand(shape))
            z_new = forward_cached(model, ids, new_mask, wave)
            if active:
                cache, mask = merge_caches(cache, mask, wave, new_mask)
                z = torch.cat([z, z_new], 0)
            else:
                cache, mask, z = wave, new_mask, z_new
            active += [_Row(i, []) for i in new]
        nxt = z.argmax(-1).tolist()
        keep = []
        for r, (row, t) in enumerate(zip(active, nxt, strict=True)):
            if t in eos:
                out[row.index] = _finish(tok, row.ids, stop)
                continue
            row.ids.append(t)
            made += 1
            hit = False
            if stop or until is not None:
                delta = row.advance(tok)
                window = row.text[-(tail + len(delta)):] if delta else ""
                hit = bool(delta) and (any(s in window for s in stop) or (until is not None and until(row.text)))
            if hit or len(row.ids) >= max_new_tokens:
                out[row.index] = _finish(tok, row.ids, stop)
            else:
                keep.append(r)
        if len(keep) < len(active):
            bar.update(len(active) - len(keep))
            bar.set_postfix_str(f"{made / max(time.perf_counter() - t0, 1e-9):.1f} tok/s", refresh=False)
            active = [active[r] for r in keep]
            if not active:
                cache = mask = z = None
                release_freed_memory()
                continue
            mask = select_rows(cache, mask, keep)
        step = torch.tensor([nxt[r] for r in keep], device=dev).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
        z = forward_cached(model, step, mask, cache)
    bar.close()
    return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
    """Token ids per prompt; instruct models get their chat template (with generation prompt)."""
    use_chat = chat_template and getattr(tokenizer, "chat_template", None)
    out = []
    for p in prompts:
        if use_chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"]
        if not ids:
            raise PrunelensError("a prompt encodes to zero tokens")
        out.append(list(ids))
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device,
              left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to one width, and the mask of real tokens. Left padding lines up the last
    tokens (for decoding from a cache); right padding keeps positions 0.. (for scoring whole rows)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols] = torch.tensor(s, dtype=torch.long)
        mask[r, cols] = 1
    return ids.to(device), mask.to(device)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(seqs, pad_id, device, left=True)


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(seqs, pad_id, device, left=False)


def eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for src in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def pad_id(lm: LoadedModel) -> int:
    """Token used to fill padded positions (never attended): the pad token, else an EOS token."""
    pad = lm.tokenizer.pad_token_id
    return pad if pad is not None else min(eos_ids(lm), default=0)


def forward_cached(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """One cached forward over ``ids`` (left-padded rows); returns the last position's logits.

    ``mask`` covers the cached tokens plus ``ids``; positions come from it, so padding is skipped.
    """
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_keyword(type(model)): cache})
    z = out.logits[:, -1].float()
    if not bool(torch.isfinite(z).all()):
        raise PrunelensError("the model produced NaN or infinite logits (a modification broke its numerics)")
    return z


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The forward's KV-cache argument: ``cache`` from transformers 5.24 (where the old name is
    deprecated, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.inference_mode()
def next_token_logits(lm: LoadedModel, ctxs: Sequence[Sequence[int]], modification: Any = None,
                      batch_size: int = 8, progress: bool = True, desc: str = "next token") -> torch.Tensor:
    """Logits of the token after each context (float32, on the CPU)."""
    out = []
    order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
    with view_of(lm.adapter, modification):
        for b0 in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
            idx = order[b0:b0 + batch_size]
            ids, mask = left_pad([ctxs[i] for i in idx], pad_id(lm), lm.device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            z = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                         logits_to_keep=1).logits[:, -1].float().cpu()
            out.extend(zip(idx, z, strict=True))
    out.sort(key=lambda t: t[0])
    return torch.stack([z for _, z in out])
