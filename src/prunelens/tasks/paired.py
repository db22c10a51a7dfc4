"""Format-paired evaluation, the pure part: the same questions asked as multiple choice and as free
generation, so that knowledge loss and format failure can be told apart.

Pure functions only (no model): GSM8K distractors derived deterministically from the gold number,
matching a free-form answer to one of the options, and the paired gap
(MCQ drop − generative drop) with a bootstrap confidence interval that resamples *questions*, so
the four per-question outcomes (dense/pruned × MCQ/generative) stay paired. And the one paired
test of two runs of any task (``paired_test``: difference, its standard error, exact McNemar).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prunelens.errors import PrunelensError

LETTERS = "ABCDEFGHIJ"


def normalize_text(s: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: "New-York." and "new york" match."""
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def gsm8k_distractors(gold: float, k: int = 3) -> list[float]:
    """``k`` wrong numbers derived from the gold one only (no randomness, no model): the usual
    slips — off by one, a factor of two or ten, a dropped or extra operation — filtered to be
    distinct, different from the gold, and non-negative when the gold is."""
    g = float(gold)
    integral = g == int(g)
    cands = [g + 1, g - 1, g * 2, g / 2, g + 10, g - 10, g * 10, g / 10, g + 2, g - 2, g + 5, g - 5,
             g * 3, g + 100]
    out: list[float] = []
    for c in cands:
        if integral and c != int(c):
            continue
        if g >= 0 and c < 0:
            continue
        if c == g or c in out:
            continue
        out.append(c)
        if len(out) == k:
            return out
    raise PrunelensError(f"cannot derive {k} distractors from {gold!r}")


def gsm8k_options(gold: float, index: int, k: int = 3) -> tuple[list[str], int]:
    """Option texts for one GSM8K question and the gold position. The position cycles with the
    question index, so every letter is gold equally often and the answer is not always "A"."""
    nums = gsm8k_distractors(gold, k)
    pos = index % (k + 1)
    nums.insert(pos, float(gold))
    return [_fmt_number(x) for x in nums], pos


def _fmt_number(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


_LETTER = re.compile(r"(?:answer(?: is)?\s*[:\-]?\s*)?\(?\b([A-J])\b\)?", re.IGNORECASE)


def match_choice(generated: str, choices: Sequence[str]) -> int | None:
    """Index of the option a free-form answer gives, or None when it names none or several.

    The option *text* is matched (normalised, as a whole phrase); a bare letter ("B", "(B)",
    "Answer: B") counts only when the text names no option, and only if it is a valid letter."""
    text = f" {normalize_text(generated)} "
    hits = [i for i, c in enumerate(choices) if (n := normalize_text(c)) and f" {n} " in text]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:  # prefer the longest match ("New York City" over "York")
        longest = max(hits, key=lambda i: len(normalize_text(choices[i])))
        others = [i for i in hits if i != longest and normalize_text(choices[i]) not in
                  normalize_text(choices[longest])]
        return None if others else longest
    m = _LETTER.fullmatch(generated.strip().rstrip("."))
    if m:
        i = LETTERS.index(m.group(1).upper())
        return i if i < len(choices) else None
    return None


@dataclass(frozen=True)
class PairedGap:
    """Accuracy drops (dense − pruned) in both formats and their difference, with a percentile
    bootstrap CI of the gap. A negative gap means generation lost more than multiple choice."""

    n: int
    mcq_dense: float
    mcq_pruned: float
    gen_dense: float
    gen_pruned: float
    mcq_drop: float
    gen_drop: float
    gap: float
    ci_low: float
    ci_high: float


def paired_gap(mcq_dense: Sequence[float], mcq_pruned: Sequence[float], gen_dense: Sequence[float],
               gen_pruned: Sequence[float], n_boot: int = 2000, confidence: float = 0.95,
               seed: int = 0) -> PairedGap:
    """Gap = (MCQ drop) − (generative drop) over the same questions, per-question outcomes in [0, 1]."""
    cols = [np.asarray(x, dtype=np.float64) for x in (mcq_dense, mcq_pruned, gen_dense, gen_pruned)]
    n = len(cols[0])
    if n == 0 or any(len(c) != n for c in cols):
        raise PrunelensError("paired evaluation needs the same non-empty set of questions in all four runs")
    if not 0 < confidence < 1:
        raise PrunelensError(f"confidence must be in (0, 1), got {confidence}")
    md, mp, gd, gp = cols
    per_q = (md - mp) - (gd - gp)  # the gap is the mean of this per-question difference
    rng = np.random.default_rng(seed)
    boots = per_q[rng.integers(0, n, size=(n_boot, n))].mean(1)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(boots, [a, 1 - a])
    return PairedGap(n, float(md.mean()), float(mp.mean()), float(gd.mean()), float(gp.mean()),
                     float((md - mp).mean()), float((gd - gp).mean()), float(per_q.mean()),
                     float(lo), float(hi))


#: below these a paired difference is printed but flagged as too small to read
MIN_ITEMS, MIN_DISCORDANT = 20, 5


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p: under no change each of the ``b + c`` discordant pairs flips
    either way with probability ½, so p = min(1, 2·P[Binomial(b+c, ½) ≤ min(b, c)]); 1 with none."""
    if b < 0 or c < 0:
        raise PrunelensError(f"discordant counts must be non-negative, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedTest:
    """Modified − dense over the same items: the mean paired difference, its standard error
    (sd of the per-item differences / √n), the flips each way and McNemar's exact p."""

    n: int
    difference: float
    stderr: float
    lost: int    # right dense, wrong modified
    gained: int  # wrong dense, right modified
    p_mcnemar: float
    too_small: bool

    def line(self) -> str:
        se = f"±{self.stderr:.3f}" if math.isfinite(self.stderr) else ""
        note = (f"  (too few to read: n={self.n}, {self.lost + self.gained} flips; need ≥{MIN_ITEMS} items "
                f"and ≥{MIN_DISCORDANT} flips)" if self.too_small else "")
        return (f"paired Δ {self.difference:+.3f}{se}, flips -{self.lost}/+{self.gained}, "
                f"McNemar p={self.p_mcnemar:.3g}{note}")


def paired_test(dense: dict[Any, float], modified: dict[Any, float]) -> PairedTest:
    """The paired test of two runs' per-item outcomes (1 right, 0 wrong), keyed by item."""
    if not dense or dense.keys() != modified.keys():
        raise PrunelensError("a paired test needs the same non-empty set of items in both runs")
    keys = list(dense)
    d = np.asarray([modified[k] - dense[k] for k in keys], dtype=np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    lost = sum(1 for k in keys if dense[k] > 0.5 >= modified[k])
    gained = sum(1 for k in keys if modified[k] > 0.5 >= dense[k])
    return PairedTest(n, float(d.mean()), se, lost, gained, mcnemar_exact_p(lost, gained),
                      n < MIN_ITEMS or lost + gained < MIN_DISCORDANT)
