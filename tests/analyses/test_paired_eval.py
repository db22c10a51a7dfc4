"""Format-paired evaluation wired to a model: question building, answer reading, subset selection,
and an end-to-end run on the bundled model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import prunelens.analyses.paired as pe
from prunelens.errors import PrunelensError
from prunelens.prune.candidate import load_candidate
from prunelens.prune.checkpoint import load_model
from prunelens.prune.recipe import Calibration, Recipe, build, save_modified
from prunelens.tasks.paired import gsm8k_distractors
from prunelens.testing import save_tiny, shared_data_dir

DATA = shared_data_dir()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_free_answer_reads_the_whole_text_then_its_first_line() -> None:
    choices = ["seed", "spore", "pollen"]
    assert pe.free_answer("A plant grows from a seed.", choices) == 0
    # the whole reply names two options (an explanation); its first line names one
    assert pe.free_answer("pollen\n\nUnlike a seed or a spore, ...", choices) == 2
    assert pe.free_answer("B", choices) == 1  # a bare letter
    assert pe.free_answer("seed or spore?", choices) is None  # names two: no answer
    assert pe.free_answer("I do not know.", choices) is None


def test_questions_of_arc_and_gsm8k(tmp_path: Path) -> None:
    _jsonl(tmp_path / "arc_easy_test.jsonl", [
        {"question": f" Q{i}? ", "choices": ["a", "b", "c"], "answer": i % 3} for i in range(10)])
    qs = pe.paired_questions("arc_easy", tmp_path, limit=4, seed=1)
    assert len(qs) == 4 and [q.index for q in qs] == sorted(q.index for q in qs)
    assert all(q.question == f"Q{q.index}?" and q.gold == q.index % 3 and q.target is None for q in qs)
    assert pe.mcq_prompt(qs[0]) == (f"Q{qs[0].index}?\nA. a\nB. b\nC. c\n"
                                    "Answer with the letter of the correct option.")

    _jsonl(tmp_path / "gsm8k_test.jsonl", [
        {"question": f"q{i}", "answer": f"... #### {10 + i}", "target": str(10 + i)} for i in range(12)])
    gq = pe.paired_questions("gsm8k", tmp_path, limit=None, seed=0, shots=2)
    assert [q.index for q in gq] == list(range(2, 12))  # the exemplars are never asked
    for q in gq:
        assert q.target == 10 + q.index and q.choices[q.gold] == str(10 + q.index)
        wrong = [str(int(x)) for x in gsm8k_distractors(q.target)]
        assert sorted(q.choices) == sorted([str(10 + q.index), *wrong])
    assert {q.gold for q in gq} == {0, 1, 2, 3}  # the gold letter cycles


def test_bad_paired_input_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PrunelensError, match="unknown paired task 'hellaswag'"):
        pe.check_paired_task("hellaswag", tmp_path)
    with pytest.raises(PrunelensError, match="needs arc_easy_test.jsonl"):
        pe.check_paired_task("arc_easy", tmp_path)
    _jsonl(tmp_path / "arc_easy_test.jsonl", [{"question": "Q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(PrunelensError, match=r"row 1: answer index 2"):
        pe.paired_questions("arc_easy", tmp_path, None, 0)
    _jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "q", "answer": "a", "target": "many"}] * 3)
    with pytest.raises(PrunelensError, match="target 'many' is not a number"):
        pe.paired_questions("gsm8k", tmp_path, None, 0, shots=1)


def test_dense_correct_keeps_questions_right_in_both_formats(monkeypatch, tmp_path: Path) -> None:
    qs = [pe.PairedQuestion(i, f"q{i}", ("a", "b"), 0) for i in range(6)]
    monkeypatch.setattr(pe, "paired_questions", lambda *a, **k: qs)
    # dense: right in MCQ on 0-3, in generation on 1-4, so both on 1, 2, 3
    outcomes = {"dense": ([1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]),
                "m": ([1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 0, 1])}
    seen = {}

    def fake_side(lm, s, questions, mod, label):
        seen[label] = [q.index for q in questions]
        mcq, gen = outcomes[label]
        idx = [q.index for q in questions]
        return {"mcq_choice": [1 - mcq[i] for i in idx], "mcq_hits": [float(mcq[i]) for i in idx],
                "gen_answer": [0 if gen[i] else None for i in idx], "gen_hits": [float(gen[i]) for i in idx],
                "gen_text": [""] * len(idx), "mcq_shares": [0.5, 0.5]}

    monkeypatch.setattr(pe, "both_formats", fake_side)
    lm = SimpleNamespace(info={"name": "stand-in"}, tokenizer=None)  # both_formats is replaced: no model runs
    res = pe.paired_eval(lm, "arc_easy", tmp_path, {"m": object()}, limit=6, select="dense-correct",
                         progress=False, samples=0)  # type: ignore[arg-type]
    assert seen == {"dense": [0, 1, 2, 3, 4, 5], "m": [1, 2, 3]}
    assert (res["pool"], res["n"]) == (6, 3)
    assert res["dense_pool"]["mcq_acc"] == pytest.approx(4 / 6) and res["dense"]["mcq_acc"] == 1.0
    r = res["methods"][0]
    # on 1, 2, 3 the method keeps MCQ on 1 and 3 (drop 1/3), generation on 3 only (drop 2/3)
    assert r["mcq_drop"] == pytest.approx(1 / 3) and r["gen_drop"] == pytest.approx(2 / 3)
    assert r["gap"] == pytest.approx(-1 / 3) and r["ci_low"] <= r["gap"] <= r["ci_high"]
    outcomes["dense"] = ([0] * 6, [1] * 6)
    with pytest.raises(PrunelensError, match="none of the 6 questions right in both formats"):
        pe.paired_eval(lm, "arc_easy", tmp_path, {}, limit=6, select="dense-correct", progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_paired_on_the_real_model_pairs_dense_with_itself_exactly() -> None:
    from prunelens import load_model, select_drop

    lm = load_model("smollm2-135m")
    mods = {"dense-again": None, "block@3,9,15": select_drop(lm, "block@3,9,15")}
    res = pe.paired_eval(lm, "arc_easy", DATA, mods, limit=12, seed=3, style="cloze", progress=False)
    same, pruned = res["methods"]
    assert res["n"] == res["pool"] == 12 and res["chance"] == pytest.approx(
        sum(1 / len(q["choices"]) for q in res["questions"]) / 12)
    # the unmodified model reads the same in both formats: nothing drops, every choice agrees
    assert (same["mcq_drop"], same["gen_drop"], same["gap"], same["mcq_agree"]) == (0.0, 0.0, 0.0, 1.0)
    assert same["per_question"]["gen_text"] == res["dense"]["per_question"]["gen_text"]
    # three blocks dropped change what the model says and chooses
    assert pruned["per_question"]["gen_text"] != res["dense"]["per_question"]["gen_text"]
    assert pruned["gap"] == pytest.approx(pruned["mcq_drop"] - pruned["gen_drop"])
    golds = [q["gold"] for q in res["questions"]]
    hits = [float(c == g) for c, g in zip(res["dense"]["per_question"]["mcq_choice"], golds, strict=True)]
    assert res["dense"]["mcq_acc"] == pytest.approx(sum(hits) / 12)
    # where the lost answers went: every answer the drop lost is traced, none for the model vs itself
    right = [[a == g for a, g in zip(side["per_question"]["gen_answer"], golds, strict=True)]
             for side in (res["dense"], pruned)]
    lost = sum(d and not m for d, m in zip(*right, strict=True))
    w = pruned["where_answers_went"]
    assert w["n"] == min(lost, 16) and len(w.get("ranks", [])) <= w["n"]
    assert same["where_answers_went"]["n"] == 0
    assert same["where_answers_went"]["ece"]["dense"] == pytest.approx(same["where_answers_went"]["ece"]["pruned"])
    # letters style: one step over the option letters, every choice a valid position
    let = pe.paired_eval(lm, "arc_easy", DATA, {}, limit=6, seed=3, style="letters", progress=False)
    assert let["methods"] == [] and len(let["dense"]["per_question"]["mcq_choice"]) == 6
    assert all(0 <= c < len(q["choices"]) for c, q in zip(let["dense"]["per_question"]["mcq_choice"],
                                                          let["questions"], strict=True))


@pytest.mark.parametrize(("task", "given", "used"), [("arc_easy", None, pe.GEN_TOKENS), ("arc_easy", 7, 7),
                                                     ("gsm8k", None, pe.GSM8K_TOKENS), ("gsm8k", 9, 9)])
def test_free_answer_budget_is_the_flag(monkeypatch, tmp_path: Path, task: str, given: int | None,
                                        used: int) -> None:
    qs = [pe.PairedQuestion(i, f"q{i}", ("a", "b"), 0, 1.0 if task == "gsm8k" else None) for i in range(3)]
    monkeypatch.setattr(pe, "paired_questions", lambda *a, **k: qs)
    monkeypatch.setattr(pe, "mcq_probs", lambda lm, s, questions, *a: [[1.0, 0.0]] * len(questions))
    budgets = []

    def fake_answer(lm, target, items, *a, **k):
        budgets.append(target.max_new_tokens)
        return [pe.Generation("a", ())] * len(items)

    def fake_gsm8k(lm, data_dir, limit, seed, shots, mod, batch_size, new_tokens, *a):
        budgets.append(new_tokens)
        return SimpleNamespace(samples=[{"index": q.index, "flexible": 1.0} for q in qs])

    monkeypatch.setattr(pe, "answer", fake_answer)
    monkeypatch.setattr(pe, "evaluate_gsm8k", fake_gsm8k)
    lm = SimpleNamespace(info={"name": "stand-in"}, tokenizer=None)
    res = pe.paired_eval(lm, task, tmp_path, {}, limit=3, progress=False, gen_tokens=given)  # type: ignore[arg-type]
    assert budgets == [used] and res["gen_tokens"] == used


def test_paired_cli_has_max_new_tokens_and_refuses_generate_configs_in_one_line(tmp_path: Path) -> None:
    from prunelens.cli import build_parser

    args = build_parser().parse_args(["paired", "--task", "arc_easy", "--method", "attn:1",
                                      "--max-new-tokens", "64"])
    assert (args.task, args.max_new_tokens) == ("arc_easy", 64)
    assert build_parser().parse_args(["paired", "--tasks", "mmlu", "--method", "attn:1"]).max_new_tokens is None
    _jsonl(tmp_path / "x.jsonl", [{"q": "one plus one?", "a": "2"}])
    cfg = tmp_path / "free.yaml"
    cfg.write_text("task: free\nkind: generate\ndata_files: x.jsonl\nprompt: '{{q}}'\ntarget: '{{a}}'\n")
    with pytest.raises(PrunelensError, match="is a generate config: its items have a target but no answer "
                                             "options") as e:
        pe.check_paired_task(str(cfg), tmp_path)
    assert "\n" not in str(e.value)


def test_a_saved_candidate_pairs_like_the_recipe_view(tmp_path: Path) -> None:
    """A model made elsewhere goes through the same paired evaluation: the recipe's checkpoint loaded
    as a candidate gives the same per-question outcomes as the recipe's view of the base."""
    base_dir = save_tiny(tmp_path / "base")
    base = load_model(str(base_dir))
    plan = build(base, Recipe.parse("wanda:0.5"), Calibration(samples=2, seq_len=16))
    save_modified(base, plan, tmp_path / "cand")
    base = load_model(str(base_dir))
    plan = build(base, Recipe.parse("wanda:0.5"), Calibration(samples=2, seq_len=16))
    _jsonl(tmp_path / "arc_easy_test.jsonl", [
        {"question": f"w{5 + i} w{9 + i}", "choices": [f"w{20 + i}", f"w{30 + i}", f"w{40 + i}"], "answer": i % 3}
        for i in range(6)])
    kw = dict(limit=6, seed=0, gen_tokens=4, progress=False, n_boot=50)
    want = pe.paired_eval(base, "arc_easy", tmp_path, {"wanda": plan}, **kw)
    got = pe.paired_eval(base, "arc_easy", tmp_path, {"wanda": load_candidate(str(tmp_path / "cand"), base,
                                                                              align=False)}, **kw)
    assert got["methods"][0]["per_question"] == want["methods"][0]["per_question"]
    assert got["methods"][0]["gap"] == want["methods"][0]["gap"]
