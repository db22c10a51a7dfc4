"""Where a task's rows come from: a local JSONL file, or the Hugging Face Hub through ``datasets``.

A dataset is one ``Source``, defined and registered (``register_source``) by the task module that
reads it: the local file names it may have in ``--data-dir`` (schemas in docs/tasks.md), the Hub
dataset, config and split that lm-evaluation-harness reads, the Hub columns the mapping needs, and
the mapping from a Hub row to the local schema. Both routes therefore hand the tasks identical rows,
and the tests check that on the same questions. ``SOURCES`` finds a source by name for callers that
have only the name (``load_rows("gsm8k", ...)``).

Order: a file in ``--data-dir`` wins; otherwise the Hub route, through ``datasets.load_dataset``
(cached in datasets' cache, so ``HF_DATASETS_OFFLINE=1`` works from a filled cache). An offline
mirror of Hub repositories can stand in for the Hub: ``PRUNELENS_DATASETS_DIR=DIR`` reads dataset
``owner/name`` from ``DIR/owner/name`` (the layout ``hf download --repo-type dataset owner/name
--local-dir DIR/owner/name`` writes), through the same ``load_dataset`` call.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import file_sha256
from prunelens.registry import Registry
from prunelens.tasks.data import read_jsonl, type_names

MIRROR_ENV = "PRUNELENS_DATASETS_DIR"


@dataclass(frozen=True)
class HubSplit:
    path: str
    name: str | None
    split: str

    def label(self) -> str:
        return f"{self.path}" + (f" ({self.name}, {self.split})" if self.name else f" ({self.split})")


@dataclass(frozen=True, eq=False)  # hashed by identity: the loaders below memoise per source
class Source:
    """One dataset: its local file names (first found wins), the schema every row is checked against
    on both routes, its Hub splits (concatenated in order), the Hub columns the mapping reads, and
    the mapping."""

    key: str
    files: tuple[str, ...]
    fields: dict[str, Any]
    hub: tuple[HubSplit, ...] = ()
    columns: tuple[str, ...] = ()
    convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    local_is_hub_schema: bool = False  # the local file keeps the Hub's columns (converted like Hub rows)
    fallback: Callable[[], Path] | None = None  # a packaged copy when the Hub cannot be reached

    def to_row(self, r: dict[str, Any]) -> dict[str, Any]:
        return self.convert(r) if self.convert else {k: r[k] for k in self.columns}

    def find(self, data_dir: str | Path | None) -> Path | None:
        """The first of ``files`` present in ``data_dir`` (None when none is)."""
        if data_dir is None:
            return None
        return next((Path(data_dir) / n for n in self.files if (Path(data_dir) / n).is_file()), None)

    def file(self, data_dir: str | Path | None, task: str | None = None) -> Path:
        """Like ``find``, with a one-line error naming the missing file."""
        path = self.find(data_dir)
        if path is None:
            who = task or f"task '{self.key}'"
            raise PrunelensError(f"{who} needs {' or '.join(self.files)} in {data_dir}, which is absent")
        return path


# Every module of the package is imported on first use and registers the sources it defines here.
SOURCES: Registry[Source] = Registry("data source", discover=("prunelens.tasks",))


def register_source(source: Source) -> Source:
    """Make a source findable by name (called by the task module that defines it)."""
    SOURCES.register(source.key, source)
    return source


@dataclass(frozen=True)
class Rows:
    """Checked rows in the local schema, where they came from, and a content hash (for cell caches)."""

    rows: list[dict[str, Any]] = field(repr=False)
    origin: str
    identity: dict[str, str]


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


# the loggers a Hub download warns on while it retries (a dozen lines before prunelens's one-line error)
_HUB_LOGGERS = ("huggingface_hub", "datasets", "fsspec", "urllib3", "httpx", "filelock")


@contextlib.contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """Only errors from the Hub client and ``datasets`` while a split loads: a retry's warning says
    nothing the one-line outcome does not, and an unreachable dataset is reported once, by prunelens."""
    loggers = [logging.getLogger(n) for n in _HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
        with quiet_hub_logs():
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
    if not rows:
        raise PrunelensError(f"{origin} has no rows")
    for i, row in enumerate(rows):
        for key, typ in fields.items():
            if not isinstance(row.get(key), typ):
                raise PrunelensError(f"{origin}: row {i + 1}: field '{key}' missing or not {type_names(typ)}")
    return rows


@functools.lru_cache(maxsize=32)
def _load_local(s: Source, path_s: str, stamp: tuple[int, int]) -> Rows:
    path = Path(path_s)
    if s.local_is_hub_schema:
        rows = check_rows(_convert(s, read_jsonl(path, {}), path_s), s.fields, path_s)
    else:
        rows = read_jsonl(path, s.fields)
    return Rows(rows, path_s, {path.name: file_sha256(path)})


@functools.lru_cache(maxsize=32)
def _load_hub(s: Source, data_dir: str | None, mirror: str | None) -> Rows:
    key = s.key
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
        return _load_local(s, str(path), stamp(path))
    origin = " + ".join(h.label() for h in s.hub)
    rows = check_rows(_convert(s, raw_rows, origin), s.fields, origin)
    return Rows(rows, origin, {origin: rows_hash(rows)})


def stamp(path: Path) -> tuple[int, int]:
    """(mtime, size): a memoised read is redone when its file changes."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def load_rows(source: Source | str, data_dir: str | Path | None) -> Rows:
    """A dataset's checked rows (``source``: the Source, or its name): the file in ``data_dir`` if
    there is one, else the Hub (memoised per process; callers must not modify the rows)."""
    s = SOURCES.get(source) if isinstance(source, str) else source
    if data_dir is not None and not Path(data_dir).is_dir():
        raise PrunelensError(f"data directory '{data_dir}' does not exist")
    path = s.find(data_dir)
    if path is not None:
        return _load_local(s, str(path), stamp(path))
    return _load_hub(s, None if data_dir is None else str(data_dir), os.environ.get(MIRROR_ENV))
