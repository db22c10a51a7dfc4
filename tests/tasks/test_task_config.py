"""YAML task configs: parsing and one-line errors (no model), the three kinds against the built-in
tasks they re-express on the real default model, and every command that takes a task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prunelens.cli import main
from prunelens.tasks.config import extract_answer, load_config, matches
from prunelens.tasks.registry import TaskOptions, get_task, run_task
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SCIQ = [{"question": f"Q{i}?", "distractor1": "d1", "distractor2": "d2", "correct_answer": f"right{i}",
         "support": "s"} for i in range(6)]


def test_templates_columns_literal_lists_and_answers(tmp_path: Path) -> None:
    _rows(tmp_path / "sciq.jsonl", SCIQ)
    cfg = load_config(_write(tmp_path / "sciq.yaml", """
task: sciq_mini
kind: multiple_choice
data_files: sciq.jsonl
num_fewshot: 1
prompt: "{{support}}\\nQuestion: {{question}}\\nAnswer:"
choices: "{{[distractor1, distractor2, correct_answer]}}"
answer: "{{correct_answer}}"
"""))
    task = get_task(str(tmp_path / "sciq.yaml"))
    assert task.name == "sciq_mini" and task.kind == "multiple-choice" and task.config is cfg
    from prunelens.tasks.config import _mcq_items

    items = _mcq_items(cfg)
    assert len(items) == 5  # the first row is the shot, never asked
    assert items[0].contexts[0] == "s\nQuestion: Q0?\nAnswer: right0\n\ns\nQuestion: Q1?\nAnswer:"
    assert items[0].continuations == (" d1", " d2", " right1") and items[0].gold == 2
    assert cfg.question_rows().rows[0] == {"question": "s\nQuestion: Q1?\nAnswer:", "choices": ["d1", "d2", "right1"],
                                           "answer": 2}


def test_labels_dotted_columns_and_index_answers(tmp_path: Path) -> None:
    rows = [{"q": "x", "opts": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "key": "3", "k": 1}]
    _rows(tmp_path / "d.jsonl", rows)
    base = "kind: multiple_choice\ndata_files: d.jsonl\nprompt: '{{q}}'\nchoices: opts.text\n"
    cfg = load_config(_write(tmp_path / "a.yaml", base + "answer: key\nlabels: opts.label\n"))
    assert cfg.gold(rows[0], 0, cfg.choices(rows[0], 0)) == 2
    cfg = load_config(_write(tmp_path / "b.yaml", base + "answer: k\n"))
    assert cfg.gold(rows[0], 0, cfg.choices(rows[0], 0)) == 1
    cfg = load_config(_write(tmp_path / "c.yaml", base + "answer: key\nlabels: ['x', 'y', '3']\n"))
    assert cfg.gold(rows[0], 0, cfg.choices(rows[0], 0)) == 2


def test_regex_extraction_and_matching_follow_lm_eval() -> None:
    strict = {"regex": r"#### (\-?[0-9\.\,]+)"}
    assert extract_answer("so 3 + 4 = 7\n#### 7", strict) == "7"
    assert extract_answer("#### 1\n#### 2", {**strict, "select": "last"}) == "2"
    assert extract_answer("no answer", strict) is None
    assert extract_answer("The answer is (B).", {"regex": r"\(([A-D])\)"}) == "B"
    assert extract_answer("abc", {"regex": "b"}) == "b" and extract_answer("abc", None) == "abc"
    assert matches("1,234", "1234", {"match": "numeric"}) and not matches("1,235", "1234", {"match": "numeric"})
    assert matches(" Paris ", "paris", {"ignore_case": True}) and not matches("Paris", "paris", {})
    assert matches("$1,000.", "1000", {"ignore": [",", r"\$", r"\.$"]})
    assert not matches(None, "1", {})


GEN = "kind: generate\ndata_files: d.jsonl\nprompt: '{{q}}'\ntarget: a\n"


@pytest.mark.parametrize(("text", "message"), [
    ("kind: essay\ndata_files: d.jsonl\n", "kind must be one of multiple_choice, generate, code"),
    ("kind: generate\ndata_files: d.jsonl\nprompt: x\n", "'target' is required for kind generate"),
    ("kind: generate\ndata_files: d.jsonl\nprompt: x\ntarget: y\nchoices: z\n", "unknown key 'choices'"),
    ("kind: generate\nprompt: x\ntarget: y\n", "give either 'dataset'"),
    ("kind: generate\ndata_files: d.jsonl\nprompt: x\ntarget: y\nextract: '(['\n", "regex '(['"),
    ("kind: generate\ndata_files: nope.jsonl\nprompt: x\ntarget: y\n", "data file"),
    ("kind: multiple_choice\ndata_files: d.jsonl\nprompt: '{{q}}'\nchoices: options\nanswer: a\n",
     "no field 'options' in the data (columns: q, opts, a)"),
    ("kind: multiple_choice\ndata_files: d.jsonl\nprompt: '{{qestion}}'\nchoices: opts\nanswer: a\n",
     "'qestion' is undefined (columns: q, opts, a)"),
    ("kind: multiple_choice\ndata_files: d.jsonl\nprompt: '{{q}}'\nchoices: opts\nanswer: a\n", None),
    (": : :\n", "not valid YAML"),
    ("- a\n", "must be a mapping"),
    # every field is checked against config_schema.SCHEMA when the file is read (issue 42 §5)
    (GEN + "ignore: '(['\n", "ignore regex '([' is invalid"),
    (GEN + "ignore: [',', 5]\n", "ignore regex must be a text (quote it), got 5"),
    (GEN + "extract: {regex: 'a(b)', group: 2}\n", "extract group 2 is not a group of regex 'a(b)' (it has 1)"),
    (GEN + "extract: {regex: 'a(b)', group: name}\n", "extract group 'name' is not a group"),
    (GEN + "extract: {regex: 5}\n", "extract regex must be a text (quote it), got 5"),
    (GEN + "extract: 5\n", "extract must be a regex or {regex, group, select}, got 5"),
    (GEN + "extract: {regex: a, select: middle}\n", "select must be one of first, last, got 'middle'"),
    (GEN + "extract: {regex: a, flags: i}\n", "extract has an unknown key 'flags'"),
    (GEN + "num_fewshot: two\n", "num_fewshot must be a whole number >= 0, got 'two'"),
    (GEN + "num_fewshot: 1.5\n", "num_fewshot must be a whole number >= 0, got 1.5"),
    (GEN + "num_fewshot: -1\n", "num_fewshot must be a whole number >= 0, got -1"),
    (GEN + "max_new_tokens: lots\n", "max_new_tokens must be a whole number >= 1, got 'lots'"),
    (GEN + "max_new_tokens: 0\n", "max_new_tokens must be a whole number >= 1, got 0"),
    (GEN + "until: [Answer, 3]\n", "until must be a stop string or a list of non-empty stop strings"),
    (GEN + "until: ''\n", "until must be a stop string"),
    (GEN + "match: fuzzy\n", "match must be one of exact, numeric, got 'fuzzy'"),
    (GEN + "ignore_case: maybe\n", "ignore_case must be true or false, got 'maybe'"),
    (GEN + "chat_template: 0\n", "chat_template must be true or false, got 0"),
    (GEN + "fewshot_target: yes\n", "fewshot_target must be a text or a number (quote yes/no/true/false)"),
    (GEN + "description: [a]\n", "description must be a text"),
    ("kind: generate\ndata_files: d.jsonl\nprompt: 5\ntarget: a\n", "prompt must be a text, got 5"),
    (GEN + "task: 'a b'\n", "task may hold only letters"),
    (GEN.replace("'{{q}}'", "'{{ q '"), "prompt: template error"),
    ("kind: generate\ndata_files: 5\nprompt: x\ntarget: y\n", "data_files must name a file, a list of files"),
    ("kind: generate\ndata_files: {test: [d.jsonl, 7]}\nprompt: x\ntarget: y\n", "data_files must name a file"),
    ("kind: generate\ndataset: {path: a/b, split: 3}\nprompt: x\ntarget: y\n", "dataset split must be a text, got 3"),
    ("kind: generate\ndataset: {path: a/b, revision: main}\nprompt: x\ntarget: y\n",
     "dataset has an unknown key 'revision'"),
    ("kind: generate\ndataset: a/b\nprompt: x\ntarget: y\n", "dataset needs at least a 'path'"),
    ("kind: multiple_choice\ndata_files: d.jsonl\nprompt: q\nchoices: {a: 1}\nanswer: a\n",
     "choices must be a column, a template or a list"),
    ("kind: code\ndata_files: d.jsonl\nprompt: q\ntests: q\nsetup: [1]\n", "setup must be a text"),
    ("kind: generate\n1: x\ndata_files: d.jsonl\nprompt: q\ntarget: a\n", "unknown key '1'"),
    ("[" * 5000 + "\n", "is refused: it is nested too deeply"),
    ("a: &a [*a]\n", "is refused: an alias in it refers to a node that contains the alias"),
    (GEN + "until: 'Answer'\nignore: ','\nextract: '(x)'\n", None),  # one stop string, one regex
])
def test_bad_configs_are_one_line_before_any_model(text: str, message: str | None, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _rows(tmp_path / "d.jsonl", [{"q": "x", "opts": ["a", "b"], "a": 0}])
    cfg = _write(tmp_path / "t.yaml", text)
    rc = main(["eval", "--model", "/no/such/model", "--tasks", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    # a good config passes the data checks and fails only at the model
    assert (message or "/no/such/model") in err[0], err


def test_until_as_a_text_is_one_stop_string_as_in_lm_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``until: 'Answer'`` once became six one-letter stop strings (outputs "Th", score 0); every
    field reaches the scorer in its one normal form."""
    import prunelens.tasks.config as config_module
    from prunelens.testing import tiny_lm

    _rows(tmp_path / "d.jsonl", [{"q": "x", "a": "1,0"}])
    cfg = load_config(_write(tmp_path / "t.yaml", GEN + "until: 'Answer'\nignore: ','\nextract: '(\\d+,?\\d*)'\n"))
    assert cfg.raw["until"] == ["Answer"] and cfg.raw["ignore"] == [","]
    assert cfg.extract == {"regex": r"(\d+,?\d*)", "group": 1} and cfg.raw["data_files"] == {"train": ["d.jsonl"]}
    seen = []

    def fake_generate(lm: Any, prompts: Any, new: int, stop: tuple[str, ...], *args: Any, **kw: Any) -> list[str]:
        seen.append(stop)
        return ["The answer is 10 Answer" for _ in prompts]

    monkeypatch.setattr(config_module, "generate", fake_generate)
    score = run_task(tiny_lm(), str(tmp_path / "t.yaml"), None, TaskOptions(progress=False))
    assert seen == [("Answer",)] and score.score == 1.0  # "10" matches "1,0" once ',' is ignored


