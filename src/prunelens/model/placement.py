"""Where a model's weights live: one device, or accelerate's device map over GPUs, CPU and disk.

prunelens does not shard models itself: ``from_pretrained(device_map=..., max_memory=...,
offload_folder=...)`` dispatches the model with accelerate's hooks, which onload a module's
weights to its execution device just before it runs and offload them after. Everything here
works on both kinds of model, so the analyses and pruning methods need not know:

- ``execution_device``: where inputs go (the embedding's execution device);
- ``onloaded(module)``: the module's real weights, inside the block, wherever they are stored;
- ``swapped(model, {path: weight})``: run with other weights for some linear layers (a weight
  patch), zero-copy for resident modules and through the hook's weight map for offloaded ones;
- ``state_tensors(model)``: every tensor of the state dict, one at a time (for saving shards).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelens.errors import PrunelensError
from prunelens.runs import probe_writable_dir

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Placement:
    """``device_map`` (a strategy name or {module: device}), ``max_memory`` ({device: size}) and
    ``offload_dir``, passed to ``from_pretrained``; all None = the whole model on one device."""

    device_map: str | dict[str, Any] | None = None
    max_memory: dict[int | str, str] | None = None
    offload_dir: str | None = None

    @property
    def dispatched(self) -> bool:
        return self.device_map is not None

    def kwargs(self) -> dict[str, Any]:
        if not self.dispatched:
            return {}
        out: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:  # a bare number is bytes, which accelerate takes only as an int
            out["max_memory"] = {k: int(v) if str(v).isdigit() else v for k, v in self.max_memory.items()}
        if self.offload_dir:
            out["offload_folder"] = self.offload_dir
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device_map": self.device_map, "max_memory": {str(k): v for k, v in (self.max_memory or {}).items()},
                "offload_dir": self.offload_dir}


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """accelerate's syntax: ``0=70GiB,1=70GiB,cpu=200GiB`` (GPU indices, ``cpu``, ``mps``, ``disk``)."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for item in text.split(","):
        dev, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not dev or not _SIZE.match(size):
            raise PrunelensError(f"--max-memory: '{item.strip()}' is not DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB)")
        key: int | str = int(dev) if dev.isdigit() else dev.lower()
        if isinstance(key, str) and key not in ("cpu", "mps", "disk") and not key.startswith(("cuda:", "xpu:")):
            raise PrunelensError(f"--max-memory: unknown device '{dev}' (GPU index, cpu, mps or disk)")
        if isinstance(key, str) and key.startswith(("cuda:", "xpu:")):
            key = int(key.split(":", 1)[1])
        out[key] = size.replace(" ", "")
    return out


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """A strategy name, or a JSON file mapping module names to devices (as ``hf_device_map`` prints)."""
    if not text:
        return None
    if text in DEVICE_MAPS:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise PrunelensError(f"--device-map '{text}' is neither {', '.join(DEVICE_MAPS)} nor a JSON file")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PrunelensError(f"--device-map file '{text}' is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise PrunelensError(f"--device-map file '{text}' must map module names to devices")
    return table


def placement(device_map: str | None, max_memory: str | None, offload_dir: str | None) -> Placement:
    """The placement the CLI options ask for; memory limits alone imply ``device_map=auto``."""
    dm, mm = parse_device_map(device_map), parse_max_memory(max_memory)
    if dm is None and (mm or offload_dir):
        dm = "auto"
    if offload_dir:
        check_offload_dir(offload_dir)
    return Placement(dm, mm, offload_dir)


def check_offload_dir(path: str) -> None:
    """The disk-offload folder is (or can be made) a directory that takes files, probed before the
    model loads: a file there or an unwritable place is one line, not an error from accelerate."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise PrunelensError(f"--offload-dir '{path}' exists and is not a directory")
    probe_writable_dir(p, ".prunelens", f"cannot write to --offload-dir '{path}'")


# --- models dispatched with accelerate's hooks --------------------------------------------------


def _hook(module: nn.Module) -> Any:
    return getattr(module, "_hf_hook", None)


def is_offloaded(module: nn.Module) -> bool:
    """True if ``module``'s own weights are kept off its execution device (CPU or disk offload)."""
    h = _hook(module)
    return bool(h is not None and getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None)


def is_dispatched(model: nn.Module) -> bool:
    return getattr(model, "hf_device_map", None) is not None


def execution_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its embedding's execution device (the first parameter's device
    for a model on one device; never ``meta``)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for m in (emb, model):
        h = _hook(m) if m is not None else None
        if h is not None and getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device if not isinstance(h.execution_device, int)
                                else f"cuda:{h.execution_device}")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its real weights on its execution device inside the block (a no-op for a
    resident module); offloaded again on exit."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


