"""Faiss indexes of a collection (``unicom index``): ``COL/index.faiss`` and ``COL/index.json``.

``auto`` reasons as autofaiss does, from the count and the memory budget: exact ``Flat`` while
it is fast enough, then HNSW, then IVF-Flat while the float32 vectors fit the budget, then
OPQ + IVF-PQ. The search parameter (nprobe, efSearch) is then tuned to the smallest value
whose recall@k, **measured against exact search** on held-out rows of the collection, reaches
the target; candidates are re-ranked with the stored float16 embeddings. ``index.json``
records the factory string, the parameters, the measured recall@k and p50/p99 single-query
latency.

When the vectors do not fit the budget, an IVF index is built the way faiss' on-disk recipe
does: trained on a sample, vectors added part by part into blocks, the blocks merged into one
``index.ivfdata`` that is memory-mapped when searched; no step holds all vectors. After an
incremental ``embed``, new rows are added and deleted rows removed with the trained index as
it is (no retraining).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._utils import write_json

__all__ = ["build_index", "choose_factory", "load_index", "make_searcher"]

logger = logging.getLogger(__name__)

EXACT_MAX = 20_000  # rows searched exactly in well under a millisecond per query
HNSW_MAX = 200_000  # beyond this HNSW's build time on a few cores outgrows IVF's
HNSW_M = 32
RERANK_PQ = 10  # candidates per result re-ranked exactly for compressed codes
TRAIN_PER_LIST = 32
TUNE_QUERIES = 500
LATENCY_QUERIES = 200


def _nlist(n: int) -> int:
    """A power of two near 2 sqrt(n) (faiss' guideline is 4 to 16 sqrt(n); fewer lists train and
    add several times faster on a few cores, and the tuned nprobe makes up the recall), with
    enough rows to train each list."""
    target = 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(target, n // 39 or 1)))


def _pq_m(n: int, d: int, memory: int) -> int:
    """Bytes per code: the largest divisor of ``d`` among 64..4, at most ``d / 4`` (sub-vectors of
    4 dimensions or more train quickly and quantise well), whose codes (plus ids) fit ``memory``."""
    for m in (64, 48, 32, 24, 16, 8, 4):
        if d % m == 0 and 4 * m <= d and n * (m + 8) <= memory:
            return m
    return 4 if d % 4 == 0 else 1


def choose_factory(kind: str, n: int, d: int, memory: int) -> str:
    """The faiss factory string for ``kind`` (auto: by count and memory budget in bytes)."""
    flat_bytes = n * d * 4
    if kind == "auto":
        if n <= EXACT_MAX:
            kind = "flat"
        elif n <= HNSW_MAX and n * (4 * d + 8 * HNSW_M) <= memory:
            kind = "hnsw"
        elif flat_bytes * 1.1 <= memory:
            kind = "ivf"
        else:
            kind = "ivfpq"
    nlist = _nlist(n)
    if kind == "flat":
        return "IDMap2,Flat"
    if kind == "hnsw":
        return f"IDMap2,HNSW{HNSW_M},Flat"
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "ivfpq":
        m = _pq_m(n, d, memory)
        nbits = 8 if n >= 256 * 39 else 4  # 2^nbits centroids per sub-quantiser need training rows
        return f"OPQ{m},IVF{nlist},PQ{m}x{nbits}"
    raise ValueError(f"unknown index kind {kind!r}: expected auto, flat, hnsw, ivf or ivfpq")


def _param_name(factory: str) -> str | None:
    return "nprobe" if "IVF" in factory else "efSearch" if "HNSW" in factory else None


def _apply(index, name: str | None, value: int | None) -> None:
    import faiss

    if name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif name == "efSearch":
        inner = faiss.downcast_index(index.index if hasattr(index, "id_map") else index)
        inner.hnsw.efSearch = int(value)


def _candidates(name: str | None, index) -> list[int]:
    import faiss

    if name == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        return sorted({min(2 ** i, nlist) for i in range(int(math.log2(nlist)) + 2)})
    if name == "efSearch":
        return [16, 32, 64, 128, 256, 512, 1024]
    return [0]


def load_index(collection):
    """(faiss index with its tuned parameters, params) when ``COL/index.faiss`` is up to date with
    the collection, else None (search is then exact)."""
    meta = collection.path / "index.json"
    if not meta.is_file() or not (collection.path / "index.faiss").is_file():
        return None
    record = json.loads(meta.read_text(encoding="utf-8"))
    if record.get("generation") != collection.manifest.get("generation"):
        logger.warning("%s is older than the collection: searching exactly (run `unicom index %s` to update it)",
                       meta, collection.path)
        return None

    # An on-disk index's lists (index.ivfdata) are memory-mapped from beside index.faiss, wherever
    # the collection folder has moved.
    index = _read(collection.path / "index.faiss", record.get("on_disk"))
    params = record["params"]
    _apply(index, params.get("name"), params.get("value"))
    return index, params


def make_searcher(collection):
    """The index searcher when ``COL/index.faiss`` matches the collection, else exact search."""
    from .search import ExactSearcher, RerankSearcher

    loaded = load_index(collection)
    if loaded is not None:
        index, params = loaded
        return RerankSearcher(index, collection, int(params.get("rerank_factor", 4)))
    ids, vectors = collection.embeddings()
    return ExactSearcher(ids, vectors)


@contextlib.contextmanager
def _quiet_stdout():
    """Keep faiss' C++ progress lines ("resizing index.ivfdata ...") off stdout, which carries
    the command's output (``unicom search --json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _read(path: Path, on_disk: bool):
    import faiss

    with _quiet_stdout():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else 0)


