"""Models spread by accelerate's device map (CPU + disk offload here, as a stand-in for GPUs +
CPU): the same logits, analysis metrics, pruning masks and saved weights as the in-memory model.

The tiny model is saved as a Hugging Face directory and loaded twice through ``load_model``: once
whole, once with a CPU budget below its size so that later blocks, the norm and the head live on
disk and are onloaded by accelerate's hooks only while they run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelens.analyses.counterfactual import CounterfactualSettings, counterfactual
from prunelens.analyses.trace import AnalysisSettings, analyze
from prunelens.cli import main
from prunelens.errors import PrunelensError
from prunelens.model.loading import load_model
from prunelens.model.placement import Placement, is_offloaded, parse_max_memory, placement
from prunelens.prune.base import combine, view_of
from prunelens.prune.checkpoint import save_sharded
from prunelens.prune.drop import DropPlan
from prunelens.prune.importance import angular_scores, greedy_scores, kl_scores, unit_scores
from prunelens.prune.recipe import build, save_modified
from prunelens.prune.repair import RepairPatch
from prunelens.prune.weights import parse_weight_method, sparsify
from prunelens.testing import save_tiny

PROMPTS = ["w3 w4 w5 w6", "w9 w8 w7 w12 w15", "w20 w21"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    d = save_tiny(tmp_path_factory.mktemp("tiny-offload"))
    dense = load_model(str(d))
    size = sum(p.numel() * p.element_size() for p in dense.model.parameters())
    off = tmp_path_factory.mktemp("offload")
    big = load_model(str(d), placement=Placement("auto", {"cpu": str(int(size * 0.6))}, str(off)))
    return d, dense, big


def _calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 60, (6, 24), generator=g)


def test_the_budget_really_offloads_and_logits_are_unchanged(pair) -> None:
    _, dense, big = pair
    assert "disk" in set(big.model.hf_device_map.values())
    offloaded = [n for n, m in big.model.named_modules() if is_offloaded(m)]
    assert any(".layers.3." in n for n in offloaded) and big.device == torch.device("cpu")
    assert big.info["device_map"] and big.info["placement"]["device_map"] == "auto"
    ids = _calib()
    with torch.no_grad():
        assert torch.equal(dense.model(input_ids=ids).logits, big.model(input_ids=ids).logits)


def test_a_budget_that_holds_the_whole_model_loads_on_one_device(pair, tmp_path: Path) -> None:
    """transformers sets no hf_device_map when everything fits the first device: loading used to crash
    there (seen on a GPU with ``--device-map auto`` and a model smaller than the budget)."""
    d, dense, _ = pair
    lm = load_model(str(d), placement=Placement("auto", {"cpu": "64GiB"}, str(tmp_path / "off")))
    assert lm.info["device_map"] == {"": "cpu"} and lm.device == torch.device("cpu")
    ids = _calib()
    with torch.no_grad():
        assert torch.equal(dense.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_layer_drop_analysis_is_the_same_under_offload(pair) -> None:
    _, dense, big = pair
    plan = DropPlan(attn=(1,), block=(2,))
    s = AnalysisSettings(max_new_tokens=6, batch_size=2, chat_template=False)
    a, b = (analyze(lm, plan, PROMPTS, s, progress=False) for lm in (dense, big))
    for key in ("layerwise", "stepwise", "taylor", "per_prompt", "summary"):
        assert json.dumps(a[key], sort_keys=True) == json.dumps(b[key], sort_keys=True), key
    for m in big.model.modules():  # the stand-ins went back: offloaded layers are the originals again
        assert type(m).__name__ not in ("SkippedAttention", "SkippedBlock")


@pytest.mark.parametrize("spec", ["wanda:0.5", "sparsegpt:2:4", "gptq:w4g16", "awq:w4g16", "owl:0.5"])
def test_calibrated_methods_give_the_same_weights_block_by_block(pair, spec: str) -> None:
    _, dense, big = pair
    m = parse_weight_method(spec)
    pa = sparsify(dense.adapter, m, _calib(), batch_size=3, progress=False)
    pb = sparsify(big.adapter, m, _calib(), batch_size=3, progress=False)
    assert pa.weights.keys() == pb.weights.keys()
    for k in pa.weights:
        assert torch.allclose(pa.weights[k], pb.weights[k].to(pa.weights[k].device), atol=1e-6, rtol=0), k
        if spec.startswith(("wanda", "sparsegpt", "owl")):  # the same mask
            assert torch.equal(pa.weights[k] == 0, pb.weights[k] == 0), k
    # offloaded layers' new weights wait on the CPU, and the patch view reaches them through the
    # hooks: the patched logits agree too, and the stored dense weights are untouched
    off = [k for k in pb.weights if is_offloaded(big.model.get_submodule(k))]
    assert off and all(pb.weights[k].device.type == "cpu" for k in off)
    # disk-offloaded layers' new weights are file mappings (page cache), not heap: the budget holds
    assert all(_file_mapped(pb.weights[k]) for k in off) and not _file_mapped(pa.weights[off[0]])
    ids = _calib()
    with torch.no_grad(), pa.view(dense.adapter), pb.view(big.adapter):
        za, zb = dense.model(input_ids=ids).logits, big.model(input_ids=ids).logits
    assert torch.allclose(za, zb, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(dense.model(input_ids=ids).logits, big.model(input_ids=ids).logits)


def _file_mapped(t: torch.Tensor) -> bool:
    """Whether ``t``'s data lies in a mapping of one of prunelens's spilled weight files."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= addr < hi:
            return "prunelens-weight-" in line
    return False


