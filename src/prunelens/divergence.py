"""Statistics the field uses to compare a compressed (candidate) model with its base (reference).

Pure math on logits and token ids, for "any candidate model vs base". Per-row functions keep the
leading dimensions (positions); ``comparison_summary`` turns rows into means ± standard errors.

Conventions (as prunelens.metrics): ``kl`` = KL(p_cand ‖ p_ref), ``rkl`` = KL(p_ref ‖ p_cand) —
``rkl`` is the direction llama.cpp (``llama-perplexity --kl-divergence``), exllamav3
(``eval/model_diff.py``, "KL divergence (A, B)" with B the reference) and mlx-lm (``mlx_lm.kld``,
"KL(baseline ‖ model)") report. Row keys: ``kl``, ``rkl``, ``top{K}_agree``, ``label_top{K}_ref``,
``label_top{K}_cand``, ``p_top_ref``. Logits must cover the true vocabulary only (slice off padding
columns first, as exllamav3 does). Metrics are float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch

from prunelens.errors import PrunelensError
from prunelens.metrics import kl_div, log_probs

Tensor = torch.Tensor

DEFAULT_KS = tuple(range(1, 11))
# exllamav3's reference-confidence buckets; the last bucket is closed so that p = 1 counts.
CONFIDENCE_EDGES = (0.0, 0.25, 0.5, 0.75, 0.95, 1.0)


def _topk_indices(z: Tensor, k: int) -> Tensor:
    return z.topk(min(k, z.shape[-1]), dim=-1).indices


def topk_agreement(z_ref: Tensor, z_cand: Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[int, Tensor]:
    """Per row, 1.0 where both models' *ordered* top-K token lists are identical (exllamav3's
    "Top-K agreement": position by position equal, not set equality), else 0.0. K = 1 is the
    same-top-token rate. Both lists come from one ``topk(max K)`` call per model, as there."""
    ks = sorted(set(ks))
    a, b = _topk_indices(z_ref, ks[-1]), _topk_indices(z_cand, ks[-1])
    return {k: (a[..., :k] == b[..., :k]).all(-1).to(torch.float64) for k in ks}


def label_in_topk(z: Tensor, labels: Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[int, Tensor]:
    """Per row, 1.0 where the label (the text's next token) is among the model's K most likely
    tokens (exllamav3's "label in top-K"; K = 1 is next-token accuracy). The caller aligns the
    logits at position t with the label at t + 1."""
    ks = sorted(set(ks))
    top = _topk_indices(z, ks[-1])
    hit = top == labels.to(top.device, torch.long).unsqueeze(-1)
    return {k: hit[..., :k].any(-1).to(torch.float64) for k in ks}


def kl_by_confidence(kl: Tensor, p_top_ref: Tensor,
                     edges: Sequence[float] = CONFIDENCE_EDGES) -> list[dict[str, float]]:
    """KL bucketed by the reference's top-token probability, as exllamav3 does ("the mean KLD is
    dominated by tokens where the reference itself is undecided"): per bucket [lo, hi) (the last
    one closed) its row count ``n``, ``share_of_rows``, ``mean_kl``, ``median_kl`` (torch's lower
    median, as there) and ``kl_share``, its part of the summed KL — where the KL mass comes from.
    Empty buckets are kept with n = 0 and NaN mean/median. Rows outside [edges[0], edges[-1]]
    fall in no bucket (none with the default edges)."""
    pairs = list(zip(edges[:-1], edges[1:], strict=True))
    if not pairs or any(lo >= hi for lo, hi in pairs):
        raise ValueError(f"edges must increase, got {tuple(edges)}")
    kl, conf = kl.detach().to(torch.float64).flatten(), p_top_ref.detach().to(torch.float64).flatten()
    if kl.shape != conf.shape:
        raise ValueError(f"kl and p_top_ref differ in size: {kl.numel()} vs {conf.numel()}")
    total, out = float(kl.sum()), []
    for i, (lo, hi) in enumerate(pairs):
        mask = (conf >= lo) & ((conf <= hi) if i == len(pairs) - 1 else (conf < hi))
        v = kl[mask]
        out.append({"lo": float(lo), "hi": float(hi), "n": int(v.numel()),
                    "share_of_rows": v.numel() / max(kl.numel(), 1),
                    "mean_kl": float(v.mean()) if v.numel() else math.nan,
                    "median_kl": float(v.median()) if v.numel() else math.nan,
                    "kl_share": float(v.sum()) / total if total > 0 else math.nan})
    return out


def _ids(x: Sequence[int] | Tensor) -> list[int]:
    return [int(t) for t in (x.flatten().tolist() if isinstance(x, Tensor) else x)]


def first_divergent_token(ref_ids: Sequence[int] | Tensor, cand_ids: Sequence[int] | Tensor,
                          autojunk: bool = True) -> int:
    """OpenVINO who-what-benchmark's FDT (after Deiseroth et al., arXiv 2311.01544): the 0-based
    index of the first divergent token, i.e. the number of leading tokens the two texts share — the
    size of difflib's first matching block of the token ids if that block starts both sequences,
    else 0; 0 if either is empty; the length when they are identical. Best is large.

    Two differences from a plain common prefix, both WWB's: difflib may align the shared prefix
    elsewhere (ref [1, 2, 1, 2, 3], cand [1, 2, 3] gives 0, not 2), and with ``autojunk`` (difflib's
    default, which WWB keeps) sequences of 200+ tokens ignore their most frequent tokens. WWB
    encodes texts with the tokenizer's special tokens, so a shared BOS adds 1 to its FDT.

    prunelens's own "first divergence" (the trace's ``prompt_records``) is the 1-based decoding step
    t at which the two models' greedy free-running tokens first differ, None when they never do:
    where difflib's first block is the common prefix, FDT = t − 1, and None corresponds to FDT =
    the length of the (identical) sequences.
    """
    a, b = _ids(ref_ids), _ids(cand_ids)
    if not a or not b:
        return 0
    first = SequenceMatcher(None, a, b, autojunk=autojunk).get_matching_blocks()[0]
    return first.size if first.a == 0 and first.b == 0 else 0


def divergent_tokens(ref_ids: Sequence[int] | Tensor, cand_ids: Sequence[int] | Tensor,
                     autojunk: bool = True) -> int:
    """WWB's SDT: how many candidate tokens difflib leaves unmatched against the reference (the
    tokens to correct); if the candidate is empty, the reference's length, as WWB has it."""
    a, b = _ids(ref_ids), _ids(cand_ids)
    if not a or not b:
        return len(a) if not b else len(b)
    blocks = SequenceMatcher(None, a, b, autojunk=autojunk).get_matching_blocks()
    return len(b) - sum(m.size for m in blocks)


