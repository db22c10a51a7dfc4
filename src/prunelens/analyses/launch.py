"""Spreading a sharded command over a cluster: one Slurm job array (or local processes) via submitit.

A run that takes ``--shard K/N`` (a sweep) is launched as the same command line once per shard, so
jobs receive only a command and paths — never a pickled model or tensor — and write their cells into
the shared ``--out``, where ``prunelens report`` merges them. ``--launch local`` runs the same plan as
local processes through submitit's own local executor (what the tests use); without the optional
``prunelens[cluster]`` extra, ``--launch`` is one line saying what to install.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError

try:
    import submitit
    from submitit.core.utils import FailedJobError
    from submitit.helpers import CommandFunction
except ImportError:  # the optional cluster extra
    submitit = None

# options of the launching process that its jobs must not repeat
LAUNCH_FLAGS = ("--launch", "--jobs", "--slurm-partition", "--slurm-gpus-per-task", "--slurm-time",
                "--slurm-array-parallelism", "--slurm-cpus-per-task", "--slurm-mem-gb", "--shard")
LAUNCH_SWITCHES = ("--overwrite",)


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launch", choices=("slurm", "local"),
                   help="submit the shards as one Slurm job array (or local processes) through submitit and "
                        "print the job id and the `report` command (needs prunelens[cluster])")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="array size with --launch (default: slurm one job per unfinished cell, local 2)")
    p.add_argument("--slurm-partition", metavar="P", help="Slurm partition of the jobs (default: the cluster's)")
    p.add_argument("--slurm-gpus-per-task", type=int, metavar="G", help="GPUs per job")
    p.add_argument("--slurm-cpus-per-task", type=int, metavar="C", help="CPU cores per job")
    p.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="host memory per job")
    p.add_argument("--slurm-time", default="4:00:00", metavar="H:MM:SS",
                   help="each job's time limit (default 4:00:00)")
    p.add_argument("--slurm-array-parallelism", type=int, metavar="N",
                   help="at most N jobs of the array run at once")


def minutes(text: str) -> int:
    """A Slurm time limit as whole minutes (rounded up), in sbatch's forms: M, M:S, H:M:S, D-H,
    D-H:M, D-H:M:S."""
    days, dash, rest = text.partition("-")
    if not dash:
        days, rest = "", text
    try:
        parts = [int(x) for x in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        raise PrunelensError(f"--slurm-time takes [D-]H:MM:SS, got '{text}'") from None
    if not 1 <= len(parts) <= 3 or min(parts + [d]) < 0:
        raise PrunelensError(f"--slurm-time takes [D-]H:MM:SS, got '{text}'")
    if dash:  # after a day count the first field is hours
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    total = d * 1440 + h * 60 + m + (1 if s else 0)
    if total < 1:
        raise PrunelensError(f"--slurm-time '{text}' is shorter than a minute")
    return total


def without_launch(argv: Sequence[str]) -> list[str]:
    """The command line without the launching options (what every job and a rerun run)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in a
            continue
        if a not in LAUNCH_SWITCHES:
            out.append(a)
    return out


def shell_line(argv: Sequence[str]) -> str:
    return "prunelens " + shlex.join(without_launch(argv))


@dataclass
class Launched:
    """What was submitted: the jobs (submitit Job objects), the shards they run and the log folder."""

    jobs: list[Any]
    shards: list[str]
    logs: Path

    @property
    def job_id(self) -> str:
        return str(self.jobs[0].job_id).split("_")[0] if self.jobs else "-"

    def wait(self) -> list[str]:
        """Wait for every job; the one-line failures of those that failed (their cells say why)."""
        failed = []
        for k, job in zip(self.shards, self.jobs, strict=True):
            try:
                job.result()
            except Exception as e:  # a failed job: its command's exit, its stderr in the log folder
                last = str(e).strip().splitlines()
                failed.append(f"job --shard {k}: {last[-1] if last else type(e).__name__}")
        return failed


def launch(argv: Sequence[str], shards: Sequence[str], args: argparse.Namespace, logs: Path) -> Launched:
    """Submit ``prunelens ARGV --shard S`` for each S in ``shards`` (``K/N``) as one array job."""
    if submitit is None:
        raise PrunelensError("--launch needs submitit: pip install 'prunelens[cluster]'")
    if not shards:
        raise PrunelensError("nothing to launch: every cell is finished")
    cluster = args.launch
    try:
        ex = submitit.AutoExecutor(folder=logs, cluster=cluster)
    except RuntimeError as e:  # submitit's check for srun/sbatch: not on a Slurm login node
        raise PrunelensError(f"--launch {cluster}: {str(e).strip().splitlines()[0]} (--launch local runs the "
                             "same jobs on this machine)") from None
    # one task per job: Slurm refuses --gpus-per-task without a task count
    params: dict[str, Any] = {"name": "prunelens", "timeout_min": minutes(args.slurm_time), "tasks_per_node": 1}
    if cluster == "slurm":
        opt = {"slurm_partition": args.slurm_partition, "slurm_gpus_per_task": args.slurm_gpus_per_task,
               "slurm_cpus_per_task": args.slurm_cpus_per_task, "slurm_mem_gb": args.slurm_mem_gb,
               "slurm_array_parallelism": args.slurm_array_parallelism}
        params.update({k: v for k, v in opt.items() if v is not None})
    ex.update_parameters(**params)
    env = None  # a Slurm job keeps the environment its node gives it (GPUs, scratch), nothing pickled
    if cluster == "local":  # local processes share this machine's cores: split them, never oversubscribe
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(shards)))}
    command = [sys.executable, "-m", "prunelens.cli", *without_launch(argv), "--shard"]
    fn = CommandFunction(command, verbose=True, cwd=os.getcwd(), env=env)  # verbose: output streams to the log
    try:
        jobs = ex.map_array(fn, list(shards))
    except (OSError, subprocess.SubprocessError, FailedJobError) as e:  # sbatch refused
        detail = getattr(e, "output", b"") or b""
        text = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        raise PrunelensError(f"--launch {cluster}: submission failed: "
                             f"{(text.strip() or str(e)).splitlines()[-1]}") from None
    return Launched(list(jobs), list(shards), logs)
