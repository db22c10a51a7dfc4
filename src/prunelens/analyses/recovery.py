"""Where a pruning's lost answers went: demoted or erased (beyond the paper).

"The Benchmark Illusion" (arXiv 2606.17609) reports that a pruned model's lost answers are often
demoted, not erased; "Don't Go Breaking My LLM" (arXiv 2606.24970) that pruning degrades
calibration while accuracy holds. For the questions a pruning loses (the dense model answers them
right, the pruned one does not), three readings tell demotion from erasure:

- the rank of the dense model's right continuation in the pruned model's logits at the first step
  where, teacher-forced on that continuation, the pruned model prefers another token (2 = runner-up);
- whether any of k samples at T = 0.7 answers right (the answer is still in the distribution);
- whether one solved example in context brings the greedy answer back (a nudge is enough);

and for multiple choice, the expected calibration error of the option probabilities, dense vs pruned.

A ``Target`` is the small generative set with gold answers that ``advise --calibrate`` measures
retention on and that this module re-asks; ``paired`` and ``advise`` build theirs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelens.metrics import expected_calibration_error, rank_at_first_divergence
from prunelens.model.generation import Generation, generate_full
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import render
from prunelens.model.views import view_of
from prunelens.render import val

SAMPLES = 4
SAMPLE_TEMPERATURE = 0.7
DEMOTED_RANK = 5
"""A right answer still within the pruned model's top 5 at the divergent step counts as demoted."""
MAX_LOST = 16
"""Lost questions re-asked per pruning: each costs k samples and one more greedy answer."""


@dataclass(frozen=True)
class GenItem:
    """One question: the conversation up to it (few-shot turns included) and its gold-answer check."""

    key: Any
    turns: tuple[dict[str, str], ...]
    check: Callable[[str], bool] = field(compare=False)


@dataclass(frozen=True)
class Target:
    """A small generative set with gold answers, and how it is asked (one home for calibration and
    recovery). ``option_probs``: multiple-choice probabilities of the same questions (for the ECE),
    with ``golds`` their right options; absent where the set has no multiple-choice form."""

    name: str
    source: str
    items: tuple[GenItem, ...]
    max_new_tokens: int
    stop: tuple[str, ...]
    chat_template: bool
    identity: dict[str, Any]
    option_probs: Callable[[LoadedModel, Any], list[list[float]]] | None = field(default=None, compare=False)
    golds: tuple[int, ...] | None = None


def prompt_ids(lm: LoadedModel, target: Target, items: Sequence[GenItem],
               example: tuple[GenItem, str] | None = None) -> list[list[int]]:
    """Each item's prompt; with ``example``, one more solved question (its question turn and a right
    answer) just before the item's own question, after any shots the item already has."""
    shot = [example[0].turns[-1], {"role": "assistant", "content": example[1].strip()}] if example else []
    return [render(lm.tokenizer, [*it.turns[:-1], *shot, it.turns[-1]], target.chat_template) for it in items]


def answer(lm: LoadedModel, target: Target, items: Sequence[GenItem], modification: Any = None, *,
           temperature: float = 0.0, repeat: int = 1, seed: int = 0, example: tuple[GenItem, str] | None = None,
           batch_size: int = 8, progress: bool = False, desc: str = "answer") -> list[Generation]:
    """Answers to ``items`` (each ``repeat`` times, in order: item 0's samples first)."""
    prompts = [p for p in prompt_ids(lm, target, items, example) for _ in range(repeat)]
    return generate_full(lm, prompts, target.max_new_tokens, target.stop, modification, batch_size, progress, desc,
                         temperature=temperature, seed=seed)


def hits(items: Sequence[GenItem], gens: Sequence[Generation]) -> list[float]:
    return [float(it.check(g.text)) for it, g in zip(items, gens, strict=True)]


@torch.inference_mode()
def divergence_ranks(lm: LoadedModel, modification: Any, prompts: Sequence[Sequence[int]],
                     refs: Sequence[Sequence[int]]) -> list[tuple[int, int] | None]:
    """Per prompt, ``rank_at_first_divergence`` of the modified model teacher-forced on ``refs`` (one
    sequence a pass: a few lost questions, and no padding to get wrong)."""
    out: list[tuple[int, int] | None] = []
    with view_of(lm.adapter, modification):
        for p, r in zip(prompts, refs, strict=True):
            if not r:
                out.append(None)
                continue
            ids = torch.tensor([[*p, *r[:-1]]], device=lm.device)
            z = lm.model(input_ids=ids, use_cache=False, logits_to_keep=len(r)).logits[0].float().cpu()
            out.append(rank_at_first_divergence(z, torch.tensor(list(r))))
    return out


