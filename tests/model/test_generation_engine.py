"""The continuous-batching engine gives, token for token, what fixed batches give: finished rows
leave the batch and its KV cache, waiting prompts are merged in, stop strings are checked on the new
text only. On every tiny architecture (sliding-window layers included), under a drop view (zero K/V
appended), and on the real model with the tasks' own prompts and stop rules."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from prunelens.errors import PrunelensError
from prunelens.model import generation
from prunelens.model.generation import generate_full
from prunelens.prune.recipe import Calibration, Recipe, build
from prunelens.testing import ARCH_NAMES, shared_data_dir, tiny_lm


def _prompts(n: int, vocab: int = 128) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _ragged(text: str) -> bool:
    """Ends rows after 1-6 words depending on their first word, so rows leave at different steps."""
    words = text.split()
    return bool(words) and len(words) >= 1 + sum(map(ord, words[0])) % 6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_continuous_equals_static_on_every_architecture(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    merges = []
    merge = generation.merge_caches
    monkeypatch.setattr(generation, "merge_caches", lambda *a: merges.append(1) or merge(*a))
    lm = tiny_lm(arch)
    prompts = _prompts(7)
    for mod in (None, build(lm, Recipe.parse("attn@1"), Calibration(), progress=False)):
        for max_new, until in ((1, None), (9, None), (9, _ragged)):
            static = generate_full(lm, prompts, max_new, (), mod, 3, False, until=until, engine="static")
            cont = generate_full(lm, prompts, max_new, (), mod, 3, False, until=until, engine="continuous")
            assert [g.ids for g in cont] == [g.ids for g in static], (arch, mod, max_new)
            assert max(len(g.ids) for g in cont) == (max_new if until is None else max(len(g.ids) for g in static))
    assert merges  # waiting prompts were merged into running batches (sliding-window caches included)


def test_rows_that_stop_early_leave_and_waiting_prompts_join() -> None:
    """Stop strings end rows at different steps, so rows leave and others are merged in mid-flight."""
    lm = tiny_lm("llama")
    prompts = _prompts(9)
    words = [lm.tokenizer.decode([t]) for t in range(3, 40)]
    stop = tuple(w for w in words if w.strip())[:6]
    static = generate_full(lm, prompts, 14, stop, None, 4, False, engine="static")
    cont = generate_full(lm, prompts, 14, stop, None, 4, False, engine="continuous")
    assert [(g.ids, g.text) for g in cont] == [(g.ids, g.text) for g in static]
    lengths = {len(g.ids) for g in cont}
    assert len(lengths) > 2  # rows really ended at different steps


def test_until_sees_the_whole_text_so_far() -> None:
    lm = tiny_lm("qwen2")
    prompts = _prompts(5)
    seen: list[str] = []

    def until(text: str) -> bool:
        seen.append(text)
        return len(text.split()) >= 4

    static = generate_full(lm, prompts, 12, (), None, 2, False, until=until, engine="static")
    n_static = len(seen)
    cont = generate_full(lm, prompts, 12, (), None, 2, False, until=until, engine="continuous")
    assert [g.ids for g in cont] == [g.ids for g in static] and len(seen) > n_static
    assert all(len(g.text.split()) <= 4 for g in cont)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(PrunelensError, match="engine must be one of continuous, static"):
        generate_full(tiny_lm("llama"), [[5, 6]], 2, engine="paged")


def test_real_model_task_prompts_token_for_token(real_lm: Any) -> None:
    """GSM8K 5-shot chat prompts and HumanEval raw prompts, the tasks' stop strings, a drop view."""

    from prunelens.model.tokens import render
    from prunelens.tasks.code import RAW_STOP_HUMANEVAL, closed_block, humaneval_problems
    from prunelens.tasks.gsm8k import STOP, conversations_for

    data = shared_data_dir()
    tok = real_lm.tokenizer
    gsm = [render(tok, c) for c in conversations_for(data if data.is_dir() else None, 5, 0, 5)[2]]
    problems, _ = humaneval_problems(None)
    he = [tok(p["prompt"])["input_ids"] for p in problems[:5]]
    chat = [render(tok, [{"role": "user", "content": f"Write a Python function {name}."}])
            for name in ("add(a, b)", "is_prime(n)", "reverse(s)")]
    mod = build(real_lm, Recipe.parse("attn:2"), Calibration(), progress=False)
    for prompts, stop, until, m in ((gsm, STOP, None, None), (he, RAW_STOP_HUMANEVAL, None, mod),
                                    (chat, (), closed_block, None)):
        static = generate_full(real_lm, prompts, 40, stop, m, 2, False, until=until, engine="static")
        cont = generate_full(real_lm, prompts, 40, stop, m, 2, False, until=until, engine="continuous")
        assert [(g.ids, g.text) for g in cont] == [(g.ids, g.text) for g in static]


def test_decode_attention_leaves_cudnn_out_on_cuda_only() -> None:
    """The decoding loops' attention choice: cuDNN SDPA off inside (it re-plans every step as the key
    length grows), restored after; on the CPU nothing is touched. The flags are process-wide, so this
    runs without a GPU."""
    from prunelens.model.generation import decode_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with decode_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with decode_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
