"""`prunelens report`: rebuild one run's page, or put runs of any kinds side by side, from saved files."""

from __future__ import annotations

from pathlib import Path

from prunelens.analyses.trace_view import analysis_page, report_from_run_dirs
from prunelens.render import CSS, esc
from prunelens.runs import atomic_write_text


def render_other_run(run_dir: Path) -> str | None:
    """The HTML page of any run but a plain analysis, re-rendered from its saved results by the
    analysis that wrote it (found by marker file or schema); None for an analysis run (or none)."""
    from prunelens.analyses.base import for_run

    found = for_run(run_dir)
    if found is None or found.name == "analyze":
        return None
    return found.page(Path(run_dir))


def rebuild_other_report(run_dir: Path) -> Path | None:
    """Rewrite report.html of a sweep, comparison, counterfactual or subspace run; None for an
    analysis run (the caller handles those)."""
    html = render_other_run(run_dir)
    if html is None:
        return None
    out = Path(run_dir) / "report.html"
    atomic_write_text(out, html)
    return out


def _body(html: str) -> str:
    """The inside of <body> of one of our own pages (they are built by this package)."""
    a, b = html.find("<body>"), html.rfind("</body>")
    return html[a + len("<body>"):b] if a >= 0 and b > a else html


def combined_report(run_dirs: list[Path], out_html: Path) -> Path:
    """One page for runs of any kind: analysis runs side by side as usual, then every other run
    (sweep, comparison, counterfactual, subspace) in its own column, from saved results only."""
    others = [(d, render_other_run(d)) for d in run_dirs]
    if all(h is None for _, h in others):
        return report_from_run_dirs(run_dirs, out_html)
    analysis = [d for d, h in others if h is None]
    parts = []
    if analysis:
        parts.append(_body(analysis_page(analysis)))
    cols = [f"<div><h2>{esc(str(d))}</h2>{_body(h)}</div>" for d, h in others if h is not None]
    grid = f'style="grid-template-columns:repeat({min(len(cols), 3)},minmax(0,1fr))"'
    parts.append(f'<div class="runs" {grid}>{"".join(cols)}</div>')
    title = "prunelens report — " + ", ".join(Path(d).name for d in run_dirs)
    page = "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                       f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
                       f"<h1>{esc(title)}</h1>", *parts, "</body></html>"])
    atomic_write_text(Path(out_html), page)
    return Path(out_html)
