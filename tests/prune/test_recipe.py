"""The one modification grammar and builder: recipe parsing (strings, '+', files), the documented
composition rule (drops first, then weight methods each calibrated on the model as modified so far),
the CLI aliases, and the lm-eval model type composing exactly as the CLI does."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from prunelens import options
from prunelens.cli import build_parser
from prunelens.errors import PrunelensError
from prunelens.prune.base import METHODS, methods, methods_help
from prunelens.prune.drop import DropPlan, parse_drop
from prunelens.prune.recipe import Calibration, Recipe, build, prune_weights, select_drop, split_specs
from prunelens.prune.weights import WeightPatch, parse_weight_method
from prunelens.testing import tiny_lm

CAL = Calibration(samples=4, seq_len=32)


def _weights(mod) -> dict[str, torch.Tensor]:
    return {k: v for p in mod.parts() if isinstance(p, WeightPatch) for k, v in p.weights.items()}


def test_every_family_is_registered_and_listed() -> None:
    assert {m.name for m in methods("drop")} == {"attn", "mlp", "block", "sleb"}
    assert {m.name for m in methods("prune")} == {"magnitude", "wanda", "sparsegpt", "owl", "owl-sparsegpt"}
    assert {m.name for m in methods("quant")} == {"rtn", "gptq", "awq"}
    assert {m.name for m in methods() if m.calibrated} >= {"wanda", "sparsegpt", "gptq", "awq", "attn"}
    text = methods_help()
    assert all(name in text for name in METHODS)


def test_recipe_parses_plus_lists_and_files(tmp_path: Path) -> None:
    assert Recipe.parse("attn:2+wanda:0.5").specs == ("attn:2", "wanda:0.5")
    assert Recipe.parse(["mlp@1", "gptq:w4g128"], "rtn:w8").specs == ("mlp@1", "gptq:w4g128", "rtn:w8")
    y = tmp_path / "r.yaml"
    y.write_text("recipe:\n  - attn:2\n  - wanda:0.5\n")
    j = tmp_path / "r.json"
    j.write_text(json.dumps(["block@1", "magnitude:2:4"]))
    assert Recipe.parse(str(y)).specs == ("attn:2", "wanda:0.5")
    assert Recipe.parse(str(j), "rtn:w4").specs == ("block@1", "magnitude:2:4", "rtn:w4")
    r = Recipe.parse("wanda:0.5+attn:2")
    assert [str(d) for d in r.drops] == ["attn:2"] and r.weight_specs == ["wanda:0.5"]


def test_a_list_of_recipes_keeps_layer_lists_whole() -> None:
    assert split_specs("block@1,2,attn:4") == ["block@1,2", "attn:4"]
    assert split_specs("block@13,14+repair:linear, wanda:0.5,attn@2,3") == [
        "block@13,14+repair:linear", "wanda:0.5", "attn@2,3"]
    # a number after a spec without a layer list is its own (malformed) item, not swallowed
    assert split_specs("block:2,3") == ["block:2", "3"]
    assert split_specs("attn@1+repair:scale,2") == ["attn@1+repair:scale", "2"]
    assert split_specs("block@14-17,attn@1,3-4+repair:linear,mlp:2") == [
        "block@14-17", "attn@1,3-4+repair:linear", "mlp:2"]


def test_layer_ranges_expand_inclusively() -> None:
    assert parse_drop("block@14-17").layers == (14, 15, 16, 17)
    assert parse_drop("attn@9,2-3").layers == (2, 3, 9)
    assert parse_drop("mlp@5-5").layers == (5,)
    for bad, message in [("block@5-3", "runs backwards"), ("attn@2,1-3", "repeats a layer"),
                         ("block@3-", "malformed drop spec"), ("block@-3", "malformed drop spec")]:
        with pytest.raises(PrunelensError, match=message):
            parse_drop(bad)


@pytest.mark.parametrize("bad, message", [
    ("attn@3+attn@3", "appears twice"),
    ("obs:0.5", "unknown method 'obs'"),
    ("magnitude:0:4", "1 <= N <= M"),
    ("attn=4", "malformed drop spec"),
    ("wanda:x", "malformed pruning spec"),
])
def test_bad_recipes_are_one_line_errors(bad: str, message: str) -> None:
    with pytest.raises(PrunelensError, match=message):
        Recipe.parse(bad)


def test_bad_recipe_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: {not: a list}\n")
    with pytest.raises(PrunelensError, match="non-empty list of specs"):
        Recipe.parse(str(bad))
    with pytest.raises(PrunelensError, match="does not exist"):
        Recipe.parse(str(tmp_path / "missing.json"))


def test_weight_methods_are_calibrated_on_the_model_with_its_drops() -> None:
    """attn:2+wanda:0.5 = the drops, then Wanda whose activation norms come from the dropped model;
    Wanda calibrated on the dense model gives other masks."""
    lm = tiny_lm("llama")
    mod = build(lm, "attn:2+wanda:0.5", CAL, progress=False)
    plan = next(p for p in mod.parts() if isinstance(p, DropPlan))
    assert len(plan.attn) == 2 and mod.label().startswith("attn@") and mod.label().endswith("+wanda:0.5")
    same_plan = select_drop(lm, "attn:2", calibration=CAL)
    assert same_plan.attn == plan.attn
    with plan.view(lm.adapter):
        by_hand = prune_weights(lm, "wanda:0.5", CAL, progress=False)
    dense_calibrated = prune_weights(lm, "wanda:0.5", CAL, progress=False)
    got = _weights(mod)
    assert got.keys() == by_hand.weights.keys()
    assert all(torch.equal(got[k] == 0, by_hand.weights[k] == 0) for k in got)
    assert any(not torch.equal(got[k] == 0, dense_calibrated.weights[k] == 0) for k in got)
    # the order of the specs does not change the rule: drops always come first
    assert all(torch.equal(_weights(build(lm, "wanda:0.5+attn:2", CAL, progress=False))[k], got[k]) for k in got)


def test_weight_methods_compose_in_order() -> None:
    """magnitude:0.5 then rtn:w8: the quantiser sees the sparse weights (zeros stay zero)."""
    lm = tiny_lm("llama")
    mod = build(lm, "magnitude:0.5+rtn:w8s", CAL, progress=False)
    sparse, quant = [p for p in mod.parts() if isinstance(p, WeightPatch)]
    for k, w in quant.weights.items():
        assert torch.all(w[sparse.weights[k] == 0] == 0)
    with mod.view(lm.adapter):
        w = lm.model.get_submodule(next(iter(quant.weights))).weight
        assert torch.equal(w, quant.weights[next(iter(quant.weights))])


def test_cli_aliases_build_the_same_recipe() -> None:
    p = build_parser()
    a = p.parse_args(["analyze", "--drop", "attn:2", "--prune", "wanda:0.5", "--quant", "gptq:w4g16"])
    b = p.parse_args(["analyze", "--recipe", "attn:2+wanda:0.5", "--recipe", "gptq:w4g16"])
    assert options.recipe(a) == options.recipe(b) == Recipe(("attn:2", "wanda:0.5", "gptq:w4g16"))
    with pytest.raises(PrunelensError, match="is a quant spec"):
        options.recipe(p.parse_args(["analyze", "--prune", "gptq:w4g128"]))
    with pytest.raises(PrunelensError, match="appears twice"):
        options.recipe(p.parse_args(["analyze", "--drop", "attn@3", "--drop", "attn@3"]))


def test_lmeval_model_type_composes_as_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """prunelens.lmeval's model type, with lm-eval's imports stubbed, builds `prune=` through
    the same builder: attn:2+wanda:0.5 gives the CLI's drops and masks."""
    registered = {}

    class FakeHFLM:
        def __init__(self, pretrained=None, tokenizer=None, **kw):
            self.model, self.tokenizer = pretrained, tokenizer

    def register_model(name):
        def deco(cls):
            registered[name] = cls
            return cls
        return deco

    stubs = {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": types.ModuleType("lm_eval.api"),
             "lm_eval.api.registry": types.ModuleType("lm_eval.api.registry"),
             "lm_eval.models": types.ModuleType("lm_eval.models"),
             "lm_eval.models.huggingface": types.ModuleType("lm_eval.models.huggingface"),
             "lm_eval.loggers": types.ModuleType("lm_eval.loggers"),
             "lm_eval.loggers.evaluation_tracker": types.ModuleType("lm_eval.loggers.evaluation_tracker")}
    stubs["lm_eval.api.registry"].register_model = register_model
    stubs["lm_eval.api.registry"].model_registry = registered
    stubs["lm_eval.loggers.evaluation_tracker"].GeneralConfigTracker = type(
        "GeneralConfigTracker", (), {"_get_model_name": staticmethod(lambda model_args: None)})
    stubs["lm_eval.models.huggingface"].HFLM = FakeHFLM
    for k, v in stubs.items():
        monkeypatch.setitem(sys.modules, k, v)
    # imported fresh over the stubs, and forgotten afterwards (later tests import the real one)
    monkeypatch.setitem(sys.modules, "prunelens.lmeval", types.ModuleType("prunelens.lmeval"))
    monkeypatch.delitem(sys.modules, "prunelens.lmeval")
    import prunelens.lmeval as lmeval

    lm = tiny_lm("llama")
    monkeypatch.setattr(lmeval, "load_model", lambda *a, **k: lm)
    model = registered["prunelens"](pretrained="tiny", prune="attn:2+wanda:0.5", calib=None, seed=0)
    via_lmeval = model.prunelens_modification
    model._views.close()  # the model type keeps its view open for lm-eval; the CLI builds on the dense model
    args = build_parser().parse_args(["analyze", "--drop", "attn:2", "--prune", "wanda:0.5"])
    cli = build(lm, options.recipe(args), options.calibration(args), progress=False)
    assert via_lmeval.label() == cli.label()
    a, b = _weights(via_lmeval), _weights(cli)
    assert a.keys() == b.keys() and all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
    assert parse_weight_method("wanda:0.5").method.calibrated


def test_an_explicit_zero_calibration_size_is_refused_not_defaulted() -> None:
    lm = tiny_lm("llama")
    with pytest.raises(PrunelensError, match="at least 1 sample"):
        build(lm, "wanda:0.5", Calibration(samples=0, seq_len=32), progress=False)
