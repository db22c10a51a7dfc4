"""Prompt and calibration text: built-in samples and the user's files.

Files: ``.txt`` (prompts: one per non-empty line; calibration: the whole text) or ``.jsonl``
(one object per line; the first present of ``prompt``, ``text``, ``question`` is used).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from prunelens.errors import PrunelensError


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "A shop sells pencils at 3 for 45 cents. How much do 12 pencils cost? Explain step by step.",
    "What is the capital of Australia, and why was it chosen?",
    "Explain in two sentences why the sky is blue.",
    "List three tips for writing clear documentation.",
    "Translate into French: The library opens at nine in the morning.",
    "Write a haiku about autumn rain.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
)

# A small, varied English sample for importance scoring when no calibration file is given.
BUILTIN_CALIBRATION = """\
The river rose slowly through the night, and by morning the lower fields were under a sheet of \
brown water. Farmers moved their animals to the ridge behind the village, where the old church \
stood on a foundation of grey stone laid more than three centuries ago. Nobody in the village \
could remember a flood like it, although the parish records described one in 1740 that had \
carried away the mill and two of the bridges.

Photosynthesis converts light energy into chemical energy stored in sugars. In the first stage, \
light-dependent reactions in the thylakoid membranes split water molecules, releasing oxygen and \
producing ATP and NADPH. In the second stage, the Calvin cycle uses that ATP and NADPH to fix \
carbon dioxide into three-carbon molecules, which the plant assembles into glucose and starch.

To install the package, create a virtual environment, activate it, and run the installer with \
the name of the package. If the installation fails because a compiler is missing, install the \
build tools for your platform first. Configuration lives in a single file in your home \
directory; every option has a default, so an empty file is valid.

def merge_sorted(a, b):
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    return result + a[i:] + b[j:]

The committee met on Tuesday to review the budget for the coming year. Spending on maintenance \
had grown faster than expected, mostly because the heating system in the east wing needed \
repairs twice during the winter. After a long discussion, members agreed to postpone the new \
playground until the autumn and to ask the regional council for a grant.

A rectangle has a perimeter of 30 centimetres, and its length is twice its width. Let the width \
be w. Then the length is 2w, and the perimeter is 2(w + 2w) = 6w. Setting 6w = 30 gives w = 5, \
so the rectangle is 5 centimetres wide and 10 centimetres long, and its area is 50 square \
centimetres.

She opened the letter carefully, as if the paper might break. The handwriting was her \
grandmother's, small and slanted, with long tails on the letters g and y. It described a summer \
by the sea, a borrowed bicycle, and a friend named Marguerite who wanted to become a pilot at a \
time when almost no women flew.

Markets reacted calmly to the announcement. Analysts had expected the central bank to keep \
interest rates unchanged, and most of them now predict a small cut early next year if inflation \
continues to fall. Bond yields moved little, while shares of housing companies rose slightly on \
hopes of cheaper mortgages.
"""

_TEXT_KEYS = ("prompt", "text", "question")


def read_text_file(path: str | Path) -> str:
    """The whole text of a UTF-8 file (gunzipped for .gz), with one-line errors for a file that is
    not UTF-8, a .gz that is not gzip, or one that cannot be read."""
    p = Path(path)
    try:
        if p.suffix == ".gz":
            with gzip.open(p, "rt", encoding="utf-8") as f:
                return f.read()
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrunelensError(f"'{p}' is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise PrunelensError(f"'{p}' is not a valid gzip file ({e})") from None
    except OSError as e:
        raise PrunelensError(f"cannot read '{p}': {e.strerror or e}") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a .jsonl(.gz) file; malformed lines raise a
    one-line error naming the file and line."""
    # split on newlines only: str.splitlines would also split inside strings at U+2028, \x85, \x0c ...
    for n, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrunelensError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PrunelensError(f"{path}:{n}: expected a JSON object")
        yield n, obj


def read_texts(path: str | Path, what: str = "prompt") -> list[str]:
    """Texts from a .txt (one per non-empty line) or .jsonl(.gz) file; errors name file and line."""
    p = Path(path)
    if not p.is_file():
        raise PrunelensError(f"{what} file '{p}' does not exist")
    out: list[str] = []
    if ".jsonl" in p.name:
        for n, obj in iter_jsonl(p):
            key = next((k for k in _TEXT_KEYS if isinstance(obj.get(k), str)), None)
            if key is None:
                raise PrunelensError(f"{p}:{n}: no string field among {', '.join(_TEXT_KEYS)}")
            if obj[key].strip():
                out.append(obj[key])
    else:
        out = [line.rstrip("\r") for line in read_text_file(p).split("\n") if line.strip()]
    if not out:
        raise PrunelensError(f"{what} file '{p}' is empty")
    return out


def builtin_prompts() -> list[str]:
    return list(BUILTIN_PROMPTS)


def calibration_ids(
    tokenizer, path: str | Path | None = None, n_samples: int = 8, seq_len: int = 128, seed: int = 0
) -> torch.Tensor:
    """``n_samples`` token windows of ``seq_len`` drawn at seeded random offsets (Wanda-style).

    The texts are joined with blank lines; the windows may overlap when the text is short, but
    the text must hold at least one full window.
    """
    if n_samples < 1 or seq_len < 2:
        raise PrunelensError("calibration needs at least 1 sample of at least 2 tokens")
    text = "\n\n".join(read_texts(path, "calibration")) if path else BUILTIN_CALIBRATION
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if len(ids) < seq_len:
        src = path or "the built-in calibration sample"
        raise PrunelensError(
            f"calibration text {src} has {len(ids)} tokens, fewer than the requested length {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
