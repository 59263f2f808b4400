"""The duplicates that `unicom serve` lists, read in-process from a real collection and its dedup
output: items deleted since the dedup run are left out, and so is a cluster left with one item."""

from __future__ import annotations

import numpy as np

from unicom.collection import Collection
from unicom.collection.dedup import dedup_collection
from unicom.collection.store import Store, new_table, write_arrays
from unicom.serve.backend import CollectionBackend


def test_a_cluster_left_with_one_item_is_no_longer_listed(tmp_path):
    x = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    x[1] = x[0] + 0.01
    x[3], x[4] = x[2] + 0.01, x[2] - 0.01
    write_arrays(tmp_path, x, part_size=100)
    dedup_collection(tmp_path, threshold=0.99)
    clusters = CollectionBackend(Collection.open(tmp_path)).duplicates()
    assert sorted(sorted(i["id"] for i in c["items"]) for c in clusters) == [[0, 1], [2, 3, 4]]
    store = Store(tmp_path)
    table = store.metadata(0).to_pydict()
    table["deleted"][1] = table["deleted"][4] = True  # deleted after the dedup run
    store.write_metadata(0, new_table(table))
    clusters = CollectionBackend(Collection.open(tmp_path)).duplicates()
    assert [sorted(i["id"] for i in c["items"]) for c in clusters] == [[2, 3]]