def recovery(lm: LoadedModel, target: Target, modification: Any, lost: Sequence[GenItem],
             dense: dict[Any, Sequence[int]], example: tuple[GenItem, str] | None, samples: int = SAMPLES,
             temperature: float = SAMPLE_TEMPERATURE, seed: int = 0, batch_size: int = 8,
             progress: bool = False) -> dict[str, Any]:
    """The three readings on the lost questions (at most ``MAX_LOST``, the first ones); ``dense``: the
    dense model's right answers by item key, as token ids of ``lm``'s tokenizer; ``example``: a
    solved question not among them."""
    lost = list(lost)[:MAX_LOST]
    out: dict[str, Any] = {"n": len(lost), "samples": samples, "temperature": temperature,
                           "in_context_example": None if example is None else str(example[0].key)}
    if not lost:
        return out
    ranks = divergence_ranks(lm, modification, prompt_ids(lm, target, lost), [dense[it.key] for it in lost])
    found = [r[1] for r in ranks if r is not None]
    out["ranks"] = found
    out["median_rank"] = statistics.median(found) if found else None
    out["demoted"] = sum(r <= DEMOTED_RANK for r in found) / len(found) if found else None
    gens = answer(lm, target, lost, modification, temperature=temperature, repeat=samples, seed=seed,
                  batch_size=batch_size, progress=progress, desc="recovery samples")
    got = hits([it for it in lost for _ in range(samples)], gens)
    out["sampled"] = sum(any(got[i * samples:(i + 1) * samples]) for i in range(len(lost))) / len(lost)
    if example is not None:
        shown = answer(lm, target, lost, modification, example=example, batch_size=batch_size, progress=progress,
                       desc="recovery in context")
        out["in_context"] = sum(hits(lost, shown)) / len(lost)
    return out


def calibration_error(target: Target, lm: LoadedModel, modification: Any) -> float | None:
    """ECE of the multiple-choice option probabilities of the target's questions (None without them)."""
    if target.option_probs is None or target.golds is None:
        return None
    probs = target.option_probs(lm, modification)
    return ece_of(probs, target.golds)


def ece_of(probs: Sequence[Sequence[float]], golds: Sequence[int]) -> float:
    """ECE of the top option's probability against whether it is the gold one."""
    conf = [max(p) for p in probs]
    right = [float(max(range(len(p)), key=p.__getitem__) == g) for p, g in zip(probs, golds, strict=True)]
    return expected_calibration_error(conf, right)


KEYS = ("pruning", "lost", "median rank", f"in top {DEMOTED_RANK}", "k samples", "1 example", "ECE dense → pruned")


def table_rows(recs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row a pruning, for the pages (``KEYS``)."""
    rows = []
    for label, r in recs.items():
        e = r.get("ece") or {}
        rows.append({"pruning": label, "lost": r["n"], "median rank": r.get("median_rank"),
                     f"in top {DEMOTED_RANK}": val(r.get("demoted"), ".0%"),
                     "k samples": val(r.get("sampled"), ".0%"), "1 example": val(r.get("in_context"), ".0%"),
                     "ECE dense → pruned": (f"{e['dense']:.3f} → {e['pruned']:.3f}" if e else None)})
    return rows


def reading(recs: dict[str, dict[str, Any]]) -> str:
    """One sentence: across the prunings, how many lost answers were demoted rather than erased."""
    n = sum(r["n"] for r in recs.values())
    if n == 0:
        return "No pruning lost an answer the dense model had right, so there is nothing to trace."
    ranks = [x for r in recs.values() for x in r.get("ranks", [])]
    sampled = sum(r["n"] * r["sampled"] for r in recs.values() if "sampled" in r) / n
    k = next(iter(recs.values()))["samples"]
    demoted = sum(x <= DEMOTED_RANK for x in ranks) / len(ranks) if ranks else float("nan")
    shown = [r for r in recs.values() if "in_context" in r]
    back = sum(r["n"] * r["in_context"] for r in shown) / max(sum(r["n"] for r in shown), 1)
    ctx = f"; one solved example in context brings back {back:.0%}" if shown else ""
    each = [f"{name} {r['demoted']:.0%}" for name, r in recs.items() if r.get("demoted") is not None]
    split = f" ({', '.join(each)})" if len(each) > 1 else ""
    return (f"Of {n} lost answers, {demoted:.0%} were only demoted{split} (the right continuation still in the "
            f"top {DEMOTED_RANK} where the pruned model first turned away) and {k} samples at T = "
            f"{next(iter(recs.values()))['temperature']:g} recover {sampled:.0%}{ctx}: "
            + ("mostly demoted, not erased — sampling, a worked example or a light repair can reach them."
               if demoted >= 0.5 else "mostly erased — the knowledge itself is gone, not just its ranking."))
