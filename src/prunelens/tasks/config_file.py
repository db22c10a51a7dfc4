"""A user's own task as a short YAML file, in the spirit of lm-evaluation-harness's task YAML.

``prunelens eval --tasks my_task.yaml`` (and ``sweep``, ``paired`` for multiple-choice configs,
``advise --prompts``) reads it. Three kinds:

- ``multiple_choice``: one step, options scored by log-likelihood (acc and acc_norm), no chat template;
- ``generate``: greedy generation (chat template for instruct models), an optional regex extraction,
  exact or numeric match with the target;
- ``code``: generation run against the row's tests in the sandbox (pass@1).

Data is a Hub dataset (``dataset: {path, name, split}``, a Hub id or a local snapshot directory)
or local files (``data_files``: .jsonl, .json, .csv or .parquet), both read by ``datasets``. Texts
are Jinja templates over a row's columns (``"Question: {{question}}\\nAnswer:"``); a value without
``{{`` names a column, dotted for nested ones (``choices.text``). docs/tasks.md has the reference
and worked examples.

This module reads and checks the file and its data (``load_config``, ``TaskConfig``);
``tasks.config`` evaluates it and makes it a ``Task``.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import file_sha256
from prunelens.tasks.sources import HubSplit, Rows, load_hub_split, rows_hash

KINDS = ("multiple_choice", "generate", "code")
MATCHES = ("exact", "numeric")
_COMMON = {"task", "kind", "description", "dataset", "data_files", "split", "fewshot_split", "num_fewshot",
           "prompt", "fewshot_delimiter"}
_KEYS = {
    "multiple_choice": _COMMON | {"question", "choices", "answer", "labels", "target_delimiter"},
    "generate": _COMMON | {"target", "fewshot_target", "until", "max_new_tokens", "extract", "match",
                           "ignore_case", "ignore", "chat_template"},
    "code": _COMMON | {"tests", "setup", "entry_point", "max_new_tokens", "chat_template"},
}
_REQUIRED = {"multiple_choice": ("prompt", "choices", "answer"), "generate": ("prompt", "target"),
             "code": ("prompt", "tests")}


def _env() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def is_template(v: Any) -> bool:
    return isinstance(v, str) and ("{{" in v or "{%" in v)


@dataclass
class TaskConfig:
    """A parsed, checked task config; ``rows`` loads its data (once per process)."""

    path: Path
    raw: dict[str, Any] = field(repr=False)
    name: str = ""
    kind: str = ""

    def __post_init__(self) -> None:
        r = self.raw
        where = f"task config '{self.path}'"
        self.where = where
        if r.get("kind") not in KINDS:
            raise PrunelensError(f"{where}: kind must be one of {', '.join(KINDS)}, got {r.get('kind')!r}")
        self.kind = r["kind"]
        unknown = sorted(set(r) - _KEYS[self.kind])
        if unknown:
            raise PrunelensError(f"{where}: unknown key '{unknown[0]}' for kind {self.kind} (keys: "
                                 f"{', '.join(sorted(_KEYS[self.kind]))})")
        for k in _REQUIRED[self.kind]:
            if r.get(k) in (None, ""):
                raise PrunelensError(f"{where}: '{k}' is required for kind {self.kind}")
        if ("dataset" in r) == ("data_files" in r):
            raise PrunelensError(f"{where}: give either 'dataset' (a Hub dataset) or 'data_files' (local files)")
        if "dataset" in r and not (isinstance(r["dataset"], dict) and r["dataset"].get("path")):
            raise PrunelensError(f"{where}: 'dataset' needs at least a 'path' (and a 'split')")
        self.name = str(r.get("task") or self.path.stem)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise PrunelensError(f"{where}: task name {self.name!r} may hold only letters, digits, '_', '.', '-'")
        self.num_fewshot = int(r.get("num_fewshot", 0))
        if self.num_fewshot < 0:
            raise PrunelensError(f"{where}: num_fewshot must be at least 0")
        if self.kind == "generate":
            self.extract = _generate_extract(r, where)
        self._compiled: dict[str, Any] = {}

    # --- data ------------------------------------------------------------------------------------

    def _split(self, fewshot: bool) -> list[dict[str, Any]]:
        r = self.raw
        if fewshot and not r.get("fewshot_split"):
            return []
        if "data_files" in r:
            return _local_rows(self.path, r["data_files"], r.get("fewshot_split") if fewshot else
                               r.get("split", "train"), self.where)
        d = r["dataset"]
        split = r["fewshot_split"] if fewshot else d.get("split") or r.get("split")
        if not split:
            raise PrunelensError(f"{self.where}: dataset needs a 'split'")
        local = (self.path.parent / d["path"])
        path = str(local) if local.is_dir() else d["path"]
        return load_hub_split(HubSplit(path, d.get("name"), split), who=self.where)

    @functools.cached_property
    def data(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(shots, rows to ask): the few-shot split, or the first ``num_fewshot`` rows, never asked."""
        rows = self._split(False)
        if not rows:
            raise PrunelensError(f"{self.where}: the dataset has no rows")
        shots = self._split(True)[:self.num_fewshot] if self.raw.get("fewshot_split") else rows[:self.num_fewshot]
        if not self.raw.get("fewshot_split"):
            rows = rows[self.num_fewshot:]
            if not rows:
                raise PrunelensError(f"{self.where}: num_fewshot {self.num_fewshot} leaves no rows to ask")
        for k in ("prompt", "choices", "answer", "target", "tests"):  # every field resolves on the first row
            if k in self.raw:
                self.value(k, rows[0], 0)
        return shots, rows

    def identity(self) -> dict[str, str]:
        shots, rows = self.data
        return {self.path.name: file_sha256(self.path), f"{self.name} data": rows_hash([*shots, *rows])}

    # --- fields ----------------------------------------------------------------------------------

    def value(self, key: str, row: dict[str, Any], i: int) -> Any:
        """A config field on one row: a template rendered, a column read, or a literal list."""
        spec = self.raw[key]
        if isinstance(spec, list):
            return [self._render(f"{key}[{j}]", s, row, i) if is_template(s) else s for j, s in enumerate(spec)]
        if is_template(spec):
            return self._render(key, spec, row, i)
        if key in ("prompt", "question", "target", "fewshot_target") and not _is_column(spec, row):
            return spec  # a constant text
        return _column(spec, row, f"{self.where}: {key}: row {i + 1}")

    def _render(self, key: str, template: str, row: dict[str, Any], i: int) -> Any:
        from jinja2 import TemplateError, UndefinedError

        try:
            t = self._compiled.get(key) or self._compiled.setdefault(key, _env().from_string(template))
            out = t.render(**row)
        except UndefinedError as e:
            raise PrunelensError(f"{self.where}: {key}: {e.message} (columns: {', '.join(row)})") from None
        except TemplateError as e:
            raise PrunelensError(f"{self.where}: {key}: template error ({e})") from None
        except Exception as e:  # an expression failing on this row's values
            raise PrunelensError(f"{self.where}: {key}: row {i + 1}: {type(e).__name__}: {e}") from None
        stripped = out.strip()
        if key in ("choices", "labels") and stripped.startswith("["):
            try:
                return list(ast.literal_eval(stripped))
            except (ValueError, SyntaxError):
                raise PrunelensError(f"{self.where}: {key}: row {i + 1}: {stripped[:80]!r} is not a list") from None
        return out

    def gold(self, row: dict[str, Any], i: int, choices: list[str]) -> int:
        ans = self.value("answer", row, i)
        labels = self.value("labels", row, i) if "labels" in self.raw else None
        where = f"{self.where}: row {i + 1}"
        if labels is not None:
            labels = [str(x) for x in labels]
            if str(ans).strip() not in labels:
                raise PrunelensError(f"{where}: answer {ans!r} is not among the labels {labels}")
            return labels.index(str(ans).strip())
        if isinstance(ans, bool) or not isinstance(ans, int | str):
            raise PrunelensError(f"{where}: answer {ans!r} is neither an index nor a choice")
        if isinstance(ans, str) and ans.strip() in choices:
            return choices.index(ans.strip())
        try:
            k = int(ans)
        except ValueError:
            raise PrunelensError(f"{where}: answer {ans!r} is neither an index nor one of the choices") from None
        if not 0 <= k < len(choices):
            raise PrunelensError(f"{where}: answer index {k} outside 0..{len(choices) - 1}")
        return k

    def choices(self, row: dict[str, Any], i: int) -> list[str]:
        ch = self.value("choices", row, i)
        if not isinstance(ch, list) or len(ch) < 2:
            raise PrunelensError(f"{self.where}: choices: row {i + 1}: needs a list of at least 2 options, got "
                                 f"{str(ch)[:80]!r}")
        return [str(c) for c in ch]

    def prompts(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[str]:
        """The zero-shot prompt of each row (``advise --prompts``)."""
        _, rows = self.data
        return [self.value("prompt", r, i) for i, r in enumerate(rows[:limit])]

    def question_rows(self, data_dir: str | Path | None = None) -> Rows:
        """Multiple-choice rows as (question, choices, answer), as ``paired`` reads them."""
        _, rows = self.data
        key = "question" if "question" in self.raw else "prompt"
        out = []
        for i, r in enumerate(rows):
            ch = self.choices(r, i)
            out.append({"question": str(self.value(key, r, i)), "choices": ch, "answer": self.gold(r, i, ch)})
        return Rows(out, str(self.path), self.identity())


def _generate_extract(r: dict[str, Any], where: str) -> dict[str, Any] | None:
    """A generate config's checked ``match`` and its ``extract`` as {regex, group?, select?} (or None)."""
    if r.get("match", "exact") not in MATCHES:
        raise PrunelensError(f"{where}: match must be one of {', '.join(MATCHES)}")
    ex = r.get("extract")
    if ex is None:
        return None
    ex = {"regex": ex} if isinstance(ex, str) else ex
    if not isinstance(ex, dict) or "regex" not in ex:
        raise PrunelensError(f"{where}: extract needs a 'regex' (and optionally group, select)")
    try:
        re.compile(ex["regex"])
    except re.error as e:
        raise PrunelensError(f"{where}: extract regex {ex['regex']!r} is invalid ({e})") from None
    if ex.get("select", "first") not in ("first", "last"):
        raise PrunelensError(f"{where}: extract select must be first or last")
    return ex


def _is_column(spec: Any, row: dict[str, Any]) -> bool:
    try:
        _column(spec, row, "")
        return True
    except PrunelensError:
        return False


def _column(spec: Any, row: dict[str, Any], where: str) -> Any:
    if not isinstance(spec, str):
        return spec
    v: Any = row
    for part in spec.split("."):
        if isinstance(v, dict) and part in v:
            v = v[part]
        elif isinstance(v, list) and part.isdigit() and int(part) < len(v):
            v = v[int(part)]
        else:
            cols = ", ".join(row)
            raise PrunelensError(f"{where}: no field '{spec}' in the data (columns: {cols})")
    return v


_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _local_rows(cfg: Path, files: Any, split: str | None, where: str) -> list[dict[str, Any]]:
    """Rows of local files through ``datasets`` (a list of files or a {split: file} mapping)."""
    import datasets

    datasets.disable_progress_bars()
    mapping = files if isinstance(files, dict) else {"train": files}
    split = split or "train"
    if split not in mapping:
        raise PrunelensError(f"{where}: split '{split}' is not among data_files' splits ({', '.join(mapping)})")
    paths = mapping[split] if isinstance(mapping[split], list) else [mapping[split]]
    resolved = []
    for p in paths:
        q = Path(p) if Path(p).is_absolute() else cfg.parent / p
        if not q.is_file():
            raise PrunelensError(f"{where}: data file '{q}' does not exist")
        resolved.append(q)
    fmts = {_FORMATS.get("".join(q.suffixes[-2:-1]) if q.suffix == ".gz" else q.suffix) for q in resolved}
    if None in fmts or len(fmts) != 1:
        raise PrunelensError(f"{where}: data files must all be one of {', '.join(_FORMATS)} (optionally .gz)")
    try:
        ds = datasets.load_dataset(fmts.pop(), data_files=[str(q) for q in resolved], split="train")
    except Exception as e:  # datasets' parse errors come as several exception types
        raise PrunelensError(f"{where}: cannot read {', '.join(map(str, resolved))} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return ds.to_list()


@functools.lru_cache(maxsize=16)
def _load_config(path: str, mtime_ns: int) -> TaskConfig:
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PrunelensError(f"task config '{p}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PrunelensError(f"task config '{p}' must be a mapping of keys to values")
    return TaskConfig(p, raw)


def load_config(path: str | Path) -> TaskConfig:
    p = Path(path)
    if not p.is_file():
        raise PrunelensError(f"task config '{p}' does not exist")
    return _load_config(str(p.resolve()), p.stat().st_mtime_ns)
