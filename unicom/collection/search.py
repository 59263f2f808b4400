"""Searching a collection: exactly, or through its index (``COL/index.faiss``) when that is up to date,
re-ranking the index's candidates with the stored float16 embeddings."""

from __future__ import annotations

import logging
import weakref

import numpy as np

__all__ = ["ExactSearcher", "RerankSearcher"]

logger = logging.getLogger(__name__)


class ExactSearcher:
    """Inner product against every searchable row (faiss ``IndexFlatIP``)."""

    kind = "exact"

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        import faiss

        self.ids = ids
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), ids (Q, k)); ids -1 past the number of rows."""
        scores, rows = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        ids = np.where(rows >= 0, self.ids[rows.clip(0)], -1)
        return scores, ids


class RerankSearcher:
    """An index's candidates (``factor * k`` of them), re-scored exactly with the stored embeddings."""

    def __init__(self, index, collection, factor: int) -> None:
        # A weak reference: the collection owns its searcher, and a cycle would leave the faiss
        # index to the garbage collector, whose run in a forked DataLoader worker then destroys
        # the parent's faiss objects there (a segfault seen in the test suite).
        self.index, self.collection, self.factor = index, weakref.proxy(collection), factor
        self.kind = "index"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        _, candidates = self.index.search(queries, max(k * self.factor, k))
        rows = _rows_of(self.collection, candidates)
        vectors = _stored(self.collection, rows.clip(0).reshape(-1)).reshape(*rows.shape, -1)
        scores = np.where(rows >= 0, np.einsum("qd,qcd->qc", queries, vectors), -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_rows = np.take_along_axis(rows, order, 1)
        top_scores = np.take_along_axis(scores, order, 1)
        ids = np.where(top_rows >= 0, self.collection.ids()[top_rows.clip(0)], -1)
        return np.where(top_rows >= 0, top_scores, -np.inf).astype(np.float32), ids


def _stored(collection, rows: np.ndarray) -> np.ndarray:
    """float32 stored embeddings of searchable rows (storage positions), read from the
    memory-mapped parts: re-ranking never loads the whole collection."""
    live = collection._rows()
    out = np.zeros((len(rows), collection.embedding_size), np.float32)
    parts = live["part"][rows]
    for part in np.unique(parts):
        mask = parts == part
        out[mask] = collection.store.embeddings(int(part))[live["row"][rows[mask]]]
    return out


def _rows_of(collection, ids: np.ndarray) -> np.ndarray:
    """Storage positions of searchable ``ids`` (any shape); -1 for ids that are not searchable."""
    rows = collection._rows()
    sorted_ids = rows["sorted_ids"]
    if not len(sorted_ids):
        return np.full(ids.shape, -1)
    pos = np.searchsorted(sorted_ids, ids).clip(0, len(sorted_ids) - 1)
    return np.where((sorted_ids[pos] == ids) & (ids >= 0), rows["by_id"][pos], -1)
