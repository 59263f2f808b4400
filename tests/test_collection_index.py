"""`unicom index`: recall measured against brute force on a few thousand vectors, every kind,
the on-disk IVF merge, and incremental add/remove without retraining."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unicom.collection import Collection
from unicom.collection.index import build_index, choose_factory
from unicom.collection.store import Store, new_table, write_arrays


def vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors: the same 40 centres whatever ``seed``, which draws the points."""
    centers = np.random.default_rng(0).standard_normal((40, dim))
    rng = np.random.default_rng(seed + 1)
    x = centers[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force_recall(collection: Collection, queries: np.ndarray, k: int) -> float:
    ids, stored = collection.embeddings()
    truth = ids[np.argsort(-(queries @ stored.T), axis=1, kind="stable")[:, :k]]
    found = [[r["id"] for r in row] for row in collection.search(queries, k)]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


@pytest.mark.parametrize("kind,on_disk", [("flat", False), ("hnsw", False), ("ivf", False), ("ivf", True)])
def test_recall_is_measured_against_exact_search(tmp_path, kind, on_disk):
    write_arrays(tmp_path, vectors(3000), part_size=1000)
    record = build_index(Collection.open(tmp_path), kind=kind, recall=0.9, k=10, on_disk=on_disk)
    saved = json.loads((tmp_path / "index.json").read_text())
    assert saved == record and (tmp_path / "index.faiss").is_file()
    assert record["recall_at_k"] >= 0.9 and record["latency_ms"]["p99"] >= record["latency_ms"]["p50"] > 0
    assert record["on_disk"] == on_disk and (tmp_path / "index.ivfdata").is_file() == on_disk
    collection = Collection.open(tmp_path)
    assert collection.searcher().kind == "index"
    queries = vectors(200, seed=1)  # new points, not rows of the collection
    assert brute_force_recall(collection, queries, 10) >= 0.85


def test_auto_choice_follows_count_and_budget():
    assert choose_factory("auto", 5_000, 512, 4 << 30) == "IDMap2,Flat"
    assert choose_factory("auto", 100_000, 512, 4 << 30).startswith("IDMap2,HNSW")
    assert choose_factory("auto", 1_000_000, 512, 4 << 30).startswith("IVF")
    assert choose_factory("auto", 1_000_000, 512, 1 << 30).startswith("OPQ")
    with pytest.raises(ValueError, match="expected auto, flat"):
        choose_factory("lsh", 10, 4, 1 << 20)


def test_incremental_add_and_remove_without_retraining(tmp_path):
    x = vectors(3000)
    write_arrays(tmp_path, x[:2000], part_size=1000)
    first = build_index(Collection.open(tmp_path), kind="ivf", recall=0.9)
    trained = (tmp_path / "index.faiss").stat().st_size
    store = Store(tmp_path)
    manifest = store.read_manifest()
    table = store.metadata(0).to_pydict()
    table["deleted"][:10] = [True] * 10  # ids 0..9 deleted
    store.write_metadata(0, new_table(table))
    new = x[2000:]
    store.write_embeddings(2, new.astype(np.float16))
    store.write_metadata(2, new_table({
        "image_path": [f"new_{i}" for i in range(1000)], "id": np.arange(2000, 3000), "size": [0] * 1000,
        "mtime": [0.0] * 1000, "sha256": ["0" * 64] * 1000, "width": [1] * 1000, "height": [1] * 1000,
        "error": [None] * 1000, "deleted": [False] * 1000}))
    manifest["parts"].append({"part": 2, "rows": 1000})
    manifest["generation"] += 1
    store.write_manifest(manifest)
    assert Collection.open(tmp_path).searcher().kind == "exact"  # the index is stale until updated
    record = build_index(Collection.open(tmp_path), kind="auto", recall=0.9)
    assert record["updated"] and (record["added"], record["removed"]) == (1000, 10)
    assert record["factory"] == first["factory"] and (tmp_path / "index.faiss").stat().st_size > trained
    collection = Collection.open(tmp_path)
    assert collection.searcher().kind == "index" and len(collection) == 2990
    hits = collection.search(x[:10], 5)
    assert all(r["id"] >= 10 for row in hits for r in row)
    assert collection.search(x[2500], 1)[0][0]["id"] == 2500


def test_a_collection_with_its_index_is_freed_without_the_garbage_collector(tmp_path):
    """No reference cycle through the searcher: the faiss index goes when the collection does, not
    at some later collection, which could run in a forked DataLoader worker and destroy the
    parent's faiss objects there (it segfaulted the suite's next worker test)."""
    import gc
    import weakref

    write_arrays(tmp_path, vectors(3000), part_size=1000)
    build_index(Collection.open(tmp_path), kind="ivf", recall=0.9, k=10, on_disk=True)
    gc.collect()
    gc.disable()
    try:
        collection = Collection.open(tmp_path)
        collection.search(vectors(3, seed=2), k=5)
        assert collection.searcher().kind == "index"
        freed = weakref.ref(collection)
        del collection
        assert freed() is None
    finally:
        gc.enable()
