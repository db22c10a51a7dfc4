"""prunelens: why a pruned LLM keeps its multiple-choice scores but loses generation.

Notebook use::

    import prunelens as pl
    lm = pl.load_model("smollm2-135m")                 # a preset, local dir, .gguf or hub id
    plan = pl.build(lm, "attn:4")                      # 4 least important attention sublayers
    both = pl.build(lm, "attn:2+wanda:0.5")            # a recipe: drops first, then weight methods
    result = pl.analyze(lm, plan, pl.builtin_prompts())
    pl.write_run(result, "runs/attn4")                 # results.json, figures/, report.html
    pl.run_task(lm, "humaneval", None, pl.TaskOptions(limit=20), plan)   # pass@1 of the pruned model
    cand = pl.load_candidate("my-gptq-w4a16/", lm)     # any tool's compressed model of the same base
    pl.compare_models(lm, cand, pl.builtin_prompts())  # the same trace, plus the field's statistics

With lm-evaluation-harness installed, ``import prunelens`` also registers its ``prunelens`` model type
(``lm_eval.simple_evaluate(model="prunelens", model_args="pretrained=...,prune=attn:4")``).
"""

import importlib.util

from prunelens.analyses.sweep import SweepSpec, run_sweep  # noqa: E402
from prunelens.analyses.trace import AnalysisSettings, TraceSettings, analyze, compare_models  # noqa: E402
from prunelens.analyses.trace import write_trace_run as write_run  # noqa: E402  (a trace's run directory)
from prunelens.analyses.trace.core import compare_sequential  # noqa: E402
from prunelens.data import builtin_prompts, read_texts  # noqa: E402
from prunelens.errors import PrunelensError  # noqa: E402
from prunelens.model.loading import PRESETS, LoadedModel  # noqa: E402
from prunelens.prune.candidate import load_candidate  # noqa: E402
from prunelens.prune.checkpoint import load_model, save_pruned  # noqa: E402
from prunelens.prune.drop import DropPlan, parse_drop, pruned_view  # noqa: E402
from prunelens.prune.recipe import (  # noqa: E402
    Calibration,
    Recipe,
    build,
    footprint,
    prune_weights,
    save_modified,
    select_drop,
)
from prunelens.tasks.registry import TaskOptions, run_task  # noqa: E402
from prunelens.version import __version__  # noqa: E402,F401


def _register_with_lm_eval() -> None:
    """Make ``lm_eval.simple_evaluate(model="prunelens")`` work after ``import prunelens``: lm-eval
    has no plugin discovery, so its registry gets a lazy ``"module:attribute"`` entry. Only
    lm-eval's small registry modules load here; its model code and ``prunelens.lmeval`` load on
    first use, and nothing at all happens where lm-eval is not installed."""
    try:
        if importlib.util.find_spec("lm_eval") is None:
            return
        import lm_eval.models  # noqa: F401  lm-eval's own lazy table first, or it would skip filling it
        from lm_eval.api.registry import model_registry
    except Exception:  # noqa: BLE001 - a broken lm-eval must not break `import prunelens`
        return
    if "prunelens" not in model_registry:
        model_registry.register("prunelens", target="prunelens.lmeval:PrunelensLM")


_register_with_lm_eval()

__all__ = [
    "AnalysisSettings", "TraceSettings", "DropPlan", "LoadedModel", "PRESETS", "PrunelensError", "analyze",
    "builtin_prompts", "load_model", "parse_drop", "pruned_view", "read_texts", "save_pruned",
    "select_drop", "write_run", "SweepSpec", "run_sweep", "TaskOptions", "run_task", "Calibration", "Recipe",
    "build", "footprint", "prune_weights", "save_modified", "compare_models", "compare_sequential", "load_candidate",
]
