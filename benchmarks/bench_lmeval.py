"""P3: the same multiple-choice questions scored by lm-evaluation-harness (HF backend) and by prunelens.

Both tools run in this one process, one after the other, on the same model object (prunelens's
``load_model``; lm-eval gets it through ``HFLM(pretrained=lm.model, tokenizer=lm.tokenizer)``),
float32 on the CPU, with the same torch thread count and the same nominal batch size. For each
task the seeded subset prunelens would evaluate (``sample_indices(n, --limit, --seed)``) is written
to a temporary data directory under the task's file name, and both tools read that file: prunelens
through ``evaluate_mcq(..., limit=None)``, lm-eval through the YAML task of
``benchmarks/lmeval_tasks/pl_<task>.yaml`` with its ``data_files`` pointed at the subset. The script
reports accuracies (acc, acc_norm) and their difference in points (goal: within 0.5), per-question
prediction agreement, the largest per-option log-likelihood difference, and wall times.

Timing (model loading excluded for both): *eval* is ``lm_eval.evaluator.evaluate`` (building the
requests, tokenising, scoring, metrics) against ``evaluate_mcq`` (reading the JSONL, building the
items, scoring, metrics); lm-eval's dataset loading (``datasets`` reading the JSONL, task setup) is
timed apart and left out of the ratio, which favours lm-eval slightly. *scoring* is the
log-likelihood call alone (``HFLM.loglikelihood`` against ``prunelens.tasks.loglik.score_requests``).
Before anything is timed, one untimed forward pass warms the model up; the tools then alternate in
the order given by ``--order``, and with ``--repeats R`` the minimum over R runs is kept. Note the
batch size means different things: lm-eval batches (context, option) sequences, prunelens batches
contexts and scores all their options together (``--lmeval-batch-size`` sets lm-eval's apart).

Environment: run it with a Python that has both packages, kept apart from the project's venv:

    python3.11 -m venv /work/lmeval-venv
    /work/lmeval-venv/bin/pip install torch==2.13.0 transformers==5.23.0 accelerate gguf \
        safetensors matplotlib lm-eval==0.4.13
    /work/lmeval-venv/bin/pip install -e . --no-deps

Run (from the repository root; offline, the model comes from prunelens's cache):

    /work/lmeval-venv/bin/python benchmarks/bench_lmeval.py --tasks arc_easy,piqa --limit 200 \
        --out benchmarks/bench_lmeval.json
"""

from __future__ import annotations

import os

# lm-eval and datasets must not reach the network: set before anything imports them.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunelens.testing import shared_data_dir

HERE = Path(__file__).resolve().parent
TASK_DIR = HERE / "lmeval_tasks"
DEFAULT_DATA = shared_data_dir()


