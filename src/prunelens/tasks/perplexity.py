"""Perplexity of a (possibly modified) model on a text corpus.

WikiText-style, as Wanda and SparseGPT measure it: the corpus is joined into one string
(JSONL rows with "\\n\\n", blank rows included), tokenised once, cut into non-overlapping windows of
``seq_len`` tokens, and perplexity = exp(total next-token NLL / number of predicted tokens).
Token-level perplexity (not word-level). ``positions="second-half"`` scores each window as
llama.cpp's ``llama-perplexity`` does (see ``scored_windows``), so its numbers can be set beside
llama.cpp's. The ``wikitext`` task (WikiText-2 raw test: the local
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


POSITIONS = ("all", "second-half")


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token before a text (llama.cpp's ``llama_vocab_get_add_bos``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def first_scored(seq_len: int, positions: str) -> int:
    """The first position whose next-token prediction is scored (0, or ``seq_len // 2``), checked:
    a window must leave at least one prediction to score."""
    if positions not in POSITIONS:
        raise PrunelensError(f"--positions must be one of {', '.join(POSITIONS)}, got '{positions}'")
    first = seq_len // 2 if positions == "second-half" else 0
    if seq_len - 1 - first < 1:
        raise PrunelensError(f"a window of {seq_len} tokens leaves no {positions} position to score: "
                             f"use --seq-len {3 if positions == 'second-half' else 2} or more")
    return first


def scored_windows(lm: LoadedModel, text: str, seq_len: int, max_windows: int | None,
                   positions: str = "all") -> tuple[torch.Tensor, int, int]:
    """The windows (n × seq_len), the first scored position and the corpus's token count.

    ``all``: every next-token prediction of a window (``seq_len - 1``), as Wanda and SparseGPT
    measure. ``second-half``: llama.cpp's ``llama-perplexity`` convention (tools/perplexity: the
    same corpus tokenisation, with BOS when the model adds one, cut into ``n_ctx`` chunks): where the
    tokenizer adds BOS, each window's first token is *replaced* by BOS (the corpus's first already is
    BOS), and only the predictions from position ``first = seq_len // 2`` to ``seq_len - 2`` are
    scored (``seq_len - 1 - seq_len // 2`` per window, 255 of 512), so every scored token has at
    least half a window of context.
    """
    first = first_scored(seq_len, positions)
    windows, corpus_tokens = _windows(lm, text, seq_len, max_windows)
    if positions == "second-half" and adds_bos(lm.tokenizer):
        windows = windows.clone()
        windows[:, 0] = lm.tokenizer.bos_token_id
    return windows, first, corpus_tokens


def check_kld_windows(n_windows: int, seq_len: int, positions: str = "all") -> None:
    """KL statistics need 2 scored tokens (their standard errors do): a window of ``seq_len``
    scores ``seq_len - 1`` (``all``) or ``seq_len - 1 - seq_len // 2`` (``second-half``)."""
    per = seq_len - 1 - first_scored(seq_len, positions)
    if n_windows * per < 2:
        raise PrunelensError(f"KL statistics need at least 2 predicted tokens, and {n_windows} window(s) of "
                             f"{seq_len} tokens predict {n_windows * per}: use --seq-len "
                             f"{3 if positions == 'all' else 5} or more")


@torch.inference_mode()
def kl_statistics(
    lm: LoadedModel,
    text: str,
    modification: Any = None,
    seq_len: int = 1024,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    *,
    candidate: LoadedModel | None = None,
    positions: str = "all",
) -> dict[str, Any]:
    """The KL-divergence and token-probability statistics quantisation users read from llama.cpp
    (``llama-perplexity --kl-divergence``), for the dense model ``lm`` against ``modification`` (a
    view of ``lm``) or against ``candidate`` (a separately loaded model, fed the very same token
    ids), over the windows and positions ``scored_windows`` gives (``second-half`` = llama.cpp's).
    Definitions: ``metrics.token_kld``/``kld_summary``; exact, where llama.cpp reads the base's
    log-probs back as uint16 over 16 nats (within 1.5 % of it on the same weights, RESULTS.md)."""
    if candidate is not None and modification is not None:
        raise ValueError("give a modification of lm or a candidate model, not both")
    windows, first, _ = scored_windows(lm, text, seq_len, max_windows, positions)
    check_kld_windows(len(windows), seq_len, positions)
    other = candidate if candidate is not None else lm
    rows = rows_per_chunk(int(lm.model.config.get_text_config().vocab_size))
    parts: dict[str, list[torch.Tensor]] = {}
    for b0 in tqdm(range(0, len(windows), batch_size), desc="kl statistics", unit="batch", disable=not progress):
        x = windows[b0:b0 + batch_size]
        hb = final_states(lm.adapter, x.to(lm.device))[:, first:-1]
        hm = final_states(other.adapter, x.to(other.device), modification)[:, first:-1]
        hb, hm = hb.reshape(-1, hb.shape[-1]), hm.reshape(-1, hm.shape[-1])
        t = x[:, first + 1:].reshape(-1)
        for i in range(0, len(t), rows):
            zb = lm.adapter.head_logits(hb[i:i + rows]).float()
            zm = other.adapter.head_logits(hm[i:i + rows]).float().to(zb.device)
            for k, v in token_kld(zb, zm, t[i:i + rows]).items():
                parts.setdefault(k, []).append(v.cpu())
    out = kld_summary({k: torch.cat(v) for k, v in parts.items()})
    out.update(windows=len(windows), seq_len=seq_len, positions_rule=positions)
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
    positions: str = "all",
) -> dict[str, Any]:
    """Token-level perplexity over non-overlapping windows (the first ``max_windows`` if given),
    scoring the positions ``scored_windows`` says (every prediction, or llama.cpp's second half)."""
    windows, first, corpus_tokens = scored_windows(lm, text, seq_len, max_windows, positions)
    nll, count = 0.0, 0
    rows = rows_per_chunk(int(lm.model.config.get_text_config().vocab_size))
    for b0 in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        x = windows[b0:b0 + batch_size].to(lm.device)
        # the final-norm outputs, then the head a chunk of positions at a time: never
        # batch × length × vocabulary logits at once
        h = final_states(lm.adapter, x, modification)
        nll += chunked_nll(lambda h: lm.adapter.head_logits(h).float(), h[:, first:-1], x[:, first + 1:], rows)
        count += x[:, first + 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
            "windows": len(windows), "seq_len": seq_len, "corpus_tokens": corpus_tokens,
            "positions_rule": positions}


