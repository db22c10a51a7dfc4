"""A candidate: a compressed model made by any tool (llm-compressor, llama.cpp, a layer-deletion
script, bitsandbytes, or prunelens itself), compared with its base.

Before any work: the candidate must read the very same token ids as the base (vocabulary and
special tokens; the base's chat template is used for both), must not be the base itself, and its
blocks are put in correspondence with the base's (identity at equal depth; else prunelens's own
checkpoint metadata, a ``--layer-map`` file, or inference from hidden-state similarity on
calibration text, reported as inferred). The correspondence only matters for h-space metrics: z
and p are compared at every step whatever the depths.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.model import loading
from prunelens.model.capture import capture, resid_names
from prunelens.model.loading import LoadedModel
from prunelens.model.placement import Placement
from prunelens.prune.checkpoint import METADATA_KEY, load_model

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# below this mean cosine of the paired streams an inferred layer map is reported as weak (on a tiny
# random model a wrong map scored 0.24 while right ones scored above 0.9; real models pair near 0.96)
WEAK_ALIGNMENT = 0.5


@dataclass(frozen=True)
class LayerMap:
    """Which base block each candidate block descends from (``kept[j]`` = base block of candidate
    block j, increasing). ``source``: identity, metadata, file or inferred."""

    kept: tuple[int, ...]
    n_base: int
    source: str = "identity"
    score: float | None = None  # inferred maps: mean cosine of the paired residual streams

    def __post_init__(self) -> None:
        k = self.kept
        if any(b <= a for a, b in zip(k, k[1:], strict=False)) or (k and (k[0] < 0 or k[-1] >= self.n_base)):
            raise PrunelensError(f"layer map {list(k)} must be increasing base block indices in 0..{self.n_base - 1}")

    @classmethod
    def identity(cls, n: int) -> LayerMap:
        return cls(tuple(range(n)), n)

    @property
    def dropped(self) -> list[int]:
        return sorted(set(range(self.n_base)) - set(self.kept))

    def resid_map(self) -> list[int]:
        """For each base residual stream l (0..n_base), the candidate stream that holds the same
        point of the computation: after the last kept block before l (a deleted block adds nothing,
        as in prunelens's own drop view)."""
        out, j = [], 0
        for b in range(self.n_base + 1):
            out.append(j)
            if b < self.n_base and j < len(self.kept) and self.kept[j] == b:
                j += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kept_layers": list(self.kept), "dropped_layers": self.dropped, "n_base_layers": self.n_base,
                "source": self.source, "score": self.score}


@dataclass
class Candidate:
    """A loaded candidate model and how it lines up with its base."""

    lm: LoadedModel
    layer_map: LayerMap | None  # None where no h-space comparison is made (tasks)
    spec: str
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return Path(self.spec).name if Path(self.spec).exists() else self.spec

    def to_dict(self) -> dict[str, Any]:
        """The run record's ``pruning`` entry for a candidate (its label is what pages show)."""
        return {"label": self.label, "kind": "candidate", "candidate": self.spec, "model": self.lm.info,
                "layer_map": self.layer_map and self.layer_map.to_dict(), "notes": list(self.notes)}


# --- tokenizer identity ------------------------------------------------------------------------


def tokenizer_difference(base: Any, cand: Any) -> str | None:
    """The first difference that would make the two models read different token ids, or None."""
    vb, vc = base.get_vocab(), cand.get_vocab()
    if len(vb) != len(vc):
        return f"vocabulary sizes differ: base {len(vb)}, candidate {len(vc)}"
    for tok, i in sorted(vb.items(), key=lambda kv: kv[1]):
        if vc.get(tok) != i:
            return f"token {tok!r} is id {i} in the base and {vc.get(tok)} in the candidate"
    for key in SPECIAL_KEYS:
        a, b = getattr(base, key, None), getattr(cand, key, None)
        if a != b:
            return f"{key} differs: base {a!r}, candidate {b!r}"
    return None


def chat_template_note(base: Any, cand: Any) -> str | None:
    """A candidate whose chat template differs is still compared (the base's template renders every
    prompt for both), but the user should know."""
    a, b = getattr(base, "chat_template", None), getattr(cand, "chat_template", None)
    if a == b:
        return None
    return ("the candidate's chat template differs from the base's (or is missing); the base's template "
            "renders the prompts for both")


