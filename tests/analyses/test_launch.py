"""Sweeps spread over jobs: Slurm's array variables as --shard, submitit's local executor running a
2-shard sweep of the tiny model end to end (equal, cell for cell, to one process), and a Slurm
submission checked through the sbatch script submitit writes (a stand-in sbatch records it)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from submitit.core.utils import DelayedSubmission

import prunelens.analyses.launch as launch_mod
from prunelens.analyses.cells import shard_from_slurm
from prunelens.analyses.launch import minutes, shell_line, without_launch
from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.testing import shared_data_dir

DATA = str(shared_data_dir())


def _env(tid: int, lo: int, hi: int, count: int, step: int | None = None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(tid), "SLURM_ARRAY_TASK_MIN": str(lo), "SLURM_ARRAY_TASK_MAX": str(hi),
           "SLURM_ARRAY_TASK_COUNT": str(count)}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


@pytest.mark.parametrize(("env", "shard"), [
    ({}, None),                                  # not in an array job
    (_env(0, 0, 3, 4), (1, 4)),                  # --array=0-3
    (_env(3, 0, 3, 4), (4, 4)),
    (_env(7, 5, 9, 5), (3, 5)),                  # --array=5-9: an array that does not start at 0
    (_env(14, 10, 16, 4, step=2), (3, 4)),       # --array=10-16:2 → ids 10, 12, 14, 16
    (_env(1, 1, 1, 1), (1, 1)),
])
def test_slurm_array_variables_give_the_shard(env: dict[str, str], shard: tuple[int, int] | None) -> None:
    assert shard_from_slurm(env) == shard


@pytest.mark.parametrize(("env", "message"), [
    (_env(12, 5, 9, 5), "outside the array"),
    (_env(13, 10, 16, 4, step=2), "outside the array"),  # between two ids of the stepped range
    (_env(4, 1, 9, 3), "evenly stepped"),                # --array=1,4,9: a list, no arithmetic
    ({**_env(1, 0, 3, 4), "SLURM_ARRAY_TASK_COUNT": "x"}, "whole-number"),
])
def test_a_task_id_the_arithmetic_cannot_place_is_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(PrunelensError, match=message) as e:
        shard_from_slurm(env)
    assert "\n" not in str(e.value) and "--shard" in str(e.value)


def _sweep(tiny: object, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--model", str(tiny), "--method", "attn", "--amounts", "0,1,2", "--tasks",
            "arc_easy,fidelity", "--limit", "4", "--data-dir", DATA, "--out", str(out), "--quiet", *extra]


def test_a_sweep_inside_an_array_job_takes_its_share_and_says_so(
        tiny_dir: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in _env(8, 7, 8, 2).items():  # the second task of --array=7-8
        monkeypatch.setenv(k, v)
    assert main(_sweep(tiny_dir, tmp_path / "s")) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("sweep: shard 2/2 from the Slurm array (SLURM_ARRAY_TASK_ID=8)")
    # grid order: (0,arc) (0,fid) (1,arc) (1,fid) (2,arc) (2,fid); shard 2/2 takes every second from the 2nd
    done = sorted(p.name for p in (tmp_path / "s" / "cells").glob("*.json"))
    assert done == ["0--fidelity.json", "1--fidelity.json", "2--fidelity.json"]
    assert main(["report", str(tmp_path / "s")]) == 1  # the arc_easy cells are missing, and listed
    err = capsys.readouterr().err
    assert "3 of 6 cells not finished" in err and "0/arc_easy: missing" in err
    assert f"`prunelens sweep --model {tiny_dir}" in err and "--shard" not in err


def test_local_launch_runs_shards_as_jobs_equal_to_one_process(tiny_dir: object, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_sweep(tiny_dir, tmp_path / "one")) == 0
    assert main(_sweep(tiny_dir, tmp_path / "two", "--launch", "local", "--jobs", "2")) == 0
    out = capsys.readouterr().out
    assert "submitted job" in out and "| fidelity |" in out
    one, two = (sorted((tmp_path / d / "cells").glob("*.json")) for d in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 6
    for a, b in zip(one, two, strict=True):
        ca, cb = json.loads(a.read_text()), json.loads(b.read_text())
        for key in ("score", "stderr", "n", "label", "details", "settings"):
            assert ca[key] == cb[key], (a.name, key)
    assert (tmp_path / "one" / "table.csv").read_text() == (tmp_path / "two" / "table.csv").read_text()
    logs = list((tmp_path / "two" / "launch").glob("*_log.out"))
    assert len(logs) == 2  # two jobs, each with its own log
    assert main(["report", str(tmp_path / "two")]) == 0


def _fake_slurm(folder: Path) -> str:
    """sbatch and srun stand-ins: sbatch keeps the script it was given and answers like Slurm."""
    folder.mkdir()
    (folder / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {folder}/submitted.sh\necho "Submitted batch job 4242"\n')
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in ("sbatch", "srun"):
        (folder / f).chmod((folder / f).stat().st_mode | stat.S_IEXEC)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_slurm_launch_submits_one_array_of_the_same_command(tiny_dir: object, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path / "bin"))
    out = tmp_path / "s"
    argv = _sweep(tiny_dir, out, "--launch", "slurm", "--slurm-partition", "gpu", "--slurm-gpus-per-task", "1",
                  "--slurm-time", "4:00:00", "--slurm-array-parallelism", "2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitted job 4242 (6 array tasks)" in printed and f"prunelens report {out}" in printed
    script = (tmp_path / "bin" / "submitted.sh").read_text()
    for line in ("--array=0-5%2", "--partition=gpu", "--gpus-per-task=1", "--ntasks-per-node=1", "--time=240"):
        assert f"#SBATCH {line}\n" in script
    jobs = [DelayedSubmission.load(p) for p in sorted((out / "launch").glob("4242_*_submitted.pkl"))]
    assert sorted(j.args[0] for j in jobs) == [f"{k}/6" for k in range(1, 7)]  # a job per cell
    # every job runs the same command line (paths and flags, nothing pickled but strings) with its shard
    cmd = jobs[0].function.command
    assert cmd[1:3] == ["-m", "prunelens.cli"] and cmd[-1] == "--shard"
    assert jobs[0].function.env is None  # the node's own environment, not this shell's (GPUs, tokens)
    assert cmd[3:-1] == without_launch(argv) and "--launch" not in cmd
    assert json.loads((out / "sweep.json").read_text())["command"] == argv  # for `report`'s rerun line


def test_a_refused_submission_is_one_line(tiny_dir: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = _fake_slurm(tmp_path / "bin")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpux' >&2\n"
                                             "exit 1\n")
    monkeypatch.setenv("PATH", path)
    assert main(_sweep(tiny_dir, tmp_path / "s", "--launch", "slurm", "--slurm-partition", "gpux")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("prunelens: error: --launch slurm: submission failed") and "gpux" in err


def test_launch_without_the_extra_or_slurm_is_one_line(tiny_dir: object, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    assert main(_sweep(tiny_dir, tmp_path / "a", "--launch", "slurm")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("prunelens: error: --launch slurm:") and "--launch local" in err[-1]
    monkeypatch.setattr(launch_mod, "submitit", None)
    assert main(_sweep(tiny_dir, tmp_path / "b", "--launch", "local")) == 2
    assert "pip install 'prunelens[cluster]'" in capsys.readouterr().err


def test_times_and_command_lines() -> None:
    assert minutes("4:00:00") == 240 and minutes("1-00:30:00") == 1470 and minutes("90") == 90
    assert minutes("0:10:30") == 11 and minutes("30:00") == 30 and minutes("1-12") == 2160  # sbatch's M:S, D-H
    for bad in ("soon", "1:2:3:4", "0:00:00"):
        with pytest.raises(PrunelensError, match="--slurm-time"):
            minutes(bad)
    argv = ["sweep", "--out", "d x", "--shard", "2/4", "--launch=slurm", "--jobs", "3", "--overwrite"]
    assert shell_line(argv) == "prunelens sweep --out 'd x'"
