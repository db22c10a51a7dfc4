"""What a task config may hold, and what reading one may cost: the one place its fields are checked.

``SCHEMA`` maps every key to the check of its value; ``tasks.config_file`` runs it over the whole
file when it is read (before any model loads), so a malformed field is one line naming the file,
the field and the problem — never a traceback after the generation is done. Each check returns the
value in its one normal form (``until: 'Answer'`` is one stop string, as in lm-eval; an ``extract``
text is ``{regex: text}``), so the code that scores a config never meets another shape.

Reading is bounded too: YAML aliases may not expand the document past ``MAX_NODES`` nodes (the
"billion laughs"), and templates run in Jinja's sandbox with ``**`` and ``*`` refused past
``MAX_INT_BITS`` bits or ``MAX_LENGTH`` items, every size one operation is asked for (a width, a
count, a format's width) at most ``MAX_LENGTH``, and every render cut at ``RENDER_SECONDS``.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

MAX_NODES = 10_000  # YAML nodes after alias expansion; a real config has a few dozen
MAX_BYTES = 1 << 20  # a task config's file size
MAX_INT_BITS = 4096  # an integer a template's ** or * may make
MAX_LENGTH = 1_000_000  # a text or list a template's * may make
RENDER_SECONDS = 2.0  # one template rendered on one row

Check = Callable[[Any], Any]  # returns the value's normal form or raises ValueError(problem)


def _got(v: Any) -> str:
    r = repr(v)
    return f", got {r if len(r) <= 60 else r[:57] + '...'}"


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a text{_got(v)}")
    return v


def _whole(lo: int) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"must be a whole number >= {lo}{_got(v)}")
        return v
    return check


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false{_got(v)}")
    return v


def _one_of(*names: str) -> Check:
    def check(v: Any) -> str:
        if v not in names:
            raise ValueError(f"must be one of {', '.join(names)}{_got(v)}")
        return v
    return check


def _scalar(v: Any) -> str | int | float:
    """A column name, a template, or a constant (bool refused: YAML reads an unquoted yes/no as one)."""
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError(f"must be a text or a number (quote yes/no/true/false){_got(v)}")
    return v


def _text_or_list(v: Any) -> str | list[Any]:
    """A column, a template, or a literal list of texts/numbers (each may be a template)."""
    if isinstance(v, list):
        return [_scalar(x) for x in v]
    if not isinstance(v, str):
        raise ValueError(f"must be a column, a template or a list{_got(v)}")
    return v


def _regex(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"regex must be a text (quote it){_got(v)}")
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"regex {v!r} is invalid ({e})") from None
    return v


def _regexes(v: Any) -> list[str]:
    """``ignore``: one regex or a list of them, each removed before an exact match."""
    return [_regex(x) for x in (v if isinstance(v, list) else [v])]


def _stops(v: Any) -> list[str]:
    """``until``: a list of stop strings; a single text is one stop string, as lm-eval reads it."""
    items = v if isinstance(v, list) else [v]
    if not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"must be a stop string or a list of non-empty stop strings{_got(v)}")
    return items


def _extract(v: Any) -> dict[str, Any]:
    """lm-eval's regex filter: a regex, or {regex, group, select}; the group must exist in the regex."""
    ex = {"regex": v} if isinstance(v, str) else v
    if not isinstance(ex, dict) or "regex" not in ex:
        raise ValueError(f"must be a regex or {{regex, group, select}}{_got(v)}")
    unknown = sorted(set(ex) - {"regex", "group", "select"})
    if unknown:
        raise ValueError(f"has an unknown key '{unknown[0]}' (keys: regex, group, select)")
    pattern = re.compile(_regex(ex["regex"]))
    g = ex.get("group", 1 if pattern.groups else 0)
    if isinstance(g, bool) or not (isinstance(g, int) and 0 <= g <= pattern.groups
                                   or isinstance(g, str) and g in pattern.groupindex):
        raise ValueError(f"group {g!r} is not a group of regex {ex['regex']!r} (it has {pattern.groups})")
    try:
        _one_of("first", "last")(ex.get("select", "first"))
    except ValueError as e:
        raise ValueError(f"select {e}") from None
    return {**ex, "group": g}


def _dataset(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not v.get("path"):
        raise ValueError("needs at least a 'path' (and a 'split')")
    unknown = sorted(set(v) - {"path", "name", "split"})
    if unknown:
        raise ValueError(f"has an unknown key '{unknown[0]}' (keys: path, name, split)")
    for k in v:
        if v[k] is not None and not isinstance(v[k], str):
            raise ValueError(f"{k} must be a text{_got(v[k])}")
    return v


def _files(v: Any) -> list[str]:
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(f, str) and f for f in items):
        raise ValueError(f"must name a file, a list of files or {{split: file}}{_got(v)}")
    return items


def _data_files(v: Any) -> dict[str, list[str]]:
    """Local files: one, a list, or {split: file(s)}; normal form {split: [file, ...]}."""
    if isinstance(v, dict):
        if not v or not all(isinstance(k, str) for k in v):
            raise ValueError(f"must map split names to files{_got(v)}")
        return {k: _files(f) for k, f in v.items()}
    return {"train": _files(v)}


def _task_name(v: Any) -> str:
    if not isinstance(v, str | int) or isinstance(v, bool) or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(v)):
        raise ValueError(f"may hold only letters, digits, '_', '.', '-'{_got(v)}")
    return str(v)