def _part_vectors(collection, part: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of the searchable rows of one part."""
    rows = collection._rows()
    keep = rows["part"] == part
    vectors = np.asarray(collection.store.embeddings(part)[rows["row"][keep]], np.float32)
    return rows["id"][keep], vectors


def _sample(collection, count: int, seed: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of up to ``count`` random searchable rows (not in ``exclude``), read part by part."""
    ids = collection.ids()
    pool = ids if exclude is None else np.setdiff1d(ids, exclude)
    chosen = np.sort(np.random.default_rng(seed).choice(pool, min(count, len(pool)), replace=False))
    got_ids, got = [], []
    for part in collection.parts:
        part_ids, vectors = _part_vectors(collection, part)
        mask = np.isin(part_ids, chosen)
        got_ids.append(part_ids[mask])
        got.append(vectors[mask])
    dim = collection.embedding_size
    return (np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64),
            np.concatenate(got) if got else np.zeros((0, dim), np.float32))


def exact_neighbours(collection, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k), of the exact top-k of ``queries``, streamed part by part."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for part in collection.parts:
        ids, vectors = _part_vectors(collection, part)
        if not len(ids):
            continue
        scores = np.concatenate([best_scores, queries @ vectors.T], 1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], 1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(all_ids, top, 1)
    return best_scores, best_ids


def _recall(found: tuple[np.ndarray, np.ndarray], truth: tuple[np.ndarray, np.ndarray], query_ids: np.ndarray,
            k: int) -> float:
    """Mean fraction of each query's exact top-k (itself left out) that ``found`` holds; a result
    tied with the k-th exact score counts as a hit (identical images tie exactly)."""
    hits = []
    for f_scores, f_ids, t_scores, t_ids, q in zip(*found, *truth, query_ids):
        t = [(s, i) for s, i in zip(t_scores, t_ids) if i != q][:k]
        f = [(s, i) for s, i in zip(f_scores, f_ids) if i != q][:k]
        kth = t[-1][0] - 1e-5 if t else np.inf
        truth_ids = {i for _, i in t}
        hits.append(sum(1 for s, i in f if i in truth_ids or s >= kth) / max(len(t), 1))
    return float(np.mean(hits)) if hits else 1.0


def _tune(collection, index, factory: str, recall: float, k: int, seed: int) -> dict:
    """Smallest search parameter reaching ``recall`` at ``k``, and its measured recall and latency."""
    from .search import RerankSearcher

    query_ids, queries = _sample(collection, TUNE_QUERIES, seed + 1)
    truth = exact_neighbours(collection, queries, k + 1)
    name = _param_name(factory)
    factor = RERANK_PQ if "PQ" in factory else 2 if "HNSW" in factory else 1
    searcher = RerankSearcher(index, collection, factor)
    measured = None
    for value in _candidates(name, index):
        _apply(index, name, value)
        measured = _recall(searcher.search(queries, k + 1), truth, query_ids, k)
        if measured >= recall:
            break
    if measured < recall:
        logger.warning("recall@%d %.3f is below the target %.3f even at %s=%s", k, measured, recall, name, value)
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # single-query latency as a server answering one query per core sees it
    times = []
    try:
        for q in queries[:LATENCY_QUERIES]:
            start = time.perf_counter()
            searcher.search(q[None], k)
            times.append(1000 * (time.perf_counter() - start))
    finally:
        faiss.omp_set_num_threads(threads)
    return {"params": {"name": name, "value": value, "rerank_factor": factor},
            "recall_at_k": round(measured, 4), "queries": len(queries),
            "latency_ms": {"p50": round(float(np.percentile(times, 50)), 4),
                           "p99": round(float(np.percentile(times, 99)), 4)}}


