"""Make a GPTQ W4A16 checkpoint with llm-compressor (compressed-tensors format), offline, so that
prunelens can compare a compressed model made by another tool with its base.

Runs in its own venv (llm-compressor pins an older transformers than prunelens):

    python3.11 -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install -c constraints-cpu.txt llmcompressor   # 0.14.0.1, torch 2.13.0+cpu
    /work/venvs/llmc/bin/python benchmarks/clients/make_llmcompressor_gptq.py --model DIR --out DIR

Calibration text is shared/data's c4_calibration.jsonl (the C4 documents Wanda/SparseGPT-style
calibration uses); ``--random-tokens`` draws uniform token ids instead, for tiny random models whose
word-level vocabulary cannot tokenise English. The group size is 128 where every quantised Linear's
input width allows it, else the largest power of two that divides them all (SmolLM2: 576 -> 64).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import preset_name_to_scheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE = ["lm_head"]


def shared_data_dir() -> Path:
    """shared/data beside the checkout (prunelens.testing is not installed in this venv)."""
    env = os.environ.get("PRUNELENS_SHARED_DATA")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    raise SystemExit("shared/data not found; set PRUNELENS_SHARED_DATA")


def pick_group_size(model: torch.nn.Module, wanted: int) -> int:
    """The largest power of two <= ``wanted`` dividing the input width of every quantised Linear."""
    widths = {m.in_features for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in IGNORE}
    g = wanted
    while g > 1 and any(w % g for w in widths):
        g //= 2
    return g


def calibration_set(tok, n: int, seq_len: int, random_tokens: bool, seed: int) -> Dataset:
    """``n`` tokenised samples of at most ``seq_len`` tokens."""
    if random_tokens:
        g = torch.Generator().manual_seed(seed)
        lo = 3 if len(tok) > 3 else 0  # skip pad/bos/eos of the tiny word-level tokenizer
        ids = torch.randint(lo, len(tok), (n, seq_len), generator=g).tolist()
    else:
        path = shared_data_dir() / "c4_calibration.jsonl"
        texts = [json.loads(line)["text"] for line in path.open()]
        random.Random(seed).shuffle(texts)
        ids = [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts[:n]]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="base model: a Hugging Face directory")
    ap.add_argument("--out", required=True, help="output directory (compressed-tensors checkpoint)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128, help="upper bound; lowered to divide the dims")
    ap.add_argument("--random-tokens", action="store_true", help="uniform random token ids as calibration")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    group = pick_group_size(model, args.group_size)
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = group
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=IGNORE)
    data = calibration_set(tok, args.samples, args.seq_len, args.random_tokens, args.seed)

    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(data),
            max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(json.dumps({"out": args.out, "group_size": group, "samples": len(data), "seq_len": args.seq_len,
                      "calibration": "random-tokens" if args.random_tokens else "c4_calibration.jsonl",
                      "oneshot_seconds": round(seconds, 1), "bytes": size}))


if __name__ == "__main__":
    main()
