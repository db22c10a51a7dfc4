"""Sequential mode (one model in memory at a time, the base's top-K reference stored) against the
in-memory lock-step trace of the same pair: equal when the reference keeps the whole vocabulary, a
lower bound of the KL when it keeps fewer tokens; the reference cache reused and checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunelens.analyses.trace import TraceSettings, write_trace_run
from prunelens.analyses.trace.core import compare_models, compare_sequential
from prunelens.errors import PrunelensError
from prunelens.prune.candidate import load_candidate
from prunelens.prune.checkpoint import load_model
from prunelens.prune.recipe import Calibration, Recipe, build, save_modified
from prunelens.testing import save_tiny

PROMPTS = ["w5 w6 w7 w8", "w9 w10 w11", "w12 w13 w14 w15 w16"]
SETTINGS = TraceSettings(max_new_tokens=6, batch_size=2, temperatures=(1.0,))
KEYS = ("kl@1", "rkl@1", "cos_h", "top1_agree", "top3_agree", "label_top5")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("seq")
    base_dir = save_tiny(d / "base")
    base = load_model(str(base_dir))
    save_modified(base, build(base, Recipe.parse("wanda:0.5"), Calibration(samples=2, seq_len=16)), d / "cand")
    return base_dir, d / "cand"


def _sequential(pair: tuple[Path, Path], k: int, cache: Path | None = None, prompts: list[str] = PROMPTS) -> dict:
    base_dir, cand_dir = pair
    return compare_sequential(lambda: load_model(str(base_dir)),
                              lambda base, _: load_candidate(str(cand_dir), base), prompts, SETTINGS, k=k,
                              reference_cache=cache, progress=False)


def test_full_vocabulary_reference_equals_the_in_memory_trace(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base = load_model(str(pair[0]))
    want = compare_models(base, load_candidate(str(pair[1]), base), PROMPTS, SETTINGS, progress=False)
    got = _sequential(pair, 10**6)  # a K past the vocabulary keeps all of it
    for mode in ("teacher_forced", "free_running"):
        for key in KEYS:
            assert got["stepwise"][mode][key] == pytest.approx(want["stepwise"][mode][key], abs=2e-5), (mode, key)
    assert got["layerwise"]["cos_h"] == pytest.approx(want["layerwise"]["cos_h"], abs=1e-6)
    assert [p["pruned_text"] for p in got["per_prompt"]] == [p["pruned_text"] for p in want["per_prompt"]]
    assert got["sequential"]["base_on_candidate_text"]["nll_base"] > 0
    write_trace_run(got, tmp_path / "run")  # the page and figures take a result without z-space metrics
    assert "sequential" in (tmp_path / "run" / "results.json").read_text()


def test_a_top_k_reference_bounds_the_kl_from_below_and_is_reused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    full = _sequential(pair, 128)
    cache = tmp_path / "ref.safetensors"
    small = _sequential(pair, 8, cache)
    assert cache.is_file()
    for mode in ("teacher_forced", "free_running"):
        for key in ("kl@1", "rkl@1"):
            for a, b in zip(small["stepwise"][mode][key], full["stepwise"][mode][key], strict=True):
                assert a <= b + 1e-9
        assert small["stepwise"][mode]["top1_agree"] == full["stepwise"][mode]["top1_agree"]
    sizes = small["sequential"]["reference_bytes"]
    assert sizes["topk"] == 3 * 6 * (8 * 4 + 8 * 4 + 4)  # prompts × steps × (K log-probs, K ids, one tail)
    again = _sequential(pair, 8, cache)  # from the cache: the same numbers
    assert again["stepwise"] == small["stepwise"]
    with pytest.raises(PrunelensError, match="another prompts"):
        _sequential(pair, 8, cache, PROMPTS[:2])
    cache.write_bytes(b"not a reference")
    with pytest.raises(PrunelensError, match="cannot be read"):
        _sequential(pair, 8, cache)
