"""Cross-check of ``prunelens ppl --kld --candidate`` against llama.cpp's own ``llama-perplexity``.

The default model's GGUF (SmolLM2-135M-Instruct, Q4_1 as packaged) is written out as an F32 GGUF
(the base: the exact dequantised weights) and re-quantised with ``llama-quantize --pure`` to Q8_0
and Q4_0. llama.cpp runs ``--kl-divergence-base`` on the base and ``--kl-divergence`` on each
quantised file over WikiText-2 (the test split rebuilt as ``wiki.test.raw``); prunelens runs the
same pairs (``load_candidate`` + ``kl_statistics(..., positions="second-half")``, what
``prunelens ppl --kld --candidate Q.gguf --positions second-half --seq-len 512`` runs) on the same
text. Both sets of statistics are printed side by side with their ratio.

llama.cpp is not part of prunelens: build ``llama-perplexity`` and ``llama-quantize`` from the
sources vendored in the ``llama-cpp-python`` sdist and pass ``--bin`` (default
``~/.cache/llama-cpp-ref/build/bin``). Each stage keeps its results in ``--work``, so the stages can
run one at a time (each a few minutes on 2 cores):

    python benchmarks/llamacpp_kld_check.py --stage llamacpp --chunks 12
    python benchmarks/llamacpp_kld_check.py --stage prunelens --types Q8_0 --chunks 12
    python benchmarks/llamacpp_kld_check.py --stage prunelens --types Q4_0 --chunks 12
    python benchmarks/llamacpp_kld_check.py --stage report
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunelens.model.loading import DEFAULT_MODEL, PRESETS, cache_dir, preset_gguf
from prunelens.prune.candidate import load_candidate
from prunelens.prune.checkpoint import load_model
from prunelens.tasks.perplexity import kl_statistics, scored_windows
from prunelens.testing import shared_data_dir

TYPES = ("Q8_0", "Q4_0")
# llama.cpp's printed statistic -> prunelens's key (kl_statistics), and how llama.cpp scales it
STATS = {"Mean    KLD": ("mean_kld", 1), "Maximum KLD": ("max_kld", 1), "99.9%   KLD": ("kld_p99.9", 1),
         "99.0%   KLD": ("kld_p99", 1), "95.0%   KLD": ("kld_p95", 1), "90.0%   KLD": ("kld_p90", 1),
         "Median  KLD": ("kld_p50", 1), "10.0%   KLD": ("kld_p10", 1), "Mean    Δp": ("mean_dp", 100),
         "RMS Δp    ": ("rms_dp", 100), "Same top p": ("same_top", 100),
         "Mean PPL(Q)                   ": ("ppl_mod", 1), "Mean PPL(base)                ": ("ppl_base", 1)}


def wiki_test_raw(path: Path) -> str:
    """``wiki.test.raw`` rebuilt from the HF rows: one row per line of the file, blank lines (a
    single space in the raw file) stored as ``""`` by the HF builder, every other line ending in
    newline; llama.cpp's runs read this file as it is."""
    rows = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return "".join(r if r else " \n" for r in rows)


def run(cmd: list[str], log: Path) -> str:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    log.write_text(out)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}); see {log}")
    print(f"  {Path(cmd[0]).name} {' '.join(cmd[1:3])} … {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def gguf_files(work: Path) -> dict[str, Path]:
    return {"F32": work / "base-f32.gguf", **{t: work / f"{t.lower()}.gguf" for t in TYPES},
            **{f"{t}-f32": work / f"{t.lower()}-dequantised-f32.gguf" for t in TYPES}}


def make_ggufs(bins: Path, work: Path) -> dict[str, Path]:
    """The F32 base (the packaged Q4_1 file dequantised), the --pure re-quantisations, and each of
    those dequantised back to F32: the very weights prunelens computes with (transformers' GGUF
    loader dequantises to fp32), run by llama.cpp with its F32 kernels."""
    src, files = preset_gguf(PRESETS[DEFAULT_MODEL]), gguf_files(work)
    quantize = str(bins / "llama-quantize")
    if not files["F32"].exists():
        run([quantize, "--allow-requantize", str(src), str(files["F32"]), "F32"], work / "quantize-f32.log")
    for t in TYPES:
        if not files[t].exists():
            run([quantize, "--pure", str(files["F32"]), str(files[t]), t], work / f"quantize-{t}.log")
        if not files[f"{t}-f32"].exists():
            run([quantize, "--allow-requantize", str(files[t]), str(files[f"{t}-f32"]), "F32"],
                work / f"dequantize-{t}.log")
    return files


def parse_kld(out: str) -> dict[str, float]:
    """The statistics block ``llama-perplexity --kl-divergence`` prints at the end."""
    got = {}
    for label, (key, scale) in STATS.items():
        m = re.search(re.escape(label.rstrip()) + r"\s*:\s*(-?[\d.]+)", out)
        if m is None:
            raise SystemExit(f"llama-perplexity printed no '{label.strip()}'")
        got[key] = float(m.group(1)) / scale
    m = re.search(r"Mean    KLD:\s*[-\d.]+\s*±\s*([\d.]+)", out)
    got["mean_kld_se"] = float(m.group(1)) if m else float("nan")
    return got


def llamacpp_stage(bins: Path, work: Path, text: Path, chunks: int, threads: int) -> None:
    files = make_ggufs(bins, work)
    common = ["-f", str(text), "-c", "512", "--chunks", str(chunks), "-t", str(threads), "-ctk", "f32", "-ctv", "f32"]
    res: dict[str, Any] = {"chunks": chunks}
    out = run([str(bins / "llama-perplexity"), "-m", str(files["F32"]), *common, "--kl-divergence-base",
               str(work / "base.kld")], work / "ppl-base.log")
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    res["base_ppl"] = float(m.group(1)) if m else float("nan")
    for t in (*TYPES, *(f"{t}-f32" for t in TYPES)):
        out = run([str(bins / "llama-perplexity"), "-m", str(files[t]), *common, "--kl-divergence",
                   "--kl-divergence-base", str(work / "base.kld")], work / f"kld-{t}.log")
        res[t] = parse_kld(out)
    (work / "llamacpp.json").write_text(json.dumps(res, indent=1))


def kld_tokens(path: Path) -> np.ndarray:
    """The token ids llama.cpp evaluated, from its base-logits file's header: ``_logits_``, n_ctx,
    n_vocab, n_chunk, then n_chunk × n_ctx int32 ids."""
    with path.open("rb") as f:
        assert f.read(8) == b"_logits_"
        n_ctx, _, n_chunk = struct.unpack("<Iii", f.read(12))
        return np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32).reshape(n_chunk, n_ctx)


