"""The Python API the CLI is a thin shell over: load → choose drops → analyse → write a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .data import calibration_ids
from .errors import PrunelensError
from .models import LoadedModel
from .prune.drop import DropPlan, DropRequest, parse_drop
from .prune.importance import select_drop as _select_drop


def select_drop(
    lm: LoadedModel,
    *specs: str | DropRequest,
    metric: str = "cosine",
    iterative: bool = False,
    calib: str | Path | None = None,
    calib_samples: int = 8,
    calib_len: int = 128,
    seed: int = 0,
    batch_size: int = 4,
) -> DropPlan:
    """Build a drop plan from specs such as ``"attn:4"`` (4 least important) or ``"mlp@3,7"``.

    Counts are ranked by ``metric`` ('cosine' = LLM-Drop / ShortGPT block influence, 'angular' =
    Gromov et al.) on calibration text: ``calib`` (a .txt/.jsonl file) or the built-in sample.
    """
    requests = [parse_drop(s) if isinstance(s, str) else s for s in specs]
    needs_calib = any(r.count for r in requests)
    ids = calibration_ids(lm.tokenizer, calib, calib_samples, calib_len, seed) if needs_calib else None
    plan = _select_drop(lm, requests, metric, iterative, ids, batch_size)
    if ids is not None:
        plan.info["calibration"] = {"source": str(calib) if calib else "built-in",
                                    "samples": calib_samples, "seq_len": calib_len, "seed": seed}
    return plan


def parse_drops(specs: Sequence[str]) -> list[DropRequest]:
    return [parse_drop(s) for s in specs]


def weight_method(spec: str):
    """Parse a ``--prune`` (magnitude/wanda/sparsegpt) or ``--quant`` (rtn/gptq) spec."""
    from .prune.weights import PRUNE_METHODS, QUANT_METHODS, parse_prune, parse_quant

    spec = spec.strip()
    name = spec.split(":")[0]
    if name not in PRUNE_METHODS + QUANT_METHODS:
        raise PrunelensError(f"unknown method '{name}'; pruning: {', '.join(PRUNE_METHODS)}; "
                             f"quantisation: {', '.join(QUANT_METHODS)}")
    return parse_quant(spec) if name in QUANT_METHODS else parse_prune(spec)


def prune_weights(
    lm: LoadedModel,
    spec: str,
    calib: str | Path | None = None,
    calib_samples: int = 32,
    calib_len: int = 256,
    seed: int = 0,
    skip: Sequence[str] = (),
    inplace: bool = False,
    progress: bool = True,
):
    """Sparsify (``"wanda:0.5"``, ``"sparsegpt:2:4"``, ``"magnitude:0.5"``) or fake-quantise
    (``"gptq:w4g128"``, ``"rtn:w8"``) every decoder linear layer; returns a ``WeightPatch``.

    Calibrated methods draw ``calib_samples`` windows of ``calib_len`` tokens from ``calib``
    (a .txt/.jsonl file) or the built-in sample. The model stays dense unless ``inplace``.
    """
    from .prune.weights import CALIBRATED, sparsify

    method = weight_method(spec)
    ids = (calibration_ids(lm.tokenizer, calib, calib_samples, calib_len, seed)
           if method.name in CALIBRATED else None)
    patch = sparsify(lm.adapter, method, ids, skip=skip, inplace=inplace, progress=progress)
    if ids is not None:
        patch.report["calibration"] = {"source": str(calib) if calib else "built-in",
                                       "samples": calib_samples, "seq_len": calib_len, "seed": seed}
    return patch


def save_modified(lm: LoadedModel, modification, out_dir: str | Path) -> Path:
    """Save any modification (layer drops and/or a weight patch) as a plain HF checkpoint."""
    import contextlib

    from .prune import Composite
    from .prune.drop import save_pruned
    from .prune.weights import WeightPatch

    parts = modification.parts if isinstance(modification, Composite) else [modification]
    drops = [p for p in parts if isinstance(p, DropPlan)]
    patches = [p for p in parts if isinstance(p, WeightPatch)]
    plan = drops[0] if drops else DropPlan()
    extra = {"weights": [{k: v for k, v in p.to_dict().items() if k not in ("layers", "seconds_per_block")}
                         for p in patches]} if patches else None
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p.view(lm.adapter))
        return save_pruned(lm.adapter, plan, out_dir, lm.tokenizer, extra_meta=extra)


DROP_KINDS = ("attn", "mlp", "block")


def spec_kind(spec: str) -> str:
    """'drop', 'prune' or 'quant' for one modification spec (one-line error if it is neither)."""
    name = spec.strip().split(":")[0].split("@")[0]
    if name in DROP_KINDS:
        parse_drop(spec)
        return "drop"
    method = weight_method(spec)
    return "quant" if method.quant is not None else "prune"


def build_modification(lm: LoadedModel, spec: str, calib: str | Path | None = None,
                       calib_samples: int | None = None, calib_len: int | None = None, seed: int = 0,
                       importance: str = "cosine", progress: bool = True):
    """One modification from one spec: a layer drop (``attn:4``, ``mlp@3,7``, ``block:2``), a
    sparsification (``wanda:0.5``, ``sparsegpt:2:4``) or a quantisation (``gptq:w4g128``)."""
    if spec_kind(spec) == "drop":
        return select_drop(lm, spec, metric=importance, calib=calib, calib_samples=calib_samples or 8,
                           calib_len=calib_len or 128, seed=seed)
    return prune_weights(lm, spec, calib=calib, calib_samples=calib_samples or 32, calib_len=calib_len or 256,
                         seed=seed, progress=progress)


def footprint(lm: LoadedModel, modification) -> dict[str, float]:
    """What a modification saves, comparable across methods: the share of the decoder's linear
    weights removed (dropped or zeroed beyond the dense model's own zeros) and their bits per weight
    (16 for unquantised weights, as they would be stored in bf16). Idealised: unstructured zeros
    only save memory in a sparse format, N:M ones with hardware support."""
    from torch import nn

    from .prune import Composite
    from .prune.weights import WeightPatch

    parts = modification.parts if isinstance(modification, Composite) else [modification]
    total = removed = 0
    dropped: set[str] = set()
    for p in parts:
        if isinstance(p, DropPlan):
            for kind in DROP_KINDS:
                for i in getattr(p, kind):
                    a = lm.adapter
                    dropped.add((a.layer_path(i) if kind == "block" else a.sublayer_path(kind, i)) + ".")
    for name, m in lm.model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in name:
            total += m.weight.numel()
            if any(name.startswith(d) for d in dropped):
                removed += m.weight.numel()
    bits = 16.0
    for p in parts:
        if isinstance(p, WeightPatch):
            r = p.report
            if "added_frac_of_dense_nonzeros" in r:
                removed += r["added_frac_of_dense_nonzeros"] * (total - removed)
            if "bits_per_weight" in r:
                bits = float(r["bits_per_weight"])
    share = removed / max(total, 1)
    return {"removed_share": share, "bits_per_weight": bits, "memory_vs_bf16": (1 - share) * bits / 16}
