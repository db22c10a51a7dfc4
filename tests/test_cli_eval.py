"""``eval`` on a tiny saved model: every task with per-item outcomes gets the paired difference
(modified − dense), its standard error and McNemar's exact p, on the line and in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelens.cli import main
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()


@pytest.mark.skipif(not (DATA / "arc_easy_test.jsonl").is_file(), reason="../shared/data is absent")
def test_eval_prints_and_saves_the_paired_test(tiny_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(tiny_dir), "--tasks", "arc_easy,fidelity", "--limit", "6",
               "--recipe", "attn:2", "--data-dir", str(DATA), "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "McNemar p=" in printed and "too few to read: n=6" in printed
    assert "no per-item outcomes: no paired test" in printed  # fidelity keeps no right/wrong per item
    rows = {r["task"]: r for r in json.loads(out.read_text())["tasks"]}
    p = rows["arc_easy"]["paired"]
    assert p["n"] == 6 and p["too_small"] and 0.0 <= p["p_mcnemar"] <= 1.0
    dense, mod = rows["arc_easy"]["dense"]["score"], rows["arc_easy"]["modified"]["score"]
    assert p["difference"] == pytest.approx(mod - dense)
    assert p["gained"] - p["lost"] == round(6 * (mod - dense))
    assert rows["fidelity"]["paired"] is None


def test_eval_gives_a_generate_config_the_paired_test(tiny_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Flips for generative tasks too: a task config's free answers are paired question by question."""
    rows = [{"q": f"w{3 + i} w{4 + i}", "a": f"w{5 + i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "free.yaml"
    cfg.write_text("task: free\nkind: generate\ndata_files: d.jsonl\nprompt: '{{q}}'\ntarget: '{{a}}'\n"
                   "max_new_tokens: 3\nchat_template: false\n")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--tasks", str(cfg), "--recipe", "attn:2",
                 "--out", str(out), "--quiet"]) == 0
    assert "McNemar p=" in capsys.readouterr().out
    row = json.loads(out.read_text())["tasks"][0]
    hits = {s["index"]: s["hit"] for s in row["modified"]["details"]["samples"]}
    p = row["paired"]
    assert p["n"] == 5 and p["too_small"]
    assert p["difference"] == pytest.approx(row["modified"]["score"] - row["dense"]["score"])
    assert sum(hits.values()) == pytest.approx(5 * row["modified"]["score"])
