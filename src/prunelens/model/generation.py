"""Batched greedy generation with the KV cache and early stop on stop sequences.

Rows of a batch are left-padded; a row stops when its decoded continuation contains a stop string
(the text is cut before it) or it emits EOS. The default engine batches continuously: a finished row
leaves the batch and its KV cache at once, and waiting prompts are prefilled and merged into the
running batch (right-aligned, the narrower side left-padded with masked zeros), so no step computes
a finished row; stop strings are checked on the newly decoded text only (incremental detokenising).
``engine="static"`` keeps the older fixed batches (each runs until its longest row ends).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.errors import PrunelensError
from prunelens.model.kvcache import (
    MIN_SHARED,
    forward_cached,
    growing_layer_class,
    merge_caches,
    new_cache,
    select_rows,
    shared_prefix,
)
from prunelens.model.loading import LoadedModel
from prunelens.model.memory import release_freed_memory
from prunelens.model.tokens import eos_ids, left_pad, pad_id
from prunelens.model.views import view_of


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
    temperature: float = 0.0,
    seed: int = 0,
) -> list[Generation]:
    """Generation keeping the token ids; ``until(text)`` is an extra stop test per row. Greedy unless
    ``temperature`` > 0: then each token is sampled from softmax(z / T), seeded, so the k samples
    that test whether a pruned model still holds an answer are reproducible."""
    if max_new_tokens < 1:
        raise PrunelensError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if engine not in ENGINES:
        raise PrunelensError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    run = _generate_continuous if engine == "continuous" else _generate_static
    pick = picker(temperature, seed, lm.device)
    with view_of(lm.adapter, modification), decode_attention(lm.device):
        return run(lm, prompts, max_new_tokens, tuple(stop), batch_size, progress, desc, until, pick)


def picker(temperature: float, seed: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The next-token rule: argmax, or a seeded draw from softmax(z / T) for T > 0."""
    if temperature < 0:
        raise PrunelensError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if temperature == 0:
        return lambda z: z.argmax(-1)
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda z: torch.multinomial(torch.softmax(z.float() / temperature, -1), 1, generator=g).squeeze(-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    return text[:min((text.find(s) for s in stop if s in text), default=len(text))]


def _finish(tok: Any, ids: list[int], stop: Sequence[str]) -> Generation:
    return Generation(cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop), tuple(ids))


def _generate_static(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str],
                     batch_size: int, progress: bool, desc: str, until: Callable[[str], bool] | None,
                     pick: Callable[[torch.Tensor], torch.Tensor]) -> list[Generation]:
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
            nxt = pick(z)
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


def _shared_prefix_cache(model: Any, prompts: Sequence[Sequence[int]], dev: torch.device) -> tuple[Any, int]:
    """A prefix all prompts share (few-shot exemplars, a system prompt), computed once; exact only
    where every layer attends to the whole context (a sliding window would count the mask's holes)."""
    n_shared = shared_prefix(prompts) if len(prompts) > 1 else 0
    cache = new_cache(model) if n_shared >= MIN_SHARED else None
    if cache is None or not all(isinstance(la, growing_layer_class()) for la in cache.layers):
        return None, n_shared
    ids1 = torch.tensor([list(prompts[0][:n_shared])], device=dev)
    forward_cached(model, ids1, torch.ones_like(ids1), cache)
    return cache, n_shared


def _prefill(model: Any, prompts: Sequence[Sequence[int]], new: list[int], pad: int, dev: torch.device,
             prefix_cache: Any, n_shared: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A wave of waiting prompts prefilled into a cache of their own: (cache, mask, last logits)."""
    wave = new_cache(model)
    if prefix_cache is None:
        ids, mask = left_pad([prompts[i] for i in new], pad, dev)
    else:  # [shared prefix][holes][own tokens]: positions come from the mask, so stay exact
        ids, own = left_pad([prompts[i][n_shared:] for i in new], pad, dev)
        mask = torch.cat([own.new_ones(len(new), n_shared), own], 1)
        for j, layer in enumerate(prefix_cache.layers):
            shape = (len(new), *layer.keys.shape[1:])
            wave.layers[j].update(layer.keys.expand(shape), layer.values.expand(shape))
    return wave, mask, forward_cached(model, ids, mask, wave)


def _advance_rows(tok: Any, active: list[_Row], nxt: list[int], eos: set[int], stop: Sequence[str],
                  until: Callable[[str], bool] | None, max_new_tokens: int, out: list[Generation]
                  ) -> tuple[list[int], int]:
    """Append each row's next token; finished rows go to ``out``. Returns the rows kept and the
    number of tokens made."""
    tail = max((len(s) for s in stop), default=0)
    keep, made = [], 0
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
    return keep, made


def _generate_continuous(lm: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         stop: Sequence[str], batch_size: int, progress: bool, desc: str,
                         until: Callable[[str], bool] | None,
                         pick: Callable[[torch.Tensor], torch.Tensor]) -> list[Generation]:
    tok, model, dev = lm.tokenizer, lm.model, lm.device
    pad, eos = pad_id(lm), eos_ids(lm)
    prefix_cache, n_shared = _shared_prefix_cache(model, prompts, dev)
    queue = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together
    queue.reverse()  # pop() takes the longest first
    out: list[Generation] = [Generation("", ())] * len(prompts)
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
            wave, new_mask, z_new = _prefill(model, prompts, new, pad, dev, prefix_cache, n_shared)
            if active:
                cache, mask = merge_caches(cache, mask, wave, new_mask)
                z = torch.cat([z, z_new], 0)
            else:
                cache, mask, z = wave, new_mask, z_new
            active += [_Row(i, []) for i in new]
        nxt = pick(z).tolist()
        keep, n_made = _advance_rows(tok, active, nxt, eos, stop, until, max_new_tokens, out)
        made += n_made
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
