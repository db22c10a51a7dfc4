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

from prunelens.errors import PrunelensError
from prunelens.registry import Registry
from prunelens.runs import read_json, write_run

Result = dict[str, Any]
Fields = dict[str, str]  # field path -> kind, see ``check_fields``

_KINDS: dict[str, Callable[[Any], bool]] = {
    "num": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list), "dict": lambda v: isinstance(v, dict), "any": lambda v: True}


def _walk(obj: Any, parts: list[str], kind: str, at: str) -> str | None:
    """The first offence of ``obj`` against one field path (``None`` when it conforms)."""
    if not parts:
        nullable = kind.endswith("?")
        ok = (nullable and obj is None) or _KINDS[kind.rstrip("?")](obj)
        what = {"num": "a number", "int": "an integer", "str": "a string", "dict": "an object"}.get(
            kind.rstrip("?"), kind.rstrip("?"))
        where = f"field '{at}'" if at else "the file"
        return None if ok else f"{where} must be {what}{' or null' if nullable else ''}"
    head, rest = parts[0], parts[1:]
    key, each = head.rstrip("?").removesuffix("[]").removesuffix("{}"), head.rstrip("?")[-2:]
    if not isinstance(obj, dict):
        return f"field '{at}' must be an object" if at else "the file must be an object"
    name = f"{at}.{key}" if at else key
    if obj.get(key) is None and head.endswith("?"):
        return None  # optional: absent or null
    if key not in obj:
        return f"field '{name}' is missing"
    v = obj[key]
    if each in ("[]", "{}"):
        if not isinstance(v, list if each == "[]" else dict):
            return f"field '{name}' must be a {'list' if each == '[]' else 'mapping'}"
        items = enumerate(v) if isinstance(v, list) else v.items()
        return next((e for i, x in items if (e := _walk(x, rest, kind, f"{name}[{i}]"))), None)
    return _walk(v, rest, kind, name)


def check_fields(obj: Any, fields: Fields, path: Path) -> Any:
    """The one check of a saved file read back: every field a view reads is present with its kind,
    else one line naming the file and the field. A path is dotted; ``a[]``/``a{}`` is every item of a
    list/mapping, ``a?`` may be absent; a kind ``num``/``int``/``str``/``bool``/``list``/``dict``/``any``
    ends in ``?`` when null is allowed."""
    for spec, kind in {"": "dict", **fields}.items():
        err = _walk(obj, spec.split(".") if spec else [], kind, "")
        if err:
            raise PrunelensError(f"'{path}': {err} (a damaged or hand-made file?)")
    return obj


def read_checked(path: Path, fields: Fields) -> Any:
    """A saved JSON file, checked by ``check_fields`` before any view reads it."""
    return check_fields(read_json(path), fields, path)


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
    unfinished: Callable[[Path], list[str]] | None = None  # what a saved run still lacks (a sweep's cells)
    fields: Fields | None = None  # what the view reads from results.json, checked on reading it back

    def finish(self, result: Result, out: Path, overwrite: bool) -> int:
        """The end every run shares: write the run directory with this analysis' view, print its
        summary lines and where the report is."""
        assert self.html is not None, f"analysis {self.name!r} has no page to write"
        write_run(result, out, overwrite=overwrite, figures=self.figures or (lambda r, d: []), html=self.html)
        if self.summary is not None:
            print("\n".join(self.summary(result)))
        print(f"report: {Path(out) / 'report.html'}")
        return 0

    def saved(self, run_dir: Path) -> Result:
        """results.json of a saved run, checked to hold the fields this analysis' view reads."""
        return read_checked(Path(run_dir) / "results.json", self.fields or {})

    def page(self, run_dir: Path) -> str:
        """This analysis' HTML page for a saved run, figures redrawn, nothing recomputed."""
        if self.rebuild is not None:
            return self.rebuild(run_dir)
        result = self.saved(run_dir)
        figs = self.figures(result, run_dir / "figures") if self.figures else []
        assert self.html is not None
        return self.html(result, figs)


# the built-in analyses in the order the CLI lists them; each module registers itself on import
BUILTIN = ("analyze", "counterfactual", "compare", "subspace", "paired", "sweep", "families", "advise")

ANALYSES: Registry[Analysis] = Registry(
    "analysis", lazy={m: f"prunelens.analyses.{m}:ANALYSIS" for m in BUILTIN},
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