def check_tokenizers(base: Any, cand: Any, spec: str) -> list[str]:
    diff = tokenizer_difference(base, cand)
    if diff is not None:
        raise PrunelensError(f"candidate '{spec}' does not share the base's tokenizer: {diff}")
    note = chat_template_note(base, cand)
    return [note] if note else []


# --- layer correspondence ----------------------------------------------------------------------


def read_layer_map(path: str | Path, n_base: int, n_cand: int) -> LayerMap:
    """A ``--layer-map`` file: JSON, either a list of base block indices (one per candidate block)
    or ``{"kept_layers": [...]}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise PrunelensError(f"cannot read layer map {p}: {e}") from None
    kept = data.get("kept_layers") if isinstance(data, dict) else data
    if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise PrunelensError(f"layer map {p} must be a JSON list of base block indices (or {{'kept_layers': [...]}})")
    if len(kept) != n_cand:
        raise PrunelensError(f"layer map {p} names {len(kept)} blocks but the candidate has {n_cand}")
    missing = [i for i in kept if not 0 <= i < n_base]
    if missing:
        raise PrunelensError(f"layer map {p} names base layer {missing[0]}, which the base (0..{n_base - 1}) "
                             "does not have")
    return LayerMap(tuple(kept), n_base, "file")


def metadata_layer_map(cand: LoadedModel, n_base: int) -> LayerMap | None:
    """The kept blocks a prunelens checkpoint records (``prunelens.kept_layers`` in its config)."""
    meta = getattr(cand.model.config, METADATA_KEY, None)
    if isinstance(meta, dict) and isinstance(meta.get("kept_layers"), list):
        if meta.get("dense_num_hidden_layers") == n_base:
            return LayerMap(tuple(meta["kept_layers"]), n_base, "metadata")
    return None


def align_layers(sim: torch.Tensor) -> tuple[tuple[int, ...], float]:
    """The monotone correspondence that best explains a shallower candidate: ``sim[l, j]`` is the
    similarity of base stream l with candidate stream j; each base block is either kept (the
    candidate stream advances) or deleted (it stays), and the path through every base stream with
    the highest total similarity wins (dynamic programming, O(n_base · n_cand))."""
    nb, nc = sim.shape[0] - 1, sim.shape[1] - 1
    neg = float("-inf")
    best = torch.full((nb + 1, nc + 1), neg, dtype=torch.float64)
    best[0, 0] = sim[0, 0]
    for li in range(1, nb + 1):
        for j in range(0, min(li, nc) + 1):
            stay = best[li - 1, j]
            step = best[li - 1, j - 1] if j > 0 else neg
            best[li, j] = max(stay, step) + sim[li, j]
    kept, j = [], nc
    for li in range(nb, 0, -1):  # walk back: a step from j-1 means block li-1 was kept
        if j > 0 and best[li - 1, j - 1] + sim[li, j] >= best[li, j] - 1e-12 and best[li - 1, j - 1] > neg:
            kept.append(li - 1)
            j -= 1
    return tuple(reversed(kept)), float(best[nb, nc]) / (nb + 1)


def stream_similarity(base_states: Sequence[torch.Tensor], cand_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cosine over tokens of every (base stream, candidate stream) pair: (n_base+1, n_cand+1)."""
    def unit(h: torch.Tensor) -> torch.Tensor:
        h = h.double()
        return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-300)

    b = torch.stack([unit(h) for h in base_states])  # (Lb, tokens, d)
    c = torch.stack([unit(h) for h in cand_states])
    return torch.einsum("ltd,mtd->lm", b, c) / b.shape[1]


