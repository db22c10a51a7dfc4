"""Hostile and careless input on the command line: one line on stderr naming the problem, exit 2,
nothing left behind (issue 15). Runs on a tiny saved model, so the whole table takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelens.cli import main
from prunelens.testing import save_tiny

# placeholders: MODEL (tiny saved model), NAN (the same with a NaN weight), LATIN1 (a file that is
# not UTF-8), DATA_LATIN1 / DATA_BADGZ (data dirs whose task file is not UTF-8 / not gzip),
# FILE (an existing file), DIR (an existing directory), OUT (a path that must not appear)
CASES = [
    (["analyze", "--model", "NAN", "--steps", "1", "--out", "OUT"], "NaN or infinite weights"),
    (["eval", "--model", "NAN", "--tasks", "fidelity", "--limit", "1"], "NaN or infinite weights"),
    (["analyze", "--model", "MODEL", "--drop", "attn@3", "--drop", "attn@3", "--out", "OUT"], "appears twice"),
    (["analyze", "--model", "MODEL", "--prune", "magnitude:0:4", "--out", "OUT"], "1 <= N <= M"),
    (["analyze", "--model", "MODEL", "--prune", "gptq:w4g128", "--out", "OUT"], "is a quant spec"),
    (["analyze", "--model", "MODEL", "--prompts", "LATIN1", "--out", "OUT"], "is not UTF-8 text"),
    (["analyze", "--model", "MODEL", "--drop", "attn:1", "--calib", "LATIN1", "--out", "OUT"], "is not UTF-8"),
    (["ppl", "--model", "MODEL", "--text", "LATIN1"], "is not UTF-8 text"),
    (["eval", "--model", "MODEL", "--tasks", "arc_easy", "--data-dir", "DATA_LATIN1"], "is not UTF-8 text"),
    (["eval", "--model", "MODEL", "--tasks", "mmlu", "--data-dir", "DATA_BADGZ"], "is not a valid gzip file"),
    (["analyze", "--model", "MODEL", "--out", "/proc/prunelens-x/run"], "cannot write"),
    (["analyze", "--model", "MODEL", "--save-pruned", "/proc/prunelens-x", "--out", "OUT"], "cannot write"),
    (["prune", "--model", "MODEL", "--drop", "attn@1", "--out", "/proc/prunelens-x"], "cannot write"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--out", "/proc/prunelens-x.json"], "cannot write"),
    (["report", "DIR", "--out", "/proc/prunelens-x.html"], "cannot write"),
    (["compare", "--model", "MODEL", "--method", "attn:1", "--out", "FILE"], "is not a directory"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--out", "DIR"], "is a directory"),
    (["ppl", "--model", "MODEL", "--text", "FILE", "--out", "DIR"], "is a directory"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--out", "FILE"], "already exists (use --overwrite)"),
    (["subspace", "--model", "MODEL", "--task", "mmlu", "--data-dir", "DATA_BADGZ", "--method", "attn:1",
      "--batch-size", "0", "--out", "OUT"], "--batch-size must be at least 1"),
    (["compare", "--model", "MODEL", "--method", "wanda:0.5", "--calib-samples", "0", "--out", "OUT"],
     "--calib-samples must be at least 1"),
    (["compare", "--model", "MODEL", "--method", "attn:40", "--out", "OUT"], "cannot drop 40 attn units"),
    (["sweep", "--model", "/no/such/model", "--method", "attn", "--amounts", "0,1", "--tasks", "fidelity",
      "--out", "OUT"], "does not exist"),
    (["sweep", "--model", "MODEL", "--method", "attn", "--amounts", "0,40", "--tasks", "fidelity",
      "--out", "OUT"], "cannot drop 40 attn units"),
    # the checks before any work, on the tiny saved model (4 layers)
    (["analyze", "--model", "/no/such/model", "--out", "OUT"], "does not exist"),
    (["analyze", "--model", "not-a-preset", "--out", "OUT"], "unknown model"),
    (["analyze", "--model", "MODEL", "--drop", "attn:4", "--out", "OUT"], "need 0 <= N < 4"),
    (["analyze", "--model", "MODEL", "--drop", "attn:-1", "--out", "OUT"], "malformed drop spec"),
    (["analyze", "--model", "MODEL", "--drop", "attn=4", "--out", "OUT"], "malformed drop spec"),
    (["analyze", "--model", "MODEL", "--drop", "block@4", "--out", "OUT"], "layers 0..3"),
    (["analyze", "--model", "MODEL", "--temps", "0", "--out", "OUT"], "temperature must be positive"),
    (["analyze", "--model", "MODEL", "--temps=-1", "--out", "OUT"], "temperature must be positive"),
    (["analyze", "--model", "MODEL", "--steps", "0", "--out", "OUT"], "--steps must be at least 1"),
    (["analyze", "--model", "MODEL", "--prompts", "EMPTY", "--out", "OUT"], "is empty"),
    (["analyze", "--model", "MODEL", "--prompts", "BADJSON", "--out", "OUT"], "badjson.jsonl:2: not valid JSON"),
    (["report", "/no/such/run"], "does not exist"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    latin1 = root / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\nd\xe9j\xe0 vu\n".encode("latin-1"))
    d1 = root / "data-latin1"
    d1.mkdir()
    (d1 / "arc_easy_test.jsonl").write_bytes('{"question": "caf\xe9"}\n'.encode("latin-1"))
    d2 = root / "data-badgz"
    d2.mkdir()
    (d2 / "mmlu_test.jsonl.gz").write_text('{"not": "gzip"}\n')
    existing = root / "existing.json"
    existing.write_text("{}")
    (root / "adir").mkdir()
    (root / "empty.txt").write_text("\n\n")
    (root / "badjson.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    return {"EMPTY": str(root / "empty.txt"), "BADJSON": str(root / "badjson.jsonl"),
            "MODEL": str(tiny_dir), "NAN": str(save_tiny(root / "nan", nan=True)), "LATIN1": str(latin1),
            "DATA_LATIN1": str(d1), "DATA_BADGZ": str(d2), "FILE": str(existing), "DIR": str(root / "adir")}


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in
                                                         enumerate(CASES)])
def test_bad_input_is_one_line_and_leaves_nothing(argv: list[str], message: str, files: dict[str, str],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # default run directories would land here
    out = tmp_path / "out"
    rc = main([str(out) if a == "OUT" else files.get(a, a) for a in argv] + ["--quiet"] * _quiet(argv[0]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was left behind"


def _quiet(command: str) -> int:
    return 0 if command in ("report", "prune") else 1


def test_the_main_job_runs_prompt_sets_larger_than_a_batch(tiny_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "nine.txt"
    prompts.write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(3, 12)))
    rc = main(["analyze", "--model", str(tiny_dir), "--prompts", str(prompts), "--drop", "attn@1", "--steps", "2",
               "--batch-size", "2", "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 0
    assert "diverged" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["settings"]["n_prompts"] == 9


def test_overwrite_keeps_the_old_run_until_the_new_one_is_whole(tmp_path: Path) -> None:
    from prunelens.runs import write_run

    out = tmp_path / "run"
    write_run({"n": 1}, out, figures=lambda r, d: [], html=lambda r, f: "old")
    with pytest.raises(RuntimeError):
        write_run({"n": 2}, out, overwrite=True, figures=lambda r, d: [],
                  html=lambda r, f: (_ for _ in ()).throw(RuntimeError("killed mid-write")))
    assert (out / "report.html").read_text() == "old"  # the old run is intact
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # and no temporary is left
    write_run({"n": 3}, out, overwrite=True, figures=lambda r, d: [], html=lambda r, f: "new")
    assert (out / "report.html").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_temporaries_of_a_killed_run_are_cleaned_up(tmp_path: Path) -> None:
    from prunelens.runs import write_run

    dead = _dead_pid()
    (tmp_path / f".run.tmp-{dead}").mkdir()  # a killed analyze's half-written run
    (tmp_path / f".other.tmp-{dead}").mkdir()  # another run's: not ours to touch
    write_run({"n": 1}, tmp_path / "run", figures=lambda r, d: [], html=lambda r, f: "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}", "run"]


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    """Only newlines end a JSONL row: U+2028, U+0085 and form feeds inside strings are text (MMLU
    has them; str.splitlines once split its rows)."""
    import gzip

    from prunelens.data import iter_jsonl, read_texts

    rows = [{"text": "a\u2028b"}, {"text": "c\x85d\x0ce"}]
    p = tmp_path / "x.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [o for _, o in iter_jsonl(p)] == rows
    assert read_texts(p) == ["a\u2028b", "c\x85d\x0ce"]
