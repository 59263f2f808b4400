"""``unicom dedup``: exact duplicates (same bytes) and near duplicates (cosine similarity at or above
a threshold) grouped into clusters, written to ``COL/dups.parquet``.

Near duplicates are found by a range search through an inverted-file index (faiss IVF-Flat; an
exact flat index for small collections), each part's rows searched in turn: no step forms an
N x N matrix, and with ``nprobe`` lists probed a row is compared with a small fraction of the
collection. Pairs are joined into clusters by connected components (union-find); each cluster
keeps its largest image (width x height, then the smallest id).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._utils import atomic_write
from .store import live_mask

__all__ = ["DedupReport", "dedup_collection", "near_duplicate_pairs"]

logger = logging.getLogger(__name__)

EXACT_MAX = 20_000  # collections searched with an exact flat index
TRAIN_PER_LIST = 40  # faiss asks for 39 rows per centroid
NPROBE = 4


@dataclass
class DedupReport:
    threshold: float
    clusters: int = 0
    duplicated: int = 0  # rows in a cluster
    exact_pairs: int = 0
    near_pairs: int = 0
    output: str = ""
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        if self.calibration:
            c = self.calibration
            out.append(f"threshold {self.threshold:.4f} (calibrated on {c['positives']} altered copies and "
                       f"{c['negatives']} nearest distinct images: estimated precision {c['precision']:.3f}, "
                       f"recall {c['recall']:.3f})")
        else:
            out.append(f"threshold {self.threshold:.4f}")
        out.append(f"{self.clusters} clusters of duplicates holding {self.duplicated} images "
                   f"({self.duplicated - self.clusters} could be removed); {self.exact_pairs} same-bytes pairs, "
                   f"{self.near_pairs} near pairs")
        out.append(f"wrote {self.output}")
        return out


def _lists(n: int) -> int:
    """A power of two near 4 sqrt(n): near duplicates share a cell (or a neighbouring one), so
    many small cells and a few probes keep the range search short."""
    return int(min(2 ** round(np.log2(4 * np.sqrt(n))), max(n // TRAIN_PER_LIST, 1)))


def _range_index(dim: int, n: int, sample: np.ndarray, nprobe: int):
    import faiss

    if n <= EXACT_MAX:
        return faiss.IndexFlatIP(dim)
    nlist = _lists(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10  # cells only route the search: coarse k-means is enough
    index.train(sample)
    index.nprobe = min(nprobe, nlist)
    return index


def near_duplicate_pairs(chunks, n: int, dim: int, threshold: float, nprobe: int = NPROBE,
                         query_chunk: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index pairs (i < j, positions in the concatenation of the chunks) with cosine
    similarity >= ``threshold`` among ``n`` vectors of size ``dim``. ``chunks()`` returns a fresh
    iterator over float32 L2-normalised (rows, D) arrays; it is called three times (training
    sample, add, search), so the vectors stream from disk and are never all copied at once."""
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    take = min(n, _lists(n) * TRAIN_PER_LIST) if n > EXACT_MAX else 0
    positions = np.sort(np.random.default_rng(0).choice(n, take, replace=False))
    index = _range_index(dim, n, _gather(chunks(), positions) if take else None, nprobe)
    for chunk in chunks():
        index.add(chunk)
    left, right = [], []
    offset = 0
    for chunk in chunks():
        for start in range(0, len(chunk), query_chunk):
            queries = chunk[start:start + query_chunk]
            lims, _, found = index.range_search(queries, threshold)
            rows = np.repeat(np.arange(len(queries)) + offset + start, np.diff(lims).astype(np.int64))
            keep = found > rows  # each pair once, no self pairs
            left.append(rows[keep])
            right.append(found[keep])
        offset += len(chunk)
    return np.concatenate(left), np.concatenate(right)


def _gather(chunks, positions: np.ndarray) -> np.ndarray:
    out, offset = [], 0
    for chunk in chunks:
        mine = positions[(positions >= offset) & (positions < offset + len(chunk))] - offset
        out.append(chunk[mine])
        offset += len(chunk)
    return np.concatenate(out)


def _clusters(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected component label of each of ``n`` nodes joined by the edges (left, right)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(left), np.int8), (left, right)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _exact_pairs(sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first row, other row) of rows with the same content hash."""
    order = np.argsort(sha256, kind="stable")
    ordered = sha256[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    group_start = starts[np.searchsorted(starts, same, side="right") - 1]
    return order[group_start], order[same]


def dedup_collection(path: str | os.PathLike, threshold: float | str = "auto", output: str | None = None,
                     device: str | None = None, nprobe: int = NPROBE) -> DedupReport:
    """Find and cluster the duplicates of the collection at ``path``; write ``output``
    (default ``COL/dups.parquet``) with columns cluster, id, image_path, score, keep."""
    from .api import Collection

    start = time.perf_counter()
    collection = Collection.open(path, device=device)
    calibration = {}
    if threshold == "auto":
        from .calibrate import calibrate_threshold

        calibration = calibrate_threshold(collection)
        threshold = calibration["threshold"]
    threshold = float(threshold)
    table = collection.metadata(["id", "image_path", "sha256", "width", "height", "error", "deleted"])
    table = table.filter(pa.array(live_mask(table)))
    ids = collection.ids()
    if not np.array_equal(table.column("id").to_numpy(), ids):
        raise RuntimeError("internal error: metadata and embeddings disagree on the searchable rows")
    n = len(ids)

    def chunks():
        from .index import _part_vectors

        for part in collection.parts:
            yield _part_vectors(collection, part)[1]

    near_left, near_right = near_duplicate_pairs(chunks, n, collection.embedding_size, threshold, nprobe)
    exact_left, exact_right = _exact_pairs(table.column("sha256").to_numpy(zero_copy_only=False).astype(str))
    labels = _clusters(n, np.r_[near_left, exact_left], np.r_[near_right, exact_right])
    sizes = np.bincount(labels, minlength=n)
    members = np.flatnonzero(sizes[labels] > 1)
    area = (table.column("width").to_numpy(zero_copy_only=False).astype(float).clip(0)
            * table.column("height").to_numpy(zero_copy_only=False).astype(float).clip(0))
    # kept: the largest image of its cluster, then the smallest id (lexsort's last key sorts first)
    order = members[np.lexsort((ids[members], -np.nan_to_num(area[members]), labels[members]))]
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    kept = np.repeat(order[first], np.diff(np.r_[np.flatnonzero(first), len(order)]))
    from .search import _stored

    scores = np.einsum("nd,nd->n", _stored(collection, order), _stored(collection, kept))
    cluster_ids = np.cumsum(first) - 1
    paths = table.column("image_path").to_numpy(zero_copy_only=False)
    result = pa.table({"cluster": pa.array(cluster_ids, pa.int64()), "id": pa.array(ids[order], pa.int64()),
                       "image_path": pa.array(paths[order], pa.string()),
                       "score": pa.array(np.where(order == kept, 1.0, scores).astype(np.float32)),
                       "keep": pa.array(order == kept)})
    output = output or str(collection.path / "dups.parquet")
    atomic_write(output, lambda f: pq.write_table(result, f))
    return DedupReport(threshold=threshold, clusters=int(first.sum()), duplicated=len(order),
                       exact_pairs=len(exact_left), near_pairs=len(near_left), output=output,
                       seconds=time.perf_counter() - start, calibration=calibration)