# each prunelens CLI run's (exit status, stderr lines), in one child process
_CHILD = """import contextlib, io, json, sys
from prunelens.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out.append((main(argv), err.getvalue().strip().splitlines()))
print(json.dumps(out))
"""


def _cli_in_subprocess(runs: list[list[str]], timeout: float) -> list[tuple[int, list[str]]]:
    """The CLI runs in a child process killed at ``timeout``: a regression to an unbounded config
    fails fast instead of hanging the test run or exhausting its memory."""
    import subprocess
    import sys

    try:
        p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(runs)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading the configs did not finish in {timeout} s")
    assert p.returncode == 0, p.stderr[-2000:]
    return [(rc, err) for rc, err in json.loads(p.stdout.strip().splitlines()[-1])]


LAUGHS = "lol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))
BOMBS = [  # (config, what the one line says)
    (GEN + LAUGHS, "is refused: its aliases expand it to over 10000 nodes"),
    (GEN.replace("'{{q}}'", "'{{ 9**(9**9) }}'"), "prompt: row 1: template refused: 9 ** 387420489 is over 4096 bits"),
    (GEN.replace("'{{q}}'", "'{{ (2**3000) * (2**3000) }}'"), "template refused: a product over 4096 bits"),
    (GEN.replace("'{{q}}'", "'{{ \"ab\" * 10**8 }}'"), "template refused: a text or list of 200000000 items"),
    (GEN.replace("'{{q}}'", "\"{{ 'x'|center(10000000000) }}\""), "template refused: a size of 10000000000"),
    (GEN.replace("'{{q}}'", "\"{{ '{:999999999}'.format(q) }}{{ '%0999999999d' % 1 }}\""),
     "template refused: a size of 999999999 (at most 1000000)"),
    (GEN.replace("'{{q}}'", "'{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}'"),
     "template refused: rendering took over 2 s"),
]


