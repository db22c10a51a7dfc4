"""A ``prunelens`` model type for lm-evaluation-harness (optional; needs ``pip install lm-eval``).

    python -m prunelens.lmeval --model prunelens \\
        --model_args pretrained=smollm2-135m,prune=attn:4 --tasks arc_easy --limit 100

or, from Python, ``import prunelens`` then ``lm_eval.simple_evaluate(model="prunelens", ...)``:
lm-eval has no plugin discovery, so ``import prunelens`` registers the model type in lm-eval's
registry as a lazy ``"prunelens.lmeval:PrunelensLM"`` entry (when lm-eval is installed; this
module, and lm-eval's model code, load only when the model type is first used).

``pretrained`` is anything ``prunelens.load_model`` takes (a preset, local HF directory, .gguf
file or hub id — a compressed model made by another tool too, docs/candidates.md); ``prune`` is a
recipe, specs joined by ``+`` (``attn:4``, ``wanda:0.5``,
``gptq:w4g128``, ``attn:2+wanda:0.5``) or a YAML/JSON recipe file, built by the same builder and
composition rule as the CLI (drops first, then weight methods each calibrated on the model as
modified so far); ``calib`` a calibration file. The modified
model is the dense one seen through prunelens's zero-copy view, so lm-eval scores exactly what
``prunelens eval`` and ``analyze`` see.

What lm-eval records: the results' ``config`` gets a ``prunelens`` entry with the device the model
really ran on and the modification (its label and ``to_dict``); lm-eval's own ``device`` field is the
device *asked for* (the runner asks for ``cpu`` when CUDA is absent, rather than lm-eval's
``cuda:0``). The model name lm-eval files results under is ``pretrained`` plus the modification's
label, so a dense and a pruned run land in different folders.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import torch

try:
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("prunelens.lmeval needs lm-evaluation-harness: pip install lm-eval") from e

from prunelens.prune.checkpoint import load_model
from prunelens.prune.recipe import Calibration, Recipe, build

#: prune argument -> the label of the modification it built (for the results' folder name)
_LABELS: dict[str, str] = {}


class PrunelensLM(HFLM):
    """lm-eval's HF model over a prunelens-loaded (and optionally pruned) model."""

    def __init__(self, pretrained: str = "smollm2-135m", prune: str | None = None, calib: str | None = None,
                 device: str | None = "cpu", dtype: str = "float32", seed: int = 0, **kwargs: Any) -> None:
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval asks for cuda:0 unless told otherwise; its own HF model falls back the same way
            logging.getLogger(__name__).warning("CUDA is not available; running prunelens on the CPU")
            device = "cpu"
        lm = load_model(str(pretrained), device, dtype)
        self._views = contextlib.ExitStack()
        self.prunelens_label = "dense"
        self.prunelens_modification: Any = None
        if prune:
            mod = build(lm, Recipe.parse(str(prune)), Calibration(path=calib, seed=int(seed)), progress=False)
            self._views.enter_context(mod.view(lm.adapter))
            self.prunelens_label = mod.label()
            self.prunelens_modification = mod
            _LABELS[str(prune)] = mod.label()
        self.prunelens_model = lm
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=lm.model, tokenizer=lm.tokenizer, **kwargs)

    def get_model_info(self) -> dict[str, Any]:
        """lm-eval's model info plus what prunelens ran: the real device and the modification."""
        mod = self.prunelens_modification
        return {**super().get_model_info(),
                "prunelens": {"device": str(self.prunelens_model.device), "modification_label": self.prunelens_label,
                              "modification": mod.to_dict() if mod is not None else None}}


def model_name(model_args: str | dict[str, Any] | None, base: Any = GeneralConfigTracker._get_model_name) -> str | None:
    """lm-eval's model name (``pretrained``) plus the modification's label when ``prune`` is given,
    so the results of a dense and a pruned run are filed in different folders."""
    name = base(model_args)
    if isinstance(model_args, dict):
        prune = model_args.get("prune")
    else:
        pairs = (kv.partition("=") for kv in str(model_args or "").split(","))
        prune = next((v for k, _, v in pairs if k.strip() == "prune"), None)
    if not name or not prune:
        return name
    return f"{name}+{_LABELS.get(str(prune), str(prune))}"


if __name__ != "__main__":  # run as `python -m`, lm-eval loads this module by name through the lazy entry
    # `prune=` is a prunelens-only model argument: other model types' names stay as lm-eval makes them
    GeneralConfigTracker._get_model_name = staticmethod(model_name)
    if "prunelens" not in model_registry:  # `import prunelens` registers the lazy entry first
        register_model("prunelens")(PrunelensLM)


def main() -> None:
    """lm-eval's command line with the ``prunelens`` model type known; ``--device`` defaults to
    ``cpu`` where CUDA is absent (lm-eval's default is ``cuda:0``, recorded even when unused)."""
    from lm_eval.__main__ import cli_evaluate

    if not any(a == "--device" or a.startswith("--device=") for a in sys.argv[1:]):
        sys.argv += ["--device", "cuda:0" if torch.cuda.is_available() else "cpu"]
    cli_evaluate()


if __name__ == "__main__":
    main()