def prunelens_stage(work: Path, text: Path, chunks: int, types: list[str]) -> None:
    torch.set_num_threads(2)
    corpus = text.read_text(encoding="utf-8")
    if not (work / "base.kld").exists():
        raise SystemExit("run --stage llamacpp first (it makes the GGUF files and llama.cpp's token ids)")
    files = gguf_files(work)
    base = load_model(str(files["F32"]))
    path = work / "prunelens.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    windows, _, _ = scored_windows(base, corpus, 512, chunks, "second-half")
    ref = kld_tokens(work / "base.kld")
    same = float((windows.numpy() == ref[: len(windows)]).mean())
    res["token_agreement"] = same
    print(f"  token ids identical to llama.cpp's at {same:.4%} of {windows.numel()} positions", flush=True)
    for t in types:
        t0 = time.perf_counter()
        cand = load_candidate(str(files[t]), base, align=False)  # reads through the base's tokenizer
        k = kl_statistics(base, corpus, candidate=cand.lm, seq_len=512, max_windows=chunks, progress=False,
                          positions="second-half")
        res[t] = {**k, "wall_s": time.perf_counter() - t0}
        print(f"  prunelens {t}: mean KLD {k['mean_kld']:.6f}, {time.perf_counter() - t0:.0f} s", flush=True)
        del cand
    path.write_text(json.dumps(res, indent=1))


ROWS = (("PPL(base)", "ppl_base", "{:.4f}"), ("PPL(Q)", "ppl_mod", "{:.4f}"), ("Mean KLD", "mean_kld", "{:.6f}"),
        ("Median KLD", "kld_p50", "{:.6f}"), ("90% KLD", "kld_p90", "{:.6f}"), ("99% KLD", "kld_p99", "{:.6f}"),
        ("99.9% KLD", "kld_p99.9", "{:.6f}"), ("Max KLD", "max_kld", "{:.4f}"),
        ("Same top p", "same_top", "{:.4%}"), ("RMS Δp", "rms_dp", "{:.4%}"), ("Mean Δp", "mean_dp", "{:+.4%}"))


def report(work: Path) -> str:
    """Per type: llama.cpp with its quantised kernels, llama.cpp on the same weights dequantised to
    F32 (what prunelens computes), prunelens, and prunelens ÷ each."""
    lc, pl = json.loads((work / "llamacpp.json").read_text()), json.loads((work / "prunelens.json").read_text())
    lines = [f"llama.cpp base run (exact logits): PPL {lc['base_ppl']:.4f} over {lc['chunks']} chunks of 512 "
             f"(second half of each); token ids identical to prunelens's at {pl['token_agreement']:.4%} of positions",
             ""]
    for t in TYPES:
        if t not in pl or t not in lc:
            continue
        p, q, d = pl[t], lc[t], lc.get(f"{t}-f32", {})
        lines += [f"{t}: {int(p['positions'])} positions; mean KLD s.e.: llama.cpp {q['mean_kld_se']:.6f}, "
                  f"prunelens {p['mean_kld_se']:.6f}",
                  f"| statistic | llama.cpp, {t} kernels | llama.cpp, {t} weights in F32 | prunelens | "
                  "prunelens ÷ llama.cpp kernels | prunelens ÷ llama.cpp F32 |", "|---|---|---|---|---|---|"]
        for name, key, f in ROWS:
            a, b, c = q[key], d.get(key, float("nan")), p[key]
            lines.append(f"| {name} | {f.format(a)} | {f.format(b)} | {f.format(c)} | "
                         f"{c / a if a else float('nan'):.4f} | {c / b if b else float('nan'):.4f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["llamacpp", "prunelens", "report", "all"], default="all")
    ap.add_argument("--bin", type=Path, default=Path.home() / ".cache" / "llama-cpp-ref" / "build" / "bin")
    ap.add_argument("--work", type=Path, default=cache_dir() / "llamacpp-kld")
    ap.add_argument("--chunks", type=int, default=12, help="chunks (windows) of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    text = args.work / "wiki.test.raw"
    if not text.exists():
        text.write_text(wiki_test_raw(shared_data_dir() / "wikitext2_raw_test.jsonl"), encoding="utf-8")
    if args.stage in ("llamacpp", "all"):
        llamacpp_stage(args.bin, args.work, text, args.chunks, args.threads)
    if args.stage in ("prunelens", "all"):
        prunelens_stage(args.work, text, args.chunks, [t for t in args.types.split(",") if t])
    if args.stage in ("report", "all"):
        print(report(args.work))


if __name__ == "__main__":
    main()
