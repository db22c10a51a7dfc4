"""Where a task's rows come from: a local JSONL file, or the Hugging Face Hub through ``datasets``.

Every built-in dataset is one ``Source`` below: the local file names it may have in ``--data-dir``
(schemas in docs/tasks.md), the Hub dataset, config and split that lm-evaluation-harness reads, the
Hub columns the mapping needs, and the mapping from a Hub row to the local schema. Both routes
therefore hand the tasks identical rows, and the tests check that on the same questions.

Order: a file in ``--data-dir`` wins; otherwise the Hub route, through ``datasets.load_dataset``
(cached in datasets' cache, so ``HF_DATASETS_OFFLINE=1`` works from a filled cache). An offline
mirror of Hub repositories can stand in for the Hub: ``PRUNELENS_DATASETS_DIR=DIR`` reads dataset
``owner/name`` from ``DIR/owner/name`` (the layout ``hf download --repo-type dataset owner/name
--local-dir DIR/owner/name`` writes), through the same ``load_dataset`` call.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.tasks.data import DATA_FILES, find_data_file, read_jsonl

MIRROR_ENV = "PRUNELENS_DATASETS_DIR"
Fields = dict[str, "type | tuple[type, ...]"]


@dataclass(frozen=True)
class HubSplit:
    path: str
    name: str | None
    split: str

    def label(self) -> str:
        return f"{self.path}" + (f" ({self.name}, {self.split})" if self.name else f" ({self.split})")


@dataclass(frozen=True)
class Source:
    """One dataset: its local file names, its Hub splits (concatenated in order), the Hub columns the
    mapping reads, the mapping, and the schema every row is checked against on both routes."""

    key: str
    fields: dict[str, Any]
    hub: tuple[HubSplit, ...] = ()
    columns: tuple[str, ...] = ()
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    local_is_hub_schema: bool = False  # the local file keeps the Hub's columns (converted like Hub rows)
    fallback: Callable[[], Path] | None = None  # a packaged copy when the Hub cannot be reached

    @property
    def files(self) -> tuple[str, ...]:
        return DATA_FILES[self.key]

    def to_row(self, r: dict[str, Any]) -> dict[str, Any]:
        return self.convert(r) if self.convert else {k: r[k] for k in self.columns}


@dataclass(frozen=True)
class Rows:
    """Checked rows in the local schema, where they came from, and a content hash (for cell caches)."""

    rows: list[dict[str, Any]] = field(repr=False)
    origin: str
    identity: dict[str, str]


# --- mappings: Hub schema -> local schema ----------------------------------------------------------


def _arc(r: dict[str, Any]) -> dict[str, Any]:
    labels = list(r["choices"]["label"])
    if r["answerKey"] not in labels:
        raise ValueError(f"answerKey {r['answerKey']!r} is not among the labels {labels}")
    return {"id": r["id"], "question": r["question"], "choices": list(r["choices"]["text"]), "labels": labels,
            "answer": labels.index(r["answerKey"])}


def _piqa(r: dict[str, Any]) -> dict[str, Any]:
    return {"question": r["goal"], "choices": [r["sol1"], r["sol2"]], "answer": int(r["label"])}


def _boolq(r: dict[str, Any]) -> dict[str, Any]:
    # SuperGLUE's passage is "<title> -- <passage>"; the local schema keeps the two apart
    title, sep, passage = r["passage"].partition(" -- ")
    if not sep:
        title, passage = "", r["passage"]
    return {"idx": int(r["idx"]), "question": r["question"], "title": title, "passage": passage,
            "choices": ["no", "yes"], "answer": int(r["label"])}


def _winogrande(r: dict[str, Any]) -> dict[str, Any]:
    # lm-eval's partial scoring: each option fills the blank, the rest of the sentence is scored
    s = r["sentence"]
    i = s.index("_")
    return {"choices": [s[:i] + r["option1"], s[:i] + r["option2"]], "continuation": s[i + 1:].strip(),
            "answer": {"1": 0, "2": 1}[str(r["answer"])]}


def _gsm8k(r: dict[str, Any]) -> dict[str, Any]:
    if "####" not in r["answer"]:
        raise ValueError("answer has no '####' final line")
    target = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    return {"question": r["question"], "answer": r["answer"], "target": target}


def _mbpp_sanitized(r: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": int(r["task_id"]), "text": r["prompt"], "code": r["code"], "test_list": list(r["test_list"]),
            "test_setup_code": "\n".join(r.get("test_imports") or []), "challenge_test_list": []}


def _humaneval_package() -> Path:
    from prunelens.model.loading import packaged_file
    from prunelens.tasks.code import HUMANEVAL_PACKAGE

    return packaged_file(*HUMANEVAL_PACKAGE)


_ARC = {"question": str, "choices": list, "answer": int}
_MMLU = {"subject": str, "question": str, "choices": list, "answer": int}
_MBPP = {"task_id": int, "text": str, "code": str, "test_list": list}
_ARC_COLS = ("id", "question", "choices", "answerKey")
_MBPP_COLS = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")

SOURCES: dict[str, Source] = {s.key: s for s in (
    Source("arc_easy", _ARC, (HubSplit("allenai/ai2_arc", "ARC-Easy", "test"),), _ARC_COLS, _arc),
    Source("arc_challenge", _ARC, (HubSplit("allenai/ai2_arc", "ARC-Challenge", "test"),), _ARC_COLS, _arc),
    Source("piqa", _ARC, (HubSplit("baber/piqa", None, "validation"),), ("goal", "sol1", "sol2", "label"), _piqa),
    Source("boolq", {"question": str, "passage": str, "answer": int},
           (HubSplit("aps/super_glue", "boolq", "validation"),), ("question", "passage", "idx", "label"), _boolq),
    Source("winogrande", {"choices": list, "continuation": str, "answer": int},
           (HubSplit("allenai/winogrande", "winogrande_xl", "validation"),),
           ("sentence", "option1", "option2", "answer"), _winogrande),
    Source("hellaswag", {"ctx_a": str, "ctx_b": str, "activity_label": str, "endings": list, "label": (int, str)},
           (HubSplit("Rowan/hellaswag", None, "validation"),),
           ("ctx_a", "ctx_b", "activity_label", "endings", "label")),
    Source("mmlu", _MMLU, (HubSplit("cais/mmlu", "all", "test"),), ("subject", "question", "choices", "answer")),
    Source("mmlu_dev", _MMLU, (HubSplit("cais/mmlu", "all", "dev"),), ("subject", "question", "choices", "answer")),
    Source("gsm8k", {"question": str, "answer": str, "target": str}, (HubSplit("openai/gsm8k", "main", "test"),),
           ("question", "answer"), _gsm8k),
    Source("humaneval", {"task_id": str, "prompt": str, "entry_point": str, "test": str},
           (HubSplit("openai/openai_humaneval", None, "test"),), ("task_id", "prompt", "entry_point", "test"),
           fallback=_humaneval_package),
    # the few-shot split (task ids 1-10) and the test split (11-510), as in the local file's id ranges
    Source("mbpp", _MBPP, (HubSplit("google-research-datasets/mbpp", "full", "prompt"),
                           HubSplit("google-research-datasets/mbpp", "full", "test")), _MBPP_COLS),
    Source("mbpp_sanitized", _MBPP, (HubSplit("google-research-datasets/mbpp", "sanitized", "prompt"),
                                     HubSplit("google-research-datasets/mbpp", "sanitized", "test")),
           ("task_id", "prompt", "code", "test_list", "test_imports"), _mbpp_sanitized, local_is_hub_schema=True),
    Source("wikitext", {"text": str}, (HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),), ("text",)),
)}

# BEIR retrieval sets on the Hub (MTEB's parquet copies: corpus, queries and qrels as three configs)
BEIR_HUB: dict[str, str] = {"scifact": "mteb/scifact", "nfcorpus": "mteb/nfcorpus"}


# --- loading ---------------------------------------------------------------------------------------


def rows_hash(rows: list[dict[str, Any]]) -> str:
    """SHA-256 of the rows' canonical JSON: the same content hashes the same from any route."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _where(path: str) -> str:
    """A Hub id, or its snapshot under $PRUNELENS_DATASETS_DIR when one is there."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and (Path(mirror) / path).is_dir():
        return str(Path(mirror) / path)
    return path


class HubUnreachable(PrunelensError):
    """A Hub dataset that is neither reachable nor in the datasets cache."""

    def __init__(self, message: str, hub: HubSplit, reason: str) -> None:
        super().__init__(message)
        self.hub, self.reason = hub, reason


def load_hub_split(hub: HubSplit, columns: tuple[str, ...] = (), files: tuple[str, ...] | None = None,
                   who: str = "") -> list[dict[str, Any]]:
    """Rows of one Hub split through ``datasets.load_dataset``; one-line errors for an unreachable
    dataset, an unknown config or split, and a column the mapping needs but the dataset lacks."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    where = _where(hub.path)
    head = f"{who}: " if who else ""
    try:
        ds = datasets.load_dataset(where, hub.name, split=hub.split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        reason = str(e).split("\n")[0][:160]
        local = f"--data-dir DIR holding {' or '.join(files)}" if files else "local data files"
        raise HubUnreachable(f"{head}cannot load Hub dataset {hub.label()} ({reason}); offline with no cached "
                             f"copy? Use {local} (docs/tasks.md), or run once online to fill the datasets cache",
                             hub, reason) from None
    except datasets.exceptions.DatasetGenerationError as e:  # unreadable or inconsistent data files
        cause = e.__cause__ or e
        raise PrunelensError(f"{head}cannot read Hub dataset {hub.label()} ({type(cause).__name__}: "
                             f"{str(cause).splitlines()[0][:200] if str(cause) else ''})") from None
    except ValueError as e:  # unknown config or split
        raise PrunelensError(f"{head}Hub dataset {hub.label()}: {str(e).splitlines()[0][:300]}") from None
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise PrunelensError(f"{head}Hub dataset {hub.label()} has no column '{missing[0]}' (columns: "
                             f"{', '.join(ds.column_names)}); its schema changed, or pass --data-dir")
    return ds.to_list()


def _convert(source: Source, raw: list[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(raw):
        try:
            out.append(source.to_row(r))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise PrunelensError(f"{origin}: row {i + 1}: cannot map to the '{source.key}' schema ({e})") from None
    return out


def check_rows(rows: list[dict[str, Any]], fields: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    from prunelens.tasks.data import type_names

    if not rows:
        raise PrunelensError(f"{origin} has no rows")
    for i, row in enumerate(rows):
        for key, typ in fields.items():
            if not isinstance(row.get(key), typ):
                raise PrunelensError(f"{origin}: row {i + 1}: field '{key}' missing or not {type_names(typ)}")
    return rows


@functools.lru_cache(maxsize=32)
def _load_local(key: str, path_s: str, stamp: tuple[int, int]) -> Rows:
    from prunelens.model.loading import file_sha256

    s, path = SOURCES[key], Path(path_s)
    if s.local_is_hub_schema:
        rows = check_rows(_convert(s, read_jsonl(path, {}), path_s), s.fields, path_s)
    else:
        rows = read_jsonl(path, s.fields)
    return Rows(rows, path_s, {path.name: file_sha256(path)})


@functools.lru_cache(maxsize=32)
def _load_hub(key: str, data_dir: str | None, mirror: str | None) -> Rows:
    s = SOURCES[key]
    try:
        raw_rows: list[dict[str, Any]] = []
        for h in s.hub:
            raw_rows += load_hub_split(h, s.columns, s.files, f"task '{key}'")
    except HubUnreachable as e:
        if s.fallback is None:
            if data_dir is not None:
                raise PrunelensError(f"task '{key}' needs {' or '.join(s.files)} in {data_dir}, which is absent, "
                                     f"and Hub dataset {e.hub.label()} is out of reach ({e.reason})") from None
            raise
        path = s.fallback()
        print(f"{key}: the Hub is out of reach, using the packaged copy {path.name}", file=sys.stderr)
        return _load_local(key, str(path), stamp(path))
    origin = " + ".join(h.label() for h in s.hub)
    rows = check_rows(_convert(s, raw_rows, origin), s.fields, origin)
    return Rows(rows, origin, {origin: rows_hash(rows)})


def stamp(path: Path) -> tuple[int, int]:
    """(mtime, size): a memoised read is redone when its file changes."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def load_rows(key: str, data_dir: str | Path | None) -> Rows:
    """A dataset's checked rows: the file in ``data_dir`` if there is one, else the Hub (memoised per
    process; callers must not modify the rows)."""
    if key not in SOURCES:
        raise PrunelensError(f"no data source '{key}'; sources: {', '.join(SOURCES)}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise PrunelensError(f"data directory '{data_dir}' does not exist")
    path = find_data_file(key, data_dir)
    if path is not None:
        return _load_local(key, str(path), stamp(path))
    return _load_hub(key, None if data_dir is None else str(data_dir), os.environ.get(MIRROR_ENV))


def load_beir_hub(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], str]:
    """(corpus, queries, test qrels, origin) of a BEIR set from MTEB's Hub copy."""
    path = BEIR_HUB[name]
    who = f"task '{name}'"
    files = (f"{name}/corpus.jsonl, {name}/queries.jsonl and {name}/qrels.tsv",)
    corpus = load_hub_split(HubSplit(path, "corpus", "corpus"), ("_id", "text"), files, who)
    queries = load_hub_split(HubSplit(path, "queries", "queries"), ("_id", "text"), files, who)
    qrels = load_hub_split(HubSplit(path, "default", "test"), ("query-id", "corpus-id", "score"), files, who)
    return corpus, queries, qrels, f"{path} (corpus, queries, default/test)"
