"""prunelens: why a pruned LLM keeps its multiple-choice scores but loses generation.

Notebook use::

    import prunelens as pl
    lm = pl.load_model("smollm2-135m")
    plan = pl.select_drop(lm, "attn:4")
    result = pl.analyze(lm, plan, pl.builtin_prompts())
    pl.write_run(result, "runs/attn4")          # results.json, figures, report.html
"""

__version__ = "0.1.0"
