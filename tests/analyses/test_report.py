"""Tests for prunelens.report on synthetic results: no model, a few seconds in all."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from prunelens.analyses.trace import make_figures, render_html, report_from_run_dirs
from prunelens.errors import PrunelensError
from prunelens.render import fmt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


def synthetic_result(n_layers: int = 6, steps: int = 5, temps: tuple[float, ...] = (1.0, 0.5),
                     label: str = "attn@2,4") -> dict[str, Any]:
    """A small result with the shape of ``analysis.analyze``'s output (numbers are made up)."""
    layers = list(range(n_layers + 1))
    lw: dict[str, Any] = {"layer": layers,
                          "cos_h": [1.0 if li <= 2 else 1 - 0.004 * li for li in layers],
                          "orth_frac_h": [0.0] * 3 + [0.9] * (n_layers - 2),
                          "lens_cos_z": [1.0 if li <= 2 else 1 - 0.001 * li for li in layers]}
    for t in temps:
        k = f"{t:g}"
        lw[f"lens_cos_p@{k}"] = [1.0 if li <= 2 else 1 - 0.02 * li / t for li in layers]
        lw[f"lens_kl@{k}"] = [0.0 if li <= 2 else 0.01 * li / t for li in layers]

    def mode(decay: float, free: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"step": list(range(1, steps + 1)), "n": [4] * steps,
                             "cos_h": [0.96 - decay * s for s in range(steps)],
                             "cos_z": [0.99 - decay * s for s in range(steps)],
                             "top1_agree": [1.0 - 0.1 * s for s in range(steps)]}
        for t in temps:
            k = f"{t:g}"
            d[f"cos_p@{k}"] = [0.94 - decay * s for s in range(steps)]
            d[f"kl@{k}"] = [0.27 * (1 + 10 * decay * s) / t for s in range(steps)]
            d[f"taylor_kl@{k}"] = [0.17 * (1 + 5 * decay * s) / t for s in range(steps)]
        if free:
            d["token_agree"] = list(d["top1_agree"])
        return d

    tf, fr = mode(0.001, False), mode(0.1, True)
    # the last steps: no prompt still valid in free-running mode
    for k, v in fr.items():
        if k not in ("step", "n"):
            v[-1] = None
    fr["n"][-1] = 0
    result = {
        "schema": "prunelens.analysis/1",
        "prunelens_version": "0.1.0",
        "created": "2026-01-01T00:00:00+0000",
        "conventions": {"kl": "KL(p_pruned || p_dense), natural log"},
        "model": {"name": "tiny-test", "n_layers": n_layers, "n_params": 1234567, "dtype": "float32"},
        "pruning": {"attn": [2, 4], "mlp": [], "block": [], "label": label,
                    "selection": {"metric": "cosine", "iterative": False, "requests": ["attn:2"],
                                  "scores": {"attn:2": {"order": [4, 2],
                                                        "scores": {str(i): 0.01 * (i + 1)
                                                                   for i in range(n_layers)}}}}},
        "settings": {"temperatures": list(temps), "max_new_tokens": steps, "n_prompts": 2},
        "layerwise": lw,
        "stepwise": {"teacher_forced": tf, "free_running": fr},
        "per_prompt": [
            {"prompt": EVIL, "dense_text": "Hello <b>world</b>\n  indented", "pruned_text": "Hello there",
             "first_divergence": 2},
            {"prompt": "Say hi.", "dense_text": "hi", "pruned_text": "hi", "first_divergence": None},
        ],
        "summary": {
            "temperature": temps[0],
            "last_prompt_token": {"cos_h": 0.9587, "cos_z": 0.99430, f"cos_p@{temps[0]:g}": 0.9413,
                                  f"kl@{temps[0]:g}": 0.2652, f"taylor_kl@{temps[0]:g}": 0.1730},
            "min_layer_cos_h": 0.9524,
            "teacher_forced_mean": {"cos_h": 0.9604, "cos_z": 0.9263, f"cos_p@{temps[0]:g}": 0.9364,
                                    f"kl@{temps[0]:g}": 0.2128, "top1_agree": 0.828125},
            "free_running_mean": {"cos_h": 0.5752, "cos_z": 0.4786, f"cos_p@{temps[0]:g}": 0.2697,
                                  f"kl@{temps[0]:g}": 9.2599, "token_agree": 0.2271},
            "kl_growth_teacher_forced": 1.0235,
            "kl_growth_free_running": 1.8552,
            "prompts_diverged": 1,
            "median_first_divergence": 2.0,
        },
        "timing": {"analysis_s": 1.5},
    }
    return result


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[Path]]:
    result = synthetic_result()
    return result, make_figures(result, tmp_path_factory.mktemp("figs") / "figures")


