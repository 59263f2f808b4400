"""`unicom dedup`: exact and near duplicates clustered, distinct images not, on real files with a
tiny random model (threshold calibrated on the collection) and on vectors against brute force."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from collection_images import altered, draw, write_folder
from unicom.collection.calibrate import pick_threshold
from unicom.collection.dedup import dedup_collection, near_duplicate_pairs
from unicom.collection.store import Store, new_table, write_arrays


def test_exact_and_near_duplicates_are_clustered(tmp_path, checkpoint, one_thread):
    from unicom.collection.embed import embed_collection

    folder = tmp_path / "images"
    write_folder(folder, range(30))
    shutil.copy(folder / "img_0003.png", folder / "same_bytes_as_3.png")
    altered(draw(7), "jpeg").save(folder / "jpeg_of_7.png")
    altered(draw(9), "brightness").resize((150, 150)).save(folder / "bigger_brighter_9.png")
    embed_collection([str(folder)], tmp_path / "col", checkpoint, batch_size=16, num_workers=0, device="cpu")
    report = dedup_collection(tmp_path / "col", threshold="auto", device="cpu")
    calibration = report.calibration
    assert calibration["precision"] >= 0.99 and calibration["positives"] == 4 * 33
    rows = pq.read_table(tmp_path / "col" / "dups.parquet").to_pylist()
    clusters: dict[int, set[str]] = {}
    for row in rows:
        clusters.setdefault(row["cluster"], set()).add(row["image_path"].rsplit("/", 1)[1])
    assert sorted(map(sorted, clusters.values())) == [
        ["bigger_brighter_9.png", "img_0009.png"], ["img_0003.png", "same_bytes_as_3.png"],
        ["img_0007.png", "jpeg_of_7.png"]]
    kept = {r["image_path"].rsplit("/", 1)[1] for r in rows if r["keep"]}
    assert "bigger_brighter_9.png" in kept and len(kept) == 3  # the largest image of its cluster
    assert all(r["score"] >= report.threshold - 1e-3 for r in rows)
    assert report.exact_pairs == 1 and report.clusters == 3


@pytest.mark.parametrize("n", [2000, 25_000])  # exact flat range search, then the IVF one
def test_near_pairs_match_brute_force(n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    copies = rng.choice(n, 100, replace=False)
    x[copies[50:]] = x[copies[:50]] + 0.02 * rng.standard_normal((50, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = lambda: iter(np.array_split(x, 3))  # noqa: E731
    left, right = near_duplicate_pairs(chunks, n, 16, 0.98)
    found = set(zip(left.tolist(), right.tolist()))
    truth = set()
    for start in range(0, n, 5000):
        sims = x[start:start + 5000] @ x.T
        i, j = np.nonzero(sims >= 0.98)
        truth |= {(a + start, b) for a, b in zip(i.tolist(), j.tolist()) if a + start < b}
    assert len(truth) >= 50 and len(found & truth) / len(truth) >= 0.99
    # each pair once, as (i < j), and every one similar enough (float32 rounding at the threshold)
    assert len(found) == len(left) and all(a < b for a, b in found)
    assert (np.einsum("nd,nd->n", x[left], x[right]) >= 0.98 - 1e-5).all()


def test_dedup_on_vectors_writes_one_row_per_duplicate(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    x[1] = x[0] + 0.01
    x[2] = x[0] - 0.01
    write_arrays(tmp_path, x, part_size=200)
    report = dedup_collection(tmp_path, threshold=0.99)
    rows = pq.read_table(tmp_path / "dups.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == [0, 1, 2] and sum(r["keep"] for r in rows) == 1
    assert report.clusters == 1 and report.duplicated == 3


def test_same_bytes_cluster_whatever_their_vectors_and_deleted_rows_never(tmp_path):
    """Rows with one content hash are one cluster even when their stored vectors differ; rows marked
    deleted take no part, neither as a near duplicate nor through their hash."""
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    x[11] = x[10] + 0.01  # near duplicates, both live
    x[1] = x[0] + 0.01  # a near duplicate of row 0, but deleted
    write_arrays(tmp_path, x, part_size=200)
    store = Store(tmp_path)
    table = store.metadata(0).to_pydict()
    for row in (5, 7, 9):  # four rows with the same bytes (and unrelated vectors)
        table["sha256"][row] = table["sha256"][3]
    table["sha256"][2] = table["sha256"][20]  # the same bytes as row 20, but deleted
    table["deleted"][1] = table["deleted"][2] = True
    store.write_metadata(0, new_table(table))
    report = dedup_collection(tmp_path, threshold=0.99)
    rows = pq.read_table(tmp_path / "dups.parquet").to_pylist()
    clusters = sorted(sorted(r["id"] for r in rows if r["cluster"] == c) for c in {r["cluster"] for r in rows})
    assert clusters == [[3, 5, 7, 9], [10, 11]] and sum(r["keep"] for r in rows) == 2
    assert (report.clusters, report.duplicated, report.exact_pairs) == (2, 6, 3)


def test_threshold_pick_reaches_the_precision():
    positives = np.array([0.99, 0.98, 0.97, 0.95, 0.90, 0.80])
    negatives = np.array([0.85, 0.70, 0.60, 0.50])
    picked = pick_threshold(positives, negatives, precision=0.99)
    assert picked["threshold"] == 0.90 and picked["precision"] == 1.0 and picked["recall"] == 5 / 6