def test_config_bombs_are_refused_while_reading(tmp_path: Path) -> None:
    """A YAML alias bomb (billion laughs) and templates that compute without end are bounded."""
    _rows(tmp_path / "d.jsonl", [{"q": "x", "a": "1"}])
    runs = [["eval", "--model", "/no/such/model", "--tasks", str(_write(tmp_path / f"t{i}.yaml", text))]
            for i, (text, _) in enumerate(BOMBS)]
    for (rc, err), (_, message) in zip(_cli_in_subprocess(runs, timeout=180), BOMBS, strict=True):
        assert rc == 2 and len(err) == 1 and message in err[0], err


def test_a_missing_hub_dataset_is_one_line_without_the_clients_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Online, a missing dataset once printed the Hub client's 12 retry warnings before the one line."""
    import logging

    import datasets

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.seen: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.seen.append(record.getMessage())

    def offline_hub(path: str, *args: Any, **kwargs: Any) -> Any:  # what the Hub client logs, then raises
        for n in range(1, 7):
            logging.getLogger("huggingface_hub.utils._http").warning(
                f"'(ConnectTimeout)' thrown while requesting HEAD https://huggingface.co/datasets/{path}")
            logging.getLogger("huggingface_hub.utils._http").warning(f"Retrying in {n}s [Retry {n}/5].")
        logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=4)) after connection broken")
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    records = Records()
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.addHandler(records)
    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    try:
        cfg = _write(tmp_path / "t.yaml", "kind: generate\ndataset: {path: org/missing, split: test}\n"
                                          "prompt: '{{q}}'\ntarget: a\n")
        rc = main(["eval", "--model", "/no/such/model", "--tasks", str(cfg)])
    finally:
        hub_logger.removeHandler(records)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot load Hub dataset org/missing" in err[0], err
    assert records.seen == [] and hub_logger.level == level  # silenced while loading, restored after


