"""`advise`'s deployment line: each kind of change goes to the export that realises its saving."""

from __future__ import annotations

import pytest

from prunelens.prune.deploy import route


@pytest.mark.parametrize(("spec", "fmt"), [
    ("attn:8", "gguf"), ("mlp@3,7", "gguf"), ("attn:4+rtn:w8", "gguf"),  # sublayers decide: only gguf/NAS skip them
    ("block:4", "gguf"), ("sleb:2", "gguf"),
    ("gptq:w4g128", "compressed-tensors"), ("rtn:w8", "compressed-tensors"),
    ("awq:w4g128", "hf"), ("wanda:0.5", "hf"), ("sparsegpt:2:4", "hf"),
])
def test_each_change_goes_to_the_format_that_realises_it(spec: str, fmt: str) -> None:
    line = route(spec)
    assert line is not None and line.startswith(f"prunelens prune --recipe {spec} --format {fmt} --out")
    assert ("nemotron-nas" in line) == spec.startswith(("attn", "mlp"))


def test_a_model_made_elsewhere_has_no_route() -> None:
    assert route("/models/my-gptq-checkpoint") is None
