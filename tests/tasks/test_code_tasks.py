"""Code execution sandbox and HumanEval/MBPP program assembly.

The sandbox is tested against what a hung or hostile completion does; the assembly against the
reference solutions shipped with the data (all must pass, wrong ones must fail).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prunelens.errors import PrunelensError
from prunelens.tasks import sandbox
from prunelens.tasks.code import extract_code, humaneval_problems, humaneval_program, mbpp_program, mbpp_rows
from prunelens.tasks.sandbox import Limits, network_namespace_available, run_program, run_programs
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()
FAST = Limits(timeout=3, cpu_seconds=2, memory_mb=512)


@pytest.mark.parametrize(
    ("program", "status"),
    [
        ("assert sum([1, 2]) == 3", "passed"),
        ("assert 1 + 1 == 3", "failed"),
        ("raise SystemExit(0)", "failed"),  # exiting early with status 0 is not a pass
        ("import os\nos._exit(0)", "failed"),
        ("while True:\n    pass", "timeout"),  # CPU limit
        ("import time\ntime.sleep(60)", "timeout"),  # wall-clock limit
        ("x = bytearray(2_000_000_000)", "failed"),  # memory limit
        ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)", "failed"),
        ("import socket\ns = socket.socket()", "failed"),
        ("import subprocess\nsubprocess.run(['true'])", "failed"),
        ("import os\nos.fork()", "failed"),
        ("import os\nos.system('true')", "failed"),
        ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "failed"),
    ],
)
@pytest.mark.slow  # runs programs in the sandbox
def test_sandbox_contains_bad_programs(program: str, status: str) -> None:
    r = run_program(program, FAST)
    assert r.status == status, r.stderr_tail
    assert r.seconds < 10


@pytest.mark.slow  # runs programs in the sandbox
def test_sandbox_cannot_touch_files_outside_its_directory(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    bad = f"import os, shutil\ntry:\n    os.remove({str(victim)!r})\nexcept PermissionError:\n    pass\n" \
          f"shutil.rmtree({str(tmp_path)!r})"
    assert run_program(bad, FAST).status == "failed"
    assert victim.read_text() == "precious"
    # it runs in a fresh directory, removed afterwards, and may write there
    probe = "import os\nopen('f.txt', 'w').write('x')\nassert os.getcwd().endswith('work')"
    assert run_program(probe, FAST).passed


@pytest.mark.slow  # runs programs in the sandbox
def test_many_programs_keep_order_and_a_hang_does_not_block_the_rest() -> None:
    progs = ["import time\ntime.sleep(60)"] + [f"assert {i} == {i}" for i in range(8)] + ["assert False"]
    res = run_programs(progs, FAST, workers=2, progress=False)
    assert [r.status for r in res] == ["timeout"] + ["passed"] * 8 + ["failed"]


@pytest.mark.skipif(not network_namespace_available(), reason="no unprivileged network namespaces here")
@pytest.mark.slow  # runs programs in the sandbox
def test_network_namespace_has_no_route() -> None:
    # even with the in-process guard undone, there is no interface to connect through
    prog = ("import importlib, socket\nimportlib.reload(socket)\ns = socket.socket()\ns.settimeout(2)\n"
            "try:\n    s.connect(('1.1.1.1', 80))\n    ok = True\nexcept OSError:\n    ok = False\n"
            "assert not ok")
    assert run_program(prog, FAST).passed


def test_extract_code() -> None:
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"  # unclosed
    assert extract_code("    return 1\n") == "    return 1\n"


@pytest.mark.slow  # runs programs in the sandbox
def test_humaneval_reference_solutions_pass_and_wrong_ones_fail() -> None:
    problems, path = humaneval_problems(None)
    assert len(problems) == 164 and path.endswith("HumanEval.jsonl.gz")
    good = [humaneval_program(p, p["canonical_solution"], chat=False) for p in problems]
    assert all(r.passed for r in run_programs(good, progress=False))
    bad = [humaneval_program(p, "    return None\n", chat=False) for p in problems[:40]]
    assert not any(r.passed for r in run_programs(bad, progress=False))


def test_humaneval_chat_replies_full_function_or_body() -> None:
    p = {"prompt": "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
         "entry_point": "add", "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n"}
    full = "Here you go:\n```python\ndef add(xs: List[int]) -> int:\n    return sum(xs)\n```\n"
    body = "```python\n    return sum(xs)\n```"
    wrong = "```python\ndef add(xs):\n    return 0\n```"
    assert run_program(humaneval_program(p, full, chat=True), FAST).passed  # List comes from the prompt
    assert run_program(humaneval_program(p, body, chat=True), FAST).passed
    assert not run_program(humaneval_program(p, wrong, chat=True), FAST).passed


@pytest.mark.skipif(not (DATA / "mbpp.jsonl").is_file(), reason="../shared/data/mbpp.jsonl is absent")
@pytest.mark.slow  # runs programs in the sandbox
def test_mbpp_reference_solutions_pass() -> None:
    test, by_id = mbpp_rows(DATA)
    assert len(test) == 500 and test[0]["task_id"] == 11
    sample = test  # all 500; 367 needs its setup code after the solution
    assert all(r.passed for r in run_programs([mbpp_program(r, r["code"], chat=False) for r in sample],
                                              progress=False))
    assert not run_program(mbpp_program(by_id[11], "def remove_Occ(s, ch):\n    return s\n", chat=False),
                           FAST).passed


@pytest.mark.slow  # runs programs in the sandbox
def test_sandbox_leaves_no_processes_behind() -> None:
    before = set(os.listdir("/proc")) if os.path.isdir("/proc") else set()
    run_program("import time\ntime.sleep(60)", Limits(timeout=1))
    after = set(os.listdir("/proc")) if os.path.isdir("/proc") else set()
    leftovers = []
    for pid in after - before:
        try:
            leftovers.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            pass
    assert not [c for c in leftovers if b"prunelens-sandbox" in c]


def test_without_isolation_code_runs_only_when_the_user_opts_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_namespace_mode", lambda: None)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(PrunelensError, match="cannot isolate generated code"):
        run_program("assert 1 + 1 == 2", FAST)
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert run_program("assert 1 + 1 == 2", FAST).passed