def test_a_config_over_a_hub_dataset_reads_it_through_datasets(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from test_sources import hub_repo

    from prunelens.tasks.sources import MIRROR_ENV

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "hub"))
    hub_repo(tmp_path / "hub", "allenai/sciq", {("default", "train"): SCIQ[:2], ("default", "test"): SCIQ[2:]})
    import os

    cfg = load_config(_write(tmp_path / "sciq.yaml", f"""
kind: multiple_choice
dataset: {{path: {os.path.join(tmp_path, 'hub', 'allenai', 'sciq')}, split: test}}
fewshot_split: train
num_fewshot: 2
prompt: "Question: {{{{question}}}}\\nAnswer:"
choices: "{{{{[distractor1, correct_answer]}}}}"
answer: 1
"""))
    shots, rows = cfg.data
    assert shots == SCIQ[:2] and rows == SCIQ[2:]


# --- the real model: each kind gives what the built-in task it re-expresses gives -----------------------


@needs_data
def test_mcq_config_equals_the_builtin_arc_easy(real_lm: Any, tmp_path: Path) -> None:
    cfg = _write(tmp_path / "arc.yaml", f"""
task: my_arc
kind: multiple_choice
data_files: {DATA / 'arc_easy_test.jsonl'}
prompt: "Question: {{{{question}}}}\\nAnswer:"
choices: choices
answer: answer
""")
    o = TaskOptions(limit=24, seed=3, progress=False)
    mine, builtin = run_task(real_lm, str(cfg), None, o), run_task(real_lm, "arc_easy", DATA, o)
    assert mine.task == "my_arc" and mine.n == builtin.n == 24
    assert mine.details["predictions"] == builtin.details["predictions"] and mine.score == builtin.score
    assert mine.details["acc_norm"] == builtin.details["acc_norm"]


