"""The HTML and number kit every report uses: one stylesheet, escaping, tables, inline figures."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPI = 110


def num(x: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers (results may hold any of them)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, sig: int = 3) -> str:
    """Significant digits, but values just below 1 keep enough digits to show how far from 1."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    v = num(x)
    if v is None:
        return "—"
    if v in (0, 1):
        return str(int(v))
    if 0.99 <= v < 1:
        dec = -math.floor(math.log10(1 - v) + 1e-9) + 1
        return f"{v:.{dec}f}" if dec <= 8 else f"1 − {1 - v:.1e}"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.{sig - 1}e}"
    return f"{v:#.{sig}g}".rstrip(".")  # '#' keeps trailing zeros: 0.960, not 0.96


def short(x: Any, missing: str = "—") -> str:
    """Short general format for steps and temperatures (5.5, 1, 0.5)."""
    v = num(x)
    return missing if v is None else f"{v:g}"


def pct(x: Any) -> str:
    v = num(x)
    return "—" if v is None else f"{100 * v:.0f}%"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1500px;
 padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:.8em 0 .3em}
.runs{display:grid;gap:1em}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;background:#fafafa;min-width:0}
.card .label{font-family:ui-monospace,Menlo,Consolas,monospace;font-weight:600}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;vertical-align:top;text-align:left}
th{background:#f1f1f1}
td.num{text-align:right;font-family:ui-monospace,Menlo,Consolas,monospace;white-space:nowrap}
tr.group th{background:#e8eef7;text-align:left}
.text{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;
 word-break:break-word}
.diff{background:#ffe2b8}
img{max-width:100%;height:auto;border:1px solid #eee}
.reading{background:#f5f8ff;border-left:4px solid #6c8ebf;padding:.5em .8em;margin:.5em 0}
.scroll{overflow-x:auto}
.drop{background:#ffd9d9;font-weight:600}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
.muted{color:#777;font-size:.85em}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def html_page(title: str, *parts: str) -> str:
    """A self-contained report page (inline CSS; figures come inline through ``img``)."""
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{title}</title><style>{CSS}</style></head><body>", *parts, "</body></html>"])


def html_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], cell: Any) -> str:
    """One row per dict, one column per key, each value through ``cell`` and escaped."""
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(Path(path).stem)}" src="data:image/png;base64,{data}">'


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0),
             **kw: Any) -> tuple[Any, Any]:
    """A figure and its axes drawn with the Agg canvas directly: no pyplot, so no global backend
    switch and nothing left open in a user's notebook session."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)
