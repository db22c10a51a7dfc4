"""The trace: a reference and a candidate compared through hidden states h → logits z →
probabilities p, per layer on the prompts and per decoding step (``prunelens analyze``).

Modules, in the order a trace runs: ``settings`` (what is measured, the schema), ``forwards`` (the
two sides), ``prefill`` and ``lens`` (per layer), ``decode`` (lock-step decoding), ``aggregate`` and
``summary`` (the numbers saved), ``core`` (the loop), ``sequential`` (one model in memory at a time);
the view is ``figures`` and ``page`` (with ``labels`` and ``sections``), which read saved results
only. The ``analyze`` subcommand is ``analyses/analyze.py``, above the predictor whose verdict it adds.
"""

from prunelens.analyses.trace.aggregate import taylor_check
from prunelens.analyses.trace.core import analyze, compare_models, trace
from prunelens.analyses.trace.decode import metric_chunk_rows, step_metrics
from prunelens.analyses.trace.figures import make_figures
from prunelens.analyses.trace.forwards import Forward, ModelForward, Prefilled
from prunelens.analyses.trace.page import load_result, render_html, report_from_run_dirs, trace_page, write_trace_run
from prunelens.analyses.trace.settings import CONVENTIONS, SCHEMA, AnalysisSettings, TraceSettings
from prunelens.analyses.trace.summary import summarize

__all__ = [
    "CONVENTIONS", "SCHEMA", "AnalysisSettings", "Forward", "ModelForward", "Prefilled",
    "TraceSettings", "analyze", "compare_models", "load_result", "make_figures", "metric_chunk_rows", "render_html",
    "report_from_run_dirs", "step_metrics", "summarize", "taylor_check", "trace",
    "trace_page", "write_trace_run",
]
