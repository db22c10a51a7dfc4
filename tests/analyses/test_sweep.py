"""Sweeps: per-cell caching and resume after a crash, refusal to mix settings, the tables and
relative drops against hand-computed values, and one-line errors for bad input.

The caching logic is exercised with a stand-in scorer (no model); tests/test_eval_real.py runs a
real sweep on the bundled model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import prunelens.analyses.sweep as sweep_mod
from prunelens.analyses.sweep import SweepSpec, parse_amounts, relative_drop, run_sweep, spec_for
from prunelens.analyses.sweep_view import table1
from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.prune.base import view_of
from prunelens.prune.recipe import build
from prunelens.tasks.registry import TaskOptions, TaskScore, task_kind
from prunelens.testing import shared_data_dir, tiny_lm

DATA = shared_data_dir()
# dense scores and per-layer losses of a made-up model: the generative task collapses
DENSE = {"gsm8k": 0.5, "arc_easy": 0.8}
LOSS = {"gsm8k": 0.2, "arc_easy": 0.05}


class FakeMod:
    def __init__(self, amount: str) -> None:
        self.amount = amount

    def label(self) -> str:
        return f"attn:{self.amount}"

    def to_dict(self) -> dict:
        return {"label": self.label()}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def build(lm, spec, amount, progress):
        return None if amount == "0" else FakeMod(amount)

    def run_task(lm, task, data_dir, options, mod=None):
        calls.append((mod.amount if mod else "0", task))
        amount = int(mod.amount) if mod else 0
        score = max(DENSE[task] - LOSS[task] * amount, 0.0)
        return TaskScore(task, task_kind(task), "acc", score, 0.01, 10, {"amount": amount})

    monkeypatch.setattr(sweep_mod, "_build", build)
    monkeypatch.setattr(sweep_mod, "run_task", run_task)
    monkeypatch.setattr(sweep_mod, "check_task", lambda t, d: [])
    monkeypatch.setattr(sweep_mod, "footprint", lambda lm, mod: {"removed_share": int(mod.amount) / 10})
    return calls


def _spec(**kw) -> SweepSpec:
    base = dict(model="m", method="attn-drop", amounts=("0", "1", "2"), tasks=("gsm8k", "arc_easy"),
                data_dir=None, options=TaskOptions(limit=10, progress=False))
    base.update(kw)
    return SweepSpec(**base)


def test_tables_and_relative_drops(tmp_path: Path, fake: list) -> None:
    res = run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False)
    assert len(fake) == 6
    rows = list(csv.DictReader(open(tmp_path / "s" / "table.csv")))
    by = {(r["task"], r["amount"]): r for r in rows}
    # gsm8k: 0.5 -> 0.3 at amount 1: a 40% drop; arc_easy: 0.8 -> 0.75: 6.25%
    assert float(by[("gsm8k", "1")]["relative_drop"]) == pytest.approx(0.4)
    assert float(by[("arc_easy", "1")]["relative_drop"]) == pytest.approx(0.0625)
    assert float(by[("gsm8k", "0")]["relative_drop"]) == 0.0
    t1 = {r["amount"]: r for r in table1(res)}
    assert t1["2"]["generative_drop"] == pytest.approx(0.8)
    assert t1["2"]["non_generative_drop"] == pytest.approx(0.125)
    assert t1["2"]["generative_worse"] is True
    for name in ("table.md", "table1.md", "figure1.png", "report.html", "results.json", "sweep.json"):
        assert (tmp_path / "s" / name).stat().st_size > 0
    assert "0.300 ±0.010 (-40%)" in (tmp_path / "s" / "table.md").read_text()
    assert relative_drop(0.0, 0.0) is None
    # perplexity: lower is better, 1/perplexity is the score -> 10 -> 20 is a 50% drop, 10 -> 5 a gain
    assert relative_drop(10.0, 20.0, lower_is_better=True) == pytest.approx(0.5)
    assert relative_drop(10.0, 5.0, lower_is_better=True) == pytest.approx(-1.0)


def test_resume_redoes_only_missing_cells_and_never_records_a_failure(
    tmp_path: Path, fake: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sweep_mod.run_task

    def crash_on_third(*a, **k):
        if len(fake) == 2:
            fake.append("crash")
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_task", crash_on_third)
    with pytest.raises(RuntimeError):
        run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False)
    assert len(list((tmp_path / "s" / "cells").glob("*.json"))) == 2
    assert not list((tmp_path / "s" / "cells").glob(".*"))  # no half-written cell
    monkeypatch.setattr(sweep_mod, "run_task", real)
    fake.clear()
    run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False)
    assert fake == [("1", "gsm8k"), ("1", "arc_easy"), ("2", "gsm8k"), ("2", "arc_easy")]
    fake.clear()
    # more amounts later: only the new cells run; nothing at all when everything is cached
    run_sweep(_spec(amounts=("0", "1", "2", "3")), tmp_path / "s", lm=object(), progress=False)
    assert fake == [("3", "gsm8k"), ("3", "arc_easy")]


def test_resume_with_other_settings_is_refused(tmp_path: Path, fake: list) -> None:
    run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False)
    with pytest.raises(PrunelensError, match="different settings"):
        run_sweep(_spec(options=TaskOptions(limit=20, progress=False)), tmp_path / "s", lm=object(),
                  progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(PrunelensError, match="not a prunelens sweep"):
        run_sweep(_spec(), tmp_path / "other", lm=object(), progress=False)


def test_amounts_are_checked_per_method() -> None:
    assert parse_amounts("attn-drop", "0,2,4") == ["0", "2", "4"]
    assert parse_amounts("wanda", "0,0.5,2:4") == ["0", "0.5", "2:4"]
    assert parse_amounts("gptq", "0,4,w3g64") == ["0", "4", "w3g64"]
    # recipe steps after '+': a repaired model beside the same pruning unrepaired
    assert parse_amounts("block", "0,2,2+repair:scale") == ["0", "2", "2+repair:scale"]
    assert spec_for("wanda", "2:4+repair:scale") == "wanda:2:4+repair:scale"
    # fixed layers, so only the repair's calibration changes between sweeps
    assert parse_amounts("attn", "4,@23-26,@3;7+repair:linear") == ["4", "@23-26", "@3;7+repair:linear"]
    assert spec_for("attn", "@3;7+repair:linear") == "attn@3,7+repair:linear"
    for method, text in [("attn-drop", "0,x"), ("attn-drop", "0,0"), ("wanda", "0,1.5"), ("foo", "1"),
                         ("gptq", "0,w99"), ("block", "0,2+"), ("block", "0,2+repair:nope"),
                         ("block", "0,+repair:scale"), ("block", "0,2+repair:scale+repair:scale"),
                         ("block", "@"), ("block", "@4-2"), ("wanda", "@3")]:
        with pytest.raises(PrunelensError):
            parse_amounts(method, text)


def test_a_repaired_amount_builds_the_repaired_recipe() -> None:
    """The sweep builds '2+repair:scale' as the recipe block:2+repair:scale (same weights, same
    logits), which differs from the unrepaired amount."""
    lm = tiny_lm("llama")
    spec = _spec(method="block", amounts=("0", "2", "2+repair:scale"))
    test = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(3))

    def logits(mod) -> torch.Tensor:
        with torch.no_grad(), view_of(lm.adapter, mod):
            return lm.model(test).logits

    swept = logits(sweep_mod._build(lm, spec, "2+repair:scale", False))
    direct = logits(build(lm, "block:2+repair:scale", progress=False))
    plain = logits(sweep_mod._build(lm, spec, "2", False))
    assert torch.allclose(swept, direct, atol=1e-6)
    assert (swept - plain).abs().max() > 1e-3
    fixed = logits(sweep_mod._build(lm, spec, "@1-2+repair:scale", False))
    assert torch.allclose(fixed, logits(build(lm, "block@1,2+repair:scale", progress=False)), atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--prune", "foo", "--amounts", "0,1", "--tasks", "fidelity"], "unknown sweep method"),
        (["sweep", "--prune", "attn-drop", "--amounts", "0,two", "--tasks", "fidelity"], "whole number"),
        (["sweep", "--prune", "attn-drop", "--amounts", "0,2", "--tasks", "nope"], "unknown task 'nope'"),
        (["eval", "--tasks", "gsm8k"], "cannot load Hub dataset openai/gsm8k (main, test)"),
        (["eval", "--tasks", "gsm8k", "--data-dir", "/no/such/dir"], "does not exist"),
        (["eval", "--tasks", "fidelity", "--limit", "0"], "--limit must be at least 1"),
        (["eval", "--tasks", "humaneval", "--generative-limit", "-1"], "--generative-limit must be"),
        (["eval", "--tasks", "EMPTYDIR_TASK", "--data-dir", "EMPTYDIR"], "which is absent"),
        (["eval", "--tasks", "retrieval:nope", "--data-dir", "EMPTYDIR"], "which is absent"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    subst = {"EMPTYDIR": str(tmp_path / "empty"), "EMPTYDIR_TASK": "mbpp"}
    argv = [subst.get(a, a) for a in argv]
    rc = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sweep_json_records_identity(tmp_path: Path, fake: list) -> None:
    run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False)
    m = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert m["identity"]["method"] == "attn-drop" and m["identity"]["options"]["limit"] == 10
    assert m["amounts"] == ["0", "1", "2"]


def test_report_rebuilds_a_sweep_from_its_cells(tmp_path: Path, fake: list) -> None:
    run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False)
    (tmp_path / "s" / "report.html").unlink()
    (tmp_path / "s" / "table.md").unlink()
    n = len(fake)
    assert main(["report", str(tmp_path / "s")]) == 0
    assert len(fake) == n  # nothing recomputed
    assert "0.300" in (tmp_path / "s" / "table.md").read_text()
    assert "Sweep" in (tmp_path / "s" / "report.html").read_text()


def test_resume_on_other_data_or_dtype_is_refused_naming_the_setting(tmp_path: Path, fake: list,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The cell cache records the data files' content, dtype and device: a resume that changes any
    of them is refused with the setting named (it once reused the old dense cell on other data)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "arc_easy_test.jsonl").write_text('{"q": 1}\n')
    from prunelens.model.loading import file_sha256

    monkeypatch.setattr(sweep_mod, "check_task",
                        lambda t, d: {"arc_easy_test.jsonl": file_sha256(Path(d) / "arc_easy_test.jsonl")})
    run_sweep(_spec(data_dir=str(data)), tmp_path / "s", lm=object(), progress=False)
    with pytest.raises(PrunelensError, match=r"dtype: 'float32' before, 'bfloat16' now"):
        run_sweep(_spec(data_dir=str(data), dtype="bfloat16"), tmp_path / "s", lm=object(), progress=False)
    (data / "arc_easy_test.jsonl").write_text('{"q": 2}\n')
    with pytest.raises(PrunelensError, match="computed on other data"):
        run_sweep(_spec(data_dir=str(data)), tmp_path / "s", lm=object(), progress=False)
    fake.clear()
    run_sweep(_spec(data_dir=str(data)), tmp_path / "s", lm=object(), progress=False, overwrite=True)
    assert len(fake) == 6  # every cell, dense included, recomputed on the new data


def test_resume_with_a_rewritten_local_model_is_refused(tmp_path: Path, fake: list) -> None:
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"0" * 10)
    run_sweep(_spec(model=str(model)), tmp_path / "s", lm=object(), progress=False)
    run_sweep(_spec(model=str(model)), tmp_path / "s", lm=object(), progress=False)  # unchanged: resumes
    (model / "model.safetensors").write_bytes(b"1" * 12)
    with pytest.raises(PrunelensError, match="model_files"):
        run_sweep(_spec(model=str(model)), tmp_path / "s", lm=object(), progress=False)


# --- several workers on one sweep directory ------------------------------------------------------

_WORKER = r'''
import json, os, sys, time
from pathlib import Path
import prunelens.analyses.sweep as sw
from prunelens.tasks.registry import TaskOptions, TaskScore, task_kind
from prunelens.testing import shared_data_dir
from prunelens.testing import shared_data_dir

out, shard, log = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

class Mod:
    def __init__(self, a): self.amount = a
    def label(self): return f"attn:{self.amount}"
    def to_dict(self): return {"label": self.label()}

def run_task(lm, task, data_dir, options, mod=None):
    a = mod.amount if mod else "0"
    with open(log, "a") as f:  # O_APPEND: one line per computed cell, from either worker
        f.write(f"{a}/{task}\n")
    time.sleep(0.3)
    return TaskScore(task, task_kind(task), "acc", 0.9 - 0.1 * int(a), 0.01, 10, {})

sw._build = lambda lm, spec, amount, progress: None if amount == "0" else Mod(amount)
sw.run_task = run_task
sw.check_task = lambda t, d: []
sw.footprint = lambda lm, mod: {"removed_share": int(mod.amount) / 10}
spec = sw.SweepSpec(model="m", method="attn", amounts=("0", "1", "2", "3"), tasks=("gsm8k", "arc_easy"),
                    data_dir=None, options=TaskOptions(limit=10, progress=False))
sw.run_sweep(spec, out, lm=object(), progress=False, shard=sw.parse_shard(shard) if shard != "-" else None)
'''


def _workers(tmp_path: Path, out: Path, shards: list[str]) -> list[str]:
    import subprocess
    import sys

    script, log = tmp_path / "worker.py", tmp_path / f"{out.name}.log"
    script.write_text(_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(out), s, str(log)]) for s in shards]
    assert [p.wait(timeout=300) for p in procs] == [0] * len(procs)
    return log.read_text().split()


@pytest.mark.slow  # two worker processes
def test_concurrent_workers_compute_each_cell_once_and_match_one_worker(tmp_path: Path) -> None:
    one = _workers(tmp_path, tmp_path / "one", ["-"])
    assert len(one) == 8
    # two shards of the grid, and two unsharded workers racing over every cell: claims keep each
    # cell to one computation
    for name, shards in (("sharded", ["1/2", "2/2"]), ("racing", ["-", "-"])):
        done = _workers(tmp_path, tmp_path / name, shards)
        assert sorted(done) == sorted(one), name
        assert main(["report", str(tmp_path / name)]) == 0
        assert (tmp_path / name / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()
        assert not list((tmp_path / name / "cells").glob("*.claim"))


def test_shard_takes_every_nth_cell_and_outputs_cover_what_is_done(tmp_path: Path, fake: list) -> None:
    res = run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False, shard=(2, 4))
    # grid order: (0,gsm8k) (0,arc) (1,gsm8k) (1,arc) (2,gsm8k) (2,arc): cells 2 and 6
    assert fake == [("0", "arc_easy"), ("2", "arc_easy")]
    assert len(res.cells) == 2 and (tmp_path / "s" / "table.csv").is_file()
    for bad in ("3/2", "0/2", "a/b", "2"):
        with pytest.raises(PrunelensError, match="--shard"):
            sweep_mod.parse_shard(bad)
    with pytest.raises(PrunelensError, match="overwrite"):
        run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False, shard=(1, 2), overwrite=True)


def test_claims_of_live_workers_are_kept_and_of_dead_ones_retaken(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    from prunelens.analyses.cells import claim, claimed_by, release

    cell = tmp_path / "a.json"
    assert claim(cell) and not claim(cell)  # a second claim by anyone, this process included, fails
    release(cell)
    assert claim(cell)
    release(cell)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "a.json.claim"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert claimed_by(cell) is None and claim(cell)  # a dead worker's claim on this host is retaken
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release(cell)
    lock.write_text(json.dumps({"host": "node17", "pid": 4242}))  # another host: assumed alive
    assert not claim(cell) and claimed_by(cell) == "node17:4242"
    lock.unlink()
    cell.write_text("{}")
    assert not claim(cell)  # finished cells are never claimed


@pytest.mark.parametrize("held", [{"host": "HERE"}, {"host": "HERE", "pid": -1}, {"host": "HERE", "pid": 0},
                                  {"host": "HERE", "pid": "12"}, {"pid": 4242}, {"host": "node17", "pid": None},
                                  ["not", "a", "claim"]])
def test_a_claim_naming_no_valid_worker_is_taken_over_and_said(tmp_path: Path, held: object,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from prunelens.analyses.cells import claim, claimed_by, release

    cell, lock = tmp_path / "a.json", tmp_path / "a.json.claim"
    lock.write_text(json.dumps(held).replace('"HERE"', json.dumps(socket.gethostname())))
    assert claimed_by(cell) is None
    assert claim(cell)  # a claim without a pid used to count as alive forever: never computed
    assert "names no valid worker" in capsys.readouterr().err
    release(cell)
    assert not lock.exists()


def test_an_unreadable_claim_is_waited_for_then_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import time

    from prunelens.analyses.cells import CLAIM_WRITE_S, claim

    cell, lock = tmp_path / "a.json", tmp_path / "a.json.claim"
    lock.write_text("{")  # a claim being written right now
    assert not claim(cell) and capsys.readouterr().err == ""
    old = time.time() - CLAIM_WRITE_S - 5
    os.utime(lock, (old, old))  # ...and still unreadable long after: abandoned
    assert claim(cell)
    assert "is unreadable; taking the cell over" in capsys.readouterr().err

def test_cache_accepts_a_directory_another_worker_is_opening_and_refuses_foreign_files(tmp_path: Path) -> None:
    from prunelens.analyses.cells import CellCache

    out = tmp_path / "sweep"
    (out / "cells").mkdir(parents=True)  # another worker's open(): cells made, manifest being written
    (out / ".sweep.json.123.abcd.tmp").write_text("{")
    CellCache(out, "sweep.json", "sweep", {"a": 1})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PrunelensError, match="is not empty and is not a prunelens sweep"):
        CellCache(out, "sweep.json", "sweep", {"a": 1})


# --- a merge a user can trust --------------------------------------------------------------------


def test_report_refuses_a_cell_of_other_settings_naming_the_setting(tmp_path: Path, fake: list,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False)
    cell = tmp_path / "s" / "cells" / "1--gsm8k.json"
    data = json.loads(cell.read_text())
    assert data["settings"] == json.loads((tmp_path / "s" / "sweep.json").read_text())["identity"]
    data["settings"]["options"]["limit"] = 20  # e.g. a shard started by hand with another --limit
    cell.write_text(json.dumps(data))
    before = (tmp_path / "s" / "table.csv").read_text()
    assert main(["report", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cell 1/gsm8k" in err and "options.limit: 10 in sweep.json, 20 in the cell" in err
    assert (tmp_path / "s" / "table.csv").read_text() == before  # nothing merged


def test_report_lists_missing_and_failed_cells_with_the_rerun_command(
        tmp_path: Path, fake: list, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    command = ["sweep", "--model", "m", "--method", "attn", "--amounts", "0,1,2", "--out", str(tmp_path / "s"),
               "--shard", "1/2"]
    run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False, shard=(1, 2), command=command)
    real = sweep_mod.run_task

    def fail_on_2(lm, task, data_dir, options, mod=None):
        if mod is not None and mod.amount == "2":
            raise RuntimeError("CUDA out of memory\nsecond line")
        return real(lm, task, data_dir, options, mod)

    monkeypatch.setattr(sweep_mod, "run_task", fail_on_2)
    with pytest.raises(RuntimeError):
        run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False, shard=(2, 2), command=command)
    err_file = tmp_path / "s" / "cells" / "2--arc_easy.json.error"
    assert json.loads(err_file.read_text())["error"].startswith("RuntimeError: CUDA out of memory")
    (tmp_path / "s" / "cells" / "1--arc_easy.json").unlink()  # as if its job had died before writing
    capsys.readouterr()
    assert main(["report", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "2 of 6 cells not finished" in err
    assert "2/arc_easy: failed: RuntimeError: CUDA out of memory" in err
    assert "1/arc_easy: missing (never finished)" in err
    assert f"`prunelens sweep --model m --method attn --amounts 0,1,2 --out {tmp_path / 's'}` computes only" in err
    assert "Incomplete: 4 of 6 cells" in (tmp_path / "s" / "report.html").read_text()
    monkeypatch.setattr(sweep_mod, "run_task", real)  # the rerun computes the two cells; the error goes
    run_sweep(_spec(), tmp_path / "s", lm=object(), progress=False, command=command)
    assert not err_file.exists() and main(["report", str(tmp_path / "s")]) == 0
