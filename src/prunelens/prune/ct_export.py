"""A quantised model as a compressed-tensors checkpoint: packed integers that vLLM serves packed.

RTN and GPTQ weights lie on a grid, W = scale · (q − zero) per output row and group of inputs;
the quantisers record the grid (``WeightPatch.grids``), and compressed-tensors' own
``PackedQuantizationCompressor`` packs the codes it recovers from W (``pack-quantized``: eight 4-bit
or four 8-bit codes per int32, scales, and packed zero points when asymmetric) — the layout
llm-compressor writes, described by the library's own ``quantization_config``. Scales are stored in
fp32, so transformers' CPU dequantisation gives back the very weights prunelens evaluated, bit for
bit (16-bit scales would move every weight by their rounding).

Whole-block drops are written as fewer layers. Sublayer drops have no compressed-tensors form (the
checkpoint is a plain model that computes every layer); AWQ's per-channel scales are folded into
the weights here, off any grid; and compressed-tensors no longer has sparse layouts (removed in
0.15–0.20, vLLM ≥ 0.19 refuses them): each is refused in one line naming the format that serves it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.model.loading import LoadedModel
from prunelens.model.placement import is_dispatched
from prunelens.model.views import Modification
from prunelens.prune.checkpoint import merged, pruned_state_and_config, renamer, save_tensors
from prunelens.prune.quant import QuantSpec
from prunelens.prune.weights import WeightPatch
from prunelens.runs import atomic_dir

try:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
except ImportError:  # the optional "candidates" extra
    ModelCompressor = None


SUBLAYERS = ("--format compressed-tensors: a dropped attention or MLP has no form in a plain checkpoint (every "
             "engine would still compute it); use --format gguf for llama.cpp, or drop blocks")


def check_recipe(steps: list[Any]) -> None:
    """The refusals ``save_compressed_tensors`` would make, from the recipe alone (before any work)."""
    names = [s.method.name for s in steps]
    if any(n in ("attn", "mlp") for n in names):
        raise PrunelensError(SUBLAYERS)
    if "awq" in names:
        raise PrunelensError("--format compressed-tensors: AWQ keeps its channel scales in the weights, off any one "
                             "grid; use rtn or gptq, or --format hf / gguf")
    if not any(n in ("rtn", "gptq") for n in names):
        raise PrunelensError("--format compressed-tensors packs quantised weights (rtn, gptq); compressed-tensors "
                             "no longer has sparse layouts, so a sparsified model is written dense with "
                             "--format hf (vLLM serves that as it is)")


def check_model(lm: LoadedModel, steps: list[Any]) -> None:
    """What the loaded model makes impossible, before any quantisation work: an offloaded or
    device-mapped model (the export reads the whole state dict), and a group size that does not
    divide some layer's input width (compressed-tensors packs whole groups)."""
    if is_dispatched(lm.model):
        raise PrunelensError("--format compressed-tensors reads the whole model at once: load it on one device "
                             "(no --device auto / --offload-dir), or save --format hf and pack with llm-compressor")
    groups = {s.value.quant.group_size for s in steps if s.method.name in ("rtn", "gptq")} - {-1}
    for name, mod in lm.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(lm.adapter.spec.layers):
            bad = [g for g in groups if mod.in_features % g]
            if bad:
                raise PrunelensError(f"--format compressed-tensors: {name} has {mod.in_features} inputs, not a "
                                     f"multiple of the group size {bad[0]} (compressed-tensors packs whole groups)")


def _quant_patch(parts: list[Any]) -> WeightPatch:
    """The one quantisation patch whose grids the file packs."""
    quant = [p for p in parts if isinstance(p, WeightPatch) and p.method.quant is not None]
    if not quant:
        raise PrunelensError("--format compressed-tensors packs quantised weights (rtn, gptq); compressed-tensors "
                             "no longer has sparse layouts, so a sparsified model is written dense with "
                             "--format hf (vLLM serves that as it is)")
    if len(quant) > 1 or not quant[0].grids:
        what = quant[0].method.name if len(quant) == 1 else "two quantisations"
        raise PrunelensError(f"--format compressed-tensors: {what} leaves no single grid to pack (AWQ keeps its "
                             "channel scales in the weights); use rtn or gptq, or --format hf / gguf")
    return quant[0]