def test_make_figures_writes_valid_pngs(figures: tuple[dict[str, Any], list[Path]]) -> None:
    _, paths = figures
    assert [p.name for p in paths] == ["layerwise.png", "stepwise.png", "spaces.png"]
    for p in paths:
        assert_png(p)


def test_figures_survive_missing_and_null_data(tmp_path: Path) -> None:
    r = synthetic_result(temps=(1.0,))
    for k in r["stepwise"]["teacher_forced"]:
        if k not in ("step", "n"):
            r["stepwise"]["teacher_forced"][k] = [None] * 5
    del r["layerwise"]["lens_cos_z"]
    r["layerwise"]["cos_h"] = [1.0] * 7  # 1 - cos is all zero: nothing to draw on a log axis
    del r["settings"]["temperatures"]   # recovered from the kl@T keys
    paths = make_figures(r, tmp_path)
    assert {p.name for p in paths} == {"layerwise.png", "stepwise.png"}  # no data for spaces.png
    for p in paths:
        assert_png(p)
    assert make_figures({"schema": "prunelens.analysis/1"}, tmp_path / "empty") == []


def test_html_summary_images_and_escaping(figures: tuple[dict[str, Any], list[Path]]) -> None:
    result, paths = figures
    page = render_html([(result, paths)])
    assert page.startswith("<!DOCTYPE html>")
    for number in ("0.959", "0.9943", "0.941", "0.265", "0.173", "9.26", "1.86", "83%", "1 / 2"):
        assert number in page, number
    assert page.count("data:image/png;base64,") == 3
    assert "<script" not in page
    assert html_escaped(EVIL) in page
    assert "&lt;b&gt;world&lt;/b&gt;" in page and "<b>world" not in page
    assert "white-space:pre-wrap" in page
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    # the reading is computed from the numbers
    assert "cos(h)=0.959 and cos(z)=0.9943 stay close to 1" in page
    assert "KL at T=1 is 0.265" in page and "9.26 in free-running decoding" in page


def html_escaped(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_html_escapes_model_and_label_text() -> None:
    r = synthetic_result(label=EVIL)
    r["model"]["name"] = '"><img src=x onerror=alert(1)>'
    r["settings"]["note"] = EVIL
    page = render_html([(r, [])], title=EVIL)
    assert "<script" not in page and "<img src=x" not in page
    assert html_escaped(EVIL) in page


def test_two_runs_side_by_side(figures: tuple[dict[str, Any], list[Path]]) -> None:
    result, paths = figures
    other = copy.deepcopy(result)
    other["pruning"]["label"] = "block@3"
    other["summary"]["free_running_mean"]["kl@1"] = 4.321
    page = render_html([(result, paths), (other, paths)])
    table = re.search(r'<table class="summary">(.*?)</table>', page, re.S)
    assert table is not None
    assert table.group(1).count('class="run-col"') == 2
    header_row = re.search(r"<tr>(.*?)</tr>", table.group(1), re.S)
    assert header_row is not None and header_row.group(1).count("<th") == 3
    assert "attn@2,4" in table.group(1) and "block@3" in table.group(1)
    assert "9.26" in table.group(1) and "4.32" in table.group(1)
    assert "repeat(2," in page
    assert page.count("data:image/png;base64,") == 6


def test_html_without_summary_or_stepwise() -> None:
    r = synthetic_result()
    for k in ("summary", "stepwise", "per_prompt", "layerwise"):
        del r[k]
    page = render_html([(r, [])])
    assert "tiny-test" in page and "attn@2,4" in page


def test_fmt_keeps_digits_near_one() -> None:
    assert fmt(0.99430) == "0.9943"
    assert fmt(0.96038) == "0.960"
    assert fmt(None) == "—" and fmt(math.nan) == "—"
    assert fmt(1.0) == "1" and fmt(3) == "3"
    assert fmt(2.5e-5) == "2.50e-05"


def write_run(run_dir: Path, result: Any) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(result))
    return run_dir


