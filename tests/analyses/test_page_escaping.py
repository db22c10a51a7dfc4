"""Every page builder, fed markup in every string and number field of a saved result, writes no live
markup (issue 42 §2): each value reaches the page through ``render``'s one escaping rule, or the
result is refused with one line naming the file and the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from prunelens.analyses.base import ANALYSES, Analysis, check_fields
from prunelens.analyses.reports import combined_page
from prunelens.analyses.sweep_data import cell_path
from prunelens.analyses.trace import AnalysisSettings, analyze
from prunelens.analyses.trace.page import FIELDS as TRACE_FIELDS
from prunelens.analyses.trace.page import render_html, trace_page
from prunelens.errors import PrunelensError
from prunelens.prune.recipe import build
from prunelens.render import img
from prunelens.testing import tiny_lm

PAYLOADS = ('<script>alert(1)</script><x-evil>', '"><img src=x onerror=alert(1)><x-evil a="')
MODEL = {"name": "tiny", "n_layers": 4}


class _Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def assert_inert(page: str, what: str) -> None:
    """No tag or attribute a payload could have brought: no script, no event handler, no foreign tag,
    no image but our inline PNGs."""
    p = _Tags()
    p.feed(page)
    for tag, attrs in p.tags:
        assert tag not in ("script", "x-evil"), f"live <{tag}> in the page ({what})"
        assert not any(k.startswith("on") for k, _ in attrs), f"event handler on <{tag}> ({what})"
        if tag == "img":
            assert dict(attrs).get("src", "").startswith("data:image/png;base64,"), f"foreign image ({what})"


def leaves(x: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every string and number in a JSON value (not the schema, which picks the view)."""
    if isinstance(x, dict):
        for k, v in x.items():
            if path or k != "schema":
                yield from leaves(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, (*path, i))
    elif isinstance(x, (str, int, float)) and not isinstance(x, bool):
        yield path


