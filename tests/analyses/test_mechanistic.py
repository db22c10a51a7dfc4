"""Option-subspace metrics on hand-made distributions, memory footprints by hand, and the
cross-method comparison (resume, figure) on a tiny model; the subspace run on the real model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import prunelens.analyses.compare as compare_mod
from prunelens.analyses.compare import compare_methods
from prunelens.analyses.trace import TraceSettings
from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.metrics import subspace_metrics
from prunelens.model.arch import Adapter
from prunelens.model.loading import LoadedModel
from prunelens.prune.recipe import build, footprint
from prunelens.testing import save_tiny, shared_data_dir, tiny_model, tiny_tokenizer

DATA = shared_data_dir()


def test_subspace_metrics_by_hand() -> None:
    # options = tokens 0..2; token 3 is outside. q_dense = (1/4, 1/4, 1/2)
    zd = torch.tensor([[0.0, 0.0, math.log(2.0), 5.0]])
    idx = torch.tensor([[0, 1, 2]])
    same = subspace_metrics(zd, zd + torch.tensor([[3.0, 3.0, 3.0, -1.0]]), idx)  # shift on the options only
    assert same["sub_kl"].item() == pytest.approx(0.0, abs=1e-15) and same["sub_cos"].item() == 1.0
    assert same["sub_agree"].item() == 1.0
    assert same["mass_dense"].item() == pytest.approx(4 / (4 + math.exp(5)))
    # pruned q = (1/2, 1/4, 1/4): KL(q_p || q_d) = ln2/2 + 0 + ln(1/2)/4 = ln2/4; cos = (5/16)/(3/8)
    zp = torch.tensor([[math.log(2.0), 0.0, 0.0, 5.0]])
    m = subspace_metrics(zd, zp, idx)
    assert m["sub_kl"].item() == pytest.approx(math.log(2) / 4)
    assert m["sub_cos"].item() == pytest.approx(5 / 6)
    assert m["sub_agree"].item() == 0.0
    # temperature divides the logits before the softmax
    t2 = subspace_metrics(zd * 2, zp * 2, idx, temperature=2.0)
    assert t2["sub_kl"].item() == pytest.approx(m["sub_kl"].item())


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    m = tiny_model("llama")
    return LoadedModel(m, tiny_tokenizer(), Adapter(m), {"name": "tiny-llama"})


def test_footprint_by_hand(tiny: LoadedModel) -> None:
    # per block: q 32x32, k 16x32, v 16x32, o 32x32 = 3072; gate, up 64x32, down 32x64 = 6144
    per_block = 3072 + 6144
    fp = footprint(tiny, build(tiny, "attn@1"))
    assert fp["removed_share"] == pytest.approx(3072 / (4 * per_block)) and fp["bits_per_weight"] == 16
    fp = footprint(tiny, build(tiny, "block@0,2"))
    assert fp["removed_share"] == pytest.approx(0.5) and fp["memory_vs_bf16"] == pytest.approx(0.5)
    q = footprint(tiny, build(tiny, "rtn:w4g16", progress=False))
    assert q["removed_share"] == 0.0 and 4 < q["bits_per_weight"] < 6
    s = footprint(tiny, build(tiny, "magnitude:0.5", progress=False))
    assert s["removed_share"] == pytest.approx(0.5, abs=0.01)


def test_compare_methods_resumes_and_draws(tiny: LoadedModel, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings = TraceSettings(max_new_tokens=4, chat_template=False, logit_lens=False)
    prompts = ["w5 w6 w7", "w8 w9 w10 w11"]
    specs = ["attn@1", "mlp@2", "rtn:w4"]
    res = compare_methods(tiny, specs, prompts, settings, tmp_path / "c", progress=False)
    assert [m["spec"] for m in res["methods"]] == ["attn@1", "mlp@2", "rtn:w4"]
    assert (tmp_path / "c" / "figures" / "compare.png").stat().st_size > 0
    assert (tmp_path / "c" / "runs" / "mlp@2" / "report.html").is_file()
    for m in res["methods"]:
        assert len(m["curves"]["teacher_forced"]["kl"]) == 4
    calls = []
    real = compare_mod.analyze
    monkeypatch.setattr(compare_mod, "analyze", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = compare_methods(tiny, [*specs, "block@3"], prompts, settings, tmp_path / "c", progress=False)
    assert len(calls) == 1 and len(again["methods"]) == 4  # only the new method was analysed
    assert json.loads((tmp_path / "c" / "results.json").read_text())["methods"][0]["curves"] == \
        res["methods"][0]["curves"]
    with pytest.raises(PrunelensError, match="other settings or prompts"):
        compare_methods(tiny, ["attn@1"], prompts[:1], settings, tmp_path / "c", progress=False)



def test_compare_reanalyses_an_edited_recipe_file(tiny: LoadedModel, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    settings = TraceSettings(max_new_tokens=2, chat_template=False, logit_lens=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- attn@1\n")
    calls = []
    real = compare_mod.analyze
    monkeypatch.setattr(compare_mod, "analyze", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = compare_methods(tiny, [str(recipe)], ["w5 w6"], settings, tmp_path / "c", progress=False)
    compare_methods(tiny, [str(recipe)], ["w5 w6"], settings, tmp_path / "c", progress=False)
    assert len(calls) == 1  # unchanged: the cached run is reused
    recipe.write_text("- mlp@2\n")  # same file name, other content
    again = compare_methods(tiny, [str(recipe)], ["w5 w6"], settings, tmp_path / "c", progress=False)
    assert len(calls) == 2 and again["methods"][0]["recipe"] == ["mlp@2"]
    assert again["methods"][0]["label"] != first["methods"][0]["label"]

@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_subspace_on_the_real_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub"
    rc = main(["subspace", "--task", "mmlu", "--data-dir", str(DATA), "--limit", "24", "--method", "attn:4",
               "--method", "block:4", "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 24 and len(res["option_tokens"]) == 4
    for r in res["methods"]:
        # the paper's point: the option subspace moves far less than the full distribution
        assert r["sub_kl"] < r["full_kl"]
        assert 0 <= r["sub_agree"] <= 1 and 0 < r["mass_dense"] <= 1
        assert sum(r["choices_pruned"]) == pytest.approx(1.0)
        # Σ q_d·q_p: between the smallest and the largest of the dense shares
        assert min(res["choices_dense"]) - 1e-9 <= r["chance_agree"] <= max(res["choices_dense"]) + 1e-9
    assert (out / "figures" / "subspace.png").is_file()
    assert "KL options" in capsys.readouterr().out
    assert main(["subspace", "--task", "arc_easy", "--data-dir", str(DATA), "--method", "attn:2",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2  # multi-token options: one-line error


@pytest.mark.slow
def test_counterfactual_and_report_rebuild_on_the_real_model(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """CLI end to end on the bundled model: attention replaced layer by layer and each block's
    weights magnitude-pruned in turn; then the report is rebuilt from the saved JSON alone."""
    out = tmp_path / "cf"
    rc = main(["counterfactual", "--kinds", "attn", "--prune", "magnitude:0.5", "--limit", "2",
               "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    L = res["model"]["n_layers"]
    assert set(res["kinds"]) == {"attn", "weights"}
    for kind, cols in res["kinds"].items():
        assert cols["layer"] == list(range(L)), kind
        for s in ("h", "z", "p"):
            assert all(-1.0 <= c <= 1.0 for c in cols[f"cos_{s}"])
            assert min(cols[f"cos_{s}"]) < 1.0  # a real replacement moves something
        assert all(k >= 0 for k in cols["kl"])
        assert all(0.0 <= f <= 1.0 for f in cols["orth_frac_h"])
    assert (out / "figures" / "counterfactual.png").is_file()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0  # rebuilt without a model
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 2 and "weights" in html  # both figures, inline
    both = tmp_path / "both.html"
    assert main(["report", str(out), str(out), "--out", str(both)]) == 0  # side by side
    page = both.read_text()
    assert page.count("<h1>Counterfactual layerwise transition") == 2 and page.count("<html") == 1
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_compare_takes_a_candidate_beside_the_methods(tmp_path: Path) -> None:
    """``compare --candidate``: a recipe's saved checkpoint, compared as a model made elsewhere, sits
    beside the same recipe's view with the same curves."""
    base = save_tiny(tmp_path / "base")
    assert main(["prune", "--model", str(base), "--recipe", "wanda:0.5", "--calib-samples", "2",
                 "--out", str(tmp_path / "cand")]) == 0
    args = ["compare", "--model", str(base), "--method", "wanda:0.5", "--candidate", str(tmp_path / "cand"),
            "--steps", "4", "--calib-samples", "2", "--quiet", "--out", str(tmp_path / "c")]
    assert main(args) == 0
    res = json.loads((tmp_path / "c" / "results.json").read_text())
    view, cand = res["methods"]
    assert cand["spec"] == str(tmp_path / "cand") and cand["label"] == "cand"
    for mode in ("teacher_forced", "free_running"):
        assert cand["curves"][mode]["kl"] == pytest.approx(view["curves"][mode]["kl"], abs=1e-9)
    assert main(args) == 0  # resumed: both runs cached