def test_report_from_run_dirs_regenerates_then_reuses_figures(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", synthetic_result())
    b = write_run(tmp_path / "b", synthetic_result(label="mlp@1"))
    out = report_from_run_dirs([a, b], tmp_path / "out" / "report.html")
    assert out == tmp_path / "out" / "report.html"
    page = out.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 6 and "mlp@1" in page
    for d in (a, b):
        assert sorted(p.name for p in (d / "figures").glob("*.png")) == [
            "layerwise.png", "spaces.png", "stepwise.png"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.html"]  # no temp file left
    # existing figures are reused as they are, not redrawn
    (a / "figures" / "spaces.png").unlink()
    stamp = (a / "figures" / "layerwise.png").stat().st_mtime_ns
    report_from_run_dirs([a], tmp_path / "one.html")
    assert (a / "figures" / "layerwise.png").stat().st_mtime_ns == stamp
    assert not (a / "figures" / "spaces.png").exists()
    assert (tmp_path / "one.html").read_text(encoding="utf-8").count("data:image/png;base64,") == 2


def test_report_from_run_dirs_rejects_bad_dirs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrunelensError, match="no results.json"):
        report_from_run_dirs([empty], tmp_path / "r.html")
    other = write_run(tmp_path / "other", {"schema": "something.else/1", "data": [1, 2]})
    with pytest.raises(PrunelensError, match="not a prunelens analysis"):
        report_from_run_dirs([other], tmp_path / "r.html")
    listing = write_run(tmp_path / "list", [1, 2, 3])
    with pytest.raises(PrunelensError, match="not a prunelens analysis"):
        report_from_run_dirs([listing], tmp_path / "r.html")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(PrunelensError, match="not valid JSON") as exc:
        report_from_run_dirs([broken], tmp_path / "r.html")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "r.html").exists()


def test_the_page_opens_with_the_decision_then_the_texts_then_the_numbers() -> None:
    """A decision page: the one-sentence verdict and the next commands first, the dense vs pruned
    texts (first divergence highlighted) before the summary table and figures."""
    from prunelens.analyses.predictor import verdict

    r = synthetic_result()
    r["verdict"] = verdict(r)
    r["next"] = {"model": "smollm2-135m", "recipe": "attn:2"}
    page = render_html([(r, [])])
    # a = 0.828: a/(1 − a) = 4.8 greedy tokens on the dense path, under 8: it breaks
    sentence = page.index("attn@2,4 breaks in generation: about 4.82 greedy tokens before its output leaves")
    texts, summary = page.index("Dense vs pruned texts"), page.index("<h2>Summary</h2>")
    assert sentence < page.index("prunelens advise --model smollm2-135m") < texts < summary
    assert "prunelens eval --model smollm2-135m --recipe &#x27;attn:2&#x27;" in page
    assert "a one-step (multiple-choice) read changes 17% of the time" in page
    r["verdict"]["retention"] = {"predicted": 0.95, "low": 0.9, "high": 0.98}
    assert "attn@2,4 likely holds up in generation: predicted to keep 95% [90%, 98%]" in render_html([(r, [])])