def _trained(collection, factory: str, seed: int):
    """A trained, empty index for ``factory`` (inner product), trained on a sample of the collection."""
    import faiss

    index = faiss.index_factory(collection.embedding_size, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10  # coarse cells only route the search; the tuned nprobe makes up for the rest
        nlist = ivf.nlist
        count = max(nlist * TRAIN_PER_LIST, 256 * 39 if "x8" in factory else 0, 10_000)
        _, sample = _sample(collection, count, seed)
        index.train(sample)
    return index


def _add_parts(collection, index, only: np.ndarray | None = None) -> int:
    """Add the searchable rows (those in ``only`` if given) part by part; returns the count."""
    added = 0
    for part in collection.parts:
        ids, vectors = _part_vectors(collection, part)
        if only is not None:
            keep = np.isin(ids, only)
            ids, vectors = ids[keep], vectors[keep]
        if len(ids):
            index.add_with_ids(vectors, ids)
            added += len(ids)
    return added


def _write_on_disk(collection, trained, folder: Path) -> object:
    """faiss' on-disk recipe: one block per part from the trained index, merged into index.ivfdata."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    blocks = folder / "index_blocks"
    blocks.mkdir(exist_ok=True)
    names = []
    for part in collection.parts:
        ids, vectors = _part_vectors(collection, part)
        block = faiss.clone_index(trained)
        if len(ids):
            block.add_with_ids(vectors, ids)
        names.append(str(blocks / f"block_{part}.index"))
        faiss.write_index(block, names[-1])
        del block
    index = faiss.clone_index(trained)
    cwd = os.getcwd()
    try:  # the .ivfdata path is stored as given: relative, so the collection folder can move
        os.chdir(folder)
        Path("index.ivfdata").unlink(missing_ok=True)
        with _quiet_stdout():
            merge_ondisk(index, names, "index.ivfdata")
    finally:
        os.chdir(cwd)
    for name in names:
        Path(name).unlink()
    blocks.rmdir()
    _save(index, folder / "index.faiss")
    return _read(folder / "index.faiss", True)


def _save(index, path: Path) -> None:
    import faiss

    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _update(collection, record: dict, live: np.ndarray, indexed: np.ndarray):
    """The existing index with deleted rows removed and new rows added (no retraining)."""
    import faiss

    removed = np.setdiff1d(indexed, live)
    new = np.setdiff1d(live, indexed)
    folder = collection.path
    if record.get("on_disk"):
        trained = faiss.read_index(str(folder / "index.trained.faiss"))
        return _write_on_disk(collection, trained, folder), len(new), len(removed)
    index = faiss.read_index(str(folder / "index.faiss"))
    if len(removed):
        if "HNSW" in record["factory"]:  # HNSW cannot remove: deleted ids are left out at search
            record["tombstones"] = int(record.get("tombstones", 0)) + len(removed)
        else:
            index.remove_ids(removed)
    _add_parts(collection, index, only=new)
    return index, len(new), len(removed)


def build_index(collection, *, kind: str = "auto", memory: int = 4 << 30, recall: float = 0.95,
                k: int = 10, rebuild: bool = False, on_disk: bool | None = None, seed: int = 0) -> dict:
    """Build (or bring up to date) the index of ``collection`` (a :class:`~unicom.collection.Collection`:
    ``Collection.open(path)``); returns index.json's record.

    ``memory``: the budget in bytes for the index; ``on_disk`` (default: when the float32 vectors
    do not fit the budget) builds an IVF index with faiss' on-disk merge.
    """
    folder = collection.path
    n, d = len(collection), collection.embedding_size
    if n == 0:
        raise ValueError(f"{folder} has no searchable rows to index")
    start = time.perf_counter()
    meta = folder / "index.json"
    record = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() and not rebuild else None
    ids_path = folder / "index_ids.npy"
    if record is not None and kind in ("auto", record["kind"]) and ids_path.is_file():
        index, added, removed = _update(collection, record, collection.ids(), np.load(ids_path))
        record.update(added=added, removed=removed, updated=True)
    else:
        factory = choose_factory(kind, n, d, memory)
        on_disk = (n * d * 4 > memory) if on_disk is None else on_disk
        on_disk = on_disk and factory.startswith(("IVF", "OPQ"))
        trained = _trained(collection, factory, seed)
        if on_disk:
            import faiss

            faiss.write_index(trained, str(folder / "index.trained.faiss"))
            index = _write_on_disk(collection, trained, folder)
        else:
            index = trained
            _add_parts(collection, index)
        chosen = {"IDMap2,Flat": "flat", "IVF": "ivf", "OPQ": "ivfpq"}
        record = {"kind": next((v for key, v in chosen.items() if factory.startswith(key)), "hnsw"),
                  "factory": factory, "metric": "inner_product", "on_disk": bool(on_disk), "memory_budget": memory,
                  "added": n, "removed": 0, "updated": False}
    record.update(_tune(collection, index, record["factory"], recall, k, seed), k=k, recall_target=recall, rows=n,
                  generation=collection.manifest["generation"], build_seconds=round(time.perf_counter() - start, 3))
    _save(index, folder / "index.faiss")
    np.save(ids_path, collection.ids())
    write_json(record, meta)
    return record
