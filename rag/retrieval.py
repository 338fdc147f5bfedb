"""`rag retrieval`: how well a sentence-embedding retriever finds each question's gold passage.

Embeds the corpus (default: every passage of the records; `--corpus` adds a distractor file) with
all-MiniLM-L6-v2, indexes it with faiss and searches with every question. Reports recall@k, MRR and nDCG@k of
the gold passage (one relevant passage per question, so nDCG@k = mean of 1/log2(1 + rank) over hits within k),
and the time to embed, index and search (queries per second).

Indexes: `flat` (exact inner product, the default; fine up to a few hundred thousand passages on a CPU),
`hnsw` (graph search, approximate, no training; `--hnsw_m`, `--ef_search`) and `ivfpq` (inverted lists with
product-quantised vectors, approximate, trained on the corpus; for millions of passages; `--nlist`,
`--nprobe`, `--pq_m`).

    rag retrieval --records ../shared/data/nq_open/nq-open-oracle-2000.jsonl.gz
    rag retrieval --records data/rag/questions.jsonl --corpus data/rag/corpus.jsonl --index hnsw
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.core.command import StageError, parse_config, run_stage
from align.core.outputs import write_json_atomic
from align.lm.models import resolve_embedding_model
from rag.data import Passage, gold_passage, load_corpus, load_records, passage_text

STAGE = "rag retrieval"
INDEX_KINDS = ("flat", "hnsw", "ivfpq")
logger = logging.getLogger("align")


class Embedder:
    """A sentence-transformers model that returns L2-normalised float32 vectors (cosine = inner product)."""

    def __init__(self, name_or_path: str = "all-minilm-l6-v2", device: str | None = None, batch_size: int = 64,
                 stage: str = "rag"):
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path
        self.path = resolve_embedding_model(name_or_path, stage)
        self.model = SentenceTransformer(self.path, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.get_embedding_dimension()), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass
class IndexSettings:
    kind: str = "flat"
    hnsw_m: int = 32  # graph degree
    ef_search: int = 64  # candidates kept while searching the graph
    nlist: int | None = None  # inverted lists; default 4 * sqrt(corpus), at most corpus / 39
    nprobe: int = 8  # lists visited per query
    pq_m: int = 16  # sub-quantisers (must divide the embedding width)


def build_index(vectors: np.ndarray, settings: IndexSettings, stage: str = STAGE):
    """A faiss inner-product index over `vectors` (n, dim)."""
    import faiss

    n, dim = vectors.shape
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = settings.ef_search
    elif settings.kind == "ivfpq":
        if dim % settings.pq_m:
            raise StageError(stage, f"pq_m={settings.pq_m} must divide the embedding width {dim}")
        if n < 256:
            raise StageError(stage, f"ivfpq needs at least 256 passages to train its codebooks, the corpus has {n} "
                             "— use --index flat")
        nlist = settings.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if nlist > n // 39:
            raise StageError(stage, f"nlist={nlist} needs at least {39 * nlist} passages to train (the corpus has {n})"
                             " — lower --nlist")
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, settings.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(settings.nprobe, nlist)
    else:
        raise StageError(stage, f"unknown index {settings.kind!r} — choose one of {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index


def ranking_metrics(ranks: Sequence[int | None], cutoffs: Sequence[int]) -> dict:
    """recall@k, nDCG@k for each cutoff and MRR from the 1-based rank of each query's one relevant item
    (None = not retrieved within the searched depth, which counts as a miss everywhere)."""
    n = len(ranks)
    if n == 0:
        raise ValueError("no queries")
    metrics = {"queries": n, "mrr": sum(1 / r for r in ranks if r) / n}
    for k in cutoffs:
        metrics[f"recall@{k}"] = sum(1 for r in ranks if r and r <= k) / n
        metrics[f"ndcg@{k}"] = sum(1 / math.log2(1 + r) for r in ranks if r and r <= k) / n
    return metrics


@dataclass
class RetrievalArguments:
    records: str = field(default="data/rag/questions.jsonl",
                         metadata={"help": "QA records with a gold passage (JSONL(.gz), JSON or a saved dataset)."})
    corpus: str | None = field(default=None, metadata={"help": "Extra passages to index besides the records' own "
                                                                "(JSONL rows with `text` and `title`)."})
    index: str = field(default="flat", metadata={"help": "Index type: flat (exact), hnsw or ivfpq (approximate)."})
    cutoffs: list[int] = field(default_factory=lambda: [1, 5, 10, 20],
                               metadata={"help": "k values for recall@k and nDCG@k."})
    hnsw_m: int = field(default=32, metadata={"help": "hnsw: neighbours per graph node."})
    ef_search: int = field(default=64, metadata={"help": "hnsw: candidates kept during search."})
    nlist: int | None = field(default=None, metadata={"help": "ivfpq: number of inverted lists (default "
                                                               "4*sqrt(corpus size))."})
    nprobe: int = field(default=8, metadata={"help": "ivfpq: lists visited per query."})
    pq_m: int = field(default=16, metadata={"help": "ivfpq: sub-quantisers per vector (divides the width)."})
    embedding_model: str = field(default="all-minilm-l6-v2", metadata={"help": "sentence-transformers model."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N records."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})


def evaluate_retrieval(args: RetrievalArguments) -> dict:
    if args.index not in INDEX_KINDS:
        raise StageError(STAGE, f"unknown index {args.index!r} — choose one of {', '.join(INDEX_KINDS)}")
    if not args.cutoffs or min(args.cutoffs) < 1:
        raise StageError(STAGE, "cutoffs must be positive integers")
    if args.limit is not None and args.limit < 1:
        raise StageError(STAGE, f"limit must be at least 1, got {args.limit}")
    records = load_records(args.records, STAGE)[:args.limit]
    corpus: list[Passage] = load_corpus(args.corpus, records, STAGE)
    position = {passage.key: i for i, passage in enumerate(corpus)}
    targets = [position[gold_passage(r).key] for r in records]
    embedder = Embedder(args.embedding_model, stage=STAGE)

    start = time.perf_counter()
    vectors = embedder.encode([passage_text(p) for p in corpus])
    embed_corpus_s = time.perf_counter() - start
    start = time.perf_counter()
    index = build_index(vectors, IndexSettings(args.index, args.hnsw_m, args.ef_search, args.nlist, args.nprobe,
                                               args.pq_m))
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    queries = embedder.encode([r["question"] for r in records])
    embed_queries_s = time.perf_counter() - start
    depth = min(len(corpus), max(max(args.cutoffs), 100))
    start = time.perf_counter()
    _, found = index.search(queries, depth)
    search_s = time.perf_counter() - start
    ranks = [next((i + 1 for i, j in enumerate(row) if j == target), None)
             for row, target in zip(found.tolist(), targets, strict=True)]
    metrics = ranking_metrics(ranks, sorted(set(args.cutoffs)))
    return {**metrics, "index": args.index, "corpus_size": len(corpus), "search_depth": depth,
            "embedding_model": args.embedding_model,
            "seconds": {"embed_corpus": embed_corpus_s, "build_index": index_s, "embed_queries": embed_queries_s,
                        "search": search_s},
            "passages_per_s_embedded": len(corpus) / embed_corpus_s,
            "queries_per_s_search": len(records) / max(search_s, 1e-9),
            "queries_per_s_end_to_end": len(records) / (embed_queries_s + search_s)}


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_config(STAGE, (RetrievalArguments,), argv, module="rag.retrieval")
    result = evaluate_retrieval(args)
    cutoffs = sorted(set(args.cutoffs))
    print(f"{result['queries']} questions, {result['corpus_size']} passages, index {result['index']}")
    print("  ".join(f"recall@{k} {result[f'recall@{k}']:.3f}" for k in cutoffs) + f"  MRR {result['mrr']:.3f}")
    print("  ".join(f"nDCG@{k} {result[f'ndcg@{k}']:.3f}" for k in cutoffs))
    print(f"search {result['queries_per_s_search']:.0f} queries/s (embedding included: "
          f"{result['queries_per_s_end_to_end']:.0f} queries/s); corpus embedded at "
          f"{result['passages_per_s_embedded']:.0f} passages/s, index built in "
          f"{result['seconds']['build_index']:.2f} s")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.output_json), result)
    else:
        logger.debug(json.dumps(result))
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
