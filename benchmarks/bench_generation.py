"""Generation speed: prunelens's continuous-batching engine against the anchors users would pick.

On the same prompts, tokens and stop rules (GSM8K 5-shot chat prompts with the task's stop strings,
HumanEval raw-completion prompts with the Codex stop strings), fp32, greedy, one process:

(a) prunelens tokens/s ÷ HF ``model.generate`` one sequence at a time (stop strings through
    ``stop_strings``). Goal ≥ 6×.
(b) prunelens wall time ÷ lm-evaluation-harness's HF backend ``generate_until`` at the same batch
    size, with identical outputs. Goal ≤ 0.5×.
(c) continuous ÷ static engine (prunelens's previous fixed batches), same batch size.

Every engine's texts are compared with the continuous engine's (the stop-cut text); timings exclude
model loading; one untimed warm-up forward runs first. Needs lm-eval for (b) (``prunelens[lmeval]``;
left out with a note otherwise).

Run: python benchmarks/bench_generation.py --model qwen2.5-coder-1.5b --n 8 --batch-size 8
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from prunelens.testing import shared_data_dir

DATA = shared_data_dir()


def workload(lm: Any, n: int, data_dir: str | None, seed: int) -> list[dict[str, Any]]:
    """Prompt texts, their ids, stop strings and token limits, as the tasks build them."""
    from prunelens.tasks.code import RAW_STOP_HUMANEVAL, humaneval_problems
    from prunelens.tasks.data import sample_indices
    from prunelens.tasks.gsm8k import STOP, conversations_for

    out, tok = [], lm.tokenizer
    for turns in conversations_for(data_dir, n, seed, 5)[2]:  # the chat prompt evaluate_gsm8k renders
        text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        out.append({"task": "gsm8k", "text": text, "ids": tok(text, add_special_tokens=False)["input_ids"],
                    "stop": list(STOP), "max_new": 256})
    problems, _ = humaneval_problems(data_dir)
    for i in sample_indices(len(problems), n, seed):
        text = problems[i]["prompt"]
        out.append({"task": "humaneval", "text": text, "ids": lm.tokenizer(text)["input_ids"],
                    "stop": list(RAW_STOP_HUMANEVAL), "max_new": 512})
    return out


def run_prunelens(lm: Any, work: list[dict[str, Any]], batch: int, engine: str
                  ) -> tuple[list[str], list[int], dict[str, float]]:
    """Texts, new tokens per prompt and seconds per task: the lengths show the tail a batch
    cannot share (one long row decodes alone), the per-task walls where the time went."""
    from prunelens.model.generation import generate_full

    texts, lengths, walls = [""] * len(work), [0] * len(work), {}
    for task in ("gsm8k", "humaneval"):
        idx = [i for i, w in enumerate(work) if w["task"] == task]
        t0 = time.perf_counter()
        gens = generate_full(lm, [work[i]["ids"] for i in idx], work[idx[0]]["max_new"], work[idx[0]]["stop"],
                             None, batch, False, task, engine=engine)
        walls[task] = time.perf_counter() - t0
        for i, g in zip(idx, gens, strict=True):
            texts[i], lengths[i] = g.text, len(g.ids)
    return texts, lengths, walls


def run_hf(lm: Any, work: list[dict[str, Any]]) -> tuple[list[str], int, float]:
    from prunelens.model.generation import cut_at_stop

    tok, texts, tokens, t0 = lm.tokenizer, [], 0, time.perf_counter()
    eos = lm.model.generation_config.eos_token_id
    for w in work:
        ids = torch.tensor([w["ids"]])
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=w["max_new"],
                                do_sample=False, stop_strings=w["stop"], tokenizer=tok, eos_token_id=eos,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos)
        new = out[0, ids.shape[1]:].tolist()
        if new and new[-1] in ([eos] if isinstance(eos, int) else list(eos or [])):
            new = new[:-1]
        tokens += len(new)
        texts.append(cut_at_stop(tok.decode(new, skip_special_tokens=True), w["stop"]))
    return texts, tokens, time.perf_counter() - t0


def run_lmeval(lm: Any, work: list[dict[str, Any]], batch: int) -> tuple[list[str], float] | None:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch, max_length=4096)
    reqs = [Instance("generate_until", {}, (w["text"], {"until": w["stop"], "max_gen_toks": w["max_new"],
                                                        "do_sample": False}), i) for i, w in enumerate(work)]
    t0 = time.perf_counter()
    texts = hflm.generate_until(reqs, disable_tqdm=True)
    return texts, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--n", type=int, default=8, help="prompts per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=str(DATA) if DATA.is_dir() else None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated: hf, lmeval, static")
    ap.add_argument("--out", help="write the figures as JSON")
    a = ap.parse_args()
    from prunelens import load_model

    skip = set(filter(None, a.skip.split(",")))
    torch.set_num_threads(torch.get_num_threads())
    lm = load_model(a.model)
    work = workload(lm, a.n, a.data_dir, a.seed)
    with torch.inference_mode():
        lm.model(torch.tensor([work[0]["ids"][:16]]))  # warm-up
    res: dict[str, Any] = {"model": a.model, "n_prompts": len(work), "batch_size": a.batch_size,
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "machine": platform.processor() or platform.machine(),
                           "date": time.strftime("%Y-%m-%d")}
    ours, lengths, walls = run_prunelens(lm, work, a.batch_size, "continuous")
    tokens, t_ours = sum(lengths), sum(walls.values())
    res["continuous"] = {"tokens": tokens, "seconds": round(t_ours, 2), "tok_s": round(tokens / t_ours, 2),
                         "seconds_per_task": {k: round(v, 2) for k, v in walls.items()},
                         "new_tokens": {t: [n for n, w in zip(lengths, work, strict=True) if w["task"] == t]
                                        for t in walls},
                         "prompt_tokens": {t: [len(w["ids"]) for w in work if w["task"] == t] for t in walls}}
    print(f"prunelens continuous: {tokens} tokens in {t_ours:.1f} s = {tokens / t_ours:.2f} tok/s", flush=True)
    if "static" not in skip:
        st, st_lengths, st_walls = run_prunelens(lm, work, a.batch_size, "static")
        st_tokens, t_st = sum(st_lengths), sum(st_walls.values())
        res["static"] = {"tokens": st_tokens, "seconds": round(t_st, 2), "same_texts": st == ours,
                         "wall_ratio": round(t_ours / t_st, 3)}
        print(f"(c) static engine: {t_st:.1f} s; continuous ÷ static wall {t_ours / t_st:.3f}; "
              f"identical texts {sum(x == y for x, y in zip(st, ours, strict=True))}/{len(work)}", flush=True)
    if "lmeval" not in skip:
        got = run_lmeval(lm, work, a.batch_size)
        if got is None:
            print("(b) lm-eval is not installed: left out")
        else:
            texts, t_le = got
            same = sum(x == y for x, y in zip(texts, ours, strict=True))
            res["lmeval"] = {"seconds": round(t_le, 2), "same_texts": same, "wall_ratio": round(t_ours / t_le, 3)}
            print(f"(b) lm-eval generate_until: {t_le:.1f} s; prunelens ÷ lm-eval wall {t_ours / t_le:.3f} "
                  f"(goal ≤ 0.5); identical texts {same}/{len(work)}", flush=True)
    if "hf" not in skip:
        texts, hf_tokens, t_hf = run_hf(lm, work)
        same = sum(x == y for x, y in zip(texts, ours, strict=True))
        ratio = (tokens / t_ours) / (hf_tokens / t_hf)
        res["hf_one_at_a_time"] = {"tokens": hf_tokens, "seconds": round(t_hf, 2),
                                   "tok_s": round(hf_tokens / t_hf, 2), "same_texts": same,
                                   "tok_s_ratio": round(ratio, 3)}
        print(f"(a) HF generate one at a time: {hf_tokens} tokens in {t_hf:.1f} s = {hf_tokens / t_hf:.2f} tok/s; "
              f"prunelens ÷ HF tokens/s {ratio:.2f} (goal ≥ 6); identical texts {same}/{len(work)}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
