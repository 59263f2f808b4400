"""`unicom index` on synthetic clustered 512-d vectors with planted near duplicates, side by side
with exact faiss ``Flat`` and with the index autofaiss' rule picks at the same memory budget.

For each: build time, recall@10 against exact search (queries: rows of the collection, itself
left out), p50/p99 single-query latency, index size. Ours is tuned to the smallest nprobe /
efSearch reaching the recall target; the autofaiss pick is tuned as autofaiss tunes it, to the
largest parameter whose mean latency stays under its default 10 ms budget.

    nice python -m benchmarks.bench_collection_index --rows 1000000 --memory 4GB
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time

import faiss
import numpy as np

from benchmarks.collection_vectors import clustered
from unicom.cli import memory_size
from unicom.collection import Collection
from unicom.collection.index import build_index
from unicom.collection.store import write_arrays


def autofaiss_key(n: int, d: int, memory: int) -> str:
    """autofaiss' ``get_optimal_index_keys_v2`` first choice (its rule, restated)."""
    if n < 1000:
        return "Flat"
    if n < 10_000:
        return "HNSW15"
    m_hnsw = int(math.floor((memory / (4 * n) - d) / 2))
    if m_hnsw >= 8:
        return f"HNSW{min(m_hnsw, 32)}"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n))) if n < 1_000_000 else 16_384
    if n < 1_000_000 and n * d * 4 <= memory:
        return f"IVF{nlist},Flat"
    target = 4.0 * n * d / memory
    for pq in (256, 128, 64, 48, 32, 24, 16, 8, 4):
        if pq < d and 4 * d / (pq + 8) >= target:
            y = (min(d // pq, 6) + 1) * pq
            return f"OPQ{pq}_{y},IVF{nlist}{'_HNSW32' if nlist >= 1000 else ''},PQ{pq}x8"
    return "Flat"


def latencies(search, queries: np.ndarray) -> tuple[float, float]:
    """p50, p99 of one query at a time, on one thread for every method (on a shared machine a
    second OpenMP thread mostly waits for a core)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        for q in queries:
            start = time.perf_counter()
            search(q[None])
            times.append(1000 * (time.perf_counter() - start))
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall_at(found: np.ndarray, truth: np.ndarray, query_rows: np.ndarray, k: int) -> float:
    hits = [len(set([i for i in f if i != q][:k]) & set([i for i in t if i != q][:k])) / k
            for f, t, q in zip(found, truth, query_rows)]
    return float(np.mean(hits))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--memory", type=memory_size, default=memory_size("4GB"))
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--autofaiss-rows", type=int, default=200_000,
                   help="rows the autofaiss pick is built on when it is HNSW (its build is the slow step)")
    args = p.parse_args(argv)
    k = 10
    x, _ = clustered(args.rows)
    rng = np.random.default_rng(1)
    query_rows = rng.choice(args.rows, args.queries, replace=False)
    queries = x[query_rows]
    with tempfile.TemporaryDirectory() as folder:
        write_arrays(folder, x)
        x16 = x.astype(np.float16).astype(np.float32)  # what the collection stores
        start = time.perf_counter()
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x16)
        flat_build = time.perf_counter() - start
        truth = flat.search(queries, k + 1)[1]
        flat_p50, flat_p99 = latencies(lambda q: flat.search(q, k), queries[:50])
        print(f"exact Flat       build {flat_build:7.1f} s  recall@10 1.000  p50 {flat_p50:8.3f} ms  "
              f"p99 {flat_p99:8.3f} ms  size {x.nbytes / 2**20:7.0f} MiB", flush=True)
        start = time.perf_counter()
        record = build_index(Collection.open(folder), memory=args.memory, recall=0.95, k=k)
        ours_build = time.perf_counter() - start

        collection = Collection.open(folder)
        searcher = collection.searcher()
        found = searcher.search(queries, k + 1)[1]
        ours_recall = recall_at(found, truth, query_rows, k)
        p50, p99 = latencies(lambda q: searcher.search(q, k), queries)
        size = sum(f.stat().st_size for f in collection.path.glob("index*") if f.is_file())
        print(f"unicom {record['factory']:<10} build {ours_build:7.1f} s  recall@10 {ours_recall:.3f}  "
              f"p50 {p50:8.3f} ms  p99 {p99:8.3f} ms  size {size / 2**20:7.0f} MiB  "
              f"({record['params']['name']}={record['params']['value']}, index.json recall "
              f"{record['recall_at_k']}, exact/ours p50 {flat_p50 / p50:.1f}x)", flush=True)
    key = autofaiss_key(args.rows, x.shape[1], args.memory)
    rows = min(args.rows, args.autofaiss_rows) if "HNSW" in key and "IVF" not in key else args.rows
    sub = x16[:rows]
    sub_rows = query_rows[query_rows < rows][:200]
    sub_truth = flat.search(x[sub_rows], k + 1)[1] if rows == args.rows else \
        faiss.knn(x[sub_rows], sub, k + 1, faiss.METRIC_INNER_PRODUCT)[1]
    flat.reset()  # frees its memory before the autofaiss pick is built
    start = time.perf_counter()
    index = faiss.index_factory(x.shape[1], key, faiss.METRIC_INNER_PRODUCT)
    index.train(sub[:min(rows, 100_000)])
    index.add(sub)
    af_build = time.perf_counter() - start
    space = faiss.ParameterSpace()
    name = "efSearch" if "HNSW" in key and "IVF" not in key else "nprobe"
    chosen = 16
    for value in (16, 32, 64, 128, 256, 512, 1024):  # autofaiss: the largest within 10 ms a query
        space.set_index_parameter(index, name, value)
        if np.mean([latencies(lambda q: index.search(q, 40), x[sub_rows[:30]])[0]]) < 10:
            chosen = value
    space.set_index_parameter(index, name, chosen)
    af_recall = recall_at(index.search(x[sub_rows], k + 1)[1], sub_truth, sub_rows, k)
    p50, p99 = latencies(lambda q: index.search(q, k), x[sub_rows])
    print(f"autofaiss {key:<8} build {af_build:7.1f} s  recall@10 {af_recall:.3f}  p50 {p50:8.3f} ms  "
          f"p99 {p99:8.3f} ms  ({name}={chosen}; on {rows} rows)", flush=True)
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