def kld_lines(k: dict[str, Any]) -> list[str]:
    """``kl_statistics`` printed as llama.cpp prints them."""
    return [f"Mean    KLD: {k['mean_kld']:10.6f} ± {k['mean_kld_se']:.6f}",
            f"Maximum KLD: {k['max_kld']:10.6f}",
            *[f"{q:5.1f}%  KLD: {k[f'kld_p{q:g}']:10.6f}" for q in (99.9, 99.0, 95.0, 90.0)],
            f"Median  KLD: {k['kld_p50']:10.6f}",
            f"Mean    Δp: {100 * k['mean_dp']:7.3f} ± {100 * k['mean_dp_se']:.3f} %",
            f"RMS     Δp: {100 * k['rms_dp']:7.3f} ± {100 * k['rms_dp_se']:.3f} %",
            f"Same top p: {100 * k['same_top']:7.3f} ± {100 * k['same_top_se']:.3f} %",
            f"over {int(k['positions'])} positions ({k.get('positions_rule', 'all')}) in {k['windows']} windows "
            f"of {k['seq_len']}"]


def _evaluate(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
              modification: Any) -> TaskScore:
    text = "\n\n".join(r["text"] for r in load_rows(WIKITEXT, data_dir).rows)
    res = perplexity(lm, text, modification, 1024, o.limit, progress=o.progress)  # --limit: 1024-token windows
    return TaskScore(task.name, task.kind, task.metric, res["perplexity"], float("nan"), res["windows"], res)


register(Task("wikitext", PERPLEXITY, "perplexity", "WikiText-2 raw test, 1024-token windows", _evaluate,
              (WIKITEXT,)))
