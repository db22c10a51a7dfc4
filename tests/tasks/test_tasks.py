"""Multiple-choice evaluation: formats, scoring rules, shared-prefix log-likelihoods, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunelens.tasks.loglik as loglik
import prunelens.tasks.mcq as mcq
from prunelens.errors import PrunelensError
from prunelens.tasks.loglik import Request, Scored, score_requests, split_tokens
from prunelens.testing import shared_data_dir

DATA = shared_data_dir()


@pytest.fixture(scope="module")
def lm(real_lm):
    return real_lm


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _items(task: str, root: Path, rows: list) -> list:
    """A built-in task's items from rows written as its local file in ``root``."""
    _jsonl(root / mcq.MCQ_TASKS[task].source.files[0], rows)
    return mcq.MCQ_TASKS[task].build(root)


def test_shared_prefix_scores_equal_a_full_forward(lm) -> None:
    reqs = [
        Request("Question: Which animal barks?\nAnswer:", (" A dog", " A cat that sleeps all day")),
        Request("The sky is ", ("blue", "green and full of stars")),  # each option its own sequence
        Request("Is water wet? Answer yes or no.\nAnswer:", (" yes", " no")),  # one token each
        Request("Which letter comes first in the alphabet?\nA. Z\nB. A\nAnswer:", (" A", " B")),
        Request("Name a colour:", (" red", " light blue")),
        # WinoGrande: each option its own context; long shared prefix (shared), short one (not)
        Request("", (" is too big.", " is too big."), (
            "The trophy doesn't fit into the brown suitcase because the trophy",
            "The trophy doesn't fit into the brown suitcase because the suitcase")),
        Request("", (" was hungry.", " was hungry."), ("Ann fed Bea because Ann", "Bea fed Ann because Ann")),
    ]  # trailing space moves over
    got = score_requests(lm, reqs, batch_size=2, progress=False)
    for r, g in zip(reqs, got, strict=True):
        for k, (cont, lp, n, greedy) in enumerate(zip(r.continuations, g.logprobs, g.n_tokens, g.is_greedy,
                                                      strict=True)):
            ctx, toks = split_tokens(lm.tokenizer, r.context_of(k), cont)
            with torch.inference_mode():
                logp = torch.log_softmax(lm.model(torch.tensor([ctx + toks])).logits.float(), -1)[0]
            want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(toks))
            assert lp == pytest.approx(want, abs=2e-4) and n == len(toks)
            assert greedy == all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(toks))


def test_split_moves_trailing_space_to_the_continuation(lm) -> None:
    a = split_tokens(lm.tokenizer, "Answer: ", "yes")
    b = split_tokens(lm.tokenizer, "Answer:", " yes")
    assert a == b


def test_acc_and_acc_norm_pick_by_sum_and_by_per_character(monkeypatch) -> None:
    # option texts "a" (1 char) and "abc" (3 chars); the delimiter space is not counted (lm-eval):
    # per char -1.2/1 = -1.2 vs -3.3/3 = -1.1 picks option 1 (counting the space would pick 0)
    items = [mcq.Item(("q",) * 2, (" a", " abc"), gold=1)]

    def fake(lm, requests, *a, **k):  # summed log-probabilities: acc picks option 0
        return [Scored((-1.2, -3.3), (1, 2), (False, False))]

    monkeypatch.setattr(mcq, "score_requests", fake)
    assert mcq.score_items(None, items, progress=False) == ([0], [1])


def test_formats_match_lm_eval(tmp_path: Path) -> None:
    arc = _items("arc_easy", tmp_path, [{"question": "Q?", "choices": ["x", "y"], "answer": 1}])
    assert arc[0] == mcq.Item(("Question: Q?\nAnswer:",) * 2, (" x", " y"), 1)
    bq = _items("boolq", tmp_path, [{"question": "is it", "passage": "P.", "answer": 0}])
    assert bq[0].contexts[0] == "P.\nQuestion: is it?\nAnswer:" and bq[0].continuations == (" no", " yes")
    wg = _items("winogrande", tmp_path, [{"choices": ["Tom ran", "Ann ran"], "continuation": "home.", "answer": 1}])
    assert wg[0] == mcq.Item(("Tom ran", "Ann ran"), (" home.", " home."), 1)
    hs = _items(
            "hellaswag", tmp_path,
            [
                {
                    "ctx_a": "A man sits.",
                    "ctx_b": "he",
                    "activity_label": "Fishing",
                    "endings": ["x [title] y", "z"],
                    "label": "1",
                }
            ],
    )
    assert (
        hs[0].contexts[0] == "Fishing: A man sits. He"
        and hs[0].continuations[0] == " x. y"
        and hs[0].gold == 1
    )


