"""GSM8K answer extraction, exemplar formatting and a short real generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelens.cli import main
from prunelens.tasks.gsm8k import exemplar_answer, extract_flexible, extract_strict, normalise
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("3 + 4 = 7\n#### 7", 7.0, 7.0),
        ("so the total is $1,234.\n#### $1,234", 1234.0, 1234.0),
        ("The answer is -12.5.", None, -12.5),
        ("#### 18 dollars, i.e. 18", 18.0, 18.0),
        ("no number here", None, None),
        ("first 3, then 40, finally 12", None, 12.0),
    ],
)
def test_extraction(text: str, strict: float | None, flexible: float | None) -> None:
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_normalise_and_exemplars() -> None:
    assert normalise("1,000") == 1000.0 and normalise("$5.") == 5.0 and normalise("abc") is None
    assert exemplar_answer("She has 2*3=<<2*3=6>>6 apples.\n#### 6") == "She has 2*3=6 apples.\n#### 6"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_eval_gsm8k_runs_with_chat_template(tmp_path: Path) -> None:
    out = tmp_path / "gsm.json"
    rc = main(
        [
            "eval",
            "--tasks",
            "gsm8k",
            "--data-dir",
            str(DATA),
            "--limit",
            "2",
            "--shots",
            "1",
            "--max-new-tokens",
            "48",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())["tasks"][0]["dense"]
    assert res["kind"] == "generative" and res["metric"] == "exact_match"
    d = res["details"]
    assert res["n"] == 2 and all(s["index"] >= 1 for s in d["samples"])  # exemplar row 0 never evaluated
    assert all(s["output"] for s in d["samples"]) and 0.0 <= d["format_rate"] <= 1.0
    assert res["score"] == d["exact_match_flexible"]


def test_eval_rejects_unknown_task_and_missing_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--tasks", "gsm9k", "--data-dir", str(tmp_path)]) == 2
    assert "unknown task 'gsm9k'" in capsys.readouterr().err
    assert main(["eval", "--tasks", "gsm8k", "--data-dir", str(tmp_path)]) == 2
    assert "needs gsm8k_test.jsonl" in capsys.readouterr().err
