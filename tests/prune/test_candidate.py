"""A candidate model made elsewhere, compared with its base: tokenizer identity, layer correspondence
(metadata, file, inferred) and the trace against a separately loaded model equal to the recipe's view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunelens.analyses.trace import TraceSettings, analyze
from prunelens.analyses.trace.core import compare_models
from prunelens.errors import PrunelensError
from prunelens.prune.candidate import (
    LayerMap,
    align_layers,
    load_candidate,
    read_layer_map,
    residual_streams,
    tokenizer_difference,
)
from prunelens.prune.checkpoint import load_model
from prunelens.prune.drop import DropPlan
from prunelens.prune.recipe import Calibration, Recipe, build, save_modified
from prunelens.testing import save_tiny, tiny_model, tiny_tokenizer

PROMPTS = ["w5 w6 w7 w8", "w9 w10 w11", "w12 w13 w14 w15 w16"]
SETTINGS = TraceSettings(max_new_tokens=6, batch_size=3, temperatures=(1.0,))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("base") / "m")


def test_resid_map_follows_the_last_kept_block() -> None:
    m = LayerMap((0, 1, 4), 5)
    assert m.dropped == [2, 3]
    # streams 0..5 of the base: after block 1 (stream 2) the candidate holds its stream 2 until block 4
    assert m.resid_map() == [0, 1, 2, 2, 2, 3]
    assert LayerMap.identity(3).resid_map() == [0, 1, 2, 3]
    with pytest.raises(PrunelensError, match="increasing"):
        LayerMap((2, 1), 5)


def test_align_layers_recovers_the_deleted_blocks() -> None:
    # streams of a 6-block base; the candidate deleted blocks 2 and 3: similarity 1 on the true path
    true = LayerMap((0, 1, 4, 5), 6).resid_map()
    sim = torch.full((7, 5), 0.2, dtype=torch.float64)
    for li, j in enumerate(true):
        sim[li, j] = 1.0
    kept, score = align_layers(sim)
    assert kept == (0, 1, 4, 5)
    assert score == pytest.approx(1.0)


def test_tokenizer_difference_names_the_first_difference() -> None:
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert tokenizer_difference(a, b) is None
    b.add_tokens(["zzz"])
    assert "vocabulary sizes differ" in tokenizer_difference(a, b)
    c = tiny_tokenizer()
    c.eos_token = "w9"
    assert "eos_token" in tokenizer_difference(a, c)


def test_layer_map_file(tmp_path: Path) -> None:
    f = tmp_path / "map.json"
    f.write_text(json.dumps([0, 2, 3]))
    assert read_layer_map(f, 4, 3).kept == (0, 2, 3)
    f.write_text(json.dumps({"kept_layers": [0, 2, 9]}))
    with pytest.raises(PrunelensError, match="names base layer 9"):
        read_layer_map(f, 4, 3)
    with pytest.raises(PrunelensError, match="names 3 blocks but the candidate has 2"):
        read_layer_map(f, 4, 2)


def _saved(base_dir: Path, tmp: Path, spec: str) -> tuple[Path, object]:
    base = load_model(str(base_dir))
    plan = build(base, Recipe.parse(spec), Calibration(samples=2, seq_len=16))
    out = tmp / spec.replace(":", "_").replace("@", "_")
    save_modified(base, plan, out)
    return out, plan


@pytest.mark.parametrize("spec", ["wanda:0.5", "block@1", "attn@2"])
def test_saved_then_compared_equals_analyze(base_dir: Path, tmp_path: Path, spec: str) -> None:
    """The consistency the issue asks for: a recipe saved by ``prune``, then compared as an external
    candidate, gives the same numbers as ``analyze`` of the recipe."""
    out, _ = _saved(base_dir, tmp_path, spec)
    base = load_model(str(base_dir))
    plan = build(base, Recipe.parse(spec), Calibration(samples=2, seq_len=16))
    want = analyze(base, plan, PROMPTS, SETTINGS, progress=False)
    cand = load_candidate(str(out), base)
    assert cand.layer_map.source == ("metadata" if spec.startswith("block") else "identity")
    got = compare_models(base, cand, PROMPTS, SETTINGS, progress=False)
    # the reference runs one row per prompt against a separate candidate (two inside analyze): CPU
    # kernels round float32 logits differently by batch shape, ~1e-7 relative, hence the tolerance
    for mode in ("teacher_forced", "free_running"):
        for key in ("kl@1", "rkl@1", "cos_z", "cos_h", "top1_agree"):
            assert got["stepwise"][mode][key] == pytest.approx(want["stepwise"][mode][key], rel=1e-5, abs=1e-6,
                                                               nan_ok=True)
    for key in ("cos_h", "lens_kl@1"):
        assert got["layerwise"][key] == pytest.approx(want["layerwise"][key], abs=1e-9)
    assert [p["pruned_text"] for p in got["per_prompt"]] == [p["pruned_text"] for p in want["per_prompt"]]


def test_deleted_blocks_without_metadata_are_inferred(base_dir: Path, tmp_path: Path) -> None:
    """A layer-deletion script's output (plain transformers, no prunelens metadata): the deleted
    blocks are found from hidden-state similarity and reported as inferred."""
    m = tiny_model("llama")
    keep = [i for i in range(m.config.num_hidden_layers) if i != 2]
    m.model.layers = torch.nn.ModuleList([m.model.layers[i] for i in keep])
    for new, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = new
    m.config.num_hidden_layers = len(keep)
    out = tmp_path / "minus1"
    m.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    base = load_model(str(base_dir))
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    cand = load_candidate(str(out), base, calibration=ids)
    assert cand.layer_map.source == "inferred"
    assert cand.layer_map.dropped == [2]
    assert any("inferred" in n for n in cand.notes)
    # with the base's streams given (sequential mode), the same answer without the base's weights
    states = residual_streams(base, ids)
    assert load_candidate(str(out), base, calibration=ids, base_states=states).layer_map.kept == cand.layer_map.kept


def test_candidate_refusals(base_dir: Path, tmp_path: Path) -> None:
    base = load_model(str(base_dir))
    with pytest.raises(PrunelensError, match="is the base model itself"):
        load_candidate(str(base_dir), base)
    other = tmp_path / "other"
    save_tiny(other)
    tok = tiny_tokenizer()
    tok.add_tokens(["extra"])
    tok.save_pretrained(other)
    with pytest.raises(PrunelensError, match="does not share the base's tokenizer: vocabulary sizes differ"):
        load_candidate(str(other), base)


def test_trace_carries_the_fields_comparison_statistics(base_dir: Path, tmp_path: Path) -> None:
    """The field's statistics in a trace agree with prunelens's own per-step numbers and with their
    definitions: label in top-1 = top-1 agreement, ordered top-K agreement can only fall with K, KL
    means are the valid-cell means of the step series, buckets partition the cells, FDT counts the
    shared leading greedy tokens."""
    out, _ = _saved(base_dir, tmp_path, "wanda:0.5")
    base = load_model(str(base_dir))
    res = compare_models(base, load_candidate(str(out), base), PROMPTS, SETTINGS, progress=False)
    tf, steps = res["comparison"]["teacher_forced"], res["stepwise"]["teacher_forced"]
    n = sum(steps["n"])
    assert tf["positions"] == n
    assert tf["label_top1"] == pytest.approx(tf["top1_agree"], abs=1e-12)
    agree = [tf[f"top{k}_agree"] for k in range(1, 11)]
    assert all(a >= b for a, b in zip(agree, agree[1:], strict=False))
    labels = [tf[f"label_top{k}"] for k in range(1, 11)]
    assert all(a <= b for a, b in zip(labels, labels[1:], strict=False))
    weighted = sum(v * c for v, c in zip(steps["kl@1"], steps["n"], strict=True) if c) / n
    assert tf["kl"] == pytest.approx(weighted, rel=1e-9)
    assert sum(b["n"] for b in tf["kl_by_confidence"]) == n
    assert tf["kl"] > 0 and tf["rkl"] > 0
    for p in res["per_prompt"]:  # difflib's first block at (0, 0) lies inside the common prefix
        d = p["first_divergence"]
        assert p["fdt"] <= (p["valid_steps_free_running"] if d is None else d - 1)
        assert 0.0 <= p["sdt"] <= 1.0
    assert res["summary"]["field"]["top5_agree"] == tf["top5_agree"]
    same = analyze(base, DropPlan(), PROMPTS, SETTINGS, progress=False)  # nothing modified
    field = same["summary"]["field"]
    assert field["kl"] == 0 and field["top10_agree"] == 1 and field["label_top1"] == 1 and field["sdt_mean"] == 0
    assert [p["fdt"] for p in same["per_prompt"]] == [len(p["dense_text"].split()) for p in same["per_prompt"]]
