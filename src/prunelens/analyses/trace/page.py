"""The HTML page of trace runs: one self-contained file (inline CSS, PNGs as data URIs), so it can
be mailed or archived as it is; several runs go side by side, one column each."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prunelens.analyses.base import check_fields
from prunelens.analyses.trace.figures import make_figures
from prunelens.analyses.trace.labels import (
    FIGURE_ORDER,
    dropped_units,
    get_in,
    model_name,
    n_prompts,
    prefixed,
    run_name,
    summary_of,
    tkey,
)
from prunelens.analyses.trace.sections import (
    field_section,
    kv_table,
    next_commands,
    one_sentence,
    prompt_table,
    selection_section,
    verdict_section,
    weights_section,
)
from prunelens.analyses.trace.settings import SCHEMA_FAMILY
from prunelens.errors import PrunelensError
from prunelens.render import CSS, esc, fmt, img, num, pct, short
from prunelens.runs import atomic_write_text, read_json, write_run


def _summary_rows(result: dict[str, Any]) -> dict[str, str]:
    """Row label → formatted value; a missing number renders as an em dash."""
    s = summary_of(result)
    lp, tf, fr = s.get("last_prompt_token"), s.get("teacher_forced_mean"), s.get("free_running_mean")
    div = s.get("prompts_diverged")
    n = n_prompts(result)
    # the three spaces, in each of the three places; labels differ by trailing spaces (dict keys)
    def spaces(d: Any, pad: str) -> dict[str, str]:
        return {f"cos(h){pad}": fmt(get_in(d, "cos_h")), f"cos(z){pad}": fmt(get_in(d, "cos_z")),
                f"cos(z − mean z){pad}": fmt(get_in(d, "cos_zc")), f"cos(p){pad}": fmt(prefixed(d, "cos_p@"))}

    rows: dict[str, str] = {
        "temperature T (first)": tkey(s["temperature"]) if num(s.get("temperature")) is not None else "—",
        "§last prompt token (step 1)": "", **spaces(lp, ""),
        "KL(p_pruned‖p_dense)": fmt(prefixed(lp, "kl@")),
        "Taylor Var_p(Δz)/2T²": fmt(prefixed(lp, "taylor_kl@")),
        "min over layers of cos(h)": fmt(s.get("min_layer_cos_h")),
        "§teacher-forced, mean over steps": "", **spaces(tf, " "),
        "KL ": fmt(prefixed(tf, "kl@")),
        "top-1 agreement": pct(get_in(tf, "top1_agree")),
        "top-k overlap": fmt(get_in(tf, "topk_overlap")),
        "top-k Spearman ρ": fmt(get_in(tf, "topk_spearman")),
        "KL growth (2nd half ÷ 1st half)": fmt(s.get("kl_growth_teacher_forced")),
        "§free-running, mean over steps": "", **spaces(fr, "  "),
        "KL  ": fmt(prefixed(fr, "kl@")),
        "token agreement": pct(get_in(fr, "token_agree")),
        "KL growth (2nd half ÷ 1st half) ": fmt(s.get("kl_growth_free_running")),
        "§greedy text": "",
        "prompts diverged": "—" if div is None else (f"{div} / {n}" if n is not None else str(div)),
        "median first divergence step": short(s.get("median_first_divergence")),
    }
    return rows


def reading(result: dict[str, Any]) -> str:
    """A plain-language sentence or three built only from this result's numbers."""
    s = summary_of(result)
    lp, tf, fr = (s.get(k) or {} for k in ("last_prompt_token", "teacher_forced_mean", "free_running_mean"))
    t = short(s.get("temperature"), "the first T")
    ch, cz, cp = num(lp.get("cos_h")), num(lp.get("cos_z")), num(prefixed(lp, "cos_p@"))
    kl1, tk = num(prefixed(lp, "kl@")), num(prefixed(lp, "taylor_kl@"))
    kl_tf, kl_fr = num(prefixed(tf, "kl@")), num(prefixed(fr, "kl@"))
    out = []
    if ch is not None and cz is not None:
        close = min(ch, cz) >= 0.95
        first = f"At the last prompt token cos(h)={fmt(ch)} and cos(z)={fmt(cz)}"
        first += " stay close to 1" if close else ""
        if kl1 is not None:
            first += " while" if close else ";"
            first += f" KL at T={t} is {fmt(kl1)} at the first step"
            if tk is not None:
                first += f" (Taylor estimate {fmt(tk)})"
            if cp is not None:
                first += f" and cos(p)={fmt(cp)}"
        out.append(first + ".")
    if kl_tf is not None and kl_fr is not None:
        sent = (f"Averaged over decoding steps, KL is {fmt(kl_tf)} when the pruned model is fed the dense "
                f"model's tokens and {fmt(kl_fr)} in free-running decoding")
        if kl_tf > 0 and kl_fr / kl_tf >= 1.5:
            sent += f" ({kl_fr / kl_tf:.2g}× larger: errors compound once the model feeds on its own tokens)"
        out.append(sent + ".")
    g = num(s.get("kl_growth_free_running"))
    if g is not None:
        out.append(f"In free-running decoding the mean KL of the second half of the steps is {fmt(g)}× "
                   "that of the first half.")
    div, n = s.get("prompts_diverged"), n_prompts(result)
    med = num(s.get("median_first_divergence"))
    if isinstance(div, int):
        if div == 0:
            steps = get_in(result, "settings", "max_new_tokens")
            out.append("No prompt's greedy output diverges from the dense one"
                       + (f" within {steps} steps." if steps else "."))
        else:
            of = f" of {n}" if n is not None else ""
            out.append(f"{div}{of} prompts' greedy outputs diverge from the dense model's"
                       + (f", at median step {short(med)}." if med is not None else "."))
    return " ".join(out)