@needs_data
def test_generate_config_with_regex_equals_builtin_gsm8k_strict(real_lm: Any, tmp_path: Path) -> None:
    cfg = _write(tmp_path / "gsm.yaml", f"""
task: my_gsm8k
kind: generate
data_files: {DATA / 'gsm8k_test.jsonl'}
prompt: "Question: {{{{question.strip()}}}}\\nAnswer:"
target: target
until: ["Question:", "</s>", "<|im_end|>"]
extract: {{regex: "#### *(-?[$0-9.,]+)"}}
match: numeric
""")
    o = TaskOptions(limit=4, seed=1, shots=0, max_new_tokens=48, progress=False)
    mine, builtin = run_task(real_lm, str(cfg), None, o), run_task(real_lm, "gsm8k", DATA, o)
    assert [s["output"] for s in mine.details["samples"]] == [s["output"] for s in builtin.details["samples"]]
    assert mine.score == builtin.details["exact_match_strict"]
    assert mine.details["format_rate"] == builtin.details["format_rate"]


@needs_data
def test_code_config_equals_builtin_mbpp(real_lm: Any, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (DATA / "mbpp.jsonl").read_text().splitlines() if line.strip()]
    sub = tmp_path / "data"
    sub.mkdir()
    _rows(sub / "mbpp.jsonl", [r for r in rows if 11 <= r["task_id"] <= 13])
    cfg = _write(tmp_path / "code.yaml", """
task: my_mbpp
kind: code
data_files: data/mbpp.jsonl
prompt: "You are an expert Python programmer, and here is your task: {{text}}
  Your code should pass these tests:\\n\\n{{test_list | join('\\n')}}\\n"
tests: test_list
setup: test_setup_code
""")
    o = TaskOptions(max_new_tokens=96, progress=False)
    mine, builtin = run_task(real_lm, str(cfg), None, o), run_task(real_lm, "mbpp", sub, o)
    assert [s["completion"] for s in mine.details["samples"]] == [s["completion"] for s in builtin.details["samples"]]
    assert [s["status"] for s in mine.details["samples"]] == [s["status"] for s in builtin.details["samples"]]
    assert mine.n == 3 and mine.score == builtin.score


def test_humaneval_style_code_config_runs_the_check_function(tmp_path: Path) -> None:
    """entry_point makes the prompt a stub the model completes and calls check(entry_point)."""
    from prunelens.tasks.code import humaneval_program
    from prunelens.tasks.sandbox import run_program

    _rows(tmp_path / "he.jsonl", [{"stub": "def add(a, b):\n", "t": "def check(f):\n    assert f(1, 2) == 3\n",
                                   "ep": "add"}])
    cfg = load_config(_write(tmp_path / "he.yaml", "kind: code\ndata_files: he.jsonl\nprompt: stub\ntests: t\n"
                                                   "entry_point: ep\n"))
    _, rows = cfg.data
    p = {"prompt": cfg.value("prompt", rows[0], 0), "entry_point": cfg.value("entry_point", rows[0], 0),
         "test": cfg.value("tests", rows[0], 0)}
    assert run_program(humaneval_program(p, "    return a + b\n", chat=False)).passed
    assert not run_program(humaneval_program(p, "    return a - b\n", chat=False)).passed


