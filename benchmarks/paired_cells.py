"""Paired differences between sweep cells of one task, across sweeps that `prunelens families`
cannot join (different calibration, say): the repaired model fitted on code against the same layers
unrepaired, on the same seeded problems.

The standard error of a paired difference is that of the per-problem differences, far below the
two scores' own, which is what makes 50 problems enough to see a few flipped answers.

    python benchmarks/paired_cells.py docs/sweeps/repair-qwen1.5b-gen/cells/4--humaneval.json \\
        docs/sweeps/repair-qwen1.5b-gen-mbpp/cells/_23-26_repair_linear--humaneval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prunelens.analyses.families import paired_differences
from prunelens.errors import PrunelensError
from prunelens.tasks.data import stderr_of_mean


def _cell(path: Path) -> dict:
    return json.loads(path.read_text())


def paired_rows(base: Path, others: list[Path]) -> list[dict]:
    """One row per cell: its label, score ± se and the paired difference from ``base``."""
    b_cell = _cell(base)
    rows = [{"label": b_cell["label"], "sweep": base.parent.parent.name, "task": b_cell["task"],
             "score": b_cell["score"], "stderr": b_cell["stderr"], "n": b_cell["n"]}]
    for p in others:
        cell = _cell(p)
        d = paired_differences(cell, b_cell) if cell["task"] == b_cell["task"] else None
        if d is None:
            raise PrunelensError(f"{p} and {base} are not per-problem records of the same problems of one task")
        rows.append({"label": cell["label"], "sweep": p.parent.parent.name, "task": cell["task"],
                     "score": cell["score"], "stderr": cell["stderr"], "n": cell["n"],
                     "diff": sum(d) / len(d), "diff_stderr": stderr_of_mean(d),
                     "gained": sum(x > 0 for x in d), "lost": sum(x < 0 for x in d),
                     "seconds": cell.get("seconds"), "build_seconds": cell.get("build_seconds")})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="the cell the others are compared with")
    ap.add_argument("others", type=Path, nargs="+")
    a = ap.parse_args()
    try:
        rows = paired_rows(a.base, a.others)
    except (PrunelensError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"paired_cells: {e}", file=sys.stderr)
        return 2
    print("| model | sweep | task | score | paired diff vs first | gained / lost | cell s | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = f"{r['diff']:+.2f} ± {r['diff_stderr']:.2f}" if "diff" in r else ""
        gl = f"{r['gained']} / {r['lost']}" if "diff" in r else ""
        secs = f"{r['seconds']:.0f}" if r.get("seconds") else ""
        build = f"{r['build_seconds']:.0f}" if r.get("build_seconds") else ""
        score = f"{r['score']:.2f} ± {r['stderr']:.2f}"
        print(f"| {r['label']} | {r['sweep']} | {r['task']} | {score} | {diff} | {gl} | {secs} | {build} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
