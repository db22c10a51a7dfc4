"""Sequential mode: the trace of a candidate against its base with one model in memory at a time.

1. The base decodes the prompts greedily once; its *reference* is kept: per step the top-K
   log-probabilities plus the log of the tail mass (``divergence.Truncated``), the final hidden
   state and the greedy token, and every residual stream of the prompts. It can be saved (a
   reference cache: safetensors, one file) and reused for any number of candidates.
2. The base is freed; the candidate prefills the same prompts (per-layer h against the stored
   streams, through its layer map) and decodes two rows per prompt as the lock-step trace does:
   teacher-forced on the reference's tokens (compared with the stored reference) and free-running
   on its own (its own top-K, hidden states and tokens kept).
3. The base comes back and re-scores only the candidate's free-running tokens, in one
   teacher-forced pass per batch: the free-running comparison uses the candidate's top-K against
   the base's full distribution.

What it measures: h (cos and the parallel/orthogonal split) and p (KL both ways, top-K agreement,
label in top-K, tokens); z-space metrics and the Taylor check need both full logit vectors and are
left to the in-memory trace. The KL from a top-K reference is a lower bound of the full KL (the
tail is one bucket on both sides); ``benchmarks/candidate_bench.py`` measures the gap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from prunelens.analyses.trace.aggregate import add_steps, comparison, prompt_records, step_accumulator, stepwise
from prunelens.analyses.trace.decode import MODES, Decoded
from prunelens.analyses.trace.forwards import ModelForward
from prunelens.analyses.trace.prefill import layerwise
from prunelens.analyses.trace.settings import TraceSettings
from prunelens.divergence import Truncated, comparison_summary, truncate, truncated_stats
from prunelens.errors import PrunelensError
from prunelens.metrics import hidden_metrics, log_probs
from prunelens.model.capture import resid_names
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import encode_prompts, eos_ids, left_pad, pad_id
from prunelens.prune.candidate import Candidate
from prunelens.runs import atomic_write_with

REFERENCE_SCHEMA = "prunelens.reference/1"
DEFAULT_TOPK = 256  # measured: teacher-forced mean |ΔKL| ≤ 6e-4 nats both ways, 0.34 % of the logits (RESULTS.md)


@dataclass
class Reference:
    """The base's side of a trace, kept so that the base need not be in memory with a candidate."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    tokens: torch.Tensor            # (P, N) greedy tokens
    valid: torch.Tensor             # (P, N) step t counts: the reference had not ended before it
    trunc: Truncated                # (P, N, K) top-K log-probs, ids; (P, N) log tail mass
    h_final: torch.Tensor           # (P, N, d) final hidden state that produced step t's logits
    resid: list[torch.Tensor]       # per prompt (L + 1, T_i, d): every residual stream of the prompt
    meta: dict[str, Any] = field(default_factory=dict)  # base info, settings, K

    def nbytes(self) -> dict[str, int]:
        """Bytes of the stored distributions, of float32 logits of the same steps, and of the states."""
        return {"topk": self.trunc.nbytes(), "full_logits": self.trunc.full_nbytes(),
                "hidden": sum(t.numel() * t.element_size() for t in (self.h_final, *self.resid))}


def _identity(base: LoadedModel, prompts: Sequence[str], settings: TraceSettings, k: int) -> dict[str, Any]:
    """What a stored reference must match to be reused."""
    return {"base": base.info.get("source") or base.info.get("name"), "prompts": list(prompts), "k": k,
            "settings": {key: v for key, v in asdict(settings).items() if key not in ("batch_size", "seed")}}


