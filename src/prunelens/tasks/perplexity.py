"""Perplexity of a (possibly modified) model on a text corpus.

WikiText-style, as Wanda and SparseGPT measure it: the corpus is joined into one string
(JSONL rows with "\\n\\n", blank rows included), tokenised once, cut into non-overlapping windows of
``seq_len`` tokens, and perplexity = exp(total next-token NLL / number of predicted tokens).
Token-level perplexity (not word-level).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.data import iter_jsonl, read_text_file
from prunelens.errors import PrunelensError
from prunelens.metrics import chunked_nll, rows_per_chunk
from prunelens.model.capture import capture
from prunelens.model.loading import LoadedModel
from prunelens.prune import view_of


def read_corpus(path: str | Path) -> str:
    """The whole text of a .txt file, or the "text" fields of a .jsonl(.gz) joined with blank lines."""
    p = Path(path)
    if not p.is_file():
        raise PrunelensError(f"text file '{p}' does not exist")
    if ".jsonl" not in p.name:
        text = read_text_file(p)
    else:
        rows = []
        for n, obj in iter_jsonl(p):
            if not isinstance(obj.get("text"), str):
                raise PrunelensError(f"{p}:{n}: expected a JSON object with a 'text' field")
            rows.append(obj["text"])
        text = "\n\n".join(rows)
    if not text.strip():
        raise PrunelensError(f"text file '{p}' is empty")
    return text


@torch.inference_mode()
def perplexity(
    lm: LoadedModel,
    text: str,
    modification: Any = None,
    seq_len: int = 1024,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-level perplexity over non-overlapping windows (the first ``max_windows`` if given)."""
    if seq_len < 2:
        raise PrunelensError(f"sequence length must be at least 2, got {seq_len}")
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    n_windows = len(ids) // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise PrunelensError(f"--max-windows must be at least 1, got {max_windows}")
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise PrunelensError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    nll, count = 0.0, 0
    rows = rows_per_chunk(int(lm.model.config.get_text_config().vocab_size))
    with view_of(lm.adapter, modification):
        batches = range(0, n_windows, batch_size)
        for b0 in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            x = windows[b0:b0 + batch_size].to(lm.device)
            # the final-norm outputs, then the head a chunk of positions at a time: never
            # batch × length × vocabulary logits at once
            with capture(lm.adapter, ["final"]) as st:
                lm.model(input_ids=x, use_cache=False, logits_to_keep=1)
            nll += chunked_nll(lambda h: lm.adapter.head_logits(h).float(), st["final"][:, :-1], x[:, 1:], rows)
            count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
            "windows": n_windows, "seq_len": seq_len, "corpus_tokens": len(ids)}
