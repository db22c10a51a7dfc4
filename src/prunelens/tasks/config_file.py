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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunelens.errors import PrunelensError
from prunelens.model.loading import file_sha256
from prunelens.tasks.config_schema import TemplateLimit, check_fields, load_yaml, render_bounded, template_env
from prunelens.tasks.sources import HubSplit, Rows, load_hub_split, rows_hash

KINDS = ("multiple_choice", "generate", "code")
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


def is_task_config(name: str | Path | None) -> bool:
    """Whether a task name or prompts path names a YAML task config (by its suffix)."""
    return bool(name) and str(name).lower().endswith((".yaml", ".yml"))


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
        """Check the whole file at once (``config_schema.SCHEMA``); ``raw`` keeps each field's normal form."""
        r = self.raw
        where = f"task config '{self.path}'"
        self.where = where
        if r.get("kind") not in KINDS:
            raise PrunelensError(f"{where}: kind must be one of {', '.join(KINDS)}, got {r.get('kind')!r}")
        self.kind = r["kind"]
        unknown = sorted(set(r) - _KEYS[self.kind], key=str)
        if unknown:
            raise PrunelensError(f"{where}: unknown key '{unknown[0]}' for kind {self.kind} (keys: "
                                 f"{', '.join(sorted(_KEYS[self.kind]))})")
        for k in _REQUIRED[self.kind]:
            if r.get(k) in (None, ""):
                raise PrunelensError(f"{where}: '{k}' is required for kind {self.kind}")
        if ("dataset" in r) == ("data_files" in r):
            raise PrunelensError(f"{where}: give either 'dataset' (a Hub dataset) or 'data_files' (local files)")
        try:
            self.raw = r = check_fields(r)
        except ValueError as e:
            raise PrunelensError(f"{where}: {e}") from None
        self.name = str(r.get("task") or self.path.stem)
        self.num_fewshot = r.get("num_fewshot", 0)
        self.extract = r.get("extract")
        self._compiled: dict[str, Any] = {}
        for key, spec in r.items():  # a template's syntax is checked here, before any data or model
            for j, s in enumerate(spec if isinstance(spec, list) else [spec]):
                if is_template(s):
                    self._template(f"{key}[{j}]" if isinstance(spec, list) else key, s)

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

    def _template(self, key: str, template: str) -> Any:
        """The compiled template of a field (compiled once, when the config is read)."""
        from jinja2 import TemplateError

        if key not in self._compiled:
            try:
                self._compiled[key] = template_env().from_string(template)
            except TemplateError as e:
                raise PrunelensError(f"{self.where}: {key}: template error ({e})") from None
        return self._compiled[key]

    def _render(self, key: str, template: str, row: dict[str, Any], i: int) -> Any:
        from jinja2 import TemplateError, UndefinedError

        try:
            out = render_bounded(self._template(key, template), row)
        except UndefinedError as e:
            raise PrunelensError(f"{self.where}: {key}: {e.message} (columns: {', '.join(row)})") from None
        except TemplateLimit as e:
            raise PrunelensError(f"{self.where}: {key}: row {i + 1}: template refused: {e}") from None
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


def _local_rows(cfg: Path, files: dict[str, list[str]], split: str | None, where: str) -> list[dict[str, Any]]:
    """Rows of local files through ``datasets`` (``files``: {split: [file, ...]}, as the schema leaves it)."""
    import datasets

    datasets.disable_progress_bars()
    split = split or "train"
    if split not in files:
        raise PrunelensError(f"{where}: split '{split}' is not among data_files' splits ({', '.join(files)})")
    paths = files[split]
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
    p = Path(path)
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PrunelensError(f"task config '{p}' is not valid YAML ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # past the bounds on what reading a config may cost
        raise PrunelensError(f"task config '{p}' is refused: {e}") from None
    if not isinstance(raw, dict):
        raise PrunelensError(f"task config '{p}' must be a mapping of keys to values")
    return TaskConfig(p, raw)


def load_config(path: str | Path) -> TaskConfig:
    p = Path(path)
    if not p.is_file():
        raise PrunelensError(f"task config '{p}' does not exist")
    return _load_config(str(p.resolve()), p.stat().st_mtime_ns)
