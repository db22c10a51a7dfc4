"""The README's Python API snippets run as written on a tiny model, and ``pl.analyze`` leaves the
caller's random state alone."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import prunelens as pl
from prunelens.testing import tiny_lm

README = Path(__file__).resolve().parents[1] / "README.md"


def _view_snippet() -> str:
    """The README's ``with pl.pruned_view(...)`` block, exactly as documented."""
    text = README.read_text()
    m = re.search(r"^with pl\.pruned_view\(lm\.adapter, (\w+)\):.*\n(?:    .*\n)+", text, re.M)
    assert m, "the README no longer shows pl.pruned_view"
    return m.group(0)


def test_readme_pruned_view_works_for_every_modification() -> None:
    lm = tiny_lm()
    snippet = _view_snippet()
    ids = lm.tokenizer("w3 w4 w5", return_tensors="pt")
    dense = lm.model(**ids).logits
    for recipe in ("attn:1", "wanda:0.5", "attn:1+rtn:w8"):
        mod = pl.build(lm, recipe)
        name = re.match(r"with pl\.pruned_view\(lm\.adapter, (\w+)\)", snippet).group(1)
        env = {"pl": pl, "lm": lm, name: mod}
        exec(snippet.replace('"Hello"', '"w3 w4 w5"'), env)  # noqa: S102 - the README's own code
        with mod.view(lm.adapter):
            expected = lm.model(**ids).logits
        assert torch.equal(env["logits"], expected), recipe
        assert not torch.equal(env["logits"], dense), recipe
        assert torch.equal(lm.model(**ids).logits, dense), f"{recipe}: the view was not undone"


def test_analyze_keeps_the_global_random_state_and_is_seeded() -> None:
    lm = tiny_lm()
    plan = pl.build(lm, "attn:1")
    settings = pl.TraceSettings(max_new_tokens=3, temperatures=(1.0,), seed=7)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = pl.analyze(lm, plan, ["w3 w4", "w5 w6 w7"], settings, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    second = pl.analyze(lm, plan, ["w3 w4", "w5 w6 w7"], settings, progress=False)
    for key in ("layerwise", "stepwise", "per_prompt"):
        assert first[key] == second[key], key
