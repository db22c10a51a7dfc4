"""End to end on the real bundled model: code tasks through the sandbox, generation fidelity,
retrieval against the MiniLM reference, and a small sweep that resumes without recomputing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelens.cli import main
from prunelens.testing import shared_data_dir

pytestmark = pytest.mark.slow  # the real bundled model


DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


@needs_data
def test_eval_code_and_fidelity_dense_vs_pruned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    rc = main(["eval", "--tasks", "humaneval,mbpp,fidelity", "--limit", "3", "--max-new-tokens", "48",
               "--drop", "attn:4", "--data-dir", str(DATA), "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "humaneval" in printed and "pass@1" in printed and "rouge_l" in printed
    rows = {r["task"]: r for r in json.loads(out.read_text())["tasks"]}
    for t in ("humaneval", "mbpp"):
        d = rows[t]["dense"]
        assert d["kind"] == "generative" and d["n"] == 3
        statuses = {s["status"] for s in d["details"]["samples"]}
        assert statuses <= {"passed", "failed", "timeout"}
        assert d["score"] == sum(s["status"] == "passed" for s in d["details"]["samples"]) / 3
    fd, fm = rows["fidelity"]["dense"], rows["fidelity"]["modified"]
    assert fd["score"] == 1.0 and fd["details"]["token_agreement"] == 1.0
    # dropping 4 attention layers changes greedy outputs within 48 tokens (the paper's point)
    assert fm["details"]["token_agreement"] < 1.0 and fm["score"] < 1.0
    assert fm["details"]["identical"] < 1.0


@needs_data
def test_retrieval_dense_vs_pruned_with_reference(tmp_path: Path) -> None:
    # a small BEIR collection cut from Cranfield: 20 queries, their relevant documents and 60 others
    src = DATA / "cranfield"
    qrels = [ln.split("\t") for ln in (src / "qrels.tsv").read_text().splitlines()[1:]]
    queries = [json.loads(x) for x in (src / "queries.jsonl").read_text().splitlines()][:20]
    qids = {q["_id"] for q in queries}
    keep_q = [r for r in qrels if r[0] in qids]
    docs = [json.loads(x) for x in (src / "corpus.jsonl").read_text().splitlines()]
    want = {r[1] for r in keep_q} | {d["_id"] for d in docs[:60]}
    dst = tmp_path / "data" / "cran_small"
    dst.mkdir(parents=True)
    (dst / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs if d["_id"] in want))
    (dst / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = "".join("\t".join(r) + "\n" for r in keep_q)
    (dst / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + lines)
    out = tmp_path / "ret.json"
    rc = main(["eval", "--tasks", "retrieval:cran_small", "--drop", "attn:4",
               "--data-dir", str(tmp_path / "data"), "--out", str(out), "--quiet"])
    assert rc == 0
    row = json.loads(out.read_text())["tasks"][0]
    dense, mod = row["dense"], row["modified"]
    assert row["kind"] == "retrieval" and dense["n"] == len({r[0] for r in keep_q if float(r[2]) > 0})
    ref = dense["details"]["reference"]
    assert ref["embedder"] == "all-MiniLM-L6-v2"
    assert 0 < dense["score"] < ref["ndcg_at_10"] <= 1  # the LM is a weaker embedder than MiniLM
    assert 0 <= mod["score"] <= 1 and mod["score"] != dense["score"]


@needs_data
def test_real_sweep_writes_tables_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "--prune", "attn-drop", "--amounts", "0,4", "--tasks", "arc_easy,fidelity",
            "--limit", "6", "--max-new-tokens", "24", "--data-dir", str(DATA), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "| arc_easy | multiple-choice | acc |" in first and "attn@" in first
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 4
    stamps = {c.name: c.stat().st_mtime_ns for c in cells}
    rows = json.loads((out / "results.json").read_text())["rows"]
    fid = {r["amount"]: r for r in rows if r["task"] == "fidelity"}
    assert fid["0"]["score"] == 1.0 and fid["4"]["score"] < 1.0
    assert fid["4"]["relative_drop"] == pytest.approx(1.0 - fid["4"]["score"])
    # the same command again: nothing is recomputed, the same tables come out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert {c.name: c.stat().st_mtime_ns for c in sorted((out / "cells").glob("*.json"))} == stamps
    assert (out / "figure1.png").stat().st_size > 0 and "Sweep" in (out / "report.html").read_text()