@torch.inference_mode()
def reference_of(base: LoadedModel, prompts: Sequence[str], settings: TraceSettings, k: int = DEFAULT_TOPK,
                 progress: bool = True) -> Reference:
    """Step 1: the base's greedy decoding of ``prompts`` with what a candidate is compared against."""
    settings.validate()
    N, dev, t = settings.max_new_tokens, base.device, settings.temperatures[0]
    k = min(k, int(base.info["vocab_size"]))  # a K past the vocabulary keeps all of it
    eos = torch.tensor(sorted(eos_ids(base)) or [-1], device=dev)
    encoded = encode_prompts(base.tokenizer, prompts, settings.chat_template)
    fwd, names = ModelForward(base), resid_names(base.adapter.n_layers)
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in ("tok", "valid", "logp", "idx", "tail", "h")}
    resid: list[torch.Tensor] = []
    bar = tqdm(total=len(encoded) * N, desc="reference", unit="step", disable=not progress)
    for b0 in range(0, len(encoded), settings.batch_size):
        batch = encoded[b0:b0 + settings.batch_size]
        ids, mask = left_pad(batch, pad_id(base), dev)
        pre = fwd.prefill(ids, mask, [*names, "final"])
        for r, row in enumerate(batch):
            resid.append(torch.stack([pre.states[n][r, -len(row):] for n in names]).float().cpu())
        z, h, cache = pre.z, pre.states["final"][:, -1], pre.cache
        ended = torch.zeros(len(batch), dtype=torch.bool, device=dev)
        cols: dict[str, list[torch.Tensor]] = {key: [] for key in parts}
        for step in range(N):
            tr = truncate(z, k, t)
            tok = z.argmax(-1)
            for key, v in (("tok", tok), ("valid", ~ended), ("logp", tr.logp), ("idx", tr.idx),
                           ("tail", tr.log_tail), ("h", h.float())):
                cols[key].append(v.cpu())
            ended |= torch.isin(tok, eos)
            bar.update(len(batch))
            if step < N - 1:
                mask = torch.cat([mask, mask.new_ones(len(batch), 1)], 1)
                z, h = fwd.step(tok[:, None], mask, cache)
        for key in parts:
            parts[key].append(torch.stack(cols[key], 1))
    bar.close()
    cat = {key: torch.cat(v) for key, v in parts.items()}
    trunc = Truncated(cat["logp"], cat["idx"], cat["tail"], int(base.info["vocab_size"]), t)
    return Reference(list(prompts), [list(map(int, e)) for e in encoded], cat["tok"], cat["valid"], trunc,
                     cat["h"], resid, {**_identity(base, prompts, settings, k), "model": base.info})


def save_reference(ref: Reference, path: str | Path) -> Path:
    """One safetensors file (tensors, the rest as JSON metadata), written atomically."""
    tensors = {"tokens": ref.tokens, "valid": ref.valid, "logp": ref.trunc.logp, "idx": ref.trunc.idx,
               "log_tail": ref.trunc.log_tail, "h_final": ref.h_final,
               **{f"resid.{i}": r.contiguous() for i, r in enumerate(ref.resid)}}
    meta = {"schema": REFERENCE_SCHEMA, "prompt_ids": ref.prompt_ids, "vocab": ref.trunc.vocab,
            "temperature": ref.trunc.temperature, **ref.meta}
    return atomic_write_with(Path(path), lambda tmp: save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"prunelens": json.dumps(meta)}))


def load_reference(path: str | Path) -> Reference:
    """A saved reference; a file that is not one is refused in one line."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("prunelens", "{}"))
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same bad input)
        raise PrunelensError(f"reference cache {path} cannot be read ({type(e).__name__})") from None
    if meta.get("schema") != REFERENCE_SCHEMA:
        raise PrunelensError(f"{path} is not a prunelens reference cache")
    trunc = Truncated(t["logp"], t["idx"], t["log_tail"], int(meta["vocab"]), float(meta["temperature"]))
    resid = [t[f"resid.{i}"] for i in range(len(meta["prompt_ids"]))]
    return Reference(meta["prompts"], meta["prompt_ids"], t["tokens"], t["valid"], trunc, t["h_final"], resid,
                     {k: meta[k] for k in ("base", "prompts", "k", "settings", "model")})


def check_reference(ref: Reference, base: LoadedModel, prompts: Sequence[str], settings: TraceSettings,
                    k: int) -> None:
    """A stored reference is reused only for the same base, prompts, settings and K."""
    want = _identity(base, prompts, settings, min(k, int(base.info["vocab_size"])))
    got = json.loads(json.dumps({key: ref.meta.get(key) for key in want}))
    for key, v in json.loads(json.dumps(want)).items():
        if got[key] != v:
            raise PrunelensError(f"the reference cache was made with another {key}: delete it or give another file")


@dataclass
class FreeRun:
    """The candidate's free-running decoding, kept for the base to re-score."""

    trunc: Truncated        # (P, N, K)
    h: torch.Tensor         # (P, N, d)
    tokens: torch.Tensor    # (P, N)
    valid: torch.Tensor     # (P, N)


def _slice(tr: Truncated, rows: slice, t: int) -> Truncated:
    return Truncated(tr.logp[rows, t], tr.idx[rows, t], tr.log_tail[rows, t], tr.vocab, tr.temperature)


def _step_row(stats: dict[str, torch.Tensor], h_ref: torch.Tensor, h_cand: torch.Tensor,
              t: str) -> dict[str, torch.Tensor]:
    """One step's statistics under the lock-step trace's keys (``label_top{K}``: the base's greedy
    token among the candidate's K most likely, ``truncated_stats``'s ``label_top{K}_cand``)."""
    out = {f"{k}_h": v for k, v in hidden_metrics(h_ref, h_cand).items()}
    out.update({f"kl@{t}": stats["kl"], f"rkl@{t}": stats["rkl"], "p_top_ref": stats["p_top_ref"]})
    for key, v in stats.items():
        if key.startswith("top") and key.endswith("_agree"):
            out[key] = v
        elif key.startswith("label_top") and key.endswith("_cand"):
            out[key.removesuffix("_cand")] = v
    return {k: v.cpu() for k, v in out.items()}


