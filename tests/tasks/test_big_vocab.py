"""Bounded metric memory for big vocabularies: perplexity and the KL importance score make the
logits a chunk of positions at a time, and give what the full n × vocab computation gives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunelens.metrics as M
from prunelens.prune.drop import DropPlan, pruned_view
from prunelens.prune.importance import kl_scores
from prunelens.tasks.perplexity import perplexity
from prunelens.testing import tiny_lm


def test_chunked_nll_and_kl_equal_the_full_computation() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 16, generator=g, dtype=torch.float64)
    h, h2 = (torch.randn(37, 16, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.randint(0, 1000, (37,), generator=g)

    def head(x):
        return x @ w.T

    full = float(F.cross_entropy(head(h).double(), t, reduction="sum"))
    for rows in (1, 5, 37, 100):
        assert M.chunked_nll(head, h, t, rows) == pytest.approx(full, rel=1e-12)
        kl = float(M.kl_div(M.log_probs(head(h2), 2.0), M.log_probs(head(h), 2.0)).sum())
        assert M.chunked_kl(head, h2, h, rows, 2.0) == pytest.approx(kl, rel=1e-12)
    assert M.rows_per_chunk(262_144) == 16 and M.rows_per_chunk(10**9) == 1


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch):
    """The tiny model, its head wrapped to record the most rows it is ever given at once."""
    lm = tiny_lm()
    seen = [0]
    real = lm.adapter.head_logits

    def head(h):
        seen[0] = max(seen[0], h.reshape(-1, h.shape[-1]).shape[0])
        return real(h)

    monkeypatch.setattr(lm.adapter, "head_logits", head)
    monkeypatch.setattr(M, "CHUNK_ELEMENTS", 128 * 8)  # vocabulary 128: 8 positions per chunk
    monkeypatch.setattr("prunelens.tasks.perplexity.rows_per_chunk", lambda v: M.rows_per_chunk(v, 128 * 8))
    monkeypatch.setattr("prunelens.prune.importance.rows_per_chunk", lambda v: M.rows_per_chunk(v, 128 * 8))
    return lm, seen


def test_perplexity_in_chunks_equals_the_full_logits(counted) -> None:
    lm, seen = counted
    text = " ".join(f"w{3 + (i * 7) % 120}" for i in range(200))
    res = perplexity(lm, text, seq_len=32, batch_size=3, progress=False)
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    x = ids[: res["windows"] * 32].reshape(-1, 32)
    with torch.no_grad():
        z = lm.model(input_ids=x).logits.double()
    nll = float(F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
    # float32 logits of a chunk vs of the whole batch round differently in the last bits
    assert res["perplexity"] == pytest.approx(math.exp(nll / res["tokens"]), rel=1e-6)
    assert 0 < seen[0] <= 8  # 3 windows × 31 positions were never made into logits at once


def test_kl_importance_in_chunks_equals_the_full_logits(counted) -> None:
    lm, seen = counted
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (4, 20), generator=g)
    plan = DropPlan(mlp=(0,))
    got = kl_scores(lm, plan, ids, "attn", [1, 2], batch_size=2)
    with torch.no_grad():
        lp_d = torch.log_softmax(lm.model(input_ids=ids).logits.double(), -1)
        for i in (1, 2):
            with pruned_view(lm.adapter, plan.with_unit("attn", i)):
                lp_p = torch.log_softmax(lm.model(input_ids=ids).logits.double(), -1)
            want = float(M.kl_div(lp_p, lp_d).sum()) / ids.numel()
            assert got[i] == pytest.approx(want, rel=1e-6)
    assert 0 < seen[0] <= 8


def test_kl_statistics_in_chunks_equal_the_full_logits(counted) -> None:
    """llama.cpp's KL statistics (``ppl --kld``) made a chunk of positions at a time equal the ones
    read off the full dense and pruned logits; an empty modification gives KL 0 and the same top token."""
    from prunelens.tasks.perplexity import kl_statistics

    lm, seen = counted
    text = " ".join(f"w{3 + (i * 11) % 120}" for i in range(200))
    plan = DropPlan(attn=(1,), mlp=(2,))
    res = kl_statistics(lm, text, plan, seq_len=32, batch_size=3, progress=False)
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    x = ids[: res["windows"] * 32].reshape(-1, 32)
    with torch.no_grad():
        lb = torch.log_softmax(lm.model(input_ids=x).logits.double()[:, :-1], -1).reshape(-1, 128)
        with pruned_view(lm.adapter, plan):
            lp = torch.log_softmax(lm.model(input_ids=x).logits.double()[:, :-1], -1).reshape(-1, 128)
    t = x[:, 1:].reshape(-1)
    kl = (lb.exp() * (lb - lp)).sum(-1)
    dp = lp.gather(-1, t[:, None]).exp()[:, 0] - lb.gather(-1, t[:, None]).exp()[:, 0]
    assert res["positions"] == len(t) and 0 < seen[0] <= 8
    assert res["mean_kld"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert res["kld_p50"] == pytest.approx(float(torch.quantile(kl, 0.5)), rel=1e-5)
    assert res["kld_p99"] == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-5)
    assert res["max_kld"] == pytest.approx(float(kl.max()), rel=1e-5)
    assert res["same_top"] == pytest.approx(float((lb.argmax(-1) == lp.argmax(-1)).double().mean()))
    assert res["rms_dp"] == pytest.approx(float(dp.pow(2).mean().sqrt()), rel=1e-5)
    assert res["ppl_mod"] == pytest.approx(perplexity(lm, text, plan, seq_len=32, progress=False)["perplexity"],
                                           rel=1e-6)
    none = kl_statistics(lm, text, DropPlan(), seq_len=32, batch_size=3, progress=False)
    assert none["mean_kld"] == 0 and none["same_top"] == 1 and none["rms_dp"] == 0
    assert none["ppl_base"] == none["ppl_mod"]


def test_ppl_kld_on_the_command_line(tiny_dir, tmp_path, capsys: pytest.CaptureFixture) -> None:
    import json

    from prunelens.cli import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{3 + (i * 5) % 50}" for i in range(300)))
    out = tmp_path / "ppl.json"
    rc = main(["ppl", "--model", str(tiny_dir), "--text", str(text), "--seq-len", "32", "--drop", "attn@1",
               "--kld", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "Mean    KLD:" in printed and "Same top p:" in printed and "RMS     Δp:" in printed
    res = json.loads(out.read_text())
    assert res["kl_statistics"]["mean_kld"] > 0
    # with --kld both perplexities come from the KL pass: the same numbers as a plain ppl run
    plain = tmp_path / "plain.json"
    assert main(["ppl", "--model", str(tiny_dir), "--text", str(text), "--seq-len", "32", "--drop", "attn@1",
                 "--quiet", "--out", str(plain)]) == 0
    ref = json.loads(plain.read_text())
    for side in ("dense", "modified"):
        assert res[side]["perplexity"] == pytest.approx(ref[side]["perplexity"], rel=1e-6)
        assert res[side]["tokens"] == ref[side]["tokens"]
