"""Figure 1 / Table 1 across pruning families: shared dense cells, paired standard errors against
their closed form, the paper's claims read off the data, refusal of sweeps that do not compare."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

import prunelens.analyses.sweep as sweep_mod
from prunelens.analyses.families import families_result, relative_change
from prunelens.analyses.sweep import SweepSpec, run_sweep
from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.tasks.registry import TaskOptions, TaskScore, item_hits, task_kind

ROOT = Path(__file__).resolve().parents[2]
N = 10
# questions each family loses per layer removed: attention drop is the gentle one
LOSS = {"attn": {"gsm8k": 1, "arc_easy": 0}, "mlp": {"gsm8k": 2, "arc_easy": 1}, "block": {"gsm8k": 2, "arc_easy": 2}}
DENSE_RIGHT = {"gsm8k": 6, "arc_easy": 8}


class Mod:
    def __init__(self, method: str, amount: str) -> None:
        self.method, self.amount = method, amount

    def label(self) -> str:
        return f"{self.method}:{self.amount}"

    def to_dict(self) -> dict:
        return {"label": self.label()}


def _details(task: str, right: int) -> tuple[dict, float]:
    """Saved details in the task's own format: the first ``right`` questions are answered right."""
    if task == "gsm8k":
        samples = [{"index": 100 + i, "target": "1,000", "output": "", "flexible": 1000.0 if i < right else 7.0,
                    "strict": None} for i in range(N)]
        return {"n": N, "samples": samples}, right / N
    golds = [i % 4 for i in range(N)]
    preds = [g if i < right else (g + 1) % 4 for i, g in enumerate(golds)]
    return {"indices": list(range(50, 50 + N)), "golds": golds, "predictions": preds,
            "predictions_norm": golds}, right / N


@pytest.fixture
def families(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    def build(lm, spec, amount, progress):
        return None if amount == "0" else Mod(spec.method, amount)

    def run_task(lm, task, data_dir, options, mod=None):
        k = int(mod.amount) if mod else 0
        right = max(DENSE_RIGHT[task] - (LOSS[mod.method][task] * k if mod else 0), 0)
        details, score = _details(task, right)
        metric = "exact_match" if task == "gsm8k" else "acc"
        return TaskScore(task, task_kind(task), metric, score, math.sqrt(score * (1 - score) / N), N, details)

    monkeypatch.setattr(sweep_mod, "_build", build)
    monkeypatch.setattr(sweep_mod, "run_task", run_task)
    monkeypatch.setattr(sweep_mod, "check_task", lambda t, d: {f"{t}.jsonl": "h"})
    monkeypatch.setattr(sweep_mod, "footprint", lambda lm, mod: {})
    dirs = []
    for method, amounts in (("attn", ("0", "1", "2")), ("mlp", ("1", "2")), ("block", ("1", "2"))):
        spec = SweepSpec("m", method, amounts, ("gsm8k", "arc_easy"), None, TaskOptions(limit=N, progress=False))
        run_sweep(spec, tmp_path / method, lm=object(), progress=False)
        dirs.append(tmp_path / method)
    return dirs


def test_dense_is_shared_and_paired_errors_match_their_closed_form(families: list[Path]) -> None:
    res = families_result(families)
    rows = {(r["family"], r["amount"]): r for r in res["table1"]}
    assert {f for f, _ in rows} == {"attn", "mlp", "block"}  # mlp and block read attn's dense cells
    # block:1 on gsm8k: 6 -> 4 right of 10; the two lost questions give differences (-1, -1, 0 x 8)
    t = rows[("block", "1")]["tasks"]["gsm8k"]
    diffs = [-1.0, -1.0] + [0.0] * 8
    assert t["paired"] is True
    assert t["change"] == pytest.approx(0.4 / 0.6 - 1)
    assert t["stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(N) / 0.6)
    # the family mean over tasks and its standard error (independent tasks)
    arc = rows[("block", "1")]["tasks"]["arc_easy"]
    assert rows[("block", "1")]["non_generative"] == pytest.approx(arc["change"])
    assert rows[("block", "1")]["generative"] == pytest.approx(t["change"])
    assert rows[("attn", "2")]["non_generative"] == 0.0 and rows[("attn", "2")]["non_generative_se"] == 0.0


def test_unpaired_cells_fall_back_to_the_pruned_standard_error() -> None:
    dense = {"task": "wikitext-like", "metric": "x", "score": 0.5, "details": {}}
    cell = {"task": "wikitext-like", "metric": "x", "score": 0.25, "stderr": 0.05, "details": {}}
    assert relative_change(cell, dense) == (pytest.approx(-0.5), pytest.approx(0.1), False)


def test_cli_writes_the_figure_tables_and_reading(families: list[Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fig1"
    assert main(["families", *map(str, families), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("results.json", "figures/figure1.png", "report.html", "table1.md", "tasks.md"):
        assert (out / name).stat().st_size > 0
    # at 2 layers attention drop keeps 4/6 of gsm8k, block drop 2/6 and far less multiple choice
    assert "2 layers: generative scores change by -33% after attention drop, -67% after block drop" in printed
    assert "'attention more robust' is not resolved" in printed  # 2 of 6 questions apart: within noise
    assert "MLP drop 2: generative" in printed
    table = (out / "table1.md").read_text()
    assert "| block drop | 2 | -67% ±" in table
    assert main(["report", str(out)]) == 0  # rebuilt from results.json alone


def test_sweeps_that_measure_other_things_are_refused(families: list[Path], monkeypatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    m = json.loads((families[1] / "sweep.json").read_text())
    m["identity"]["options"]["seed"] = 1
    (families[1] / "sweep.json").write_text(json.dumps(m))
    for cell in (families[1] / "cells").glob("*.json"):  # a whole sweep run with another seed
        c = json.loads(cell.read_text())
        c["settings"] = m["identity"]
        cell.write_text(json.dumps(c))
    with pytest.raises(PrunelensError, match="differ in options"):
        families_result(families)
    assert main(["families", str(families[2]), "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert "no sweep has a dense cell" in err and len(err.splitlines()) == 1
    assert main(["families", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) != 0


@pytest.mark.parametrize("task", ["gsm8k", "humaneval", "arc_easy", "mmlu", "piqa"])
def test_per_question_outcomes_of_a_real_saved_cell_reproduce_its_score(task: str) -> None:
    cell = json.loads((ROOT / "docs/sweeps/fig1-qwen1.5b-attn/cells" / f"8--{task}.json").read_text())
    hits = item_hits(cell["task"], cell["metric"], cell["details"])
    assert hits is not None and len(hits) == cell["n"]
    assert sum(hits.values()) / len(hits) == pytest.approx(cell["score"])