def _fmt_params(n: Any) -> str:
    v = num(n)
    if v is None:
        return "—"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def _header_card(result: dict[str, Any]) -> str:
    m, p = result.get("model") or {}, result.get("pruning") or {}
    items = []
    for key, label in (("preset", "preset"), ("model_type", "type"), ("n_layers", "layers"),
                       ("hidden_size", "hidden"), ("vocab_size", "vocab"), ("dtype", "dtype"),
                       ("device", "device"), ("gguf", "gguf")):
        if m.get(key) is not None:
            items.append(f"{label} <b>{esc(m[key])}</b>")
    if m.get("n_params") is not None:
        items.insert(0, f"params <b>{esc(_fmt_params(m['n_params']))}</b>")
    drops = ", ".join(f"{len(v)} {k}" for k, v in dropped_units(result).items()) or "nothing"
    meta = [f"prunelens {esc(result.get('prunelens_version', '?'))}", esc(result.get("created", ""))]
    secs = num(get_in(result, "timing", "analysis_s"))
    if secs is not None:
        meta.append(f"analysis {secs:.1f} s")
    return (f'<div class="card"><div><b>{esc(model_name(result))}</b></div>'
            f'<div class="label">{esc(p.get("label", "—"))}</div>'
            f"<div>dropped: {esc(drops)}</div>"
            f'<div class="muted">{" · ".join(items)}</div>'
            f'<div class="muted">{" · ".join(x for x in meta if x)}</div></div>')


def _summary_table(runs: Sequence[dict[str, Any]]) -> str:
    per_run = [_summary_rows(r) for r in runs]
    head = "".join(f'<th class="run-col">{esc(run_name(r))}</th>' for r in runs)
    body = []
    for label in per_run[0]:
        if label.startswith("§"):
            body.append(f'<tr class="group"><th colspan="{len(runs) + 1}">{esc(label[1:])}</th></tr>')
            continue
        cells = "".join(f'<td class="num">{esc(rows.get(label, "—"))}</td>' for rows in per_run)
        body.append(f"<tr><th>{esc(label.strip())}</th>{cells}</tr>")
    return f'<table class="summary"><tr><th></th>{head}</tr>{"".join(body)}</table>'



def render_html(runs: list[tuple[dict[str, Any], list[Path]]], title: str = "prunelens report") -> str:
    """One self-contained page: runs side by side, images inline, every data string escaped."""
    if not runs:
        raise PrunelensError("nothing to report: no runs given")
    results = [r for r, _ in runs]
    ncol = len(runs)
    grid = f'style="grid-template-columns:repeat({ncol},minmax(0,1fr))"'
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>",
           '<p class="muted">Dense vs pruned, traced through hidden states h → logits z → probabilities '
           "p = softmax(z/T), per layer and per decoding step.</p>",
           f'<div class="runs" {grid}>', *(_header_card(r) for r in results), "</div>"]
    out += _per_run("Verdict", _decision, results)
    out += _per_run("Dense vs pruned texts (first divergence highlighted)", prompt_table, results)
    out += ["<h2>Summary</h2>", _summary_table(results)]
    out += _per_run("The field's comparison statistics", field_section, results)
    out.append("<h2>Reading</h2>")
    for r in results:
        text = reading(r)
        if text:
            prefix = f"<b>{esc(run_name(r))}</b>: " if ncol > 1 else ""
            out.append(f'<div class="reading">{prefix}{esc(text)}</div>')

    out += _figures_section(runs, grid)
    out += _run_sections(results)
    out.append("</body></html>")
    return "\n".join(out)


