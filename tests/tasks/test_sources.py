"""The Hub route of every built-in task, offline: small datasets written in each Hub dataset's own
schema and repository layout (parquet files under ``<config>/``, a README with ``configs:``), read
through the same ``datasets.load_dataset`` call the Hub route makes (``PRUNELENS_DATASETS_DIR``),
must give exactly the questions, options, gold answers, shots and tests of ../shared/data's JSONL."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.tasks import sources
from prunelens.tasks.mcq import MCQ_TASKS
from prunelens.tasks.sources import MIRROR_ENV, load_rows
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hub_repo(root: Path, repo: str, splits: dict[tuple[str, str], list[dict[str, Any]]]) -> Path:
    """A dataset repository as the Hub stores it: ``<config>/<split>-00000-of-00001.parquet`` and a
    README whose YAML header lists the configs (what ``hf download --repo-type dataset`` brings)."""
    import datasets

    d = root / repo
    configs: dict[str, list[str]] = {}
    for (config, split), rows in splits.items():
        (d / config).mkdir(parents=True, exist_ok=True)
        # one schema per config, as on the Hub (an all-empty list column would otherwise be typed null)
        every = [r for (c, _), rs in splits.items() if c == config for r in rs]
        features = datasets.Dataset.from_list(every).features
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(d / config / f"{split}-00000-of-00001.parquet"))
        configs.setdefault(config, []).append(split)
    lines = ["---", "configs:"]
    for config, names in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [f"  - split: {s}\n    path: {config}/{s}-*" for s in names]
    (d / "README.md").write_text("\n".join(lines) + "\n---\n# test copy\n")
    return d


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv(MIRROR_ENV, str(root))
    _private_cache(tmp_path / "hf-cache", monkeypatch)
    return root


def _private_cache(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' cache in the test's own directory (datasets read the variable at import)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path)


# --- the inverse of each mapping: local rows back into the Hub's schema (written independently) -----


def arc_hub(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "question": r["question"], "choices": {"text": r["choices"], "label": r["labels"]},
            "answerKey": r["labels"][r["answer"]]}


def piqa_hub(r: dict[str, Any]) -> dict[str, Any]:
    return {"goal": r["question"], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": r["answer"]}


def boolq_hub(r: dict[str, Any]) -> dict[str, Any]:
    return {"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": r["idx"],
            "label": r["answer"]}


def winogrande_hub(r: dict[str, Any]) -> dict[str, Any]:
    a, b = r["choices"]
    k = 0
    while k < min(len(a), len(b)) - 1 and a[k] == b[k]:
        k += 1
    return {"sentence": a[:k] + "_ " + r["continuation"], "option1": a[k:], "option2": b[k:],
            "answer": str(r["answer"] + 1)}


def gsm8k_hub(r: dict[str, Any]) -> dict[str, Any]:
    return {"question": r["question"], "answer": r["answer"]}


def _sample(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    step = max(len(rows) // n, 1)
    return rows[::step][:n]


MCQ_CASES = [
    ("arc_easy", "arc_easy_test.jsonl", "allenai/ai2_arc", ("ARC-Easy", "test"), arc_hub),
    ("arc_challenge", "arc_challenge_test.jsonl", "allenai/ai2_arc", ("ARC-Challenge", "test"), arc_hub),
    ("piqa", "piqa_validation.jsonl", "baber/piqa", ("default", "validation"), piqa_hub),
    ("boolq", "boolq_validation.jsonl", "aps/super_glue", ("boolq", "validation"), boolq_hub),
    ("winogrande", "winogrande_dev.jsonl", "allenai/winogrande", ("winogrande_xl", "validation"), winogrande_hub),
]


@needs_data
@pytest.mark.parametrize(("task", "file", "repo", "split", "to_hub"), MCQ_CASES, ids=[c[0] for c in MCQ_CASES])
def test_hub_rows_map_to_the_local_questions(task: str, file: str, repo: str, split: tuple[str, str],
                                             to_hub: Any, mirror: Path, tmp_path: Path) -> None:
    rows = _jsonl(DATA / file)
    # every row with a digit or 5-way label, a passage holding " -- ", ... plus an even sample
    picked = _sample(rows, 60) + [r for r in rows if r.get("labels", ["A"])[0] == "1"][:5] + \
        [r for r in rows if len(r.get("choices", [])) not in (2, 4)][:5] + \
        [r for r in rows if " -- " in r.get("passage", "")][:5]
    hub_repo(mirror, repo, {split: [to_hub(r) for r in picked]})
    local = tmp_path / "local"
    local.mkdir()
    (local / file).write_text("".join(json.dumps(r) + "\n" for r in picked))
    via_hub = load_rows(task, None)
    assert via_hub.origin.startswith(repo) and via_hub.rows == picked
    assert MCQ_TASKS[task].build(None) == MCQ_TASKS[task].build(local)


@needs_data
def test_mmlu_hub_all_config_gives_the_questions_and_the_dev_shots(mirror: Path, tmp_path: Path) -> None:
    test, dev = _jsonl(DATA / "mmlu_test.jsonl.gz"), _jsonl(DATA / "mmlu_dev.jsonl")
    subjects = {"abstract_algebra", "machine_learning", "world_religions"}
    test = [r for r in test if r["subject"] in subjects][::7]
    dev = [r for r in dev if r["subject"] in subjects]
    hub_repo(mirror, "cais/mmlu", {("all", "test"): test, ("all", "dev"): dev})
    local = tmp_path / "local"
    local.mkdir()
    (local / "mmlu_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (local / "mmlu_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    for task in ("mmlu", "mmlu_5shot", "mmlu_full_5shot"):
        hub_items, local_items = MCQ_TASKS[task].build(None), MCQ_TASKS[task].build(local)
        assert hub_items == local_items and len(hub_items) == len(test)
    assert "Answer: " in MCQ_TASKS["mmlu_5shot"].build(None)[0].contexts[0].split("\n\n")[1]  # a shot is there


def test_hellaswag_hub_schema_is_the_local_schema(mirror: Path, tmp_path: Path) -> None:
    rows = [{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
             "ctx_b": "then", "ctx": "...", "endings": [", the man adds wax [title] to the windshield.", "b", "c",
                                                         "d"], "source_id": "x", "split": "val",
             "split_type": "indomain", "label": "3"}]
    hub_repo(mirror, "Rowan/hellaswag", {("default", "validation"): rows})
    local = tmp_path / "local"
    local.mkdir()
    (local / "hellaswag_validation.jsonl").write_text(json.dumps(rows[0]) + "\n")
    items = MCQ_TASKS["hellaswag"].build(None)
    assert items == MCQ_TASKS["hellaswag"].build(local)
    assert items[0].contexts[0] == "Removing ice from car: Then, the man writes over the snow. Then"
    assert items[0].continuations[0] == " , the man adds wax. to the windshield." and items[0].gold == 3


@needs_data
def test_gsm8k_mbpp_wikitext_map_to_the_local_rows(mirror: Path, tmp_path: Path) -> None:
    gsm = _sample(_jsonl(DATA / "gsm8k_test.jsonl"), 40)
    hub_repo(mirror, "openai/gsm8k", {("main", "test"): [gsm8k_hub(r) for r in gsm]})
    assert load_rows("gsm8k", None).rows == gsm  # targets: the text after ####, commas removed

    mbpp = _jsonl(DATA / "mbpp.jsonl")
    prompt, test = [r for r in mbpp if r["task_id"] <= 10], [r for r in mbpp if 11 <= r["task_id"] <= 40]
    hub_repo(mirror, "google-research-datasets/mbpp", {("full", "prompt"): prompt, ("full", "test"): test})
    from prunelens.tasks.code import mbpp_rows

    local = tmp_path / "local"
    local.mkdir()
    (local / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt + test))
    hub_test, hub_ids = mbpp_rows(None)
    local_test, local_ids = mbpp_rows(local)
    assert hub_test == local_test and [r["task_id"] for r in hub_test] == list(range(11, 41))
    assert {i: hub_ids[i] for i in (2, 3, 4)} == {i: local_ids[i] for i in (2, 3, 4)}  # the 3 shots
    assert [r["test_list"] for r in hub_test] == [r["test_list"] for r in test]

    wiki = _jsonl(DATA / "wikitext2_raw_test.jsonl")[:300]
    hub_repo(mirror, "Salesforce/wikitext", {("wikitext-2-raw-v1", "test"): wiki})
    assert load_rows("wikitext", None).rows == wiki and any(r["text"] == "" for r in wiki)


def test_humaneval_hub_rows_equal_the_packaged_release(mirror: Path) -> None:
    from prunelens.model.loading import packaged_file
    from prunelens.tasks.code import HUMANEVAL_PACKAGE

    packaged = _jsonl(packaged_file(*HUMANEVAL_PACKAGE))
    hub_repo(mirror, "openai/openai_humaneval", {("openai_humaneval", "test"): packaged[:20]})
    # the Hub repo's single config is named after the dataset; the loader asks for the default one
    rows = load_rows("humaneval", None)
    assert rows.origin.startswith("openai/openai_humaneval")
    assert rows.rows == [{k: r[k] for k in ("task_id", "prompt", "entry_point", "test")} for r in packaged[:20]]


def test_mbpp_sanitized_maps_prompt_and_imports(mirror: Path) -> None:
    row = {"source_file": "x", "task_id": 12, "prompt": "Write a function to sort a matrix.",
           "code": "import math\ndef f(m):\n    return sorted(m, key=sum)", "test_imports": ["import math"],
           "test_list": ["assert f([[2], [1]]) == [[1], [2]]"]}
    shot = {**row, "task_id": 2, "prompt": "Write a shot.", "test_imports": []}
    hub_repo(mirror, "google-research-datasets/mbpp", {("sanitized", "prompt"): [shot], ("sanitized", "test"): [row]})
    from prunelens.tasks.code import mbpp_program, mbpp_rows
    from prunelens.tasks.sandbox import run_program

    test, by_id = mbpp_rows(None, "mbpp_sanitized")
    assert test == [{"task_id": 12, "text": row["prompt"], "code": row["code"], "test_list": row["test_list"],
                     "test_setup_code": "import math", "challenge_test_list": []}] and 2 in by_id
    assert run_program(mbpp_program(test[0], test[0]["code"], chat=False)).passed


@needs_data
def test_beir_hub_copy_gives_the_local_retrieval_data(mirror: Path) -> None:
    from prunelens.tasks.retrieval import beir_data, read_beir

    root = DATA / "cranfield"
    corpus, queries = _jsonl(root / "corpus.jsonl"), _jsonl(root / "queries.jsonl")
    qrels = [line.split("\t") for line in (root / "qrels.tsv").read_text().splitlines()[1:] if line.strip()]
    hub_repo(mirror, "mteb/scifact", {
        ("corpus", "corpus"): [{"_id": r["_id"], "title": r["title"], "text": r["text"]} for r in corpus],
        ("queries", "queries"): [{"_id": r["_id"], "text": r["text"]} for r in queries],
        ("default", "test"): [{"query-id": q, "corpus-id": c, "score": int(s)} for q, c, s in qrels]})
    assert beir_data(None, "scifact").data == read_beir(root)


# --- errors --------------------------------------------------------------------------------------------


def test_offline_without_cache_names_the_dataset_and_both_ways_out(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    _private_cache(tmp_path / "empty-cache", monkeypatch)
    sources._load_hub.cache_clear()
    with pytest.raises(PrunelensError) as e:
        load_rows("arc_easy", None)
    msg = str(e.value)
    assert "allenai/ai2_arc (ARC-Easy, test)" in msg and "--data-dir" in msg and "run once online" in msg
    assert main(["eval", "--tasks", "piqa", "--limit", "2"]) == 2  # before any model loads
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "baber/piqa" in err[0] and "piqa_validation.jsonl" in err[0]


def test_a_changed_hub_schema_names_the_missing_column(mirror: Path) -> None:
    hub_repo(mirror, "allenai/ai2_arc", {("ARC-Easy", "test"): [
        {"id": "1", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answer": "A"}]})
    with pytest.raises(PrunelensError, match=r"allenai/ai2_arc \(ARC-Easy, test\) has no column 'answerKey' "
                                             r"\(columns: id, question, choices, answer\)"):
        load_rows("arc_easy", None)


def test_a_hub_row_that_does_not_map_is_named(mirror: Path) -> None:
    hub_repo(mirror, "allenai/ai2_arc", {("ARC-Challenge", "test"): [
        {"id": "1", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}]})
    with pytest.raises(PrunelensError, match=r"row 1: cannot map to the 'arc_challenge' schema .*'C' is not among"):
        load_rows("arc_challenge", None)


def test_a_local_file_wins_over_the_hub(mirror: Path, tmp_path: Path) -> None:
    hub_repo(mirror, "baber/piqa", {("default", "validation"): [{"goal": "hub", "sol1": "a", "sol2": "b",
                                                                   "label": 0}]})
    (tmp_path / "piqa_validation.jsonl").write_text(json.dumps({"question": "local", "choices": ["a", "b"],
                                                                "answer": 1}) + "\n")
    assert load_rows("piqa", tmp_path).rows[0]["question"] == "local"
    assert load_rows("piqa", None).rows[0]["question"] == "hub"