def _prefill_layers(cand: Candidate, ref: Reference, i0: int, pre: Any, batch: list[list[int]],
                    layer_acc: Any) -> None:
    """Per-layer h of the candidate's prompt streams against the stored ones, through its layer map."""
    streams = cand.layer_map.resid_map() if cand.layer_map else list(range(ref.resid[0].shape[0]))
    for r, row in enumerate(batch):
        for li, m in enumerate(streams):
            a, b = ref.resid[i0 + r][li], pre.states[f"resid.{m}"][r, -len(row):].float().cpu()
            for k, v in hidden_metrics(a, b).items():
                layer_acc[k + "_h"][li].append(v)


@torch.inference_mode()
def candidate_pass(cand: Candidate, ref: Reference, settings: TraceSettings, layer_acc: Any,
                   progress: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], FreeRun]:
    """Step 2: the candidate's prefill (per-layer h) and its two decoding rows per prompt, each step
    against the stored reference step, as the lock-step trace compares them (teacher-forced: the
    candidate fed the reference's tokens; free-running: fed its own, the reference on its own).
    Returns per mode the statistics per key, (P, N), and the free run for the base to re-score."""
    lm, k, t = cand.lm, ref.trunc.k, ref.trunc.temperature
    N, dev, tk = ref.tokens.shape[1], lm.device, f"{t:g}"
    eos = torch.tensor(sorted(eos_ids(lm)) or [-1], device=dev)
    fwd, names = ModelForward(lm), resid_names(lm.adapter.n_layers)
    stats: dict[str, dict[str, list[torch.Tensor]]] = {m: {} for m in MODES}
    fr: dict[str, list[torch.Tensor]] = {key: [] for key in ("logp", "idx", "tail", "h", "tok", "valid")}
    bar = tqdm(total=len(ref.prompts) * N, desc=f"candidate {cand.label}", unit="step", disable=not progress)
    for i0 in range(0, len(ref.prompts), settings.batch_size):
        batch = ref.prompt_ids[i0:i0 + settings.batch_size]
        rows, B = slice(i0, i0 + len(batch)), len(batch)
        ids, mask = left_pad(batch, pad_id(lm), dev)
        pre = fwd.prefill(ids, mask, [*names, "final"])
        _prefill_layers(cand, ref, i0, pre, batch, layer_acc)
        cache = pre.cache
        cache.batch_repeat_interleave(2)
        z2, h2 = pre.z.repeat_interleave(2, 0), pre.states["final"][:, -1].repeat_interleave(2, 0)
        del pre
        mask2, ended = mask.repeat_interleave(2, 0), torch.zeros(B, dtype=torch.bool)
        cols: dict[str, list[torch.Tensor]] = {key: [] for key in fr}
        steps: dict[str, dict[str, list[torch.Tensor]]] = {m: {} for m in MODES}
        for s in range(N):
            ref_s = _slice(ref.trunc, rows, s)
            for mode, z, h in (("teacher_forced", z2[0::2], h2[0::2]), ("free_running", z2[1::2], h2[1::2])):
                st = truncated_stats(ref_s, z.cpu(), t, "ref", labels=ref.tokens[rows, s])
                for key, v in _step_row(st, ref.h_final[rows, s], h.float().cpu(), tk).items():
                    steps[mode].setdefault(key, []).append(v)
            tr, tok = truncate(z2[1::2], k, t), z2[1::2].argmax(-1).cpu()
            for key, v in (("logp", tr.logp), ("idx", tr.idx), ("tail", tr.log_tail), ("h", h2[1::2].float()),
                           ("tok", tok), ("valid", ref.valid[rows, s] & ~ended)):
                cols[key].append(v.cpu())
            ended |= torch.isin(tok, eos.cpu())
            bar.update(B)
            if s < N - 1:
                feed = torch.stack([ref.tokens[rows, s], tok], 1).reshape(-1, 1).to(dev)
                mask2 = torch.cat([mask2, mask2.new_ones(2 * B, 1)], 1)
                z2, h2 = fwd.step(feed, mask2, cache)
        for key in fr:
            fr[key].append(torch.stack(cols[key], 1))
        for mode, per_key in steps.items():
            for key, v in per_key.items():
                stats[mode].setdefault(key, []).append(torch.stack(v, 1))
    bar.close()
    c = {key: torch.cat(v) for key, v in fr.items()}
    run = FreeRun(Truncated(c["logp"], c["idx"], c["tail"], ref.trunc.vocab, t), c["h"], c["tok"], c["valid"])
    return {m: {key: torch.cat(v) for key, v in per_key.items()} for m, per_key in stats.items()}, run