def _decision(result: dict[str, Any]) -> str:
    """The one-sentence verdict, the commands to run next, then the verdict's caveats."""
    first = one_sentence(result)
    cmds = next_commands(result)
    return ((f'<p class="verdict"><b>{esc(first)}</b></p>' if first else "")
            + ("<p>Next: " + " · ".join(f"<code>{esc(c)}</code>" for c in cmds) + "</p>" if cmds else "")
            + verdict_section(result))


def _per_run(title: str, section: Any, results: list[dict[str, Any]]) -> list[str]:
    """A section with each run's part (under its name when there are several); none if all are empty."""
    parts = [(r, section(r)) for r in results]
    if not any(html for _, html in parts):
        return []
    multi = len(results) > 1
    return [f"<h2>{esc(title)}</h2>", *(f"<h3>{esc(run_name(r))}</h3>{html}" if multi else html
                                        for r, html in parts if html)]


def _figures_section(runs: list[tuple[dict[str, Any], list[Path]]], grid: str) -> list[str]:
    """Each figure once, its runs side by side (known figures first, in their order)."""
    by_name: list[dict[str, Path]] = [{Path(f).stem: Path(f) for f in figs if Path(f).is_file()}
                                      for _, figs in runs]
    names = [n for n in FIGURE_ORDER if any(n in d for d in by_name)]
    names += sorted({n for d in by_name for n in d} - set(names))
    if not names:
        return []
    out = ["<h2>Figures</h2>"]
    for name in names:
        cells = "".join(f"<div>{img(d[name]) if name in d else ''}</div>" for d in by_name)
        out.append(f'<h3>{esc(name)}</h3><div class="runs" {grid}>{cells}</div>')
    return out


def _run_sections(results: list[dict[str, Any]]) -> list[str]:
    """Prompts, selection, weights, then settings: each section with every run's part under its name
    (when there are several runs)."""
    ncol = len(results)
    out: list[str] = []

    def per_run(title: str, section: Any, empty: str) -> None:
        out.append(f"<h2>{title}</h2>")
        for r in results:
            if ncol > 1:
                out.append(f"<h3>{esc(run_name(r))}</h3>")
            out.append(section(r) or f'<p class="muted">{empty}</p>')

    per_run("Pruning selection", selection_section, "")
    if any(weights_section(r) for r in results):
        per_run("Weights: sparsity and quantisation", weights_section, "No weight modification.")
    out.append("<h2>Settings and conventions</h2>")
    for r in results:
        label = f" — {esc(run_name(r))}" if ncol > 1 else ""
        for key in ("settings", "conventions", "model"):
            d = r.get(key)
            if isinstance(d, dict) and d:
                out.append(f"<details><summary>{key}{label}</summary>{kv_table(d)}</details>")
    return out


def load_result(run_dir: Path) -> dict[str, Any]:
    """results.json of a run directory, checked to be a trace result (any version of its schema)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise PrunelensError(f"'{run_dir}' has no results.json (not a prunelens run directory)")
    result = read_json(path)
    schema = result.get("schema", "") if isinstance(result, dict) else ""
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_FAMILY):
        raise PrunelensError(f"'{path}' is not a prunelens analysis result (schema {schema!r})")
    return check_fields(result, FIELDS, path)


# the parts of a trace result that must have their shape when present (the view tolerates any of
# them missing, and any number missing or malformed)
FIELDS = {f"{k}?": "dict" for k in ("model", "pruning", "settings", "conventions", "summary", "layerwise",
                               "stepwise", "timing")} | {"per_prompt[]?": "dict"}


def _existing_figures(fig_dir: Path) -> list[Path]:
    found = sorted(fig_dir.glob("*.png")) if fig_dir.is_dir() else []
    rank = {n: i for i, n in enumerate(FIGURE_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.name))


def report_from_run_dirs(run_dirs: Iterable[Path], out_html: Path) -> Path:
    """Rebuild one HTML report from saved runs, reusing their figures where they exist."""
    out = Path(out_html)
    atomic_write_text(out, trace_page(run_dirs))
    return out


def trace_page(run_dirs: Iterable[Path]) -> str:
    """The HTML page of saved trace runs side by side (figures reused where saved, else redrawn)."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise PrunelensError("no run directories given")
    runs = []
    for d in dirs:
        result = load_result(d)
        figs = _existing_figures(d / "figures") or make_figures(result, d / "figures")
        runs.append((result, figs))
    title = "prunelens report — " + ", ".join(run_name(r) for r, _ in runs)
    return render_html(runs, title=title)


def run_html(result: dict[str, Any], figs: list[Path]) -> str:
    """The page a trace command writes into its new run directory."""
    return render_html([(result, figs)])


def write_trace_run(result: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> Path:
    """A trace result's run directory: results.json, figures/*.png and report.html, atomically."""
    return write_run(result, out_dir, overwrite=overwrite, figures=make_figures, html=run_html)