@torch.inference_mode()
def residual_streams(lm: LoadedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every residual stream (embeddings, then each block's output) at every token of the
    calibration windows ``ids`` (windows × tokens)."""
    n = lm.adapter.n_layers
    with capture(lm.adapter, resid_names(n)) as st:
        lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=1)
    return [st[f"resid.{i}"].reshape(-1, st[f"resid.{i}"].shape[-1]).float().cpu() for i in range(n + 1)]


def infer_layer_map(base_states: Sequence[torch.Tensor], cand: LoadedModel, ids: torch.Tensor) -> LayerMap:
    """The correspondence inferred from hidden-state similarity on calibration windows ``ids``
    (``base_states``: the base's ``residual_streams`` of the same windows)."""
    sim = stream_similarity(base_states, residual_streams(cand, ids))
    kept, score = align_layers(sim)
    return LayerMap(kept, len(base_states) - 1, "inferred", score)


# --- loading -----------------------------------------------------------------------------------


def check_not_base(spec: str, base: LoadedModel) -> None:
    """Comparing the base with itself gives KL 0 everywhere: say so rather than compute it."""
    src = str(loading.resolve_source(spec)[0])
    if spec == base.info.get("name") or src == base.info.get("source"):
        raise PrunelensError(f"candidate '{spec}' is the base model itself: every divergence would be 0 "
                             "(KL 0 is expected); name a compressed model")


def load_candidate(spec: str, base: LoadedModel, *, device: str = "cpu", dtype: str = "float32",
                   placement: Placement | None = None, layer_map: str | Path | None = None,
                   calibration: torch.Tensor | None = None, base_states: Sequence[torch.Tensor] | None = None,
                   trust_remote_code: bool = False, align: bool = True) -> Candidate:
    """Load ``spec`` (a local HF directory or hub id, quantised checkpoints included, a GGUF file,
    or a preset) beside ``base`` and line it up with it.

    ``base`` may be a model whose weights were already freed (sequential mode): only its tokenizer
    and info are read, and an inferred layer map then needs ``base_states`` (the base's
    ``residual_streams`` of the ``calibration`` windows), computed while it was loaded. ``align=False``
    (scoring tasks, where no hidden state is compared) skips the layer correspondence.
    """
    check_not_base(spec, base)
    cand = load_model(spec, device=device, dtype=dtype, placement=placement, trust_remote_code=trust_remote_code)
    notes = check_tokenizers(base.tokenizer, cand.tokenizer, spec)
    cand.tokenizer = base.tokenizer  # identical ids checked: the base's chat template serves both
    vb, vc = base.info.get("vocab_size"), cand.info.get("vocab_size")
    if vb != vc:
        raise PrunelensError(f"candidate '{spec}' has {vc} output logits and the base {vb}: the distributions "
                             "cannot be compared token for token")
    n_base, n_cand = int(base.info["n_layers"]), cand.adapter.n_layers
    if not align:
        return Candidate(cand, None, spec, notes)
    if layer_map is not None:
        lmap = read_layer_map(layer_map, n_base, n_cand)
    elif n_cand == n_base:
        lmap = LayerMap.identity(n_base)
    elif n_cand > n_base:
        raise PrunelensError(f"candidate '{spec}' has {n_cand} layers, more than the base's {n_base}: "
                             "give --layer-map to say which base layer each of its layers continues")
    else:
        lmap = metadata_layer_map(cand, n_base) or _inferred(base, cand, calibration, base_states)
        if lmap.source == "inferred":
            notes.append(f"layer correspondence inferred from hidden-state similarity (mean cosine "
                         f"{lmap.score:.3f}): base layers {lmap.dropped} taken as deleted")
            if lmap.score is not None and lmap.score < WEAK_ALIGNMENT:
                notes.append(f"the inferred correspondence is weak (mean cosine below {WEAK_ALIGNMENT}): its "
                             "per-layer h numbers may pair the wrong layers; give --layer-map if you know them")
    return Candidate(cand, lmap, spec, notes)


def _inferred(base: LoadedModel, cand: LoadedModel, ids: torch.Tensor | None,
              base_states: Sequence[torch.Tensor] | None) -> LayerMap:
    if ids is None:
        raise PrunelensError("a shallower candidate without layer metadata needs calibration text to infer "
                             "its layer correspondence (or give --layer-map)")
    states = base_states if base_states is not None else residual_streams(base, ids)
    return infer_layer_map(states, cand, ids)


def stored_footprint(cand: Candidate, base: LoadedModel) -> dict[str, float]:
    """A candidate's memory as stored (a GGUF file's size; a directory's weight files) against the
    base's parameters in bf16, and the share of the base's parameters it no longer has (deleted
    layers): what a model made elsewhere saves, read from what its tool wrote."""
    path = Path(cand.spec).expanduser()
    if not path.exists():
        path = Path(str(cand.lm.info.get("source", "")))
    files = [path] if path.is_file() else [p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf")]
    n_base, n_cand = float(base.info["n_params"]), float(cand.lm.info["n_params"])
    return {"memory_vs_bf16": sum(f.stat().st_size for f in files) / (2 * n_base),
            "removed_share": max(0.0, 1 - n_cand / n_base)}
