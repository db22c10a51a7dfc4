"""Saving a checkpoint is all or nothing: an interrupted save leaves nothing loadable at --out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelens.errors import PrunelensError
from prunelens.options import check_checkpoint_dir
from prunelens.prune import checkpoint
from prunelens.prune.recipe import build, save_modified
from prunelens.testing import tiny_lm


def _interrupt_after_config(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Let the save write config.json and the weights, then interrupt it (as Ctrl-C would) in the
    step after them, saving the tokenizer; returns what had been written by then."""
    written: list[Path] = []

    def boom(self, out, *a, **kw):  # noqa: ANN001
        written.extend(sorted(Path(out).iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_lm().tokenizer), "save_pretrained", boom)
    return written


@pytest.mark.parametrize("sharded", [False, True])
def test_an_interrupted_save_leaves_nothing_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     sharded: bool) -> None:
    lm = tiny_lm()
    mod = build(lm, ["block:1", "attn:2"])
    if sharded:  # the device-map path: shards, index and config written by save_sharded
        monkeypatch.setattr(checkpoint, "is_dispatched", lambda m: True)
    written = _interrupt_after_config(monkeypatch)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        save_modified(lm, mod, out)
    assert "config.json" in {p.name for p in written}  # the interruption came after config.json
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind either
    monkeypatch.undo()
    # the same save, uninterrupted, is whole and loads
    if sharded:
        monkeypatch.setattr(checkpoint, "is_dispatched", lambda m: True)
    save_modified(lm, mod, out)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert again.config.num_hidden_layers == lm.adapter.n_layers - 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_an_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_lm()
    out = tmp_path / "ckpt"
    save_modified(lm, build(lm, ["block:1"]), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _interrupt_after_config(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_modified(lm, build(lm, ["block:2"]), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_replaces_checkpoints_only(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(PrunelensError, match="not empty .use --overwrite"):
        check_checkpoint_dir(other, overwrite=False)
    with pytest.raises(PrunelensError, match="holds no model checkpoint"):
        check_checkpoint_dir(other, overwrite=True)
    lm = tiny_lm()
    save_modified(lm, build(lm, ["block:1"]), tmp_path / "ck")
    check_checkpoint_dir(tmp_path / "ck", overwrite=True)  # a checkpoint may be replaced
