"""The skeleton every analysis shares, and the registry the CLI and ``prunelens report`` read.

An analysis is one registered ``Analysis``: its subcommand (name, help, arguments, and ``run``,
which checks the arguments, loads the model, computes, writes the run directory and prints the
summary lines), and its view (``figures`` and ``html`` re-drawn from a saved result, so
``prunelens report`` can rebuild any run). A run directory is recognised by the ``schema`` its
results.json records, or by a ``marker`` file for directory-level runs (a sweep's sweep.json).

Adding an analysis is one module in this package that calls ``register`` (it is found by
discovery) plus its test; the table below only fixes the order in which the CLI lists the built-in ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelens.registry import Registry
from prunelens.runs import read_json, write_run

Result = dict[str, Any]


@dataclass(frozen=True)
class Analysis:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    schema: str | None = None  # results.json "schema" prefix this analysis writes
    figures: Callable[[Result, Path], list[Path]] | None = None
    html: Callable[[Result, list[Path]], str] | None = None
    summary: Callable[[Result], list[str]] | None = None  # the lines the command prints, from a saved result
    marker: str | None = None  # a file naming a run directory of this analysis (sweep.json)
    rebuild: Callable[[Path], str] | None = None  # the page of a saved run, from its files
    combine: Callable[[list[Path]], str] | None = None  # one page for several of its runs side by side

    def finish(self, result: Result, out: Path, overwrite: bool) -> int:
        """The end every run shares: write the run directory with this analysis' view, print its
        summary lines and where the report is."""
        assert self.html is not None, f"analysis {self.name!r} has no page to write"
        write_run(result, out, overwrite=overwrite, figures=self.figures or (lambda r, d: []), html=self.html)
        if self.summary is not None:
            print("\n".join(self.summary(result)))
        print(f"report: {Path(out) / 'report.html'}")
        return 0

    def page(self, run_dir: Path) -> str:
        """This analysis' HTML page for a saved run, figures redrawn, nothing recomputed."""
        if self.rebuild is not None:
            return self.rebuild(run_dir)
        result = read_json(run_dir / "results.json")
        figs = self.figures(result, run_dir / "figures") if self.figures else []
        assert self.html is not None
        return self.html(result, figs)


# the built-in analyses in the order the CLI lists them; each module registers itself on import
BUILTIN = ("trace", "counterfactual", "compare", "subspace", "paired", "sweep", "families", "advise")
_COMMANDS = {"trace": "analyze"}  # module -> subcommand, where they differ

ANALYSES: Registry[Analysis] = Registry(
    "analysis", lazy={_COMMANDS.get(m, m): f"prunelens.analyses.{m}:ANALYSIS" for m in BUILTIN},
    discover=("prunelens.analyses",))


def register(analysis: Analysis) -> Analysis:
    """Add an analysis under its subcommand name (a second one of the same name is an error)."""
    ANALYSES.register(analysis.name, analysis)
    return analysis


def analyses() -> list[Analysis]:
    """Every analysis, built-in ones first in the CLI's order, then any others in discovery order."""
    return ANALYSES.values()


def for_run(run_dir: str | Path) -> Analysis | None:
    """The analysis that wrote a run directory: by marker file, else by results.json's schema."""
    d = Path(run_dir)
    found = analyses()
    for a in found:
        if a.marker and (d / a.marker).is_file():
            return a
    path = d / "results.json"
    if not path.is_file():
        return None
    result = read_json(path)
    schema = result.get("schema", "") if isinstance(result, dict) else ""
    if not isinstance(schema, str):
        return None
    return next((a for a in found if a.schema and schema.startswith(a.schema)), None)
