"""``eval --candidate`` and ``ppl --candidate`` on tiny saved models: a recipe saved by ``prune`` and
scored as a candidate gives the recipe's own numbers, and ``--positions second-half`` is
llama.cpp's ``llama-perplexity`` convention (BOS first where the model adds one, the second half
of each window scored)."""

from __future__ import annotations

import argparse
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from prunelens import options
from prunelens.cli import main
from prunelens.model.arch import Adapter
from prunelens.model.loading import LoadedModel
from prunelens.prune.checkpoint import load_model
from prunelens.tasks.pairing import score_candidate
from prunelens.tasks.perplexity import adds_bos, kl_statistics, perplexity, scored_windows
from prunelens.tasks.registry import TaskOptions
from prunelens.testing import BOS, save_tiny, tiny_model, tiny_tokenizer

CALIB = ["--calib-samples", "2", "--calib-len", "16"]
TEXT = " ".join(f"w{3 + (i * 37) % 125}" for i in range(600))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny base, two recipes saved by ``prune`` (a drop and a calibrated weight method), a
    multiple-choice task config over 40 questions and a text."""
    root = tmp_path_factory.mktemp("cand")
    out = {"base": save_tiny(root / "base")}
    for spec in ("attn@1", "wanda:0.5"):
        out[spec] = root / spec.replace(":", "_").replace("@", "_")
        assert main(["prune", "--model", str(out["base"]), "--recipe", spec, *CALIB, "--out", str(out[spec])]) == 0
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(40):
        w = [f"w{int(x)}" for x in torch.randint(3, 128, (7,), generator=g)]
        rows.append({"q": " ".join(w[:3]), "opts": w[3:], "a": int(torch.randint(0, 4, (1,), generator=g))})
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["task"] = root / "mc.yaml"
    out["task"].write_text("task: mc\nkind: multiple_choice\ndata_files: mc.jsonl\nprompt: '{{q}}'\n"
                           "choices: opts\nanswer: a\n")
    out["text"] = root / "text.txt"
    out["text"].write_text(TEXT)
    return out


@pytest.mark.parametrize("spec", ["attn@1", "wanda:0.5"])
def test_eval_candidate_equals_the_recipe(saved: dict[str, Path], tmp_path: Path, spec: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The checkpoint ``prune --recipe`` saved, scored as a candidate (sequential mode), gives the
    per-item outcomes, paired test and lost/gained items of ``eval --recipe``."""
    base, task = str(saved["base"]), str(saved["task"])
    rec, cand = tmp_path / "recipe.json", tmp_path / "candidate.json"
    assert main(["eval", "--model", base, "--tasks", task, "--recipe", spec, *CALIB, "--out", str(rec),
                 "--quiet"]) == 0
    assert main(["eval", "--model", base, "--tasks", task, "--candidate", str(saved[spec]), "--out", str(cand),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    a, b = json.loads(rec.read_text()), json.loads(cand.read_text())
    assert b["candidate"]["candidate"] == str(saved[spec]) and "modification" not in b
    ra, rb = a["tasks"][0], b["tasks"][0]
    for side in ("dense", "modified"):
        assert rb[side]["details"]["predictions"] == ra[side]["details"]["predictions"]
        assert rb[side]["score"] == pytest.approx(ra[side]["score"], abs=1e-12)
    assert rb["paired"] == pytest.approx(ra["paired"], nan_ok=True)
    assert (rb["lost"], rb["gained"]) == (ra["lost"], ra["gained"])
    # lost/gained by their definition, from the per-item predictions
    d, m = rb["dense"]["details"], rb["modified"]["details"]
    right = {i: (p == g, q == g) for i, p, q, g in zip(d["indices"], d["predictions"], m["predictions"], d["golds"],
                                                       strict=True)}
    assert rb["lost"] == [i for i in d["indices"] if right[i][0] and not right[i][1]]
    assert rb["gained"] == [i for i in d["indices"] if right[i][1] and not right[i][0]]
    assert rb["paired"]["lost"] == len(rb["lost"]) and rb["paired"]["gained"] == len(rb["gained"])
    assert rb["lost"] or rb["gained"], "the candidate changed no answer: the comparison would prove nothing"
    assert f"lost {len(rb['lost'])} (right for dense, wrong for {saved[spec].name})" in printed


@pytest.mark.parametrize("positions", ["all", "second-half"])
def test_ppl_kld_candidate_equals_the_recipe(saved: dict[str, Path], tmp_path: Path, positions: str) -> None:
    base, text = str(saved["base"]), str(saved["text"])
    common = ["--text", text, "--seq-len", "24", "--kld", "--positions", positions, "--quiet"]
    rec, cand = tmp_path / "r.json", tmp_path / "c.json"
    assert main(["ppl", "--model", base, "--recipe", "wanda:0.5", *CALIB, *common, "--out", str(rec)]) == 0
    assert main(["ppl", "--model", base, "--candidate", str(saved["wanda:0.5"]), *common, "--out", str(cand)]) == 0
    a, b = json.loads(rec.read_text()), json.loads(cand.read_text())
    ka, kb = a["kl_statistics"], b["kl_statistics"]
    assert ka.keys() == kb.keys()
    for key, v in ka.items():
        assert kb[key] == (pytest.approx(v, abs=1e-9) if isinstance(v, float) else v), key
    assert ka["mean_kld"] > 0.01  # a real difference, compared at 1e-9
    per = 24 - 1 - (12 if positions == "second-half" else 0)
    assert kb["positions"] == kb["windows"] * per
    # and without --kld, the candidate's own perplexity over the same windows
    plain = tmp_path / "p.json"
    assert main(["ppl", "--model", base, "--candidate", str(saved["wanda:0.5"]), "--text", text, "--seq-len", "24",
                 "--positions", positions, "--quiet", "--out", str(plain)]) == 0
    assert json.loads(plain.read_text())["modified"]["perplexity"] == pytest.approx(kb["ppl_mod"], rel=1e-9)


def _bos_lm() -> LoadedModel:
    """The tiny model with a tokenizer that puts BOS before every text (as Llama's does)."""
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)])
    m = tiny_model("llama")
    return LoadedModel(m, tok, Adapter(m), {"name": "tiny-bos"})


