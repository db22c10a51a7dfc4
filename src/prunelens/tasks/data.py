"""Task data: the one table of data file names, checked JSONL rows, seeded question samples and the
standard error of a mean."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunelens.data import iter_jsonl
from prunelens.errors import PrunelensError


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Rows of a JSONL(.gz) file, each checked for the required fields; errors name file and line."""
    if not path.is_file():
        raise PrunelensError(f"data file '{path}' does not exist")
    rows = []
    for n, row in iter_jsonl(path):
        for key, typ in required.items():
            if not isinstance(row.get(key), typ):
                raise PrunelensError(f"{path}:{n}: field '{key}' missing or not {type_names(typ)}")
        rows.append(row)
    if not rows:
        raise PrunelensError(f"data file '{path}' has no rows")
    return rows


def type_names(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded sample of ``limit`` of them in their original order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise PrunelensError(f"--limit must be at least 1, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


def stderr_of_mean(x: Sequence[float]) -> float:
    """Sample standard deviation / √n (nan for fewer than 2 values)."""
    n = len(x)
    if n < 2:
        return float("nan")
    m = sum(x) / n
    return math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1) / n)


# Every task's data file names, first found wins (the shared data directory's names first).
DATA_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc_easy_test.jsonl",),
    "arc_challenge": ("arc_challenge_test.jsonl",),
    "piqa": ("piqa_validation.jsonl",),
    "boolq": ("boolq_validation.jsonl",),
    "winogrande": ("winogrande_dev.jsonl",),
    "hellaswag": ("hellaswag_validation.jsonl", "hellaswag_val.jsonl"),
    "mmlu": ("mmlu_test.jsonl.gz", "mmlu_test.jsonl"),
    "mmlu_dev": ("mmlu_dev.jsonl",),
    "gsm8k": ("gsm8k_test.jsonl",),
    "mbpp": ("mbpp.jsonl",),
    "mbpp_sanitized": ("mbpp_sanitized.jsonl",),
    "humaneval": ("HumanEval.jsonl.gz", "HumanEval.jsonl", "humaneval.jsonl"),
    "wikitext": ("wikitext2_raw_test.jsonl",),
}


def find_data_file(key: str, data_dir: str | Path | None) -> Path | None:
    """The first of ``DATA_FILES[key]`` present in ``data_dir`` (None when none is)."""
    if data_dir is None:
        return None
    return next((Path(data_dir) / n for n in DATA_FILES[key] if (Path(data_dir) / n).is_file()), None)


def data_file(key: str, data_dir: str | Path | None, task: str | None = None) -> Path:
    """Like ``find_data_file``, with a one-line error naming the missing file."""
    path = find_data_file(key, data_dir)
    if path is None:
        who = task or f"task '{key}'"
        raise PrunelensError(f"{who} needs {' or '.join(DATA_FILES[key])} in {data_dir}, which is absent")
    return path
