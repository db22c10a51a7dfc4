"""Step-wise accumulation across pruning and quantisation methods (the paper's Fig. 7 and its
quantisation comparison): the same prompts, the same analysis, one figure.

Each method is one full ``analyze`` run saved under ``runs/<method>/`` (so ``prunelens report``
can show any of them), done at most once: a comparison that is interrupted resumes with the
methods already analysed. The memory each method saves is reported beside it (``api.footprint``),
so methods can be compared at similar memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import AnalysisSettings, analyze
from .errors import PrunelensError
from .memory import release_freed_memory
from .models import LoadedModel
from .report import _atomic_write, _e, _img, html_page, load_result
from .runs import write_json, write_run

SCHEMA = "prunelens.compare/1"
CURVES = ("kl", "cos_p", "top1_agree")


def _safe(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in spec)


def _identity(settings: AnalysisSettings, prompts: Sequence[str], calib: str | None, model: str) -> dict:
    digest = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    return {"model": model, "settings": asdict(settings), "prompts_sha256": digest, "calib": calib}


def compare_methods(lm: LoadedModel, specs: Sequence[str], prompts: Sequence[str], settings: AnalysisSettings,
                    out_dir: str | Path, calib: str | None = None, calib_samples: int | None = None,
                    calib_len: int | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    from .api import build_modification, footprint, spec_kind

    if not specs:
        raise PrunelensError("give at least one --method")
    for s in specs:
        spec_kind(s)
    out = Path(out_dir)
    ident = json.loads(json.dumps(_identity(settings, prompts, calib, str(lm.info.get("name")))))
    manifest = out / "compare.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("identity") != ident:
        raise PrunelensError(f"'{out}' holds a comparison with other settings or prompts; use another --out")
    if out.exists() and not manifest.is_file() and any(out.iterdir()):
        raise PrunelensError(f"'{out}' is not empty and is not a prunelens comparison")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"schema": SCHEMA, "identity": ident, "methods": list(specs)})
    methods = []
    for spec in specs:
        run_dir = out / "runs" / _safe(spec)
        if (run_dir / "results.json").is_file():
            result = load_result(run_dir)
        else:
            mod = build_modification(lm, spec, calib, calib_samples, calib_len, seed, progress=progress)
            result = analyze(lm, mod, prompts, settings, progress=progress)
            result["footprint"] = footprint(lm, mod)
            write_run(result, run_dir, overwrite=True)
            del mod
            release_freed_memory()
        t = f"{settings.temperatures[0]:g}"
        curves = {}
        for mode in ("teacher_forced", "free_running"):
            sw = result["stepwise"][mode]
            curves[mode] = {"step": sw["step"], **{c: sw[f"{c}@{t}" if c in ("kl", "cos_p") else c]
                                                   for c in CURVES}}
            if mode == "free_running":
                curves[mode]["token_agree"] = sw.get("token_agree")
        methods.append({"spec": spec, "label": result["pruning"]["label"],
                        "footprint": result.get("footprint"), "summary": result["summary"], "curves": curves,
                        "run": str(run_dir)})
    combined = {"schema": SCHEMA, "identity": ident, "temperature": settings.temperatures[0],
                "methods": methods}
    figs = compare_figure(combined, out / "figures")
    write_json(out / "results.json", combined)
    _atomic_write(out / "report.html", compare_html(combined, figs))
    return combined


def _arr(v: Any) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in (v or [])], dtype=float)


def compare_figure(combined: dict[str, Any], fig_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for m in combined["methods"]:
        for col, mode in enumerate(("teacher_forced", "free_running")):
            c = m["curves"][mode]
            kl = _arr(c["kl"])
            axes[0][col].plot(c["step"], np.where(kl > 0, kl, np.nan), label=m["spec"])
            axes[1][col].plot(c["step"], 1 - _arr(c["cos_p"]), label=m["spec"])
    t = combined["temperature"]
    titles = ("teacher-forced (fed the dense model's tokens)", "free-running (own tokens)")
    for col, title in enumerate(titles):
        axes[0][col].set_title(title, fontsize=10)
        axes[0][col].set_yscale("log")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("decoding step")
    axes[0][0].set_ylabel(f"KL(p' || p), T={t:g}")
    axes[1][0].set_ylabel("1 − cos(p, p')")
    axes[0][1].legend(fontsize=8, loc="best")
    fig.suptitle("Step-wise deviation by method (mean over prompts)", fontsize=11)
    fig.tight_layout()
    path = fig_dir / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _g(x: Any) -> str:
    return "—" if x is None else f"{x:.3g}"


def compare_html(combined: dict[str, Any], figs: list[Path]) -> str:
    t = f"{combined['temperature']:g}"
    head = "".join(f"<th>{h}</th>" for h in ("method", "pruning", "weights removed", "bits/weight",
                                              "memory vs bf16", "TF mean KL", "TF top-1", "FR mean KL",
                                              "FR token agreement", "diverged"))
    body = []
    for m in combined["methods"]:
        fp, s = m.get("footprint") or {}, m["summary"]
        tf, fr = s["teacher_forced_mean"], s["free_running_mean"]
        vals = (m["spec"], m["label"], _g(fp.get("removed_share")), _g(fp.get("bits_per_weight")),
                _g(fp.get("memory_vs_bf16")), _g(tf.get(f"kl@{t}")), _g(tf.get("top1_agree")),
                _g(fr.get(f"kl@{t}")), _g(fr.get("token_agree")), str(s.get("prompts_diverged")))
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in vals) + "</tr>")
    return html_page("prunelens method comparison",
        f"<h1>Step-wise deviation by method — {_e(str(combined['identity']['model']))}</h1>",
        '<p class="muted">Every method analysed on the same prompts; teacher-forced and free-running '
        "decoding. Memory is idealised (zeros counted as saved).</p>",
        f"<table><tr>{head}</tr>{''.join(body)}</table>", *(_img(f) for f in figs),
        "<p>Each method's full analysis report: " + ", ".join(
            f"<code>{_e(m['run'])}/report.html</code>" for m in combined["methods"]) + "</p>")
