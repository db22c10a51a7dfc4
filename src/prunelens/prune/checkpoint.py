"""Prunelens checkpoints: saving a drop plan as a plain Hugging Face checkpoint, and loading one back
with its skipped sublayers reinstalled.

Blocks dropped are removed and the later ones renumbered; sublayers dropped keep their weights with
the output projection zeroed, and the config records which to skip (``METADATA_KEY``), so plain
transformers loads the checkpoint as is and prunelens skips those sublayers again. The reinstall
lives here rather than in ``model.loading``, which knows nothing of pruning.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from prunelens.errors import PrunelensError
from prunelens.model import loading
from prunelens.model.arch import Adapter
from prunelens.model.loading import LoadedModel
from prunelens.model.placement import is_dispatched, state_tensors
from prunelens.model.views import Modification
from prunelens.prune.plan import DropPlan, install_permanently
from prunelens.runs import atomic_dir

METADATA_KEY = "prunelens"


def renamer(adapter: Adapter, plan: DropPlan) -> tuple[Any, list[int], dict[int, int]]:
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


@contextlib.contextmanager
def merged(adapter: Adapter, modification: Modification | None) -> Iterator[DropPlan]:
    """The modification's weight parts entered (the model holds their weights while the block runs)
    and its drop plan, which every saver writes in its own way (removed, zeroed, no-op, deci)."""
    parts = modification.parts() if modification is not None else []
    drops = [p for p in parts if isinstance(p, DropPlan)]
    with contextlib.ExitStack() as stack:
        for p in parts:
            if not isinstance(p, DropPlan):
                stack.enter_context(p.view(adapter))
        yield drops[0] if drops else DropPlan()


def pruned_state_and_config(adapter: Adapter, plan: DropPlan,
                            extra_meta: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """State dict and config of the pruned model as plain transformers understands it.

    Dropped blocks are removed and later blocks renumbered; dropped sublayers keep their weights
    but their output projection is zeroed, so they add exactly nothing. Weights are shared with
    the live model except for the zero tensors created here.
    """
    _check_dense(adapter, plan)
    rename, keep, new_index = renamer(adapter, plan)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in adapter.model.state_dict(keep_vars=False).items():
        r = rename(name)
        if r is not None:
            state[r[0]] = torch.zeros_like(tensor) if r[1] else tensor
    return state, _pruned_config(adapter, plan, keep, new_index, extra_meta)


SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def save_tensors(state: dict[str, torch.Tensor], folder: Path) -> None:
    """A state dict as safetensors shards of at most 5 GB with their index, named as transformers
    names them (for exports whose tensors are not a module's: packed, padded, renamed)."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=SHARD_BYTES)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, Path(folder) / fname, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def save_sharded(adapter: Adapter, plan: DropPlan, out_dir: str | Path,
                 extra_meta: dict[str, Any] | None = None, shard_bytes: int = SHARD_BYTES) -> Any:
    """The checkpoint of ``save_pruned`` for a model spread by a device map: tensors are read one
    module at a time (offloaded ones through their hooks, so a weight patch's overlay is what gets
    written) and written shard by shard, so the CPU holds at most one shard, never the model."""
    from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE

    _check_dense(adapter, plan)
    rename, keep, new_index = renamer(adapter, plan)
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
    """Write a safetensors checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads as is.

    Written whole or not at all (``runs.atomic_dir``): an interrupted or killed save leaves nothing
    at ``out_dir`` that transformers would load, and a checkpoint being replaced stays until then."""
    out = Path(out_dir)
    model = adapter.model
    _check_dense(adapter, plan)
    with atomic_dir(out) as tmp:
        if is_dispatched(model):
            config = save_sharded(adapter, plan, tmp, extra_meta)
        else:
            state, config = pruned_state_and_config(adapter, plan, extra_meta)
            # Blocks removed: drop the stale modules from the state dict's view by saving with a
            # swapped config (save_pretrained writes self.config) and the explicit state dict.
            original = model.config
            model.config = config
            try:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                model.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "prunelens.json").write_text(json.dumps(getattr(config, METADATA_KEY), indent=2))
    return out


def plan_from_config(config: Any) -> DropPlan | None:
    """The skip plan recorded in a saved pruned checkpoint (saved-model indexing), if any."""
    meta = getattr(config, METADATA_KEY, None)
    if not isinstance(meta, dict) or "skip" not in meta:
        return None
    skip = meta["skip"]
    return DropPlan(attn=tuple(skip.get("attn", ())), mlp=tuple(skip.get("mlp", ())))


@functools.wraps(loading.load_model, assigned=("__name__", "__qualname__", "__annotations__"))
def load_model(*args: Any, **kwargs: Any) -> LoadedModel:
    """``model.loading.load_model`` (same arguments), then a checkpoint saved by prunelens has its
    dropped sublayers skipped again (recorded as ``skipped_from_checkpoint`` in the model's info)."""
    lm = loading.load_model(*args, **kwargs)
    plan = plan_from_config(lm.model.config)
    if plan is not None and not plan.empty:
        install_permanently(lm.adapter, plan)
        _record_skip(lm.info, plan.to_dict(), sum(p.numel() for p in lm.model.parameters()))
    return lm


def _record_skip(info: dict[str, Any], skipped: dict[str, Any], n_params: int) -> None:
    """Note the reinstalled plan in place, before ``name`` as it always was (run records keep their key
    order), and count the parameters without the skipped sublayers."""
    items = list(info.items())
    info.clear()
    for k, v in items:
        if k == "name":
            info["skipped_from_checkpoint"] = skipped
        info[k] = v
    info.setdefault("skipped_from_checkpoint", skipped)
    info["n_params"] = int(n_params)