def test_pruning_in_place_under_disk_offload_keeps_new_weights_out_of_the_heap(pair, tmp_path: Path) -> None:
    """``prune`` (in place) on a disk-offloaded model: the new weights shadow the checkpoint's through
    file mappings, the model runs with them, and the saved checkpoint equals the in-memory one."""
    d, dense, _ = pair
    size = sum(p.numel() * p.element_size() for p in dense.model.parameters())
    big = load_model(str(d), placement=Placement("auto", {"cpu": str(int(size * 0.6))}, str(tmp_path / "off")))
    ref = load_model(str(d))
    m = parse_weight_method("wanda:0.5")
    pa = sparsify(ref.adapter, m, _calib(), batch_size=3, progress=False, inplace=True)
    pb = sparsify(big.adapter, m, _calib(), batch_size=3, progress=False, inplace=True)
    off = [k for k in pb.weights if is_offloaded(big.model.get_submodule(k))]
    assert off and all(_file_mapped(pb.weights[k]) for k in off)
    ids = _calib()
    with torch.no_grad():
        assert torch.allclose(ref.model(input_ids=ids).logits, big.model(input_ids=ids).logits, atol=1e-5)
    for lm, name in ((ref, "ref"), (big, "big")):
        save_modified(lm, pa if lm is ref else pb, tmp_path / name)
    sa = AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(tmp_path / "big", dtype=torch.float32).state_dict()
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0) for k in sa)


def test_importance_scores_and_the_counterfactual_are_the_same_under_offload(pair) -> None:
    """Importance scoring (cosine, angular, KL, SLEB's perplexity) and the one-layer-at-a-time counterfactual run whole
    forwards and single blocks through accelerate's hooks: the numbers equal the in-memory ones."""
    _, dense, big = pair
    calib = _calib()
    for kind in ("attn", "mlp", "block"):
        assert unit_scores(dense, DropPlan(), calib, kind) == unit_scores(big, DropPlan(), calib, kind), kind
    assert angular_scores(dense, DropPlan(), calib, 2) == angular_scores(big, DropPlan(), calib, 2)
    a = kl_scores(dense, DropPlan(attn=(0,)), calib, "block", [1, 2, 3])
    b = kl_scores(big, DropPlan(attn=(0,)), calib, "block", [1, 2, 3])
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) <= 1e-12 + 1e-9 * a[i] for i in a) and min(a.values()) > 0
    a = greedy_scores(dense, DropPlan(), calib, "block", [0, 1, 2, 3], "ppl")  # SLEB's score
    b = greedy_scores(big, DropPlan(), calib, "block", [0, 1, 2, 3], "ppl")
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) <= 1e-9 * a[i] for i in a)
    s = CounterfactualSettings(kinds=("attn", "mlp", "block"), chat_template=False, batch_size=2)
    ca = counterfactual(dense, PROMPTS, s, progress=False)
    cb = counterfactual(big, PROMPTS, s, progress=False)
    assert ca["kinds"] == cb["kinds"]