def test_mmlu_letters_and_five_shot(tmp_path: Path) -> None:
    row = {
        "subject": "high_school_physics",
        "question": " What? ",
        "choices": ["a", "b", "c", "d"],
        "answer": 2,
    }
    _jsonl(tmp_path / "mmlu_dev.jsonl", [{**row, "question": f"Dev {i}", "answer": i % 4} for i in range(6)])
    _jsonl(tmp_path / "mmlu_test.jsonl", [row])
    zero = mcq.MCQ_TASKS["mmlu"].build(tmp_path)[0]
    assert zero.contexts[0] == (
        "The following are multiple choice questions (with answers) about high school "
        "physics.\n\nWhat?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    assert zero.continuations == (" A", " B", " C", " D") and zero.gold == 2
    five = mcq.MCQ_TASKS["mmlu_5shot"].build(tmp_path)[0].contexts[0]
    assert five.count("\nAnswer:") == 6 and "Dev 4" in five and "Dev 5" not in five and "Dev 1\nA. a" in five
    assert "Dev 1\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n" in five
    full = mcq.MCQ_TASKS["mmlu_full"].build(tmp_path)[0]
    assert full.continuations == (" a", " b", " c", " d") and "\nA. a" not in full.contexts[0]


def test_bad_data_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "arc_easy_test.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n{"question": \n')
    with pytest.raises(PrunelensError, match=r"arc_easy_test.jsonl:2: not valid JSON"):
        mcq.evaluate_mcq(None, "arc_easy", tmp_path)
    _jsonl(bad, [{"question": "q", "choices": ["a"]}])
    with pytest.raises(PrunelensError, match=r":1: field 'answer' missing"):
        mcq.evaluate_mcq(None, "arc_easy", tmp_path)
    _jsonl(bad, [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(PrunelensError, match="answer index 5 outside 0..1"):
        mcq.evaluate_mcq(None, "arc_easy", tmp_path)
    with pytest.raises(PrunelensError, match="needs piqa_validation.jsonl"):
        mcq.evaluate_mcq(None, "piqa", tmp_path)
    _jsonl(tmp_path / "piqa_validation.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(PrunelensError, match="answer index 2 outside 0..1"):
        mcq.evaluate_mcq(None, "piqa", tmp_path)
    _jsonl(
        tmp_path / "hellaswag_validation.jsonl",
        [{"ctx_a": "a", "ctx_b": "b", "activity_label": "c", "endings": ["x", "y"], "label": ""}],
    )
    with pytest.raises(PrunelensError, match="label '' is not an index"):
        mcq.evaluate_mcq(None, "hellaswag", tmp_path)
    with pytest.raises(PrunelensError, match="unknown task 'gsm8k_mcq'"):
        mcq.evaluate_mcq(None, "gsm8k_mcq", tmp_path)
    with pytest.raises(PrunelensError, match="--limit must be at least 1"):
        mcq.sample_indices(10, 0, 0)


def test_seeded_sample_is_stable_and_ordered() -> None:
    a = mcq.sample_indices(1000, 20, seed=7)
    assert a == mcq.sample_indices(1000, 20, seed=7) and a == sorted(a) and len(set(a)) == 20
    assert a != mcq.sample_indices(1000, 20, seed=8)
    assert mcq.sample_indices(5, 20, 0) == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_real_arc_easy_above_chance_and_pruning_changes_scores(lm) -> None:
    from prunelens import select_drop

    # measured: acc 0.49 +- 0.03 on 300 questions; ~4 options, so chance is about 0.25
    dense = mcq.evaluate_mcq(lm, "arc_easy", DATA, limit=100, seed=0, progress=False)
    assert dense.n == 100 and dense.acc > 0.35
    assert dense.acc_stderr == pytest.approx((dense.acc * (1 - dense.acc) / 99) ** 0.5, rel=1e-9)
    pruned = mcq.evaluate_mcq(
        lm, "arc_easy", DATA, limit=100, seed=0, modification=select_drop(lm, "block@3,9,15"), progress=False
    )
    assert pruned.indices == dense.indices and pruned.predictions != dense.predictions
    f = mcq.answer_flips(dense.golds, dense.predictions, pruned.predictions)
    # flips bound the accuracy change from above: |Δacc| = |wrong→right − right→wrong| ≤ flips
    assert abs(pruned.acc - dense.acc) == pytest.approx(abs(f["wrong_to_right"] - f["right_to_wrong"]))
    assert abs(pruned.acc - dense.acc) <= f["flips"] <= f["changed"] and f["flips"] > 0


def test_answer_flips_by_definition() -> None:
    # right→right, right→wrong, wrong→right, wrong→another wrong
    f = mcq.answer_flips([0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 2, 1])
    assert f == {"flips": 0.5, "right_to_wrong": 0.25, "wrong_to_right": 0.25, "changed": 0.75, "n": 4}
    with pytest.raises(PrunelensError, match="same questions"):
        mcq.answer_flips([0, 1], [0], [0, 1])


@pytest.mark.parametrize("row_tokens", [256, 5])  # 5: one request a row, rows of unequal width
@pytest.mark.parametrize("mt", ["llama", "gemma3_text", "qwen2", "gemma2", "mistral", "phi3"])
def test_every_scoring_path_equals_a_full_forward_on_tiny_models(mt: str, row_tokens: int,
                                                                monkeypatch) -> None:
    """Packed trees (shared prefix, per-option branches, several requests a row, padded rows),
    one-token options and per-option contexts: each option's log-probability equals that of a
    plain forward. The tiny sliding-window models (window 4; Gemma 2 also soft-caps its logits)
    send requests longer than the window down the unpacked path and pack the shorter ones."""
    from prunelens.testing import tiny_model, tiny_tokenizer

    monkeypatch.setattr(loglik, "ROW_TOKENS", row_tokens)

    from prunelens.model.arch import Adapter
    from prunelens.model.loading import LoadedModel

    model = tiny_model(mt)
    lm = LoadedModel(model, tiny_tokenizer(), Adapter(model), {"name": f"tiny-{mt}"})
    reqs = [
        Request("w3 w4 w5 w6 w7 w8 w9", (" w10 w11", " w12", " w13 w14 w15")),  # shared prefix
        Request("w20 w21 w22 w23 w24", (" w25 w26", " w27")),
        Request("w3", (" w30 w31 w32 w33", " w34 w35")),  # short context: one sequence per option
        Request("w40 w41 w42 w43", (" w44", " w45", " w46")),  # one token each
        Request("w5 w6", (" w7", " w8")),
        Request("", (" w60 w61", " w60 w61"), ("w50 w51 w52 w53 w54 w55 w56", "w50 w51 w52 w53 w54 w55 w57")),
        Request("", (" w62", " w62"), ("w58 w59", "w59 w58")),  # nothing shared
    ]
    got = score_requests(lm, reqs, batch_size=2, progress=False)
    for r, g in zip(reqs, got, strict=True):
        for k, (cont, lp, greedy) in enumerate(zip(r.continuations, g.logprobs, g.is_greedy, strict=True)):
            ctx, toks = split_tokens(lm.tokenizer, r.context_of(k), cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + toks])).logits.float(), -1)[0]
            want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(toks))
            assert lp == pytest.approx(want, abs=1e-4), (mt, r, k)
            assert greedy == all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(toks))