def scheme_of(spec: QuantSpec) -> Any:
    """compressed-tensors' description of prunelens's quantisation: int weights, per group or per row."""
    group = spec.group_size != -1
    return QuantizationScheme(targets=["Linear"], format="pack-quantized", weights=QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group" if group else "channel",
        group_size=spec.group_size if group else None))


def _packed(w: torch.Tensor, grid: dict[str, torch.Tensor], spec: QuantSpec, scheme: Any, name: str
            ) -> dict[str, torch.Tensor]:
    """One linear's packed tensors, after checking W lies exactly on its recorded grid."""
    out_f, in_f = w.shape
    g = in_f if spec.group_size == -1 else spec.group_size
    if in_f % g:
        raise PrunelensError(f"--format compressed-tensors: {name} has {in_f} inputs, not a multiple of the group "
                             f"size {g} (compressed-tensors packs whole groups)")
    scale, zero = grid["scale"].float().cpu(), grid["zero"].float().cpu()
    s, z = scale.repeat_interleave(g, 1), zero.repeat_interleave(g, 1)
    q = torch.clamp(torch.round(w.detach().float().cpu() / s) + z, 0, 2 ** spec.bits - 1)
    grid_w = s * (q - z)  # the fp32 grid the quantiser computed; the model holds it in its own dtype
    if not torch.equal(grid_w.to(w.dtype), w.detach().cpu()):
        raise PrunelensError(f"--format compressed-tensors: {name}'s weights are off their quantisation grid "
                             "(modified after quantising?); save with --format hf")
    half = 2 ** (spec.bits - 1)  # compressed-tensors' codes and zero points are signed
    state = {"weight": grid_w, "weight_scale": scale if g != in_f else scale.reshape(out_f, 1)}
    if not spec.symmetric:
        state["weight_zero_point"] = (zero - half).to(torch.int8)
    return PackedQuantizationCompressor.compress(state, scheme)


def save_compressed_tensors(lm: LoadedModel, modification: Modification, out: str | Path) -> dict[str, Any]:
    """Write the modified model as a ``pack-quantized`` checkpoint directory (atomically: built in a
    temp directory, renamed at the end); returns what was packed and the bits per weight on disk."""
    if ModelCompressor is None:
        raise PrunelensError("--format compressed-tensors needs compressed-tensors: "
                             "pip install 'prunelens[candidates]'")
    patch = _quant_patch(modification.parts())
    spec, scheme = patch.method.quant, scheme_of(patch.method.quant)
    assert spec is not None
    adapter, out = lm.adapter, Path(out)
    with merged(adapter, modification) as plan:
        if plan.attn or plan.mlp:
            raise PrunelensError(SUBLAYERS)
        rename = renamer(adapter, plan)[0]

        def renamed(path: str) -> str | None:  # a module's path in the saved checkpoint (None: block dropped)
            r = rename(path + ".weight")
            return None if r is None else r[0].removesuffix(".weight")

        state, config = pruned_state_and_config(adapter, plan)
        packed_bytes, n_weights = 0, 0
        for path, grid in patch.grids.items():
            new = renamed(path)
            if new is None:
                continue
            w = state.pop(new + ".weight")
            for k, v in _packed(w, grid, spec, scheme, path).items():
                state[f"{new}.{k}"] = v.contiguous()
                packed_bytes += 0 if k == "weight_shape" else v.numel() * v.element_size()
            n_weights += w.numel()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # one tensor in the file, as transformers saves tied weights
    linears = [n for n, m in adapter.model.named_modules() if isinstance(m, torch.nn.Linear) and n not in patch.grids]
    ignore = sorted({renamed(n) for n in linears} - {None})
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized",
                              quantization_status="compressed")
    info = {"layers_packed": len([p for p in patch.grids if renamed(p)]), "scheme": spec.label(),
            "bits_per_weight_on_disk": 8 * packed_bytes / max(n_weights, 1), "ignored": ignore}
    with atomic_dir(out) as tmp:
        save_tensors(state, tmp)
        config.save_pretrained(tmp)
        ModelCompressor(quantization_config=qcfg).update_config(str(tmp))
        lm.tokenizer.save_pretrained(tmp)
        (tmp / "prunelens-export.json").write_text(json.dumps(info, indent=1))
    return info
