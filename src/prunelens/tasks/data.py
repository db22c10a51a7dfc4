"""Task data helpers: checked JSONL rows, seeded question samples and the standard error of a mean.
(A dataset's file names live on its ``Source``, in the task module that reads it.)"""

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
