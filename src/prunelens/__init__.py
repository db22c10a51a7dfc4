"""prunelens: why a pruned LLM keeps its multiple-choice scores but loses generation.

Notebook use::

    import prunelens as pl
    lm = pl.load_model("smollm2-135m")                 # a preset, local dir, .gguf or hub id
    plan = pl.select_drop(lm, "attn:4")                # 4 least important attention sublayers
    result = pl.analyze(lm, plan, pl.builtin_prompts())
    pl.write_run(result, "runs/attn4")                 # results.json, figures/, report.html
    pl.run_task(lm, "humaneval", None, pl.TaskOptions(limit=20), plan)   # pass@1 of the pruned model
"""

__version__ = "0.1.0"

from .analysis import AnalysisSettings, analyze  # noqa: E402
from .api import select_drop  # noqa: E402
from .data import builtin_prompts, read_texts  # noqa: E402
from .errors import PrunelensError  # noqa: E402
from .models import PRESETS, LoadedModel, load_model  # noqa: E402
from .prune.drop import DropPlan, parse_drop, pruned_view, save_pruned  # noqa: E402
from .runs import write_run  # noqa: E402
from .sweep import SweepSpec, run_sweep  # noqa: E402
from .tasks.registry import TaskOptions, run_task  # noqa: E402

__all__ = [
    "AnalysisSettings", "DropPlan", "LoadedModel", "PRESETS", "PrunelensError", "analyze",
    "builtin_prompts", "load_model", "parse_drop", "pruned_view", "read_texts", "save_pruned",
    "select_drop", "write_run", "SweepSpec", "run_sweep", "TaskOptions", "run_task",
]
