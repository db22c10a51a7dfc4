"""A user's own task as a short YAML file, in the spirit of lm-evaluation-harness's task YAML.

``prunelens eval --tasks my_task.yaml`` (and ``sweep``, ``paired`` for multiple-choice configs,
``advise --prompts``) reads it; ``config_task`` makes it a ``Task`` like the built-in ones, scored by
the built-in machinery of its kind: multiple-choice items through ``tasks.mcq``, generation with
regex extraction and exact or numeric match, code run in the sandbox as ``tasks.code`` runs it.
Reading and checking the file and its data is ``tasks.config_file``; docs/tasks.md has the
reference and worked examples.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from prunelens.model.generation import generate
from prunelens.model.loading import LoadedModel
from prunelens.model.tokens import render
from prunelens.tasks.base import GENERATIVE, MULTIPLE_CHOICE, Task, TaskOptions, TaskScore, limit_for
from prunelens.tasks.code import (
    INSTRUCTION,
    RAW_STOP_HUMANEVAL,
    closed_block,
    humaneval_program,
    mbpp_program,
    score_programs,
)
from prunelens.tasks.code import item_hits as code_hits
from prunelens.tasks.config_file import TaskConfig, load_config
from prunelens.tasks.data import sample_indices, stderr_of_mean
from prunelens.tasks.gsm8k import normalise
from prunelens.tasks.mcq import Item, evaluate_items
from prunelens.tasks.mcq import item_hits as mcq_hits

__all__ = ["TaskConfig", "answer_is_right", "config_task", "evaluate_config", "extract_answer", "generate_turns",
           "load_config", "matches"]

Chosen = list[tuple[int, dict[str, Any]]]  # (row index, row) of the sampled questions


def _mcq_items(cfg: TaskConfig) -> list[Item]:
    shots, rows = cfg.data
    delim = cfg.raw.get("target_delimiter", " ")
    sep = cfg.raw.get("fewshot_delimiter", "\n\n")
    head = "".join(f"{cfg.value('prompt', r, i)}{delim}{cfg.choices(r, i)[cfg.gold(r, i, cfg.choices(r, i))]}{sep}"
                   for i, r in enumerate(shots))
    items = []
    for i, r in enumerate(rows):
        ch = cfg.choices(r, i)
        ctx = head + cfg.value("prompt", r, i)
        items.append(Item(tuple(ctx for _ in ch), tuple(f"{delim}{c}" for c in ch), cfg.gold(r, i, ch)))
    return items


def extract_answer(text: str, extract: dict[str, Any] | None) -> str | None:
    """lm-eval's regex filter: the first (or last) match, its ``group`` (default 1 if the pattern has
    a group, else the whole match); None when nothing matches."""
    if not extract:
        return text
    ms = list(re.finditer(extract["regex"], text))
    if not ms:
        return None
    m = ms[0] if extract.get("select", "first") == "first" else ms[-1]
    g = extract.get("group", 1 if m.re.groups else 0)
    return m.group(g) or ""


def matches(pred: str | None, target: str, cfg: dict[str, Any]) -> bool:
    if pred is None:
        return False
    if cfg.get("match", "exact") == "numeric":
        a, b = normalise(pred.strip()), normalise(str(target).strip())
        return a is not None and b is not None and math.isclose(a, b)

    def norm(s: str) -> str:
        for pat in cfg.get("ignore") or ():
            s = re.sub(pat, "", s)
        s = s.strip()
        return s.lower() if cfg.get("ignore_case") else s

    return norm(pred) == norm(str(target))


def generate_turns(cfg: TaskConfig, row: dict[str, Any], index: int) -> list[dict[str, str]]:
    """The conversation a generate config asks one row in: its shots as solved turns, then the row."""
    key = "fewshot_target" if "fewshot_target" in cfg.raw else "target"
    turns: list[dict[str, str]] = []
    for i, r in enumerate(cfg.data[0]):
        turns += [{"role": "user", "content": cfg.value("prompt", r, i)},
                  {"role": "assistant", "content": str(cfg.value(key, r, i)).strip()}]
    return [*turns, {"role": "user", "content": cfg.value("prompt", row, index)}]


def answer_is_right(cfg: TaskConfig, row: dict[str, Any], index: int, text: str) -> bool:
    """A generate config's own scoring of one answer: its extraction, then its match with the target."""
    return matches(extract_answer(text, cfg.extract), str(cfg.value("target", row, index)).strip(), cfg.raw)


def _generate_prompts(lm: LoadedModel, cfg: TaskConfig, rows: Chosen, chat_template: bool) -> list[Any]:
    use_chat = chat_template and cfg.raw.get("chat_template", True)
    return [render(lm.tokenizer, generate_turns(cfg, r, i), use_chat) for i, r in rows]


def evaluate_config(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
                    modification: Any) -> TaskScore:
    """Score a config task; the result is a ``TaskScore`` like the built-in tasks'."""
    cfg: TaskConfig = task.config
    shots, rows = cfg.data
    limit = limit_for(task.kind, o)
    if cfg.kind == "multiple_choice":
        r = evaluate_items(lm, cfg.name, _mcq_items(cfg), limit, o.seed, modification, o.batch_size, o.progress)
        return TaskScore(cfg.name, task.kind, task.metric, r.acc, r.acc_stderr, r.n, r.to_dict())
    chosen = [(i, rows[i]) for i in sample_indices(len(rows), limit, o.seed)]
    new = o.new_tokens(task)
    if cfg.kind == "generate":
        return _evaluate_generate(lm, cfg, task, chosen, new, o, modification)
    return _evaluate_code(lm, cfg, task, chosen, new, o, modification)


