"""Models larger than the device, simulated on this CPU: each command run in memory and under a
``--max-memory`` budget far below the model's size (the rest on disk), in one run.

For analyze (a layer drop), prune (Wanda, saved checkpoint) and eval (multiple choice), it prints
wall time ÷ in-memory wall time, peak RSS ÷ budget, and whether the results are equal. Each command
runs as its own process; its memory is sampled from /proc every 50 ms: peak RSS, and its anonymous
part (heap, the part a budget constrains; file-backed pages of the memory-mapped safetensors are
the kernel's page cache, dropped under pressure).

Run: python benchmarks/bench_offload.py --model qwen2.5-coder-1.5b --budget 2GiB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prunelens.testing import shared_data_dir

DATA = shared_data_dir()
UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def to_bytes(size: str) -> int:
    for u, f in UNITS.items():
        if size.endswith(u):
            return int(float(size[: -len(u)]) * f)
    return int(size)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def run(cmd: list[str]) -> dict[str, Any]:
    """Wall time and peak memory of one command (a fresh process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: dict[str, int] = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while p.poll() is None:
        for k, v in _status(p.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    log = p.stdout.read() if p.stdout else ""
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{log[-2000:]}")
    return {"wall_s": wall, "peak_rss": peak["VmRSS"], "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"]}


def same_analysis(a: Path, b: Path) -> str:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    worst = 0.0
    for key in ("stepwise", "layerwise"):
        fa, fb = _floats(ra[key]), _floats(rb[key])
        if len(fa) != len(fb):
            return "different shapes"
        worst = max([worst, *(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(fa, fb, strict=True))])
    return "identical" if worst == 0 else f"max rel diff {worst:.1e}"


def _floats(x: Any) -> list[float]:
    if isinstance(x, dict):
        return [f for k in sorted(x) for f in _floats(x[k])]
    if isinstance(x, list):
        return [f for v in x for f in _floats(v)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def same_checkpoint(a: Path, b: Path) -> str:
    """Tensor by tensor (one at a time), over every safetensors file of both checkpoints."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Path]:
        return {k: f for f in sorted(d.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return f"different tensors ({len(ta)} vs {len(tb)})"
    worst = 0.0
    for k in ta:
        x = safe_open(str(ta[k]), "pt").get_tensor(k)
        y = safe_open(str(tb[k]), "pt").get_tensor(k)
        if x.shape != y.shape:
            return f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        worst = max(worst, float((x.double() - y.double()).abs().max()))
    files = len(list(b.glob("*.safetensors")))
    return ("identical" if worst == 0 else f"max abs diff {worst:.1e}") + f" ({len(ta)} tensors, {files} shard(s))"


def same_eval(a: Path, b: Path) -> str:
    ra, rb = (json.loads(p.read_text()) for p in (a, b))
    sa, sb = (json.dumps(r.get("scores", r.get("tasks", r)), sort_keys=True) for r in (ra, rb))
    return "identical" if sa == sb else "different"


def block_bytes(model: str) -> int:
    from prunelens.model.loading import resolve_source

    src, _ = resolve_source(model)
    cfg = json.loads((Path(src) / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    return 4 * (2 * h * heads * hd + 2 * h * kv * hd + 3 * h * i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--budget", default="2GiB", help="the CPU budget (--max-memory cpu=...)")
    ap.add_argument("--data-dir", default=str(DATA) if DATA.is_dir() else None)
    ap.add_argument("--out", help="write the figures as JSON")
    ap.add_argument("--only", help="run only the commands whose name contains this (e.g. prune)")
    a = ap.parse_args()
    exe = [sys.executable, "-m", "prunelens.cli"]
    work = Path(tempfile.mkdtemp(prefix="bench-offload-"))
    prompts = work / "prompts.txt"
    prompts.write_text("Write a Python function that reverses a string.\nWhat is 17 times 23?\n"
                       "Explain why the sky is blue in one sentence.\nList three prime numbers.\n")
    data = ["--data-dir", a.data_dir] if a.data_dir else []
    commands = {
        "analyze --drop attn:4": lambda out: ["analyze", "--model", a.model, "--drop", "attn:4", "--prompts",
                                              str(prompts), "--steps", "16", "--batch-size", "4", "--quiet",
                                              "--out", str(out)],
        "prune --prune wanda:0.5": lambda out: ["prune", "--model", a.model, "--prune", "wanda:0.5",
                                                "--calib-samples", "8", "--calib-len", "128", "--out", str(out)],
        "eval arc_easy (40 questions)": lambda out: ["eval", "--model", a.model, "--tasks", "arc_easy", "--limit",
                                                     "40", *data, "--quiet", "--out", str(out)],
    }
    compare = {"analyze --drop attn:4": same_analysis, "prune --prune wanda:0.5": same_checkpoint,
               "eval arc_easy (40 questions)": same_eval}
    budget, blk = to_bytes(a.budget), block_bytes(a.model)
    rows = []
    for name, cmd in commands.items():
        if a.only and a.only not in name:
            continue
        suffix = ".json" if name.startswith("eval") else ""
        mem_out, off_out = work / f"mem-{len(rows)}{suffix}", work / f"off-{len(rows)}{suffix}"
        mem = run([*exe, *cmd(mem_out)])
        off = run([*exe, *cmd(off_out), "--max-memory", f"cpu={a.budget}", "--offload-dir", str(work / "offload")])
        row = {"command": name, "in_memory": mem, "offloaded": off, "time_ratio": off["wall_s"] / mem["wall_s"],
               "rss_over_budget": off["peak_rss"] / budget, "anon_over_budget": off["peak_anon"] / budget,
               "goal_bytes": budget + blk * 1.15 + 0.15 * budget, "equal": compare[name](mem_out, off_out)}
        rows.append(row)
        print(f"{name:30s} in-memory {mem['wall_s']:7.1f} s, peak RSS {mem['peak_rss'] / 2**30:5.2f} GiB | "
              f"offloaded {off['wall_s']:7.1f} s (x{row['time_ratio']:.2f}), peak RSS {off['peak_rss'] / 2**30:5.2f}"
              f" GiB = {row['rss_over_budget']:.2f} x budget (anonymous {off['peak_anon'] / 2**30:.2f} GiB = "
              f"{row['anon_over_budget']:.2f} x) | results: {row['equal']}", flush=True)
    print(f"budget {a.budget}; one block {blk / 2**20:.0f} MiB; goal: peak <= budget + one block + 15 % = "
          f"{(budget + blk) * 1.15 / 2**30:.2f} GiB")
    if a.out:
        Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
                                           "model": a.model, "budget": a.budget, "block_bytes": blk, "rows": rows},
                                          indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
