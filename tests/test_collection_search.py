"""Searching a collection with deleted rows, exactly and through an HNSW index (which cannot remove
them), against a float64 brute force over the stored float16 vectors written in this test."""

from __future__ import annotations

import numpy as np
import pytest

from unicom.collection import Collection
from unicom.collection.index import build_index
from unicom.collection.store import Store, new_table, write_arrays

DELETED = 25  # ids 0..24


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def delete_first(root, count: int) -> None:
    """Mark ids 0..count-1 deleted, as `unicom embed` does for files gone from the sources."""
    store = Store(root)
    manifest = store.read_manifest()
    table = store.metadata(0).to_pydict()
    table["deleted"][:count] = [True] * count
    store.write_metadata(0, new_table(table))
    manifest["generation"] += 1
    store.write_manifest(manifest)


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the k best live rows: ids are row numbers, rows below DELETED are gone."""
    stored = x.astype(np.float16).astype(np.float64)[DELETED:]
    scores = queries.astype(np.float64) @ stored.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order + DELETED, np.take_along_axis(scores, order, 1)


def check(collection: Collection, x: np.ndarray, queries: np.ndarray, k: int) -> None:
    want_ids, want_scores = brute_force(x, queries, k)
    for row, ids, scores in zip(collection.search(queries, k), want_ids, want_scores):
        assert [r["id"] for r in row] == ids.tolist()
        np.testing.assert_allclose([r["score"] for r in row], np.minimum(scores, 1.0), atol=1e-5)


def test_exact_search_answers_ids_not_positions(tmp_path):
    x = unit(300)
    write_arrays(tmp_path, x, part_size=100)
    delete_first(tmp_path, DELETED)
    collection = Collection.open(tmp_path)
    assert collection.searcher().kind == "exact" and len(collection) == 300 - DELETED
    check(collection, x, np.r_[x[:DELETED + 5], unit(20, seed=1)], 5)


def test_deleted_rows_left_in_an_hnsw_index_are_never_answered(tmp_path):
    x = unit(600)
    write_arrays(tmp_path, x, part_size=300)
    build_index(Collection.open(tmp_path), kind="hnsw", recall=0.9, k=5)
    delete_first(tmp_path, DELETED)
    record = build_index(Collection.open(tmp_path), kind="hnsw", recall=0.9, k=5)
    assert record["updated"] and record["removed"] == DELETED
    collection = Collection.open(tmp_path)
    assert collection.searcher().kind == "index"
    # the deleted vectors themselves as queries: the index's best candidates are deleted rows
    check(collection, x, x[:DELETED], 5)


def test_k_below_one_is_refused(tmp_path):
    write_arrays(tmp_path, unit(10), part_size=10)
    collection = Collection.open(tmp_path)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be at least 1, got"):
            collection.search(unit(1), k)
