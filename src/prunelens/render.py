"""The HTML and number kit every report uses: one stylesheet, escaping, tables, inline figures."""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError

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
.verdict{font-size:1.1em;background:#f3faf6;border-left:4px solid #2a7;padding:.5em .8em;margin:.5em 0}
.scroll{overflow-x:auto}
.drop{background:#ffd9d9;font-weight:600}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
.muted{color:#777;font-size:.85em}
"""


class Markup(str):
    """Text that is already HTML built by this kit (escaped values inside our own tags): ``esc``
    passes it through unchanged, so escaping twice never shows ``&amp;lt;``."""


def esc(x: Any) -> Markup:
    """The one escaping rule: every value a page shows goes through here (or ``val``), whatever its
    type, since a saved result read back may hold markup in any field."""
    return x if isinstance(x, Markup) else Markup(html.escape(str(x), quote=True))


def text(x: Any, spec: str = "", missing: str = "—") -> str:
    """A saved value as plain text: a real number formatted with ``spec``, None as ``missing``,
    anything else (a crafted string, a list where a number belongs) as it is, never a crash."""
    if x is None:
        return missing
    if spec and isinstance(x, (int, float)) and not isinstance(x, bool):
        return format(x, spec)
    return str(x)


def val(x: Any, spec: str = "", missing: str = "—") -> Markup:
    """A saved value for a page: ``text`` escaped, the way every value reaches HTML."""
    return esc(text(x, spec, missing))


def html_page(title: str, *parts: str) -> str:
    """A self-contained report page (inline CSS; figures come inline through ``img``); the title is
    escaped here, the parts are HTML built with ``esc``/``val``."""
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{esc(title)}</title><style>{CSS}</style></head><body>", *parts, "</body></html>"])


def html_table(rows: Sequence[Any], keys: Sequence[str], cell: Any = val) -> str:
    """One row per dict, one column per key, each value through ``cell`` and escaped."""
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell(r.get(k) if isinstance(r, dict) else None))}</td>"
                                    for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(path: Path) -> str:
    """A PNG inlined as a data URI: only a regular file reached without a symlink (neither the file
    nor its folder), so a crafted run folder cannot pull another file into the page."""
    p = Path(path)
    if p.is_symlink() or p.parent.is_symlink() or not p.is_file():
        raise PrunelensError(f"figure '{p}' is not a regular file inside the run folder (a symlink?); "
                             "remove it and rebuild the report")
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<img alt="{esc(p.stem)}" src="data:image/png;base64,{data}">'


def save_figure(fig: Any, path: Path, dpi: int = DPI) -> Path:
    """Write a figure as a new file renamed into place: a symlink planted at ``path`` is replaced,
    never written through, and a symlinked folder is refused (as ``img`` refuses to read it)."""
    p = Path(path)
    if p.parent.is_symlink():
        raise PrunelensError(f"figure folder '{p.parent}' is a symlink; figures are written only inside "
                             "the run folder")
    tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0),
             **kw: Any) -> tuple[Any, Any]:
    """A figure and its axes drawn with the Agg canvas directly: no pyplot, so no global backend
    switch and nothing left open in a user's notebook session."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)
