"""Pruned GGUFs measured where users serve them: llama.cpp's own speed, KV cache and KL divergence.

For one model, ``prunelens prune --format gguf`` writes the dense model and each pruning (default
``attn:4, attn:8, block:4, block:8``, importance-chosen layers) at one tensor type. Then:

- ``llama-bench`` (prompt 512 and 128 generated tokens, flash attention on, 2 threads) gives tokens/s;
  the time saved per generated token is set against the *ideal* saving: the share of bytes a
  token no longer reads (every weight tensor, the tied embedding read once as the output matrix,
  and the KV cache of the average context of a 128-token generation). CPU decoding is
  memory-bound, so a well-encoded drop should come close to that share.
- ``llama-perplexity --kl-divergence`` of each pruned GGUF against the dense GGUF (WikiText-2, 512-token
  chunks, second half scored) beside prunelens's teacher-forced KL of the same pruning on the same
  windows (``kl_statistics``, fp32): the deci encoding computes what prunelens's pruned view does iff
  the two agree up to the tensor type's rounding.
- the KV-cache size llama.cpp reports for each file (``llama_kv_cache: size = …`` at 512 cells).

llama.cpp is not part of prunelens: ``bash ../shared/tools/build-llama-cpp.sh`` builds the tools from the
``llama-cpp-python`` sdist (~10 min on 2 cores) and prints the bin folder (``--bin``). Stages keep
their results in ``--work`` and can run one at a time:

    python benchmarks/llamacpp_deploy_bench.py --model smollm2-135m --stage export
    python benchmarks/llamacpp_deploy_bench.py --model smollm2-135m --stage llamacpp
    python benchmarks/llamacpp_deploy_bench.py --model smollm2-135m --stage report
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import gguf
import torch
from llamacpp_kld_check import parse_kld, run, wiki_test_raw

from prunelens.model.loading import cache_dir
from prunelens.prune.checkpoint import load_model
from prunelens.prune.gguf_export import save_gguf
from prunelens.prune.recipe import Calibration, Recipe, build
from prunelens.tasks.perplexity import kl_statistics
from prunelens.testing import shared_data_dir

GEN_TOKENS, PROMPT_TOKENS = 128, 512


def export_stage(a: argparse.Namespace, work: Path, corpus: str) -> None:
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    save_gguf(lm, None, work / "dense.gguf", a.type)
    res["dense"] = {"export_s": time.perf_counter() - t0, "bytes": (work / "dense.gguf").stat().st_size}
    for spec in a.prunings.split(","):
        mod = build(lm, Recipe.parse(spec), Calibration(seed=0), progress=False)
        t0 = time.perf_counter()
        path = save_gguf(lm, mod, work / f"{spec.replace(':', '')}.gguf", a.type)
        took = time.perf_counter() - t0
        k = kl_statistics(lm, corpus, mod, seq_len=512, max_windows=a.chunks, progress=False, positions="second-half")
        res[spec] = {"label": mod.label(), "export_s": took, "bytes": path.stat().st_size, "prunelens": k}
        print(f"  {spec}: {mod.label()}, {path.stat().st_size / 2**20:.1f} MiB, prunelens mean KL "
              f"{k['mean_kld']:.4f}", flush=True)
    (work / "export.json").write_text(json.dumps(res, indent=1))


def bytes_read(path: Path, context: float) -> dict[str, float]:
    """Bytes one generated token reads: every tensor but the embedding (one row), which a tied
    model reads whole as its output matrix; and the KV cache (f16) of ``context`` earlier tokens."""
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    names = {t.name for t in r.tensors}
    weights = sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight" or "output.weight" not in names)
    kv = r.fields[f"{arch}.attention.head_count_kv"].contents()
    n_layers = r.fields[f"{arch}.block_count"].contents()
    kv = kv if isinstance(kv, list) else [kv] * n_layers
    head = r.fields[f"{arch}.attention.key_length"].contents()
    kv_bytes = sum(2 * h * head * 2 for h in kv) * context
    return {"weights": weights, "kv": kv_bytes, "total": weights + kv_bytes}


def llamacpp_stage(a: argparse.Namespace, work: Path, text: Path) -> None:
    exp = json.loads((work / "export.json").read_text())
    files = {k: work / ("dense.gguf" if k == "dense" else f"{k.replace(':', '')}.gguf") for k in exp}
    res = bench_rounds(a, files, work)
    common = ["-f", str(text), "-c", "512", "--chunks", str(a.chunks), "-t", str(a.threads), "-fa", "on", "-lv", "4"]
    base = run([str(a.bin / "llama-perplexity"), "-m", str(files["dense"]), *common, "--kl-divergence-base",
                str(work / "dense.kld")], work / "ppl-dense.log")
    res["dense"]["kv_mib"] = kv_mib(base)
    for k, f in files.items():
        if k == "dense":
            continue
        log = run([str(a.bin / "llama-perplexity"), "-m", str(f), *common, "--kl-divergence", "--kl-divergence-base",
                   str(work / "dense.kld")], work / f"kld-{f.stem}.log")
        res[k].update(kv_mib=kv_mib(log), llamacpp=parse_kld(log))
    (work / "llamacpp.json").write_text(json.dumps(res, indent=1))


def bench_rounds(a: argparse.Namespace, files: dict[str, Path], work: Path) -> dict[str, Any]:
    """llama-bench on every file in turn, ``--rounds`` times: a drift of this machine's speed during
    the run then hits every file alike; each figure is the median over rounds (spread: min–max)."""
    seen: dict[str, dict[str, list[float]]] = {k: {"pp": [], "tg": []} for k in files}
    for _ in range(a.rounds):
        for k, f in files.items():
            out = run([str(a.bin / "llama-bench"), "-m", str(f), "-p", str(PROMPT_TOKENS), "-n", str(GEN_TOKENS),
                       "-t", str(a.threads), "-r", str(a.reps), "-fa", "on", "-o", "json"], work / "bench.log")
            rows = json.loads(out[out.index("["):out.rindex("]") + 1])
            seen[k]["pp"].append(next(x["avg_ts"] for x in rows if x["n_gen"] == 0))
            seen[k]["tg"].append(next(x["avg_ts"] for x in rows if x["n_prompt"] == 0))
    return {k: {"pp_tps": statistics.median(v["pp"]), "tg_tps": statistics.median(v["tg"]),
                "tg_range": [min(v["tg"]), max(v["tg"])], "tg_rounds": v["tg"]} for k, v in seen.items()}


def kv_mib(log: str) -> float:
    m = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", log)
    return float(m.group(1)) if m else float("nan")


def rng(q: dict[str, Any]) -> str:
    return f"{q['tg_tps']:.1f} ({q['tg_range'][0]:.1f}–{q['tg_range'][1]:.1f})"


def report(a: argparse.Namespace, work: Path) -> str:
    exp, lc = json.loads((work / "export.json").read_text()), json.loads((work / "llamacpp.json").read_text())
    ctx = GEN_TOKENS / 2
    dense = bytes_read(work / "dense.gguf", ctx)
    d = lc["dense"]
    lines = [f"{a.model}, {a.type} GGUFs, llama-bench -p {PROMPT_TOKENS} -n {GEN_TOKENS} -t {a.threads} -r {a.reps} "
             f"-fa on, {a.rounds} rounds over the files in turn (median, min–max); KL over {a.chunks} WikiText-2 "
             "chunks of 512 (second half)", "",
             "| file | layers dropped | size MiB | prompt tok/s | gen tok/s (range) | gen time saved / token | "
             "ideal saving (bytes read) | saved ÷ ideal | KV cache MiB (2048 cells) | KL llama.cpp | "
             "KL prunelens (fp32) | same top-1 llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | — | {exp['dense']['bytes'] / 2**20:.1f} | {d['pp_tps']:.1f} | {rng(d)} "
             f"| — | — | — | {d['kv_mib']:.2f} | — | — | — |"]
    for k, e in exp.items():
        if k == "dense":
            continue
        q = lc[k]
        saved = 1 - d["tg_tps"] / q["tg_tps"]
        ideal = 1 - bytes_read(work / f"{k.replace(':', '')}.gguf", ctx)["total"] / dense["total"]
        lines.append(f"| {k} | {e['label']} | {e['bytes'] / 2**20:.1f} | {q['pp_tps']:.1f} | {rng(q)} "
                     f"| {saved:.1%} | {ideal:.1%} | {saved / ideal:.2f} | {q['kv_mib']:.2f} | "
                     f"{q['llamacpp']['mean_kld']:.4f} | {e['prunelens']['mean_kld']:.4f} | "
                     f"{q['llamacpp']['same_top']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stage", choices=["export", "llamacpp", "report", "all"], default="all")
    ap.add_argument("--prunings", default="attn:4,attn:8,block:4,block:8")
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--bin", type=Path, default=Path.home() / ".cache" / "llama-cpp-ref" / "build" / "bin")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="llama-bench repetitions per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all files, interleaved")
    a = ap.parse_args()
    work = a.work or cache_dir() / "deploy-bench" / f"{a.model}-{a.type}"
    work.mkdir(parents=True, exist_ok=True)
    text = work / "wiki.test.raw"
    if not text.exists():
        text.write_text(wiki_test_raw(shared_data_dir() / "wikitext2_raw_test.jsonl"), encoding="utf-8")
    if a.stage in ("export", "all"):
        export_stage(a, work, text.read_text(encoding="utf-8"))
    if a.stage in ("llamacpp", "all"):
        llamacpp_stage(a, work, text)
    if a.stage in ("report", "all"):
        print(report(a, work))


if __name__ == "__main__":
    main()
