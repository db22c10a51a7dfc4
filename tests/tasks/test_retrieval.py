"""Retrieval: BEIR reading, rankings from constructed embeddings, LM pooling on a tiny model
(padding must not change an embedding), generation fidelity of an unmodified model, and the
packaged all-MiniLM-L6-v2 reference on the real Cranfield collection.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prunelens.errors import PrunelensError
from prunelens.model.arch import Adapter
from prunelens.model.loading import LoadedModel
from prunelens.prune.drop import DropPlan
from prunelens.tasks.fidelity import evaluate_fidelity
from prunelens.tasks.retrieval import BeirData, embed_lm, read_beir, score_rankings
from prunelens.testing import EOS, shared_data_dir, tiny_model, tiny_tokenizer

DATA = shared_data_dir()


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    model = tiny_model("llama")
    return LoadedModel(model, tiny_tokenizer(), Adapter(model), {"name": "tiny-llama"})


def _beir(root: Path, qrels: str) -> Path:
    root.mkdir()
    docs = [{"_id": str(i), "title": "", "text": f"w{i + 3}"} for i in range(3)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "w4"}) + "\n")
    (root / "qrels.tsv").write_text(qrels)
    return root


def test_read_beir_skips_header_and_unknown_docs(tmp_path: Path) -> None:
    d = read_beir(_beir(tmp_path / "b", "query-id\tcorpus-id\tscore\nq\t1\t2\nq\t99\t1\n"))
    assert d.doc_ids == ["0", "1", "2"] and d.qrels == {"q": {"1": 2.0}}
    bad = _beir(tmp_path / "c", "query-id\tcorpus-id\tscore\nq\t1\n")
    with pytest.raises(PrunelensError, match=r"qrels.tsv:2: expected"):
        read_beir(bad)
    (bad / "corpus.jsonl").unlink()
    with pytest.raises(PrunelensError, match="no corpus.jsonl"):
        read_beir(bad)


def test_rankings_from_constructed_embeddings() -> None:
    data = BeirData(["a", "b", "c"], ["", "", ""], {"q1": "", "q2": ""},
                    {"q1": {"b": 1}, "q2": {"a": 2, "c": 1}})
    docs = torch.eye(3)
    # q1 points at b; q2 prefers c, then a
    queries = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]), dim=-1)
    r = score_rankings("t", "x", data, ["q1", "q2"], queries, docs)
    # q2 ranks c (grade 1) then a (grade 2): DCG = 1 + 2/log2(3), ideal = 2 + 1/log2(3)
    q2 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert r.ndcg_at_10 == pytest.approx((1.0 + q2) / 2)
    assert r.recall_at_10 == 1.0 and r.mrr_at_10 == 1.0
    assert r.per_query[1]["top10"] == ["c", "a", "b"]


def test_lm_embeddings_do_not_depend_on_padding(tiny: LoadedModel) -> None:
    short, long = "w5 w6 w7", "w9 w10 w11 w12 w13 w14 w15 w16"
    for pooling in ("mean", "last"):
        alone = embed_lm(tiny, [short], pooling, progress=False)
        batched = embed_lm(tiny, [long, short], pooling, batch_size=2, progress=False)
        torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.linalg.vector_norm(alone[0]).item() == pytest.approx(1.0, abs=1e-6)
    # last-token pooling is the final-norm state at the appended EOS
    ids = torch.tensor([[5, 6, 7, EOS]])
    with torch.no_grad():
        h = tiny.model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(embed_lm(tiny, [short], "last", progress=False)[0],
                               torch.nn.functional.normalize(h, dim=-1), atol=1e-5, rtol=1e-5)
    # a pruned view changes the embedding; the dense one is back afterwards
    dense = embed_lm(tiny, [short], "mean", progress=False)
    pruned = embed_lm(tiny, [short], "mean", DropPlan(attn=(0, 1)), progress=False)
    assert (pruned - dense).abs().max() > 1e-3
    assert torch.equal(embed_lm(tiny, [short], "mean", progress=False), dense)


def test_fidelity_of_the_unmodified_model_is_perfect_and_a_drop_is_not(tiny: LoadedModel) -> None:
    prompts = ["w5 w6 w7", "w8 w9", "w20 w21 w22 w23"]
    same = evaluate_fidelity(tiny, prompts, None, max_new_tokens=8, chat_template=False, progress=False)
    assert same.rouge_l == 1.0 and same.token_agreement == 1.0 and same.identical == 1.0
    assert same.median_first_divergence is None
    other = evaluate_fidelity(tiny, prompts, DropPlan(block=(0, 1)), max_new_tokens=8, chat_template=False,
                              progress=False)
    assert other.token_agreement < 1.0 and other.identical < 1.0
    for s in other.samples:
        assert 0.0 <= s["rouge_l"] <= 1.0 and 0.0 <= s["repetition_modified"] < 1.0


@pytest.mark.skipif(not (DATA / "cranfield").is_dir(), reason="../shared/data/cranfield is absent")
@pytest.mark.slow  # loads the MiniLM reference model
def test_minilm_reference_on_cranfield() -> None:
    from prunelens.tasks.retrieval import evaluate_retrieval_reference

    r = evaluate_retrieval_reference(DATA, "cranfield", limit=60, progress=False)
    assert r.n == 60 and r.embedder == "all-MiniLM-L6-v2"
    # a real sentence embedder is far above chance (random ranking of 1400 documents: ~0.01)
    assert 0.25 < r.ndcg_at_10 < 0.6 and r.recall_at_100 > 0.5
