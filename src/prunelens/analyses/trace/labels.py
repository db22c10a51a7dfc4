"""Reading a saved trace result for the figures and the page: names, temperatures, safe lookups.

Results may come from any modification or an older/newer schema, so every reader here tolerates a
missing key: it gives None (or an empty value) and the piece that needed it is left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prunelens.analyses.trace.summary import summarize
from prunelens.render import num

FIGURE_ORDER = ("layerwise", "stepwise", "spaces", "taylor")
SPACE_COLORS = {"h": "tab:green", "z": "tab:orange", "zc": "tab:brown", "p": "tab:purple"}
DROP_COLORS = {"attn": "tab:red", "mlp": "tab:blue", "block": "0.45"}
MODES = {"teacher_forced": "teacher-forced", "free_running": "free-running"}

def tkey(t: Any) -> str:
    """Temperature suffix as the trace writes it (``f"{T:g}"``)."""
    try:
        return f"{float(t):g}"
    except (TypeError, ValueError):
        return str(t)


def temperatures(result: dict[str, Any]) -> list[str]:
    """Temperature suffixes from settings, else recovered from the ``kl@T`` keys present."""
    temps = (result.get("settings") or {}).get("temperatures")
    if isinstance(temps, (list, tuple)) and temps:
        return [tkey(t) for t in temps]
    found: list[str] = []
    for block in [result.get("layerwise") or {}, *((result.get("stepwise") or {}).values())]:
        if isinstance(block, dict):
            for k in block:
                t = k.split("@", 1)[1] if k.startswith(("kl@", "lens_kl@")) else None
                if t is not None and t not in found:
                    found.append(t)
    return found


def as_array(values: Any, n: int | None = None) -> np.ndarray | None:
    """List of numbers/None → float array with NaN gaps; None if absent or all missing."""
    if not isinstance(values, (list, tuple)) or not values:
        return None
    a = np.array([num(v) if num(v) is not None else np.nan for v in values], dtype=float)
    if n is not None:
        a = a[:n] if len(a) >= n else np.concatenate([a, np.full(n - len(a), np.nan)])
    return a if np.isfinite(a).any() else None


def positive_only(a: np.ndarray) -> np.ndarray:
    """Values a log axis can show; zeros and rounding negatives become gaps."""
    return np.where(a > 0, a, np.nan)


def model_name(result: dict[str, Any]) -> str:
    m = result.get("model") or {}
    return str(m.get("name") or m.get("preset") or m.get("source") or "model")


def pruning_label(result: dict[str, Any]) -> str:
    return str((result.get("pruning") or {}).get("label") or "pruned")


def run_name(result: dict[str, Any]) -> str:
    return f"{model_name(result)} · {pruning_label(result)}"


def mpl_text(s: str) -> str:
    """Keep ``$`` in model names from switching matplotlib into mathtext."""
    return s.replace("$", r"\$")


def dropped_units(result: dict[str, Any]) -> dict[str, list[int]]:
    p = result.get("pruning") or {}
    out = {}
    for kind in DROP_COLORS:
        idx = [int(i) for i in (p.get(kind) or []) if num(i) is not None]
        if idx:
            out[kind] = idx
    return out


def get_in(d: Any, *path: Any) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def prefixed(d: Any, prefix: str) -> Any:
    """Value of the first key starting with ``prefix`` (temperature-suffixed keys like ``kl@1``)."""
    if not isinstance(d, dict):
        return None
    for k, v in d.items():
        if str(k).startswith(prefix):
            return v
    return None


def summary_of(result: dict[str, Any]) -> dict[str, Any]:
    """The stored summary, else one recomputed from the result (older or partial results)."""
    s = result.get("summary")
    if isinstance(s, dict):
        return s
    try:
        return summarize(result)
    except Exception:  # noqa: BLE001 - a partial result just has no summary table
        return {}


def n_prompts(result: dict[str, Any]) -> int | None:
    n = get_in(result, "settings", "n_prompts")
    if isinstance(n, int):
        return n
    pp = result.get("per_prompt")
    return len(pp) if isinstance(pp, list) else None