def share_of_divergent_tokens(ref_ids: Sequence[int] | Tensor, cand_ids: Sequence[int] | Tensor,
                              autojunk: bool = True) -> float:
    """WWB's "SDT norm": ``divergent_tokens`` / len(candidate), in [0, 1], best 0; 1 when exactly
    one text is empty, 0 when both are."""
    a, b = _ids(ref_ids), _ids(cand_ids)
    if not a or not b:
        return 0.0 if not a and not b else 1.0
    return divergent_tokens(a, b, autojunk) / len(b)


@dataclass(frozen=True)
class Truncated:
    """One model's next-token distributions kept as top-K only (mlx-lm's ``kld`` baseline cache):
    per row the K largest log-probabilities in decreasing order (``logp``), their token ids
    (``idx``) and log of the mass of every other token (``log_tail``; −inf when K = vocabulary)."""

    logp: Tensor       # (..., K) float32 by default
    idx: Tensor        # (..., K) int32
    log_tail: Tensor   # (...,)
    vocab: int
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.logp.shape[-1]

    def nbytes(self) -> int:
        """Bytes of the three tensors."""
        return sum(t.numel() * t.element_size() for t in (self.logp, self.idx, self.log_tail))

    def full_nbytes(self) -> int:
        """Bytes of float32 logits of the same positions over the whole vocabulary."""
        return self.log_tail.numel() * self.vocab * 4


def truncate(z: Tensor, k: int, temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> Truncated:
    """Keep the top ``k`` of softmax(z / T) per row. The tail's log-mass is the logsumexp of the
    other log-probabilities (not log(1 − Σ top), which cancels). Holds one float64 copy of ``z``:
    chunk the rows (``metrics.rows_per_chunk``) for long texts and large vocabularies."""
    vocab = z.shape[-1]
    if not 1 <= k <= vocab:
        raise PrunelensError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    lp = log_probs(z, temperature)
    top = lp.topk(k, dim=-1)
    tail = lp.scatter(-1, top.indices, -math.inf).logsumexp(-1)
    return Truncated(top.values.to(dtype), top.indices.to(torch.int32), tail.to(dtype), vocab, temperature)


def truncated_stats(trunc: Truncated, z_full: Tensor, temperature: float = 1.0, truncated: str = "ref",
                    ks: Iterable[int] = DEFAULT_KS, labels: Tensor | None = None) -> dict[str, Tensor]:
    """Per-row comparison of a truncated model (the reference, or with ``truncated="cand"`` the
    candidate) with the other model's full logits ``z_full`` (same positions).

    KL both ways is computed as mlx-lm does: the complement of the truncated model's top-K is one
    bucket on both sides, so each side is a K + 1 cell distribution (the full side's tail is the
    logsumexp of its other log-probabilities). Coarse-graining never increases a divergence (data
    processing inequality), so both are lower bounds of the full KLs, equal to them at K =
    vocabulary and nondecreasing in K. Also ``top{K}_agree`` for each K ≤ stored K (exllamav3's
    ordered top-K agreement), ``p_top_ref``, each side's tail mass (``tail_ref``, ``tail_cand``) and,
    given ``labels``, ``label_top{K}_ref`` / ``label_top{K}_cand``."""
    if truncated not in ("ref", "cand"):
        raise ValueError(f"truncated must be 'ref' or 'cand', got {truncated!r}")
    if z_full.shape[-1] != trunc.vocab or z_full.shape[:-1] != trunc.log_tail.shape:
        raise PrunelensError(f"logits of shape {tuple(z_full.shape)} do not match a truncated set of "
                             f"{tuple(trunc.log_tail.shape)} rows over a vocabulary of {trunc.vocab}")
    if temperature != trunc.temperature:
        raise PrunelensError(f"the truncated distributions were stored at temperature {trunc.temperature:g}, "
                             f"not {temperature:g}")
    lead, k = trunc.log_tail.shape, trunc.k
    lf = log_probs(z_full.reshape(-1, trunc.vocab), temperature)
    idx = trunc.idx.reshape(-1, k).to(lf.device, torch.long)
    coarse_t = torch.cat([trunc.logp.reshape(-1, k), trunc.log_tail.reshape(-1, 1)], -1).to(lf)
    coarse_f = torch.cat([lf.gather(-1, idx), lf.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True)], -1)
    ref, cand = (coarse_t, coarse_f) if truncated == "ref" else (coarse_f, coarse_t)
    out = {"kl": kl_div(cand, ref), "rkl": kl_div(ref, cand),
           "p_top_ref": (coarse_t[:, 0] if truncated == "ref" else lf.max(-1).values).exp(),
           "tail_ref": ref[:, -1].exp(), "tail_cand": cand[:, -1].exp()}
    ks = sorted(kk for kk in set(ks) if kk <= k)
    top_f = _topk_indices(lf, ks[-1]) if ks else idx[:, :0]
    for kk in ks:
        out[f"top{kk}_agree"] = (top_f[:, :kk] == idx[:, :kk]).all(-1).to(torch.float64)
    if labels is not None:
        lab = labels.reshape(-1, 1).to(idx.device, torch.long)
        hit_t, hit_f = idx == lab, top_f == lab
        names = ("ref", "cand") if truncated == "ref" else ("cand", "ref")
        for kk in ks:
            out[f"label_top{kk}_{names[0]}"] = hit_t[:, :kk].any(-1).to(torch.float64)
            out[f"label_top{kk}_{names[1]}"] = hit_f[:, :kk].any(-1).to(torch.float64)
    return {key: v.reshape(lead) for key, v in out.items()}