def _timed(fn: Callable[..., Any], sink: list[float], out: list[Any] | None = None) -> Callable[..., Any]:
    """fn, adding each call's wall time to sink (and its result to out)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        res = fn(*args, **kwargs)
        sink.append(time.perf_counter() - t)
        if out is not None:
            out.append((args, kwargs, res))
        return res

    return wrapper


def write_subset(
    task: str, data_dir: Path, dest: Path, limit: int | None, seed: int
) -> tuple[Path, list[int]]:
    """Write the rows prunelens would sample into dest/<task file name>; return it and the indices."""
    from prunelens.data import iter_jsonl
    from prunelens.tasks.data import sample_indices
    from prunelens.tasks.mcq import MCQ_TASKS

    t = MCQ_TASKS[task]
    src = t.source.file(data_dir)
    rows = [row for _, row in iter_jsonl(src)]
    idx = sample_indices(len(rows), limit, seed)
    name = src.name[:-3] if src.name.endswith(".gz") else src.name
    out = dest / name
    with open(out, "w", encoding="utf-8") as f:
        for i in idx:
            f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
    # the subset must hold exactly the items evaluate_mcq(limit, seed) would pick from the full file
    full, sub = t.build(data_dir), t.build(dest)
    if len(full) != len(rows) or [full[i] for i in idx] != sub:
        raise SystemExit(f"{task}: subset items differ from prunelens's own sample")
    return out, idx


def lmeval_config(task: str, subset: Path) -> dict[str, Any]:
    import yaml

    path = TASK_DIR / f"pl_{task}.yaml"
    if not path.is_file():
        raise SystemExit(f"no lm-eval task YAML for '{task}' ({path} is absent)")
    cfg = yaml.safe_load(path.read_text())
    cfg["dataset_kwargs"] = {**cfg.get("dataset_kwargs", {}), "data_files": {"test": str(subset)}}
    cfg["test_split"] = "test"
    return cfg


def prunelens_option_logprobs(items: list[Any], calls: list[Any]) -> list[list[float]]:
    """Per-option log-probabilities from the captured score_requests call (one request per item)."""
    (args, _, scored), = calls
    if len(args[1]) != len(items):
        raise SystemExit("could not map prunelens's requests back to options")
    out = [list(s.logprobs) for s in scored]
    return out


def run_lmeval(hflm: Any, tm: Any, task: str, subset: Path, ll_times: list[float]) -> dict[str, Any]:
    from lm_eval import evaluator

    t = time.perf_counter()
    loaded = tm.load([lmeval_config(task, subset)])
    for obj in loaded["tasks"].values():
        if obj.get_config("num_fewshot") is None:
            obj.set_config(key="num_fewshot", value=0)
        obj.set_fewshot_seed(seed=1234)
    setup = time.perf_counter() - t
    n_ll = len(ll_times)
    t = time.perf_counter()
    res = evaluator.evaluate(lm=hflm, task_dict=loaded, log_samples=True, verbosity="WARNING")
    total = time.perf_counter() - t
    name = f"pl_{task}"
    r = res["results"][name]
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(x[0]) for x in s["filtered_resps"]] for s in samples]
    return {
        "acc": r.get("acc,none"),
        "acc_norm": r.get("acc_norm,none"),
        "n": len(samples),
        "setup_s": setup,
        "eval_s": total,
        "scoring_s": sum(ll_times[n_ll:]),
        "option_logprobs": lls,
    }


def run_prunelens(lm: Any, task: str, data_dir: Path, batch_size: int, progress: bool,
                  calls: list[Any], sc_times: list[float]) -> dict[str, Any]:
    from prunelens.tasks.mcq import MCQ_TASKS, evaluate_mcq

    del calls[:]
    n_sc = len(sc_times)
    t = time.perf_counter()
    res = evaluate_mcq(lm, task, data_dir, limit=None, batch_size=batch_size, progress=progress)
    total = time.perf_counter() - t
    items = MCQ_TASKS[task].build(data_dir)
    return {
        "acc": res.acc,
        "acc_norm": res.acc_norm,
        "n": res.n,
        "eval_s": total,
        "scoring_s": sum(sc_times[n_sc:]),
        "predictions": res.predictions,
        "golds": res.golds,
        "option_logprobs": prunelens_option_logprobs(items, calls),
    }


def compare(task: str, pl: dict[str, Any], le: dict[str, Any], tol: float) -> dict[str, Any]:
    if pl["n"] != le["n"]:
        raise SystemExit(f"{task}: prunelens scored {pl['n']} questions, lm-eval {le['n']}")
    le_pred = [max(range(len(x)), key=x.__getitem__) for x in le["option_logprobs"]]
    same_pred = sum(a == b for a, b in zip(pl["predictions"], le_pred, strict=True))
    dll = [abs(a - b) for xs, ys in zip(pl["option_logprobs"], le["option_logprobs"], strict=True)
           for a, b in zip(xs, ys, strict=True)]
    d_acc = 100 * abs(pl["acc"] - le["acc"])
    d_norm = None if le["acc_norm"] is None else 100 * abs(pl["acc_norm"] - le["acc_norm"])
    return {
        "task": task,
        "n": pl["n"],
        "prunelens": {k: pl[k] for k in ("acc", "acc_norm", "eval_s", "scoring_s")},
        "lm_eval": {k: le[k] for k in ("acc", "acc_norm", "setup_s", "eval_s", "scoring_s")},
        "abs_diff_points": {"acc": d_acc, "acc_norm": d_norm},
        "agree": d_acc <= tol and (d_norm is None or d_norm <= tol),
        "same_prediction": same_pred,
        "max_abs_option_logprob_diff": max(dll),
        "ratio_eval": le["eval_s"] / pl["eval_s"],
        "ratio_scoring": le["scoring_s"] / pl["scoring_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="arc_easy,piqa", help="comma-separated prunelens MCQ task names")
    ap.add_argument("--limit", type=int, default=200, help="questions per task (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lmeval-batch-size", type=int, default=None, help="default: --batch-size")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--order", choices=["lmeval-first", "prunelens-first"], default="lmeval-first")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each tool per task; minimum time kept")
    ap.add_argument("--tolerance", type=float, default=0.5, help="agreement goal, accuracy points")
    ap.add_argument("--progress", action="store_true", help="show prunelens's progress bar too")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_lmeval-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "hf_datasets"))  # no stray cache entries
    try:
        _main(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(a: argparse.Namespace, tmp: Path) -> None:
    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import prunelens.tasks.mcq as mcq
    from prunelens.prune.checkpoint import load_model

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in mcq.MCQ_TASKS:
            raise SystemExit(f"unknown task '{t}'; prunelens MCQ tasks: {', '.join(mcq.MCQ_TASKS)}")
    data = tmp / "data"
    data.mkdir()
    subsets = {t: write_subset(t, a.data_dir, data, a.limit or None, a.seed) for t in tasks}

    lm = load_model(a.model, device="cpu", dtype="float32")
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=a.lmeval_batch_size or a.batch_size)
    tm = TaskManager(include_defaults=False)

    ll_times: list[float] = []
    hflm.loglikelihood = _timed(hflm.loglikelihood, ll_times)
    sc_times: list[float] = []
    calls: list[Any] = []
    mcq.score_requests = _timed(mcq.score_requests, sc_times, calls)

    with torch.inference_mode():  # warm-up, untimed, shared by both tools
        ids = torch.randint(100, 1000, (a.batch_size, 96))
        for _ in range(2):
            lm.model(input_ids=ids)

    print(f"model {a.model} ({lm.info.get('source')}), float32 cpu, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; lm-eval {lm_eval.__version__}, transformers "
          f"{transformers.__version__}; batch size prunelens {a.batch_size} contexts, lm-eval "
          f"{a.lmeval_batch_size or a.batch_size} sequences; limit {a.limit}, seed {a.seed}", flush=True)
    rows = []
    for task in tasks:
        subset, idx = subsets[task]
        best_pl: dict[str, Any] | None = None
        best_le: dict[str, Any] | None = None
        for _ in range(a.repeats):
            order = ["lmeval", "prunelens"] if a.order == "lmeval-first" else ["prunelens", "lmeval"]
            for tool in order:
                if tool == "lmeval":
                    r = run_lmeval(hflm, tm, task, subset, ll_times)
                    if best_le is None:
                        best_le = r
                    else:
                        for k in ("setup_s", "eval_s", "scoring_s"):
                            best_le[k] = min(best_le[k], r[k])
                else:
                    r = run_prunelens(lm, task, data, a.batch_size, a.progress, calls, sc_times)
                    if best_pl is None:
                        best_pl = r
                    else:
                        for k in ("eval_s", "scoring_s"):
                            best_pl[k] = min(best_pl[k], r[k])
        assert best_pl is not None and best_le is not None
        row = compare(task, best_pl, best_le, a.tolerance)
        row["indices"] = idx
        rows.append(row)
        pl, le, d = row["prunelens"], row["lm_eval"], row["abs_diff_points"]
        norm = "n/a" if d["acc_norm"] is None else f"{d['acc_norm']:.2f}"
        le_norm = "n/a" if le["acc_norm"] is None else f"{le['acc_norm']:.4f}"
        print(f"{task}: n={row['n']}  prunelens acc {pl['acc']:.4f} acc_norm {pl['acc_norm']:.4f} | "
              f"lm-eval acc {le['acc']:.4f} acc_norm {le_norm} | |diff| acc {d['acc']:.2f} "
              f"acc_norm {norm} points ({'agree' if row['agree'] else 'DISAGREE'}); same prediction "
              f"{row['same_prediction']}/{row['n']}, max |d loglik| {row['max_abs_option_logprob_diff']:.2e}")
        print(f"{task}: time eval prunelens {pl['eval_s']:.2f} s, lm-eval {le['eval_s']:.2f} s "
              f"(+ {le['setup_s']:.2f} s task setup, not counted) -> lm-eval/prunelens "
              f"{row['ratio_eval']:.2f}x; "
              f"scoring only {pl['scoring_s']:.2f} s vs {le['scoring_s']:.2f} s -> "
              f"{row['ratio_scoring']:.2f}x", flush=True)

    t_pl = sum(r["prunelens"]["eval_s"] for r in rows)
    t_le = sum(r["lm_eval"]["eval_s"] for r in rows)
    s_pl = sum(r["prunelens"]["scoring_s"] for r in rows)
    s_le = sum(r["lm_eval"]["scoring_s"] for r in rows)
    agree = all(r["agree"] for r in rows)
    summary = {
        "prunelens_eval_s": t_pl, "lm_eval_eval_s": t_le, "ratio_eval": t_le / t_pl,
        "prunelens_scoring_s": s_pl, "lm_eval_scoring_s": s_le, "ratio_scoring": s_le / s_pl,
        "agree_within_points": a.tolerance, "agree": agree,
    }
    print(f"overall: lm-eval {t_le:.2f} s / prunelens {t_pl:.2f} s = {summary['ratio_eval']:.2f}x "
          f"(scoring only {summary['ratio_scoring']:.2f}x; goal >= 1.5x: "
          f"{'met' if summary['ratio_eval'] >= 1.5 else 'not met'}); accuracies within {a.tolerance} points "
          f"on every task: {'yes' if agree else 'NO'}")
    if a.out:
        meta = {
            "model": a.model, "model_source": lm.info.get("source"), "tasks": tasks, "limit": a.limit,
            "seed": a.seed, "batch_size": a.batch_size,
            "lmeval_batch_size": a.lmeval_batch_size or a.batch_size, "order": a.order,
            "repeats": a.repeats, "dtype": "float32", "device": "cpu",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
            "python": sys.version.split()[0], "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        }
        payload = {"meta": meta, "tasks": rows, "summary": summary}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