SCHEMA: dict[str, Check] = {
    "task": _task_name, "kind": _text, "description": _text, "dataset": _dataset, "data_files": _data_files,
    "split": _text, "fewshot_split": _text, "num_fewshot": _whole(0), "fewshot_delimiter": _text,
    "prompt": _text, "question": _text, "choices": _text_or_list, "answer": _scalar, "labels": _text_or_list,
    "target_delimiter": _text, "target": _scalar, "fewshot_target": _scalar, "until": _stops,
    "max_new_tokens": _whole(1), "extract": _extract, "match": _one_of("exact", "numeric"), "ignore_case": _flag,
    "ignore": _regexes, "chat_template": _flag, "tests": _text_or_list, "setup": _text, "entry_point": _text,
}


def check_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Every field in its normal form; ValueError("KEY PROBLEM") for the first one that is malformed."""
    out = {}
    for key, value in raw.items():
        try:
            out[key] = SCHEMA[key](value)
        except ValueError as e:
            raise ValueError(f"{key} {e}") from None
    return out


# --- bounded YAML --------------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a document whose aliases expand past ``MAX_NODES`` nodes
    (or hold themselves) before constructing a single object."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_nodes(node, {}, set())
        return super().construct_document(node)


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise ValueError("an alias in it refers to a node that contains the alias")
    open_.add(id(node))
    children = ([n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    n = 1 + sum(_expanded_nodes(c, memo, open_) for c in children)
    if n > MAX_NODES:
        raise ValueError(f"its aliases expand it to over {MAX_NODES} nodes")
    open_.discard(id(node))
    memo[id(node)] = n
    return n


def load_yaml(text: str) -> Any:
    """The document, or ValueError / yaml.YAMLError naming why not."""
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise ValueError(f"it is larger than {MAX_BYTES >> 20} MiB")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: no Python objects
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


# --- bounded templates ---------------------------------------------------------------------------


class TemplateLimit(Exception):
    """A template asked for more than a config may cost (a huge number or text, or too much time)."""


def _check_binop(op: str, left: Any, right: Any) -> None:
    ints = all(isinstance(x, int) for x in (left, right))
    if op == "**" and ints and right > 0 and abs(left) > 1 and right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
        raise TemplateLimit(f"{left} ** {right} is over {MAX_INT_BITS} bits")
    if op == "*" and ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise TemplateLimit(f"a product over {MAX_INT_BITS} bits")
    if op == "%" and isinstance(left, str):
        _check_size(left)
        for v in right if isinstance(right, tuple) else (right,):  # a "*" width comes from the arguments
            _check_size(v if "*" in left and not isinstance(v, str) else 0)
    if op == "*" and not ints:
        seq, k = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(k, int) and isinstance(seq, str | list | tuple) and len(seq) * k > MAX_LENGTH:
            raise TemplateLimit(f"a text or list of {len(seq) * k} items (at most {MAX_LENGTH})")


# a width or precision in a %-format or a str.format field ("%0999999999d", "{:999999999}")
_WIDTH = re.compile(r"(?:%[-#0 +]*|\{[^{}]*:[^{}\d]*)(\d+)(?:\.(\d+))?")
_SIZE_FILTERS = frozenset({"center", "indent", "truncate", "wordwrap", "batch", "slice", "format"})
_SIZE_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _check_size(v: Any) -> None:
    """A size a template asks of one operation (a width, a count, a format width) is at most MAX_LENGTH."""
    if isinstance(v, str):
        for m in _WIDTH.finditer(v):
            _check_size(max(int(g) for g in m.groups() if g))
    elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_LENGTH:
        raise TemplateLimit(f"a size of {v} (at most {MAX_LENGTH})")


def _sized(f: Any) -> Any:
    """A filter whose size arguments are checked: the numbers after the value, or for ``format`` the
    format's widths (and the numbers a ``*`` width takes)."""
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0
    is_format = f.__name__ == "do_format"

    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        value, rest = args[skip], (*args[skip + 1:], *kwargs.values())
        if is_format:
            _check_size(str(value))
        for v in rest if not is_format or "*" in str(value) else ():
            _check_size(0 if isinstance(v, str) else v)
        return f(*args, **kwargs)
    return checked


@functools.cache
def template_env() -> Any:
    """Jinja's immutable sandbox, undefined names refused, and every size a template asks bounded:
    ``**`` and ``*``, %-formats and str.format widths, size-taking filters and string methods."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"**", "*", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(__obj, "__name__", "") in _SIZE_METHODS:
                for v in (*args, *kwargs.values()):
                    _check_size(v if not isinstance(v, str) else 0)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Any:
            if isinstance(getattr(value, "__self__", None), str):
                _check_size(value.__self__)
            return super().wrap_str_format(value)

    env = Bounded(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters.update({k: _sized(env.filters[k]) for k in _SIZE_FILTERS})
    return env


def render_bounded(template: Any, row: dict[str, Any], seconds: float = RENDER_SECONDS) -> str:
    """``template.render(**row)`` cut at ``seconds``: a local trace on the template's own frames
    checks the clock at every line it runs, so loops are bounded too (restoring any tracer after)."""
    deadline = time.monotonic() + seconds

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateLimit(f"rendering took over {seconds:g} s")
        return tracer if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return template.render(**row)
    finally:
        sys.settrace(previous)
