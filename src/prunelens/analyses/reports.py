"""`prunelens report`: rebuild one run's page, or put runs of any kinds side by side, from saved files.

Each run is drawn by the analysis that wrote it (found by marker file or schema). Runs of an
analysis that can ``combine`` several runs (the trace) share one page section, side by side; every
other run gets a column of its own.
"""

from __future__ import annotations

from pathlib import Path

from prunelens.analyses.base import Analysis, for_run
from prunelens.errors import PrunelensError
from prunelens.render import esc, html_page
from prunelens.runs import atomic_write_text, read_json


def _analysis_of(run_dir: Path) -> Analysis:
    """The analysis that wrote ``run_dir``; a one-line error when none did."""
    found = for_run(run_dir)
    if found is not None:
        return found
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise PrunelensError(f"'{run_dir}' has no results.json (not a prunelens run directory)")
    result = read_json(path)
    schema = result.get("schema", "") if isinstance(result, dict) else ""
    raise PrunelensError(f"'{path}' is not a prunelens analysis result (schema {schema!r})")


def rebuild_report(run_dir: Path) -> Path | None:
    """Rewrite report.html of one run by its analysis; None when no analysis wrote it (the caller
    then reports the error through ``combined_report``)."""
    found = for_run(run_dir)
    if found is None:
        return None
    out = Path(run_dir) / "report.html"
    atomic_write_text(out, found.page(Path(run_dir)))
    return out


def _body(html: str) -> str:
    """The inside of <body> of one of our own pages (they are built by this package)."""
    a, b = html.find("<body>"), html.rfind("</body>")
    return html[a + len("<body>"):b] if a >= 0 and b > a else html


def combined_page(run_dirs: list[Path]) -> str:
    """One page for runs of any kind: runs of a combining analysis side by side, then every other
    run in its own column, from saved results only."""
    if not run_dirs:
        raise PrunelensError("no run directories given")
    found = [(Path(d), _analysis_of(d)) for d in run_dirs]
    groups: dict[str, tuple[Analysis, list[Path]]] = {}
    for d, a in found:
        if a.combine is not None:
            groups.setdefault(a.name, (a, []))[1].append(d)
    if len(groups) == 1 and all(a.combine is not None for _, a in found):
        a, dirs = next(iter(groups.values()))
        return a.combine(dirs)
    parts = [_body(a.combine(dirs)) for a, dirs in groups.values() if a.combine is not None]
    cols = [f"<div><h2>{esc(str(d))}</h2>{_body(a.page(d))}</div>" for d, a in found if a.combine is None]
    grid = f'style="grid-template-columns:repeat({min(len(cols), 3)},minmax(0,1fr))"'
    parts.append(f'<div class="runs" {grid}>{"".join(cols)}</div>')
    title = "prunelens report — " + ", ".join(Path(d).name for d in run_dirs)
    return html_page(title, f"<h1>{esc(title)}</h1>", *parts)


def combined_report(run_dirs: list[Path], out_html: Path) -> Path:
    """Write ``combined_page`` to ``out_html``."""
    atomic_write_text(Path(out_html), combined_page(run_dirs))
    return Path(out_html)