def test_saving_from_an_offloaded_model_writes_the_same_checkpoint_in_shards(pair, tmp_path: Path) -> None:
    _, dense, big = pair
    m = parse_weight_method("wanda:0.5")
    plan = DropPlan(attn=(1,), block=(2,))
    for lm, name in ((dense, "dense"), (big, "big")):
        patch = sparsify(lm.adapter, m, _calib(), batch_size=3, progress=False)
        save_modified(lm, combine([plan, patch]), tmp_path / name)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "big", dtype=torch.float32)
    sa, sb = ref.state_dict(), got.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0), k
    ids = _calib()
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=ids).logits, got(input_ids=ids).logits, atol=1e-5)
    # small shards: several files, an index, and the same tensors
    save_sharded(big.adapter, DropPlan(), tmp_path / "shards", shard_bytes=20_000)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "shards" / f).is_file() for f in files)
    assert not list((tmp_path / "shards").glob("*.partial"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "shards", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, dense.model(input_ids=ids).logits)


def test_placement_options_and_their_errors(pair, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d, _, _ = pair
    assert parse_max_memory("0=70GiB,1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory("cuda:1=8GB") == {1: "8GB"}
    assert placement(None, "cpu=1GiB", None).device_map == "auto"  # a budget alone implies auto
    assert not placement(None, None, None).dispatched
    dm = tmp_path / "map.json"
    dm.write_text(json.dumps({"": "cpu"}))
    assert placement(str(dm), None, None).device_map == {"": "cpu"}
    for bad, msg in (("cpu:2GiB", "DEVICE=SIZE"), ("gpu=2GiB", "unknown device"), ("cpu=lots", "DEVICE=SIZE")):
        with pytest.raises(PrunelensError, match=msg):
            parse_max_memory(bad)
    with pytest.raises(PrunelensError, match="neither"):
        placement("everywhere", None, None)
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "p.txt").write_text("w3 w4 w5\n")
    for args, msg in ((["--max-memory", "cpu=two"], "DEVICE=SIZE"),
                      (["--device-map", str(tmp_path / "bad.json")], "not valid JSON")):
        assert main(["analyze", "--model", str(d), "--drop", "attn@1", "--prompts", str(tmp_path / "p.txt"),
                     "--no-chat-template", "--quiet", *args]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]
    # and the CLI's offloaded analysis writes the same metrics as the in-memory one
    runs = []
    for name, extra in (("mem", []), ("off", ["--max-memory", "cpu=40000", "--offload-dir", str(tmp_path / "o")])):
        assert main(["analyze", "--model", str(d), "--drop", "attn@1", "--prompts", str(tmp_path / "p.txt"),
                     "--no-chat-template", "--quiet", "--steps", "4", "--out", str(tmp_path / name), *extra]) == 0
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert runs[1]["model"]["device_map"] and not runs[0]["model"].get("device_map")
    assert json.dumps(runs[0]["stepwise"], sort_keys=True) == json.dumps(runs[1]["stepwise"], sort_keys=True)


@pytest.mark.parametrize("spec", ["block@2+attn@1+repair:linear", "wanda:0.5+repair:scale"])
def test_repair_is_fitted_block_by_block_the_same_under_offload(pair, spec: str) -> None:
    """The streamed repair fit runs blocks one at a time with their offload hooks: the same maps, merged
    weights parked on the CPU for offloaded projections, and the same repaired logits."""
    _, dense, big = pair
    mods = [build(lm, spec, progress=False) for lm in (dense, big)]
    pa, pb = ([p for p in m.parts() if isinstance(p, RepairPatch)][0] for m in mods)
    assert [m.span for m in pa.maps] == [m.span for m in pb.maps] and len(pa.maps) >= 2
    for a, b in zip(pa.maps, pb.maps, strict=True):
        fa, fb = (a.t, b.t) if a.t is not None else (a.s, b.s)
        assert torch.allclose(fa, fb, atol=1e-5, rtol=1e-4), a.span
        if is_offloaded(big.model.get_submodule(b.module)):
            assert b.weight.device.type == "cpu"
    assert any(is_offloaded(big.model.get_submodule(b.module)) for b in pb.maps)
    ids = _calib()
    with torch.no_grad(), view_of(dense.adapter, mods[0]), view_of(big.adapter, mods[1]):
        za, zb = dense.model(input_ids=ids).logits, big.model(input_ids=ids).logits
    assert torch.allclose(za, zb, atol=1e-4, rtol=1e-4)
