"""Inter-layer pruning: a plan of dropped sublayers/blocks, a zero-copy pruned view, and saving.

The pruned view swaps the dropped modules for stand-ins that add nothing to the residual stream
and are never computed, then puts the originals back: dense and pruned share every weight.
A dropped attention sublayer still appends (zero) keys/values to the KV cache, because
transformers derives positions and mask sizes from the cache length; without it, decoding after
prefill would place tokens at the wrong positions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter, get_module, set_module
from prunelens.prune.base import REGISTRY, Method, method_name, register

KINDS = ("attn", "mlp", "block")
# Layer indices are 0-based positions in the original (dense) model's layer list.
LAYER_INDEXING = "0-based index into the dense model's decoder layers"


@dataclass(frozen=True)
class DropRequest:
    """One parsed ``--drop`` spec: either explicit layers or a count chosen by importance."""

    kind: str
    count: int | None = None
    layers: tuple[int, ...] | None = None
    #: the importance metric this request is ranked by, over the calibration's (``sleb:N``: ppl)
    metric: str | None = None
    #: the registered method's name when it is not the kind (``sleb``)
    method: str | None = None
    #: never rank the first and last remaining unit (SLEB's reference keeps them)
    keep_ends: bool = False

    def __str__(self) -> str:
        if self.layers is not None:
            return f"{self.method or self.kind}@{','.join(map(str, self.layers))}"
        return f"{self.method or self.kind}:{self.count}"

    def check(self, n_layers: int) -> None:
        """The request fits a model of ``n_layers`` layers (one-line error otherwise)."""
        if self.layers is not None:
            DropPlan(**{self.kind: self.layers}).validate(n_layers)
        elif not 0 <= (self.count or 0) < n_layers:
            raise PrunelensError(f"cannot drop {self.count} {self.kind} units: the model has {n_layers} layers "
                                 f"(need 0 <= N < {n_layers})")


#: one item of a layer list: an index or an inclusive range (``14``, ``14-17``)
LAYER_ITEM = r"\d+(?:-\d+)?"
_SPEC = re.compile(rf"^(attn|mlp|block)(?::(\d+)|@({LAYER_ITEM}(?:,{LAYER_ITEM})*))$")


def _malformed(spec: str) -> PrunelensError:
    return PrunelensError(f"malformed drop spec '{spec}': expected KIND:N or KIND@i,j,... with KIND in "
                          f"{'/'.join(KINDS)} (e.g. attn:4, mlp@3,7, block@14-17), or sleb:N")


def parse_drop(spec: str) -> DropRequest:
    """Parse any registered drop spec: ``attn:4`` (drop the 4 least important), ``mlp@3,7`` (drop
    layers 3 and 7), ``sleb:2``; a one-line error for anything else, weight specs included."""
    method = REGISTRY.get(method_name(spec))
    if not isinstance(method, DropKind):
        raise _malformed(spec)
    return method.parse(spec)


def _parse_kind(spec: str) -> DropRequest:
    """``attn:4``, ``mlp@3,7`` or ``block@14-17`` (an inclusive range): one of the plain kinds."""
    m = _SPEC.match(spec.strip().replace(" ", ""))
    if not m:
        raise _malformed(spec)
    kind, count, layers = m.groups()
    if layers is not None:
        idx: tuple[int, ...] = ()
        for item in layers.split(","):
            lo, _, hi = item.partition("-")
            if hi and int(hi) < int(lo):
                raise PrunelensError(f"drop spec '{spec}': range {item} runs backwards")
            idx += tuple(range(int(lo), int(hi or lo) + 1))
        if len(set(idx)) != len(idx):
            raise PrunelensError(f"drop spec '{spec}' repeats a layer index")
        return DropRequest(kind, layers=tuple(sorted(idx)))
    return DropRequest(kind, count=int(count))


@dataclass(frozen=True)
class DropKind(Method):
    """A registered structural kind: its units are whole sublayers (``attn``, ``mlp``) or blocks,
    chosen by count (ranked by importance on calibration text) or by index."""

    def parse(self, spec: str) -> DropRequest:
        return _parse_kind(spec)

    def amount_spec(self, amount: str) -> str:
        """A sweep amount is a number of units, ranked on the calibration text, or fixed layers
        ``@23-26`` / ``@3;7`` (``;`` because ``,`` separates amounts), so a sweep can hold the
        layers still while something else, such as the calibration of a repair, changes."""
        if amount.startswith("@"):
            spec = f"{self.name}@{amount[1:].replace(';', ',')}"
            self.parse(spec)
            return spec
        if not amount.isdigit():
            raise PrunelensError(f"amount '{amount}' for {self.name} drops must be a whole number of layers "
                                 f"or fixed layers such as @23-26")
        return super().amount_spec(amount)

    @property
    def unit(self) -> str:
        """The kind of unit it removes (``attn``, ``mlp`` or ``block``)."""
        return self.name


for _k, _what in (("attn", "attention sublayers"), ("mlp", "MLP sublayers"), ("block", "whole blocks")):
    register(DropKind(_k, "drop", f"drop {_what}: KIND:N least important, KIND@i,j or KIND@i-j", f"{_k}:2", True))


@dataclass(frozen=True)
class SlebKind(DropKind):
    """SLEB (Song et al. 2024): whole blocks removed one at a time, each time the block whose removal
    leaves the lowest perplexity on the calibration text; as in the reference code, the first and
    last remaining blocks are never candidates. ``block:N`` with ``--importance ppl`` (which ranks
    every block), named so that sweeps and ``advise`` can set it beside one-shot cosine."""

    def parse(self, spec: str) -> DropRequest:
        m = re.match(r"^sleb:(\d+)$", spec.strip().replace(" ", ""))
        if not m:
            raise PrunelensError(f"malformed SLEB spec '{spec}': expected sleb:N (N blocks removed by "
                                 "calibration perplexity, e.g. sleb:2)")
        return DropRequest("block", count=int(m.group(1)), metric="ppl", method="sleb", keep_ends=True)

    @property
    def unit(self) -> str:
        return "block"


register(SlebKind("sleb", "drop", "SLEB: N blocks removed one at a time by calibration perplexity",
                  "sleb:2", True))


@dataclass(frozen=True)
class DropPlan:
    """Which sublayers and blocks are dropped, with how they were chosen."""

    view_order: ClassVar[int] = 1

    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    block: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def empty(self) -> bool:
        return not (self.attn or self.mlp or self.block)

    def units(self) -> list[tuple[str, int]]:
        return [(k, i) for k in KINDS for i in getattr(self, k)]

    def with_unit(self, kind: str, i: int) -> DropPlan:
        cur = getattr(self, kind)
        return DropPlan(**{**self._fields(), kind: tuple(sorted({*cur, i}))}, info=self.info)

    def _fields(self) -> dict[str, tuple[int, ...]]:
        return {"attn": self.attn, "mlp": self.mlp, "block": self.block}

    def label(self) -> str:
        parts = [f"{k}@{','.join(map(str, v))}" for k, v in self._fields().items() if v]
        return "+".join(parts) or "dense"

    def view(self, adapter: Adapter) -> contextlib.AbstractContextManager[None]:
        return pruned_view(adapter, self)

    def parts(self) -> list[DropPlan]:
        return [self]

    def layer_indices(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self._fields().items()}

    def footprint(self, adapter: Adapter, share_removed: float) -> tuple[float, None]:
        """(share of the decoder's linear weights removed, no change of bits), given the share
        earlier parts removed: the linear weights inside the dropped units."""
        dropped = {(adapter.layer_path(i) if k == "block" else adapter.sublayer_path(k, i)) + "."
                   for k, i in self.units()}
        total = removed = 0
        for name, m in adapter.model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                total += m.weight.numel()
                removed += m.weight.numel() if any(name.startswith(d) for d in dropped) else 0
        return share_removed + removed / max(total, 1), None

    def validate(self, n_layers: int) -> None:
        for kind, i in self.units():
            if not 0 <= i < n_layers:
                raise PrunelensError(
                    f"cannot drop {kind} {i}: the model has layers 0..{n_layers - 1}"
                )
        if len(self.block) >= n_layers:
            raise PrunelensError(f"cannot drop all {n_layers} blocks")

    def to_dict(self) -> dict[str, Any]:
        return {**{k: list(v) for k, v in self._fields().items()}, "label": self.label(),
                "layer_indexing": LAYER_INDEXING, **({"selection": self.info} if self.info else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DropPlan:
        return cls(attn=tuple(d.get("attn", ())), mlp=tuple(d.get("mlp", ())),
                   block=tuple(d.get("block", ())), info=d.get("selection", {}))


def merge(a: DropPlan, b: DropPlan) -> DropPlan:
    return DropPlan(
        attn=tuple(sorted({*a.attn, *b.attn})),
        mlp=tuple(sorted({*a.mlp, *b.mlp})),
        block=tuple(sorted({*a.block, *b.block})),
        info={**a.info, **b.info},
    )


# --- stand-ins for dropped modules -------------------------------------------------------------


class _CacheKeeper(nn.Module):
    """Appends zero keys/values so the KV cache of a skipped layer keeps the right length."""

    def __init__(self, layer_idx: int, n_kv: int, head_dim: int):
        super().__init__()
        self.layer_idx, self.n_kv, self.head_dim = layer_idx, n_kv, head_dim

    def _keep_cache(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        # the keyword is `cache` from transformers 5.24, `past_key_values`/`past_key_value` before
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if k in kwargs), None)
        if cache is not None:
            b, t = hidden.shape[:2]
            kv = hidden.new_zeros(b, self.n_kv, t, self.head_dim)
            cache.update(kv, kv, self.layer_idx)


class SkippedAttention(_CacheKeeper):
    """A dropped attention sublayer: contributes zero, computes nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._keep_cache(hidden_states, kwargs)
        return torch.zeros_like(hidden_states), None


class SkippedBlock(_CacheKeeper):
    """A dropped decoder block: the identity on the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._keep_cache(hidden_states, kwargs)
        return hidden_states


class SkippedMLP(nn.Module):
    """A dropped MLP sublayer: contributes zero."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _swap_in(adapter: Adapter, plan: DropPlan) -> list[tuple[str, nn.Module]]:
    """Replace the plan's units by stand-ins; returns what was replaced, for restoring."""
    plan.validate(adapter.n_layers)
    root = adapter.model
    saved: list[tuple[str, nn.Module]] = []
    n_kv, hd = adapter.num_kv_heads, adapter.head_dim

    def swap(path: str, new: nn.Module) -> None:
        saved.append((path, get_module(root, path)))
        set_module(root, path, new)

    try:
        for i in plan.block:
            swap(adapter.layer_path(i), SkippedBlock(i, n_kv, hd))
        for i in plan.attn:
            if i not in plan.block:
                swap(adapter.sublayer_path("attn", i), SkippedAttention(i, n_kv, hd))
        for i in plan.mlp:
            if i not in plan.block:
                swap(adapter.sublayer_path("mlp", i), SkippedMLP())
    except BaseException:
        _restore(adapter, saved)
        raise
    return saved


def _restore(adapter: Adapter, saved: list[tuple[str, nn.Module]]) -> None:
    for path, module in reversed(saved):
        set_module(adapter.model, path, module)


@contextlib.contextmanager
def pruned_view(adapter: Adapter, plan: DropPlan) -> Iterator[None]:
    """Inside the block, the model computes as if ``plan``'s units were removed.

    No weight is copied: the dropped modules are swapped out for stand-ins and restored on exit.
    """
    saved = _swap_in(adapter, plan)
    try:
        yield
    finally:
        _restore(adapter, saved)


def install_permanently(adapter: Adapter, plan: DropPlan) -> None:
    """Skip a loaded checkpoint's zeroed sublayers for good (used when reading prunelens metadata)."""
    _swap_in(adapter, plan)


# --- saving -----------------------------------------------------------------------------------

METADATA_KEY = "prunelens"


def _renamer(adapter: Adapter, plan: DropPlan) -> tuple[Any, list[int], dict[int, int]]:
    """For each state-dict name: its name in the pruned checkpoint and whether it is zeroed, or None
    if its block is dropped; also the kept blocks and their new indices."""
    spec, prefix = adapter.spec, adapter.spec.layers + "."
    keep = [i for i in range(adapter.n_layers) if i not in plan.block]
    new_index = {old: new for new, old in enumerate(keep)}
    zeroed = {f"{adapter.layer_path(i)}.{spec.attn_out}." for i in plan.attn} | {
        f"{adapter.layer_path(i)}.{spec.mlp_out}." for i in plan.mlp
    }

    def rename(name: str) -> tuple[str, bool] | None:
        if not name.startswith(prefix):
            return name, False
        idx_str, rest = name[len(prefix):].split(".", 1)
        old = int(idx_str)
        if old in plan.block:
            return None
        return f"{prefix}{new_index[old]}.{rest}", any(name.startswith(z) for z in zeroed)

    return rename, keep, new_index


def _pruned_config(adapter: Adapter, plan: DropPlan, keep: list[int], new_index: dict[int, int],
                   extra_meta: dict[str, Any] | None) -> Any:
    config = copy.deepcopy(adapter.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    meta = {
        "format": 1,
        "dropped": plan.to_dict(),
        "dense_num_hidden_layers": adapter.n_layers,
        "kept_layers": keep,
        # what to skip in the saved model's own indexing (sublayers of kept blocks):
        "skip": {"attn": [new_index[i] for i in plan.attn if i in new_index],
                 "mlp": [new_index[i] for i in plan.mlp if i in new_index]},
        **(extra_meta or {}),
    }
    setattr(config, METADATA_KEY, meta)
    return config


def _check_dense(adapter: Adapter, plan: DropPlan) -> None:
    plan.validate(adapter.n_layers)
    installed = plan_from_config(adapter.config)
    if installed is not None and not installed.empty:
        raise PrunelensError("this model is a pruned prunelens checkpoint with skipped sublayers; "
                             "prune and save from the dense model instead")


def pruned_state_and_config(adapter: Adapter, plan: DropPlan,
                            extra_meta: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """State dict and config of the pruned model as plain transformers understands it.

    Dropped blocks are removed and later blocks renumbered; dropped sublayers keep their weights
    but their output projection is zeroed, so they add exactly nothing. Weights are shared with
    the live model except for the zero tensors created here.
    """
    _check_dense(adapter, plan)
    rename, keep, new_index = _renamer(adapter, plan)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in adapter.model.state_dict(keep_vars=False).items():
        r = rename(name)
        if r is not None:
            state[r[0]] = torch.zeros_like(tensor) if r[1] else tensor
    return state, _pruned_config(adapter, plan, keep, new_index, extra_meta)


SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def save_sharded(adapter: Adapter, plan: DropPlan, out_dir: str | Path,
                 extra_meta: dict[str, Any] | None = None, shard_bytes: int = SHARD_BYTES) -> Any:
    """The checkpoint of ``save_pruned`` for a model spread by a device map: tensors are read one
    module at a time (offloaded ones through their hooks, so a weight patch's overlay is what gets
    written) and written shard by shard, so the CPU holds at most one shard, never the model."""
    from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE
    from safetensors.torch import save_file

    from prunelens.model.placement import state_tensors

    _check_dense(adapter, plan)
    rename, keep, new_index = _renamer(adapter, plan)
    config = _pruned_config(adapter, plan, keep, new_index, extra_meta)
    model, out = adapter.model, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if getattr(
        model.config, "tie_word_embeddings", False) else set()
    current: dict[str, torch.Tensor] = {}
    size, n_written, weight_map, total = 0, 0, {}, 0
    tmp_names: list[str] = []

    def flush() -> None:
        nonlocal current, size, n_written
        if not current:
            return
        n_written += 1
        fname = f"model-{n_written:05d}.safetensors.partial"
        save_file(current, str(out / fname), metadata={"format": "pt"})
        tmp_names.append(fname)
        for k in current:
            weight_map[k] = fname
        current, size = {}, 0

    for name, tensor in state_tensors(model):
        r = rename(name)
        if r is None or name in tied or r[0] in current or r[0] in weight_map:
            continue
        t = torch.zeros_like(tensor) if r[1] else tensor.contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[r[0]] = t
        size += nbytes
        total += nbytes
    flush()
    # the shards get their final names only when all are written: a crash leaves no checkpoint that
    # looks complete
    final = ({tmp_names[0]: SAFETENSORS_SINGLE_FILE} if len(tmp_names) == 1 else
             {f: f"model-{i + 1:05d}-of-{len(tmp_names):05d}.safetensors" for i, f in enumerate(tmp_names)})
    for f, g in final.items():
        (out / f).replace(out / g)
    if len(tmp_names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
        (out / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return config


def save_pruned(adapter: Adapter, plan: DropPlan, out_dir: str | Path, tokenizer: Any = None,
                extra_meta: dict[str, Any] | None = None) -> Path:
    """Write a safetensors checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads as is."""
    from prunelens.model.placement import is_dispatched

    out = Path(out_dir)
    model = adapter.model
    if is_dispatched(model):
        config = save_sharded(adapter, plan, out, extra_meta)
    else:
        state, config = pruned_state_and_config(adapter, plan, extra_meta)
        # Blocks removed: drop the stale modules from the state dict's view by saving with a swapped
        # config (save_pretrained writes self.config) and the explicit state dict.
        original = model.config
        model.config = config
        try:
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
        finally:
            model.config = original
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "prunelens.json").write_text(json.dumps(getattr(config, METADATA_KEY), indent=2))
    return out


def plan_from_config(config: Any) -> DropPlan | None:
    """The skip plan recorded in a saved pruned checkpoint (saved-model indexing), if any."""
    meta = getattr(config, METADATA_KEY, None)
    if not isinstance(meta, dict) or "skip" not in meta:
        return None
    skip = meta["skip"]
    return DropPlan(attn=tuple(skip.get("attn", ())), mlp=tuple(skip.get("mlp", ())))