def _evaluate_generate(lm: LoadedModel, cfg: TaskConfig, task: Task, chosen: Chosen, new: int, o: TaskOptions,
                       modification: Any) -> TaskScore:
    """Greedy answers, extracted and matched with the target (exact match, and how many had a match)."""
    prompts = _generate_prompts(lm, cfg, chosen, o.chat_template)
    outs = generate(lm, prompts, new, tuple(cfg.raw.get("until") or ()), modification, o.batch_size,
                    o.progress, cfg.name)
    hits, formatted, samples = [], [], []
    for (i, r), text in zip(chosen, outs, strict=True):
        target = str(cfg.value("target", r, i)).strip()
        pred = extract_answer(text, cfg.extract)
        hits.append(float(matches(pred, target, cfg.raw)))
        formatted.append(float(pred is not None))
        samples.append({"index": i, "target": target, "extracted": pred, "output": text, "hit": hits[-1]})
    n = len(hits)
    details = {"n": n, "exact_match": sum(hits) / n, "format_rate": sum(formatted) / n, "samples": samples}
    return TaskScore(cfg.name, GENERATIVE, task.metric, sum(hits) / n, stderr_of_mean(hits), n, details)


def _code_problems(cfg: TaskConfig, chosen: Chosen) -> list[dict[str, Any]]:
    """Each row as a HumanEval-style problem (with ``entry_point``) or an MBPP-style one."""
    problems = []
    for i, r in chosen:
        tests = cfg.value("tests", r, i)
        tests = list(map(str, tests)) if isinstance(tests, list) else [str(tests)]
        p = {"id": i, "prompt": str(cfg.value("prompt", r, i)), "test_list": tests,
             "test_setup_code": str(cfg.value("setup", r, i)) if "setup" in cfg.raw else ""}
        if "entry_point" in cfg.raw:
            p["entry_point"], p["test"] = str(cfg.value("entry_point", r, i)), "\n".join(tests)
        problems.append(p)
    return problems


def _evaluate_code(lm: LoadedModel, cfg: TaskConfig, task: Task, chosen: Chosen, new: int, o: TaskOptions,
                   modification: Any) -> TaskScore:
    problems = _code_problems(cfg, chosen)
    chat = o.chat_template and cfg.raw.get("chat_template", True) and bool(getattr(lm.tokenizer, "chat_template",
                                                                                   None))
    stub = "entry_point" in cfg.raw  # HumanEval style: the prompt is code the model completes
    if chat:
        text = (lambda p: f"Complete the following Python function. {INSTRUCTION}\n\n```python\n{p['prompt']}```"
                ) if stub else (lambda p: f"{p['prompt']}\n{INSTRUCTION}")
        prompts = [render(lm.tokenizer, [{"role": "user", "content": text(p)}]) for p in problems]
        outs = generate(lm, prompts, new, (), modification, o.batch_size, o.progress, cfg.name, until=closed_block)
    else:
        prompts = [lm.tokenizer(p["prompt"])["input_ids"] for p in problems]
        stop = tuple(cfg.raw.get("until") or (RAW_STOP_HUMANEVAL if stub else ("\n```", "[DONE]")))
        outs = generate(lm, prompts, new, stop, modification, o.batch_size, o.progress, cfg.name)
    programs = [humaneval_program(p, out, chat) if stub else mbpp_program(p, out, chat)
                for p, out in zip(problems, outs, strict=True)]
    c = score_programs(cfg.name, problems, outs, programs, None, o.progress, "id")
    return TaskScore(cfg.name, task.kind, task.metric, c.pass_at_1, c.stderr, c.n, c.to_dict())


def config_task(path: str | Path) -> Task:
    """The ``Task`` of a YAML task config (the registry's interface, so every command takes it)."""
    cfg = load_config(path)
    kind = MULTIPLE_CHOICE if cfg.kind == "multiple_choice" else GENERATIVE
    metric = {"multiple_choice": "acc", "generate": "exact_match", "code": "pass@1"}[cfg.kind]
    hits = {"multiple_choice": mcq_hits, "generate": _generate_hits, "code": code_hits}[cfg.kind]
    budget = int(cfg.raw.get("max_new_tokens", 256 if cfg.kind == "generate" else 512))  # generation only
    return Task(cfg.name, kind, metric, cfg.raw.get("description") or f"task config {Path(path).name}",
                evaluate_config, data=lambda data_dir: cfg.identity(), max_new_tokens=budget, config=cfg, hits=hits)


def _generate_hits(metric: str, details: dict[str, Any]) -> dict[Any, float] | None:
    """Per-question outcomes of a generate config's run (for ``eval``'s paired test), from its samples."""
    samples = details.get("samples")
    if not samples or not all("hit" in s for s in samples):
        return None
    return {s["index"]: float(s["hit"]) for s in samples}
