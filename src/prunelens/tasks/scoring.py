"""Pure scoring math for task outputs: retrieval ranking, generation fidelity, repetition.

No model code here, so every function is checked against hand-computed values in the tests.
Conventions follow the tools people compare against: nDCG uses linear gains (trec_eval /
pytrec_eval, as BEIR reports it); recall@k counts documents with a positive grade; ROUGE-L is the
LCS-based F1 over whitespace words (Lin, 2004, with β = 1).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

# --- retrieval ---------------------------------------------------------------------------------


def dcg(gains: Sequence[float]) -> float:
    """Σ gainᵢ / log₂(i + 1), ranks i counted from 1."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranked: Sequence[Hashable], relevance: Mapping[Hashable, float], k: int = 10) -> float:
    """nDCG@k of a ranking against graded relevance (missing documents have grade 0)."""
    ideal = dcg(sorted((g for g in relevance.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return float("nan")
    return dcg([max(relevance.get(d, 0.0), 0.0) for d in ranked[:k]]) / ideal


def recall_at_k(ranked: Sequence[Hashable], relevance: Mapping[Hashable, float], k: int) -> float:
    """Share of the relevant documents (grade > 0) found in the top k."""
    relevant = {d for d, g in relevance.items() if g > 0}
    if not relevant:
        return float("nan")
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def reciprocal_rank(ranked: Sequence[Hashable], relevance: Mapping[Hashable, float], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevance.get(d, 0.0) > 0:
            return 1.0 / (i + 1)
    return 0.0


# --- generation fidelity -----------------------------------------------------------------------


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts over whitespace words; 1 for two empty texts."""
    c, r = candidate.split(), reference.split()
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def first_divergence(a: Sequence[Hashable], b: Sequence[Hashable]) -> int | None:
    """First position where two token sequences differ (a length mismatch counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_agreement(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """Share of the reference's positions where the candidate has the same token.

    Position-wise, as free-running decoding is compared step by step: after a divergence the two
    texts are usually shifted, so agreement falls even if words reappear later (ROUGE-L measures
    that). A missing position counts as a mismatch; two empty sequences agree fully.
    """
    n = max(len(reference), len(candidate))
    if n == 0:
        return 1.0
    return sum(x == y for x, y in zip(candidate, reference, strict=False)) / n


def repetition_rate(tokens: Sequence[Hashable], n: int = 4) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same text (0 = none, → 1 = a loop).

    Degenerate repetition is the typical failure of a pruned model's free-running output.
    """
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