@pytest.mark.parametrize("seq_len", [16, 17])
def test_second_half_is_llamacpps_convention(seq_len: int) -> None:
    """llama.cpp tokenises the corpus with BOS, cuts chunks of n_ctx, overwrites each chunk's first
    token with BOS and scores the predictions from first = n_ctx/2 to n_ctx - 2: the perplexity is
    recomputed here from the plain forward's logits of those chunks."""
    lm = _bos_lm()
    assert adds_bos(lm.tokenizer) and not adds_bos(tiny_tokenizer())
    ids = lm.tokenizer(TEXT)["input_ids"]
    assert ids[0] == BOS
    windows, first, _ = scored_windows(lm, TEXT, seq_len, 5, "second-half")
    assert first == seq_len // 2 and windows.shape == (5, seq_len)
    for i, w in enumerate(windows.tolist()):
        assert w == [BOS] + ids[i * seq_len + 1:(i + 1) * seq_len]
    nll, count = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(lm.model(input_ids=w[None]).logits[0].double(), -1)
        for pos in range(first, seq_len - 1):
            nll -= float(logp[pos, w[pos + 1]])
            count += 1
    got = perplexity(lm, TEXT, seq_len=seq_len, max_windows=5, progress=False, positions="second-half")
    assert got["tokens"] == count == 5 * (seq_len - 1 - seq_len // 2)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # "all" is unchanged: no BOS substitution, every prediction
    assert scored_windows(lm, TEXT, seq_len, 5, "all")[0][1, 0] == ids[seq_len]
    assert perplexity(lm, TEXT, seq_len=seq_len, max_windows=5, progress=False)["tokens"] == 5 * (seq_len - 1)


def test_second_half_kl_against_a_candidate_model() -> None:
    """KL(p_base ‖ p_candidate) over the second half of each window, from two separately held
    models' full logits, with BOS first in each window."""
    lm, other = _bos_lm(), _bos_lm()
    cm = tiny_model("llama", seed=1)
    other = LoadedModel(cm, other.tokenizer, Adapter(cm), {"name": "tiny-other"})
    k = kl_statistics(lm, TEXT, candidate=other, seq_len=16, max_windows=3, progress=False, positions="second-half")
    windows, first, _ = scored_windows(lm, TEXT, 16, 3, "second-half")
    kls, same = [], []
    for w in windows:
        lb = torch.log_softmax(lm.model(input_ids=w[None]).logits[0, first:-1].double(), -1)
        lc = torch.log_softmax(cm(input_ids=w[None]).logits[0, first:-1].double(), -1)
        kls += (lb.exp() * (lb - lc)).sum(-1).tolist()
        same += (lb.argmax(-1) == lc.argmax(-1)).tolist()
    assert k["positions"] == len(kls) == 3 * 7
    assert k["mean_kld"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert k["same_top"] == pytest.approx(sum(same) / len(same))
    assert k["positions_rule"] == "second-half"


def test_sequential_mode_frees_the_base_before_the_candidate_loads(saved: dict[str, Path]) -> None:
    base = load_model(str(saved["base"]))
    ref = weakref.ref(base.model)
    args = argparse.Namespace(candidate=str(saved["attn@1"]), device="cpu", dtype="float32", device_map=None,
                              max_memory=None, offload_dir=None, trust_remote_code=False)

    def load(shell: LoadedModel):
        assert ref() is None, "the base's weights are still alive when the candidate loads"
        return options.scoring_candidate(args, shell)

    opts = TaskOptions(limit=5, progress=False)
    dense, cand = score_candidate(base, [str(saved["task"])], None, opts, load)
    assert dense[0].n == 5 and cand.lm.tokenizer is base.tokenizer  # the base's tokenizer and chat template


def test_candidate_chat_template_differs_note(saved: dict[str, Path], tmp_path: Path) -> None:
    """A candidate whose tokenizer differs only by its chat template is scored through the base's
    tokenizer (same ids, the base's template), with a note saying so."""
    other = tmp_path / "other"
    save_tiny(other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }} w9 {% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    base = load_model(str(saved["base"]))
    args = argparse.Namespace(candidate=str(other), device="cpu", dtype="float32", device_map=None,
                              max_memory=None, offload_dir=None, trust_remote_code=False)
    cand = options.scoring_candidate(args, base)
    assert cand.lm.tokenizer is base.tokenizer and cand.layer_map is None
    assert any("chat template" in n for n in cand.notes)


def test_tokenizer_mismatch_stops_eval_before_the_base_runs(saved: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    save_tiny(other)
    tok = tiny_tokenizer()
    tok.add_tokens(["extra"])
    tok.save_pretrained(other)

    def never(*a: object, **k: object) -> None:
        raise AssertionError("the base ran its tasks before the candidate's tokenizer was checked")

    monkeypatch.setattr("prunelens.cli.score_candidate", never)
    assert main(["eval", "--model", str(saved["base"]), "--tasks", str(saved["task"]), "--candidate", str(other),
                 "--quiet"]) == 2
    assert "vocabulary sizes differ" in capsys.readouterr().err
