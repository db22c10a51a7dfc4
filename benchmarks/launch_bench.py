"""One sweep as one process vs the same sweep as local submitit jobs (`sweep --launch local`).

Runs a 6-cell sweep of the default model twice, each from an empty directory: once as the plain
command (one worker, all cores), once as ``--launch local --jobs N`` (N worker processes, the cores
split between them). Prints both wall times, their ratio and whether the merged tables are equal
cell for cell. On a machine with C cores and N ≤ C workers the ideal ratio is about N× less the
model loads each worker repeats; on this 2-core box two workers can at most share the same 2 cores.

    python benchmarks/launch_bench.py [--model smollm2-135m] [--jobs 2] [--limit 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prunelens.testing import shared_data_dir


def sweep(out: Path, a: argparse.Namespace, *extra: str) -> float:
    cmd = [sys.executable, "-m", "prunelens.cli", "sweep", "--model", a.model, "--method", "attn",
           "--amounts", a.amounts, "--tasks", a.tasks, "--limit", str(a.limit), "--max-new-tokens",
           str(a.max_new_tokens), "--data-dir", str(shared_data_dir()), "--out", str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cells(out: Path) -> dict[str, dict]:
    keep = ("score", "stderr", "n", "label", "details")
    return {p.name: {k: json.loads(p.read_text()).get(k) for k in keep} for p in sorted((out / "cells").glob("*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--amounts", default="0,4,8")
    ap.add_argument("--tasks", default="arc_easy,gsm8k")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    sweep(root / "warm", a)  # the model's safetensors cache and the data, once, outside the timing
    shutil.rmtree(root / "warm")
    one = sweep(root / "one", a)
    many = sweep(root / "many", a, "--launch", "local", "--jobs", str(a.jobs))
    same = cells(root / "one") == cells(root / "many")
    n = len(cells(root / "one"))
    print(f"{n}-cell sweep of {a.model} ({a.amounts} × {a.tasks}, limit {a.limit}): one process {one:.1f} s, "
          f"--launch local --jobs {a.jobs} {many:.1f} s; speed-up {one / many:.2f}×; merged cells equal: {same}")
    shutil.rmtree(root)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