@torch.inference_mode()
def rescore(base: LoadedModel, ref: Reference, run: FreeRun, settings: TraceSettings,
            progress: bool = True) -> dict[str, torch.Tensor]:
    """Step 3: the base reads each prompt followed by the candidate's free-running tokens in one
    teacher-forced pass per batch; returns the free-running statistics per key, (P, N)."""
    N, t, dev = run.tokens.shape[1], run.trunc.temperature, base.device
    fwd, out = ModelForward(base), {}
    for i0 in tqdm(range(0, len(ref.prompts), settings.batch_size), desc="base re-scores", unit="batch",
                   disable=not progress):
        batch = ref.prompt_ids[i0:i0 + settings.batch_size]
        rows = slice(i0, i0 + len(batch))
        seqs = [p + run.tokens[i0 + r, :N - 1].tolist() for r, p in enumerate(batch)]
        ids, mask = left_pad(seqs, pad_id(base), dev)
        h_all = fwd.prefill(ids, mask, ["final"]).states["final"][:, -N:]
        for s in range(N):
            z = base.adapter.head_logits(h_all[:, s]).float().cpu()
            st = truncated_stats(_slice(run.trunc, rows, s), z, t, "cand", labels=z.argmax(-1))
            row = _step_row(st, h_all[:, s].float().cpu(), run.h[rows, s], f"{t:g}")
            row["nll_base"] = -log_probs(z).gather(-1, run.tokens[rows, s, None])[:, 0]  # the base on this token
            for key, v in row.items():
                out.setdefault(key, [[] for _ in range(N)])[s].append(v)
    return {key: torch.stack([torch.cat(p) for p in per_step], 1) for key, per_step in out.items()}


def _decoded(ref: Reference, stats: dict[str, dict[str, torch.Tensor]], run: FreeRun) -> Decoded:
    """Both modes as the lock-step trace records them, so its aggregation applies unchanged."""
    d = Decoded()
    for s in range(ref.tokens.shape[1]):
        for mode, valid in (("teacher_forced", ref.valid), ("free_running", run.valid)):
            for key, v in stats[mode].items():
                d.rows[mode][key].append(v[:, s])
            d.rows[mode]["valid"].append(valid[:, s])
        d.rows["free_running"]["token_agree"].append((ref.tokens[:, s] == run.tokens[:, s]).double())
        d.toks_d.append(ref.tokens[:, s])
        d.toks_p.append(run.tokens[:, s])
    return d


def sequential_result(base: LoadedModel, ref: Reference,
                      parts: tuple[Any, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], FreeRun],
                      ) -> dict[str, Any]:
    """The measured part of a sequential trace, in the lock-step trace's shape (``parts``: the layer
    accumulator, both modes' statistics, the base's re-scoring of the free run, the free run;
    ``base`` gives the tokenizer and EOS tokens). The re-scoring — both models on the candidate's
    own text — is summarised apart, with the base's NLL of the candidate's tokens."""
    layer_acc, stats, rescored, run = parts
    P, N = ref.tokens.shape
    decoded = _decoded(ref, stats, run)
    step_acc = step_accumulator()
    add_steps(step_acc, decoded, P, N)
    eos = torch.tensor(sorted(eos_ids(base)) or [-1])
    n_layers = base.adapter.n_layers
    sizes = ref.nbytes()
    return {
        "layerwise": layerwise(layer_acc, n_layers),
        "stepwise": stepwise(step_acc, N),
        "taylor": {},
        "comparison": comparison(step_acc, ref.trunc.temperature),
        "per_prompt": prompt_records(decoded, ref.prompts, [len(p) for p in ref.prompt_ids], base.tokenizer, eos),
        "sequential": {"reference_topk": ref.trunc.k, "reference_bytes": sizes,
                       "topk_share_of_full_logits": sizes["topk"] / sizes["full_logits"],
                       "base_on_candidate_text": _rescored_summary(rescored, run),
                       "measured": "h and p only: z-space metrics and the Taylor check need both full logit "
                                   "vectors (the in-memory trace); KL from the top-K reference is a lower bound"},
    }


def _rescored_summary(rescored: dict[str, torch.Tensor], run: FreeRun) -> dict[str, Any] | None:
    """KL both ways, agreement and the base's NLL per token, over the candidate's valid free-running steps."""
    valid = run.valid.bool()
    if not bool(valid.any()):
        return None
    keys = [k for k in rescored if k.startswith(("kl@", "rkl@", "top", "label_top", "nll")) or k == "p_top_ref"]
    rows = {k: rescored[k][valid] for k in keys}
    t = next(k for k in rescored if k.startswith("kl@")).split("@")[1]
    rows["kl"], rows["rkl"] = rows.pop(f"kl@{t}"), rows.pop(f"rkl@{t}")
    return comparison_summary(rows)
