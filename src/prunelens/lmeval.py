"""A ``prunelens`` model type for lm-evaluation-harness (optional; needs ``pip install lm-eval``).

    python -m prunelens.lmeval --model prunelens \\
        --model_args pretrained=smollm2-135m,prune=attn:4 --tasks arc_easy --limit 100

``pretrained`` is anything ``prunelens.load_model`` takes (a preset, local HF directory, .gguf
file or hub id); ``prune`` is a recipe, specs joined by ``+`` (``attn:4``, ``wanda:0.5``,
``gptq:w4g128``, ``attn:2+wanda:0.5``) or a YAML/JSON recipe file, built by the same builder and
composition rule as the CLI (drops first, then weight methods each calibrated on the model as
modified so far); ``calib`` a calibration file. The modified
model is the dense one seen through prunelens's zero-copy view, so lm-eval scores exactly what
``prunelens eval`` and ``analyze`` see. lm-eval has no plugin discovery, hence the module runner:
it registers the model type and hands the command line to lm-eval's own ``cli_evaluate``.
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("prunelens.lmeval needs lm-evaluation-harness: pip install lm-eval") from e

from prunelens.prune.checkpoint import load_model
from prunelens.prune.recipe import Calibration, Recipe, build


@register_model("prunelens")
class PrunelensLM(HFLM):
    """lm-eval's HF model over a prunelens-loaded (and optionally pruned) model."""

    def __init__(self, pretrained: str = "smollm2-135m", prune: str | None = None, calib: str | None = None,
                 device: str = "cpu", dtype: str = "float32", seed: int = 0, **kwargs: Any) -> None:
        import logging

        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval asks for cuda:0 unless told otherwise; its own HF model falls back the same way
            logging.getLogger(__name__).warning("CUDA is not available; running prunelens on the CPU")
            device = "cpu"
        lm = load_model(str(pretrained), device, dtype)
        self._views = contextlib.ExitStack()
        self.prunelens_label = "dense"
        if prune:
            mod = build(lm, Recipe.parse(str(prune)), Calibration(path=calib, seed=int(seed)), progress=False)
            self._views.enter_context(mod.view(lm.adapter))
            self.prunelens_label = mod.label()
            self.prunelens_modification = mod
        self.prunelens_model = lm
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=lm.model, tokenizer=lm.tokenizer, **kwargs)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