def replaced(x: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(x)
    at = out
    for k in path[:-1]:
        at = at[k]
    at[path[-1]] = value
    return out


def every_string(x: Any, value: str) -> Any:
    """All strings of a JSON value (not the schema) replaced at once; numbers kept."""
    out = copy.deepcopy(x)
    for p in leaves(x):
        if isinstance(replaced_get(x, p), str):
            out = replaced(out, p, value + str(replaced_get(x, p)))
    return out


def replaced_get(x: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        x = x[k]
    return x


# --- one saved result per analysis, in the shape its command writes --------------------------------

def _trace() -> dict[str, Any]:
    lm = tiny_lm()
    res = analyze(lm, build(lm, ["attn:1"], progress=False), ["w5 w9 w17", "w11 w12"],
                  AnalysisSettings(max_new_tokens=3, temperatures=(1.0,), chat_template=False), progress=False)
    res["model"] = {**res.get("model", {}), **MODEL}
    return res


def _advise() -> dict[str, Any]:
    row = {"spec": "attn:1", "meets_budget": True, "risk": 0.2, "saved": 0.1, "decode_speedup": 1.2,
           "agreeing_tokens": None, "risk_generative": 0.3, "risk_multiple_choice": 0.1, "risk_retrieval": 0.01,
           "signals": {"tf_kl": 0.3, "tf_top1_disagree": 0.1},
           "retention": {"predicted": 0.8, "low": 0.7, "high": 0.9, "outside_fitted_range": False},
           "repair_gain": {"of": "attn:1", "tf_kl": 0.01, "risk": 0.02, "retention": 0.03}}
    return {"schema": "prunelens.advise/1", "model": MODEL, "use": "chat", "budget": 0.1, "n_prompts": 4,
            "recommendation": "use attn:1", "rows": [row, {**row, "spec": "mlp:1", "meets_budget": False}],
            "retention_fit": {"fitted_on": "smollm2", "grid": "g", "lomo_mae": 0.1, "coverage": 0.9}}


def _paired() -> dict[str, Any]:
    m = {"method": "attn:1", "mcq_pruned": 0.5, "gen_pruned": 0.4, "mcq_drop": 0.1, "gen_drop": 0.2, "gap": -0.1,
         "ci_low": -0.2, "ci_high": 0.0, "mcq_agree": 0.9, "mcq_chance_agree": 0.3, "gen_answered": 0.8}
    return {"schema": "prunelens.paired/1", "model": MODEL, "task": "arc_easy", "style": "letters",
            "select": "dense_correct", "n": 5, "pool": 20, "chance": 0.25, "dense": {"mcq_acc": 1.0, "gen_acc": 1.0},
            "dense_pool": {"mcq_acc": 0.6, "gen_acc": 0.5}, "methods": [m]}


def _counterfactual() -> dict[str, Any]:
    cols = {k: [0.9, 0.8] for k in ("cos_h", "cos_z", "cos_p", "kl", "top1_agree", "orth_frac_local",
                                    "orth_frac_h", "orth_frac_z")}
    summ = {"median_1-cos": {"h": 0.1, "z": 0.2, "p": 0.3}, "p_over_z": 1.5, "most_harmful_layer": 1,
            "max_kl": 0.4, "median_head_attenuation": 0.5}
    return {"schema": "prunelens.counterfactual/1", "model": MODEL, "kinds": {"attn": {"layer": [0, 1], **cols}},
            "summary": {"attn": summ}, "settings": {"n_prompts": 3, "n_tokens": 30},
            "timing": {"counterfactual_s": 1.5, "ratio_to_dense_forward_per_layer": 1.1}}


def _subspace() -> dict[str, Any]:
    m = {"method": "attn:1", "full_kl": 0.1, "sub_kl": 0.05, "full_cos_p": 0.9, "sub_cos": 0.95,
         "full_top1_agree": 0.8, "sub_agree": 0.9, "chance_agree": 0.3, "mass_dense": 0.5, "mass_pruned": 0.4,
         "acc_dense": 0.6, "acc_pruned": 0.5}
    return {"schema": "prunelens.subspace/1", "model": MODEL, "task": "arc_easy", "n": 10,
            "choices_dense": [0.25, 0.75], "methods": [m]}


def _families() -> dict[str, Any]:
    change = {"family": "attn", "amount": "2", "task": "gsm8k", "kind": "generative", "score": 0.3, "dense": 0.4,
              "change": -0.25, "stderr": 0.05, "n": 20, "paired": True}
    row = {"family": "attn", "amount": "2", "generative": -0.25, "generative_se": 0.05, "non_generative": -0.1,
           "non_generative_se": 0.02, "gap": -0.15, "gap_se": 0.05}
    return {"schema": "prunelens.families/1", "model": "tiny", "sweeps": ["s1"], "families": ["attn"],
            "changes": [change], "table1": [row, {**row, "family": "block", "amount": "1"}], "options": {}}


def _compare() -> dict[str, Any]:
    curve = {"step": [1, 2], "kl": [0.1, 0.2], "cos_p": [0.9, 0.8]}
    summ = {"teacher_forced_mean": {"kl@1": 0.1, "top1_agree": 0.9}, "free_running_mean": {"kl@1": 0.2,
                                                                                          "token_agree": 0.7},
            "prompts_diverged": 1}
    return {"schema": "prunelens.compare/1", "temperature": 1.0, "identity": {"model": "tiny"},
            "methods": [{"spec": "attn:1", "label": "attn@1", "run": "runs/attn_1",
                         "footprint": {"removed_share": 0.1, "bits_per_weight": 16, "memory_vs_bf16": 0.9},
                         "summary": summ, "curves": {"teacher_forced": curve, "free_running": curve}}]}


RESULTS = {"analyze": _trace, "advise": _advise, "paired": _paired, "counterfactual": _counterfactual,
           "subspace": _subspace, "families": _families, "compare": _compare}


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return {name: make() for name, make in RESULTS.items()}


def _html_of(a: Analysis, result: dict[str, Any], path: Path) -> str:
    """The page builder without figures, after the check ``report`` makes when it reads the file."""
    check_fields(result, TRACE_FIELDS if a.name == "analyze" else a.fields or {}, path)
    if a.summary is not None:
        a.summary(result)  # what `report` prints first: it too must read any checked result
    if a.name == "analyze":
        return render_html([(result, [])])
    assert a.html is not None
    return a.html(result, [])


def test_every_page_builder_is_covered(results: dict[str, dict[str, Any]]) -> None:
    """A new analysis with a page must bring its saved result here (sweep is fuzzed below)."""
    with_page = {a.name for a in ANALYSES.values() if a.html is not None or a.rebuild is not None}
    assert with_page <= set(RESULTS) | {"sweep"}, with_page - set(RESULTS)


@pytest.mark.parametrize("name", list(RESULTS))
def test_markup_in_any_one_field_stays_text(name: str, results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    a, result = ANALYSES.get(name), results[name]
    assert_inert(_html_of(a, result, tmp_path / "results.json"), f"{name}, untouched")
    refused = shown = 0
    for path in leaves(result):
        for payload in PAYLOADS:
            bad = replaced(result, path, payload)
            try:
                page = _html_of(a, bad, tmp_path / "results.json")
            except PrunelensError as e:
                assert "results.json" in str(e) and "\n" not in str(e), e
                refused += 1
                continue
            assert_inert(page, f"{name} {path}")
            shown += 1
    assert shown > 0  # markup in string fields is shown (escaped), not refused


@pytest.mark.parametrize("name", list(RESULTS))
def test_whole_report_of_a_crafted_run_is_inert(name: str, results: dict[str, dict[str, Any]],
                                                tmp_path: Path) -> None:
    """``prunelens report`` end to end (figures redrawn) with markup in every string at once, alone and
    in the combined page."""
    for i, payload in enumerate(PAYLOADS):
        run = tmp_path / f"run{i}"
        run.mkdir()
        crafted = every_string(results[name], payload)
        (run / "results.json").write_text(json.dumps(crafted))
        a = ANALYSES.get(name)
        page = a.page(run)
        assert_inert(page, name)
        assert "&lt;script&gt;" in page or "&lt;img" in page  # the payload is there, as text
        assert_inert(combined_page([run, run]), f"{name}, combined")


def test_a_symlinked_figure_is_not_inlined(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "layerwise.png").symlink_to(secret)
    (run / "results.json").write_text(json.dumps({"schema": "prunelens.analysis/1"}))
    with pytest.raises(PrunelensError, match="not a regular file"):
        trace_page([run])
    with pytest.raises(PrunelensError, match="not a regular file"):
        img(run / "figures" / "layerwise.png")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "x.png").write_bytes(b"\x89PNG")
    (run / "figs").symlink_to(linked)
    with pytest.raises(PrunelensError, match="not a regular file"):
        img(run / "figs" / "x.png")


def _sweep_run(root: Path, mark: str) -> Path:
    """A saved sweep (manifest and two cells) with ``mark`` in every string a person could write."""
    manifest = {"model": mark + "m", "method": mark + "attn", "amounts": ["0", mark + "1"],
                "tasks": [mark + "t"], "data_dir": mark, "identity": {
                    "options": {"limit": 3}, "importance": mark, "calib": mark, "calib_samples": None,
                    "calib_len": None, "device": mark, "dtype": mark}}
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps(manifest))
    for amount, score in (("0", 0.5), (mark + "1", 0.4)):
        cell = {"amount": amount, "task": mark + "t", "kind": mark + "generative", "metric": mark, "label": mark,
                "score": score, "stderr": 0.1, "n": 10}
        path = cell_path(root, amount, mark + "t")
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(cell))
    return root


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_crafted_sweep_page_is_inert(payload: str, tmp_path: Path) -> None:
    run = _sweep_run(tmp_path / "sweep", payload)
    page = ANALYSES.get("sweep").page(run)
    assert_inert(page, "sweep")
    assert "&lt;" in page  # the payload is shown, as text
    assert_inert(combined_page([run, run]), "sweep, combined")
    # a number field holding markup is refused with the file and the field named
    cell = next((run / "cells").iterdir())
    cell.write_text(json.dumps({**json.loads(cell.read_text()), "score": payload}))
    with pytest.raises(PrunelensError, match=r"\.json': field 'score' must be a number"):
        ANALYSES.get("sweep").page(run)