def test_a_request_packs_as_a_prefix_and_one_branch_per_option() -> None:
    # context [1, 2, 3]; options [4, 5] and [6]: the inputs (less each last token) are [1, 2, 3, 4]
    # and [1, 2, 3]; they share [1, 2, 3]; option 0's branch is [4], option 1 needs none
    t = loglik._tree(7, [([1, 2, 3], [4, 5]), ([1, 2, 3], [6])], [0, 1])
    assert (t.req, t.tokens, t.positions, t.branch) == (7, [1, 2, 3, 4], [0, 1, 2, 3], [0, 0, 0, 1])
    assert t.where == [[(4, 2), (5, 3)], [(6, 2)]]  # (token, packed index predicting it)
    # per-option contexts (WinoGrande): prefix [1, 2], branches [3, 9] and [4, 9] at positions 2, 3
    u = loglik._tree(0, [([1, 2, 3], [9, 8]), ([1, 2, 4], [9, 8])], [0, 1])
    assert (u.tokens, u.positions, u.branch) == ([1, 2, 3, 9, 4, 9], [0, 1, 2, 3, 2, 3], [0, 0, 1, 1, 2, 2])
    assert u.where == [[(9, 2), (8, 3)], [(9, 4), (8, 5)]]


def test_packed_rows_mask_siblings_other_requests_and_padding() -> None:
    a = loglik._tree(0, [([1, 2], [3, 4]), ([1, 2], [5, 6])], [0, 1])  # tokens [1, 2, 3, 5]
    b = loglik._tree(1, [([7], [8])], [0])  # tokens [7]
    c = loglik._tree(2, [([9], [10, 11])], [0])  # tokens [9, 10]
    rows = loglik._pack([a, b, c], row_tokens=5)
    assert [[t.req for t in r] for r in rows] == [[0, 1], [2]]  # first fit, fullest row first
    ids, pos, mask = loglik._row_tensors(rows, pad=0, dtype=torch.float32, dev=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3, 5, 7], [9, 10, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 2, 0], [0, 1, 0, 0, 0]]
    seen = (mask[:, 0] == 0).int().tolist()
    assert seen[0] == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],   # branch of option 0
                       [1, 1, 0, 1, 0],   # option 1's branch sees the prefix, not its sibling
                       [0, 0, 0, 0, 1]]   # the next request sees only itself
    assert seen[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert float(mask.min()) == torch.finfo(torch.float32).min