class _Overlay(Mapping):
    """A hook's weight map with some entries replaced: accelerate reads ``weights_map[name]`` when it
    onloads, so an offloaded module runs with the replacement and the stored weight is untouched."""

    def __init__(self, base: Mapping, over: dict[str, torch.Tensor]) -> None:
        self.base, self.over = base, over

    def __getitem__(self, key: str) -> Any:
        return self.over[key] if key in self.over else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


@contextlib.contextmanager
def swapped(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run ``model`` with ``weights`` ({linear module path: weight}) in place of the current ones.

    Resident modules swap the parameter's storage pointer (no copy); offloaded ones get an overlay on
    their hook's weight map, so the replacement is onloaded in place of the stored weight.
    """
    restore: list[tuple[Any, str, Any]] = []
    try:
        for path, w in weights.items():
            mod = model.get_submodule(path)
            if is_offloaded(mod):
                h = _hook(mod)
                restore.append((h, "weights_map", h.weights_map))
                h.weights_map = _Overlay(h.weights_map, {"weight": w})
            else:
                restore.append((mod.weight, "data", mod.weight.data))
                mod.weight.data = w
        yield
    finally:
        for obj, attr, old in reversed(restore):
            setattr(obj, attr, old)


def _stored_weight(h: Any) -> tuple[Any, Any, str]:
    """(the hook's weight map under any overlay, the loader behind it, the weight's key there):
    accelerate keeps CPU-offloaded weights in the loader's ``state_dict`` and disk-offloaded ones
    in its ``index``."""
    wm = h.weights_map
    root = wm.base if isinstance(wm, _Overlay) else wm
    return root, getattr(root, "dataset", root), getattr(root, "prefix", "") + "weight"


def _stored_on_disk(h: Any) -> tuple[bool, str | None]:
    """(whether the hook's stored weight is read from disk, the offload folder if one was given)."""
    _, loader, key = _stored_weight(h)
    in_ram = key in getattr(loader, "state_dict", {})
    return (not in_ram and key in getattr(loader, "index", {})), getattr(loader, "save_folder", None)


def spill(t: torch.Tensor, folder: str | None = None) -> torch.Tensor:
    """``t`` as a tensor backed by a file mapping: its pages are the kernel's page cache, read back
    on use and dropped under memory pressure, so a model's worth of new weights for disk-offloaded
    layers costs disk, not RAM. The file is unlinked at once; the mapping keeps its data alive."""
    import tempfile

    t = t.detach().contiguous().to("cpu")
    fd, path = tempfile.mkstemp(prefix="prunelens-weight-", suffix=".bin", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            t.view(torch.uint8).numpy().tofile(f)
        out = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    finally:
        os.unlink(path)
    return out


def offload_copy(module: nn.Module, new: torch.Tensor) -> torch.Tensor:
    """Where a new weight of an offloaded module waits between onloads: a file mapping when the
    module's stored weight lives on disk (so the budget is kept), otherwise the CPU."""
    on_disk, folder = _stored_on_disk(_hook(module))
    if on_disk:
        return spill(new, folder if folder and Path(folder).is_dir() else None)
    return new.detach().to("cpu")


def store_weight(module: nn.Module, new: torch.Tensor) -> torch.Tensor:
    """Make ``new`` the module's weight for good (pruning in place for saving). A resident weight is
    overwritten in its storage; an offloaded one replaces the stored entry of the hook's weight map
    (a CPU tensor is dropped for it; a disk-stored one is shadowed by a file-mapped copy). Returns
    the tensor that now holds the weight."""
    if is_offloaded(module):
        h = _hook(module)
        kept = new if new.device.type == "cpu" else offload_copy(module, new)
        root, loader, key = _stored_weight(h)
        if key in getattr(loader, "state_dict", {}):  # CPU offload: the old weight is freed
            loader.state_dict[key] = kept
            return kept
        base = h.weights_map
        over = dict(base.over) if isinstance(base, _Overlay) else {}
        over["weight"] = kept
        h.weights_map = _Overlay(root, over)
        return kept
    w = module.weight.data
    w.copy_(new)
    return w


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the state dict, reading offloaded weights one module at a time, so at most
    one module's offloaded weights are materialised at once (on the CPU)."""
    for mod_name, mod in model.named_modules():
        local = [n for n, _ in mod.named_parameters(recurse=False)] + [
            n for n, _ in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set]
        if not local:
            continue
        with onloaded(mod):
            for n in local:
                yield (f"{mod_name}.{n}" if mod_name else n), getattr(mod, n).detach().to("cpu")
