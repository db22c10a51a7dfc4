"""Perplexity of a (possibly modified) model on a text corpus.

WikiText-style, as Wanda and SparseGPT measure it: the corpus is joined into one string
(JSONL rows with "\\n\\n", blank rows included), tokenised once, cut into non-overlapping windows of
``seq_len`` tokens, and perplexity = exp(total next-token NLL / number of predicted tokens).
Token-level perplexity (not word-level). The ``wikitext`` task (WikiText-2 raw test: the local
``wikitext2_raw_test.jsonl``, else Salesforce/wikitext on the Hub) registers itself at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.data import iter_jsonl, read_text_file
from prunelens.errors import PrunelensError
from prunelens.metrics import chunked_nll, kld_summary, rows_per_chunk, token_kld
from prunelens.model.capture import final_states
from prunelens.model.loading import LoadedModel
from prunelens.tasks.base import PERPLEXITY, Task, TaskOptions, TaskScore, register
from prunelens.tasks.sources import HubSplit, Source, load_rows, register_source

WIKITEXT = register_source(Source("wikitext", ("wikitext2_raw_test.jsonl",), {"text": str},
                                  (HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),), ("text",)))


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


def _windows(lm: LoadedModel, text: str, seq_len: int, max_windows: int | None) -> tuple[torch.Tensor, int]:
    """The corpus tokenised once and cut into non-overlapping windows (n_windows × seq_len), and
    the corpus's token count."""
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
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len), len(ids)


def check_kld_windows(n_windows: int, seq_len: int) -> None:
    """KL statistics need 2 predicted tokens (their standard errors do): a window of ``seq_len``
    predicts ``seq_len - 1``, so ``--seq-len 3`` always works, 2 only over several windows."""
    if n_windows * (seq_len - 1) < 2:
        raise PrunelensError(f"KL statistics need at least 2 predicted tokens, and {n_windows} window(s) of "
                             f"{seq_len} tokens predict {n_windows * (seq_len - 1)}: use --seq-len 3 or more")


@torch.inference_mode()
def kl_statistics(
    lm: LoadedModel,
    text: str,
    modification: Any,
    seq_len: int = 1024,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """The KL-divergence and token-probability statistics quantisation users read from llama.cpp
    (``llama-perplexity --kl-divergence``), for the dense model against ``modification``, over the same
    windows and positions as ``perplexity`` (every next-token position of each window; llama.cpp
    scores the second half of each window only). Definitions: ``metrics.token_kld``/``kld_summary``."""
    windows, _ = _windows(lm, text, seq_len, max_windows)
    check_kld_windows(len(windows), seq_len)
    rows = rows_per_chunk(int(lm.model.config.get_text_config().vocab_size))
    parts: dict[str, list[torch.Tensor]] = {}

    def head(h: torch.Tensor) -> torch.Tensor:
        return lm.adapter.head_logits(h).float()

    for b0 in tqdm(range(0, len(windows), batch_size), desc="kl statistics", unit="batch", disable=not progress):
        x = windows[b0:b0 + batch_size].to(lm.device)
        hb, hm = final_states(lm.adapter, x), final_states(lm.adapter, x, modification)
        hb, hm = hb[:, :-1].reshape(-1, hb.shape[-1]), hm[:, :-1].reshape(-1, hm.shape[-1])
        t = x[:, 1:].reshape(-1)
        for i in range(0, len(t), rows):
            for k, v in token_kld(head(hb[i:i + rows]), head(hm[i:i + rows]), t[i:i + rows]).items():
                parts.setdefault(k, []).append(v.cpu())
    out = kld_summary({k: torch.cat(v) for k, v in parts.items()})
    out.update(windows=len(windows), seq_len=seq_len)
    return out


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
    windows, corpus_tokens = _windows(lm, text, seq_len, max_windows)
    nll, count = 0.0, 0
    rows = rows_per_chunk(int(lm.model.config.get_text_config().vocab_size))
    for b0 in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        x = windows[b0:b0 + batch_size].to(lm.device)
        # the final-norm outputs, then the head a chunk of positions at a time: never
        # batch × length × vocabulary logits at once
        h = final_states(lm.adapter, x, modification)
        nll += chunked_nll(lambda h: lm.adapter.head_logits(h).float(), h[:, :-1], x[:, 1:], rows)
        count += x[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
            "windows": len(windows), "seq_len": seq_len, "corpus_tokens": corpus_tokens}


def kld_lines(k: dict[str, Any]) -> list[str]:
    """``kl_statistics`` printed as llama.cpp prints them."""
    return [f"Mean    KLD: {k['mean_kld']:10.6f} ± {k['mean_kld_se']:.6f}",
            f"Maximum KLD: {k['max_kld']:10.6f}",
            *[f"{q:5.1f}%  KLD: {k[f'kld_p{q:g}']:10.6f}" for q in (99.9, 99.0, 95.0, 90.0)],
            f"Median  KLD: {k['kld_p50']:10.6f}",
            f"Mean    Δp: {100 * k['mean_dp']:7.3f} ± {100 * k['mean_dp_se']:.3f} %",
            f"RMS     Δp: {100 * k['rms_dp']:7.3f} ± {100 * k['rms_dp_se']:.3f} %",
            f"Same top p: {100 * k['same_top']:7.3f} ± {100 * k['same_top_se']:.3f} %",
            f"over {int(k['positions'])} positions in {k['windows']} windows of {k['seq_len']}"]


def _evaluate(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
              modification: Any) -> TaskScore:
    text = "\n\n".join(r["text"] for r in load_rows(WIKITEXT, data_dir).rows)
    res = perplexity(lm, text, modification, 1024, o.limit, progress=o.progress)  # --limit: 1024-token windows
    return TaskScore(task.name, task.kind, task.metric, res["perplexity"], float("nan"), res["windows"], res)


register(Task("wikitext", PERPLEXITY, "perplexity", "WikiText-2 raw test, 1024-token windows", _evaluate,
              (WIKITEXT,)))