def test_commands_take_a_config(tiny_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """eval, sweep, paired and advise --prompts on a saved tiny model (seconds)."""
    _rows(tmp_path / "d.jsonl", [{"q": f"is {i} even", "opts": ["yes", "no"], "a": i % 2} for i in range(6)])
    cfg = str(_write(tmp_path / "mine.yaml", "task: mine\nkind: multiple_choice\ndata_files: d.jsonl\n"
                                              "prompt: '{{q}}?'\nquestion: '{{q}}?'\nchoices: opts\nanswer: a\n"))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--tasks", cfg, "--drop", "attn:1", "--out", str(out),
                 "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["tasks"][0]["task"] == "mine" and res["tasks"][0]["dense"]["n"] == 6
    assert main(["sweep", "--model", str(tiny_dir), "--method", "attn", "--amounts", "0,1", "--tasks", cfg,
                 "--out", str(tmp_path / "sweep"), "--quiet"]) == 0
    assert len(list((tmp_path / "sweep" / "cells").glob("*.json"))) == 2
    assert main(["paired", "--model", str(tiny_dir), "--task", cfg, "--method", "attn:1", "--limit", "4",
                 "--out", str(tmp_path / "paired"), "--quiet"]) == 0
    assert main(["advise", "--model", str(tiny_dir), "--budget", "25%", "--use", "generative", "--prompts", cfg,
                 "--steps", "2",
                 "--out", str(tmp_path / "advise"), "--quiet"]) == 0
    assert json.loads((tmp_path / "advise" / "results.json").read_text())["n_prompts"] == 6  # the config's rows
    capsys.readouterr()


def _doc_configs() -> list[str]:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "tasks.md").read_text()
    return [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind:" in b]


def test_the_documented_examples_run_on_the_real_model(real_lm: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from test_sources import hub_repo

    from prunelens.tasks.sources import MIRROR_ENV

    sciq_doc, arith_doc = _doc_configs()
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "hub"))
    sciq = [{**r, "distractor3": "d3"} for r in SCIQ]
    hub_repo(tmp_path / "hub", "allenai/sciq", {("default", "test"): sciq})
    arith = [{"question": f"What is {a} plus {b}?", "solution": f"{a} + {b} = {a + b}.", "answer": str(a + b)}
             for a, b in ((2, 3), (10, 5), (7, 8), (1, 1), (20, 22))]
    _rows(tmp_path / "arith.jsonl", arith)
    o = TaskOptions(limit=3, max_new_tokens=24, progress=False)
    mcq = run_task(real_lm, str(_write(tmp_path / "sciq.yaml", sciq_doc)), None, o)
    assert mcq.task == "sciq" and mcq.n == 3 and mcq.details["golds"] == [3, 3, 3]
    cfg = load_config(_write(tmp_path / "my_arith.yaml", arith_doc))
    shots, rows = cfg.data
    assert shots == arith[:2] and rows == arith[2:]
    gen = run_task(real_lm, str(tmp_path / "my_arith.yaml"), None, o)
    assert gen.task == "my_arith" and gen.n == 3 and 0 <= gen.score <= 1
    hits = [s["extracted"] is not None and float(s["extracted"].rstrip(".").replace(",", "")) == float(s["target"])
            for s in gen.details["samples"]]  # the score is the numeric match of what the regex extracted
    assert gen.score == sum(hits) / 3 and all(("The answer is" in s["output"]) == (s["extracted"] is not None)
                                              for s in gen.details["samples"])