def comparison_rows(z_ref: Tensor, z_cand: Tensor, labels: Tensor | None = None,
                    ks: Iterable[int] = DEFAULT_KS, temperature: float = 1.0) -> dict[str, Tensor]:
    """The per-row statistics from both models' full logits, under the keys ``truncated_stats``
    uses, for ``comparison_summary``."""
    ks = sorted(set(ks))
    lr, lc = log_probs(z_ref, temperature), log_probs(z_cand, temperature)
    out = {"kl": kl_div(lc, lr), "rkl": kl_div(lr, lc), "p_top_ref": lr.max(-1).values.exp()}
    out.update({f"top{k}_agree": v for k, v in topk_agreement(z_ref, z_cand, ks).items()})
    if labels is not None:
        for name, z in (("ref", z_ref), ("cand", z_cand)):
            out.update({f"label_top{k}_{name}": v for k, v in label_in_topk(z, labels, ks).items()})
    return out


def comparison_summary(rows: dict[str, Tensor], kl_key: str = "rkl",
                       edges: Sequence[float] = CONFIDENCE_EDGES) -> dict[str, object]:
    """Mean of every per-row statistic with its standard error (sample s.d. / √n; NaN for one
    row) as ``key`` and ``key_se``, the row count as ``positions``, and — when ``p_top_ref`` and
    ``kl_key`` are present — ``kl_by_confidence`` of that KL (default KL(ref ‖ cand), the one
    exllamav3 buckets)."""
    flat = {key: v.detach().to(torch.float64).flatten() for key, v in rows.items()}
    sizes = {v.numel() for v in flat.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"rows must be non-empty and of one length, got sizes {sorted(sizes)}")
    n = sizes.pop()
    out: dict[str, object] = {"positions": n}
    for key, v in flat.items():
        out[key] = float(v.mean())
        out[f"{key}_se"] = float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    if "p_top_ref" in flat and kl_key in flat:
        out["kl_by_confidence"] = kl_by_confidence(flat[kl_key], flat["p_top_ref"], edges)
    return out


def step_comparison(z_ref: Tensor, z_cand: Tensor, ks: Iterable[int] = DEFAULT_KS,
                    temperature: float = 1.0) -> dict[str, Tensor]:
    """Per row, the comparison statistics a decoding step adds to prunelens's own metrics:
    ``top{K}_agree`` for K ≥ 2 (K = 1 is the metrics' ``top1_agree``), ``label_top{K}`` — the
    reference's greedy token among the candidate's K most likely (the label of the text being
    decoded, which in teacher-forced mode is the reference's) — and ``p_top_ref`` at
    ``temperature``, the reference confidence KL is bucketed by."""
    ks = sorted(set(ks))
    out = {f"top{k}_agree": v for k, v in topk_agreement(z_ref, z_cand, ks).items() if k > 1}
    label = z_ref.argmax(-1)
    out.update({f"label_top{k}": v for k, v in label_in_topk(z_cand, label, ks).items()})
    out["p_top_ref"] = log_probs(z_ref, temperature).max(-1).values.exp()
    return out
