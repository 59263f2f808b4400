"""Tests of unicom.metrics against brute-force float64 references.

Two kinds of data:
* random float64 embeddings: near-ties are ~1e-16 apart from real ones, so rankings computed
  in float64 by the library and by the reference agree exactly;
* "exact" embeddings: entries +-1 in 16 dimensions, rows scaled by powers of two. Normalised
  entries are +-0.25 and every cosine similarity is a multiple of 1/16, computed exactly in
  float16, bfloat16, float32 and float64 alike. Similarities take only 33 values, so ties
  (including at the k-th place) are everywhere and the tie rule is checked exactly.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from reference import ref_knn, ref_retrieval, ref_topk
from unicom.metrics import (
    knn_accuracy,
    knn_classify,
    knn_topk,
    knn_vote_accuracy,
    merge_topk,
    retrieval_metrics,
)

# ---------------------------------------------------------------------------------------
# data


def random_data(n: int, num_classes: int, seed: int, dim: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    # Class centres plus noise, so metrics land away from 0 and 1.
    centres = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    x = centres[labels] + 1.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.5), labels  # random norms


def exact_data(n: int, num_classes: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, 16), generator=g).double() * 2 - 1
    labels = torch.randint(0, num_classes, (n,), generator=g)
    # Exact duplicates, half with the source's label and half with another.
    src = torch.randint(0, n, (n // 5,), generator=g)
    dst = torch.randint(0, n, (n // 5,), generator=g)
    x[dst] = x[src]
    same = torch.rand(n // 5, generator=g) < 0.5
    labels[dst[same]] = labels[src[same]]
    x = x * 2.0 ** torch.randint(0, 3, (n, 1), generator=g)  # normalisation stays exact
    return x.to(dtype), labels


def assert_same_metrics(got: dict, want: dict) -> None:
    # Counts and recalls (count / num_query) must match exactly; the averages up to the
    # order of float64 summation.
    for key in ("recall", "num_query", "num_gallery", "num_lone_queries"):
        assert got[key] == want[key], key
    for key in ("map_at_r", "r_precision"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15, nan_ok=True), key


# ---------------------------------------------------------------------------------------
# retrieval_metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_random_many_classes(seed):
    x, y = random_data(300, 60, seed)
    ks = (1, 2, 4, 8, 1000)  # 1000 > gallery: clamped to everything
    got = retrieval_metrics(x, y, ks=ks, chunk_size=37)  # 37 does not divide 300
    want = ref_retrieval(x, y, ks=ks)
    assert 0.05 < want["recall"][1] < 0.95 and 0 < want["map_at_r"] < 1
    assert_same_metrics(got, want)
    assert got["recall"][1000] == pytest.approx(1 - want["num_lone_queries"] / 300)


def test_retrieval_separate_gallery_inshop_style():
    x, y = random_data(260, 40, seed=3)
    query, query_labels = x[:110], y[:110]
    gallery, gallery_labels = x[110:], y[110:]
    query_labels = query_labels.clone()
    query_labels[:5] = 1000  # labels the gallery lacks: lone queries
    # A duplicate of a query in the gallery: it is not the query, so it is ranked (no exclusion).
    gallery[7] = query[20]
    ks = (1, 10, 20, 30, 40, 50, 500)
    got = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=ks, chunk_size=16)
    want = ref_retrieval(query, query_labels, gallery, gallery_labels, ks=ks)
    assert want["num_lone_queries"] >= 5 and got["num_gallery"] == 150
    assert_same_metrics(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_retrieval_exact_ties(dtype, caplog):
    x, y = exact_data(240, 30, seed=4, dtype=dtype)
    ks = (1, 2, 4, 8, 16)
    with caplog.at_level(logging.DEBUG, logger="unicom.metrics"):
        got = retrieval_metrics(x, y, ks=ks, chunk_size=50)
    # The tie re-ranking really ran (ties straddled the k-th place).
    assert any("re-ranking" in r.getMessage() for r in caplog.records)
    assert_same_metrics(got, ref_retrieval(x, y, ks=ks))


def test_retrieval_exact_ties_separate_gallery():
    x, y = exact_data(300, 25, seed=5)
    ks = (1, 3, 10)
    got = retrieval_metrics(x[:100], y[:100], x[100:], y[100:], ks=ks, chunk_size=33)
    assert_same_metrics(got, ref_retrieval(x[:100], y[:100], x[100:], y[100:], ks=ks))


def duplicates_example(same_label: bool):
    # Items 0 and 1 are identical. Similarities (cosine) are 1, 0.96, 0.8, 0.6 and 0.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    y = torch.tensor([0, 0 if same_label else 1, 0, 1, 2])
    return x, y


def test_duplicate_of_query_with_other_label_is_a_miss():
    x, y = duplicates_example(same_label=False)
    got = retrieval_metrics(x, y, ks=(1, 2, 4))
    # query 0: 1(L1) 2(L0) ...; query 1: 0(L0) 2(L0) 3(L1): its duplicate at the lower index
    # ranks first, so dropping "rank 0" instead of index 1 would count query 1 as a hit.
    # query 2: 3(L1) 0(L0); query 3: 2(L0) 4(L2) 0(L0) 1(L1); query 4 is lone.
    assert got["recall"] == {1: 0.0, 2: pytest.approx(2 / 5), 4: pytest.approx(4 / 5)}
    assert got["map_at_r"] == 0.0 and got["r_precision"] == 0.0
    assert got["num_lone_queries"] == 1
    assert_same_metrics(got, ref_retrieval(x, y, ks=(1, 2, 4)))


def test_duplicate_of_query_with_same_label_is_a_hit():
    x, y = duplicates_example(same_label=True)
    got = retrieval_metrics(x, y, ks=(1, 2, 4))
    # queries 0 and 1 find each other, then item 2: R = 2, AP@R = 1 for both.
    # query 2 (L0, R = 2): 3(L1) 0(L0) 1(L0) -> AP@R = (1/2) / 2, R-precision 1/2.
    # queries 3 and 4 are lone.
    assert got["recall"][1] == pytest.approx(2 / 5)
    assert got["map_at_r"] == pytest.approx((1 + 1 + 1 / 4) / 3)
    assert got["r_precision"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert got["num_lone_queries"] == 2
    assert_same_metrics(got, ref_retrieval(x, y, ks=(1, 2, 4)))


def test_map_at_r_hand_example():
    # Gallery at 10, 20, 30, 40 degrees from the query: labels same, other, same, other.
    angles = torch.tensor([10.0, 20.0, 30.0, 40.0]).deg2rad()
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1)
    got = retrieval_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([7]), gallery, torch.tensor([7, 3, 7, 3]))
    assert got["map_at_r"] == pytest.approx(0.5)  # R = 2: (1/1 + 0) / 2
    assert got["r_precision"] == pytest.approx(0.5)
    assert got["recall"] == {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}


def test_lone_queries():
    x, y = random_data(120, 30, seed=6)
    y = y.clone()
    y[:10] = torch.arange(100, 110)  # ten labels seen once
    got = retrieval_metrics(x, y, ks=(1, 200), chunk_size=50)
    want = ref_retrieval(x, y, ks=(1, 200))
    assert got["num_lone_queries"] == want["num_lone_queries"] >= 10
    assert_same_metrics(got, want)
    # Lone queries are misses even with every item retrieved.
    assert got["recall"][200] == pytest.approx(1 - got["num_lone_queries"] / 120)

    everyone_alone = retrieval_metrics(x[:20], torch.arange(20))
    assert everyone_alone["num_lone_queries"] == 20 and everyone_alone["recall"][8] == 0.0
    assert math.isnan(everyone_alone["map_at_r"]) and math.isnan(everyone_alone["r_precision"])

    single = retrieval_metrics(x[:1], y[:1])  # nothing to rank at all
    assert single["recall"] == {1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0} and single["num_lone_queries"] == 1


@pytest.mark.parametrize("data", ["random", "exact"])
def test_retrieval_identical_for_any_chunk_size(data):
    x, y = random_data(97, 12, seed=7) if data == "random" else exact_data(97, 12, seed=7)
    results = [retrieval_metrics(x, y, ks=(1, 5, 50), chunk_size=c) for c in (1, 7, 97, 500)]
    for other in results[1:]:
        assert other == results[0]


def test_retrieval_rejects_bad_arguments():
    x, y = random_data(10, 3, seed=8)
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, gallery=x)  # no gallery labels
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, gallery_labels=y)  # labels without gallery
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, ks=(0,))
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, chunk_size=0)
    with pytest.raises(ValueError):
        retrieval_metrics(x, y[:5])
    with pytest.raises(ValueError):
        retrieval_metrics(x, y, x[:, :5], y)


# ---------------------------------------------------------------------------------------
# knn_topk and merge_topk


@pytest.mark.parametrize("data", ["random", "exact"])
def test_knn_topk_matches_reference(data):
    x, _ = random_data(200, 5, seed=9) if data == "random" else exact_data(200, 5, seed=9)
    query, gallery = x[:70], x[70:]
    for k in (1, 3, 13, 130, 1000):  # 1000 > 130 gallery rows: clamped
        sims, idx = knn_topk(query, gallery, k, chunk_size=16)
        want_sims, want_idx = ref_topk(query, gallery, k)
        assert sims.shape == idx.shape == (70, min(k, 130))
        assert sims.dtype == x.dtype and idx.dtype == torch.long
        assert np.array_equal(idx.numpy(), want_idx)
        np.testing.assert_allclose(sims.numpy(), want_sims, rtol=0, atol=1e-12)


@pytest.mark.parametrize("data", ["random", "exact"])
def test_knn_topk_block_selection(data):
    # A gallery of prime size (blocks never divide it) and small k: the selection goes
    # through block maxima (sqrt(N / k) >= 4 columns a block), with ties everywhere for
    # the exact data.
    x, _ = random_data(1040, 5, seed=16) if data == "random" else exact_data(1040, 5, seed=16)
    query, gallery = x[:43], x[43:]  # 997 gallery rows
    for k in (1, 2, 7, 20, 60):
        sims, idx = knn_topk(query, gallery, k, chunk_size=10)
        want_sims, want_idx = ref_topk(query, gallery, k)
        assert np.array_equal(idx.numpy(), want_idx), k
        np.testing.assert_allclose(sims.numpy(), want_sims, rtol=0, atol=1e-12)


def test_knn_topk_half_inputs_give_float32():
    x, _ = exact_data(60, 5, seed=10, dtype=torch.float16)
    sims, idx = knn_topk(x[:20], x[20:], 9, chunk_size=6)
    want_sims, want_idx = ref_topk(x[:20], x[20:], 9)
    assert sims.dtype == torch.float32
    assert np.array_equal(idx.numpy(), want_idx) and np.array_equal(sims.double().numpy(), want_sims)


@pytest.mark.parametrize("data", ["random", "exact"])
def test_merge_topk_over_shards_equals_single_search(data):
    x, _ = random_data(230, 5, seed=11) if data == "random" else exact_data(230, 5, seed=11)
    query, gallery = x[:30], x[30:]
    k = 25
    want_sims, want_idx = (torch.from_numpy(a) for a in ref_topk(query, gallery, k))
    # Uneven shards, one smaller than k, one empty-handed in ties.
    for bounds in ([0, 200], [0, 120, 200], [0, 10, 133, 200]):
        parts = [knn_topk(query, gallery[a:b], k, chunk_size=8) for a, b in zip(bounds, bounds[1:])]
        sims = torch.cat([s for s, _ in parts], dim=1)
        idx = torch.cat([i + a for (_, i), a in zip(parts, bounds)], dim=1)  # global indices
        got_sims, got_idx = merge_topk(sims, idx, k)
        assert torch.equal(got_idx, want_idx), bounds
        torch.testing.assert_close(got_sims, want_sims.to(got_sims.dtype), rtol=0, atol=1e-12)


def test_merge_topk_ties_and_clamping():
    sims = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]], dtype=torch.float64)
    idx = torch.tensor([[8, 4, 2, 6, 0]])
    got_sims, got_idx = merge_topk(sims, idx, 3)
    assert got_idx.tolist() == [[4, 6, 2]] and got_sims.tolist() == [[0.9, 0.9, 0.5]]
    assert merge_topk(sims, idx, 99)[1].tolist() == [[4, 6, 2, 8, 0]]


# ---------------------------------------------------------------------------------------
# kNN classifier


def test_knn_classify_matches_dino_scores():
    g = torch.Generator().manual_seed(12)
    sims = torch.rand(40, 20, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 7, (40, 20), generator=g)
    scores = knn_classify(sims, labels, 7, temperature=0.07)
    want = torch.zeros(40, 7, dtype=torch.float64)
    for i in range(40):
        for j in range(20):
            want[i, labels[i, j]] += math.exp(sims[i, j] / 0.07)
    # documented scale: the best neighbour of each row weighs 1
    rescaled = scores * torch.exp(sims.max(dim=1, keepdim=True).values / 0.07)
    torch.testing.assert_close(rescaled, want, rtol=1e-12, atol=0)

    scores32 = knn_classify(sims.half(), labels, 7)
    assert scores32.dtype == torch.float32
    assert torch.equal(scores32.argmax(1), knn_classify(sims.half().double(), labels, 7).argmax(1))


def test_knn_classify_is_finite_for_tiny_temperature():
    sims = torch.tensor([[1.0, 0.99, -1.0]], dtype=torch.float16)
    scores = knn_classify(sims, torch.tensor([[2, 0, 1]]), 3, temperature=1e-3)  # exp(1000) raw
    assert torch.isfinite(scores).all() and scores.argmax().item() == 2 and scores[0, 0] > 0


def test_knn_accuracy_matches_reference_imbalanced():
    g = torch.Generator().manual_seed(13)
    num_classes = 15
    probs = 1.0 / torch.arange(1, num_classes + 1).double() ** 2  # imbalanced classes
    labels = torch.multinomial(probs, 260, replacement=True, generator=g)
    centres = torch.randn(num_classes, 16, generator=g, dtype=torch.float64)
    x = centres[labels] + 2.5 * torch.randn(260, 16, generator=g, dtype=torch.float64)
    train, train_labels, test, test_labels = x[:200], labels[:200], x[200:], labels[200:]
    ks = (1, 10, 20, 100, 300)  # 300 > 200 training items: clamped
    got = knn_accuracy(train, train_labels, test, test_labels, ks=ks, num_classes=num_classes, chunk_size=7)
    want = ref_knn(train, train_labels, test, test_labels, [min(k, 200) for k in ks], 0.07, num_classes)
    assert list(got) == list(ks)
    for k in ks:
        assert got[k] == pytest.approx(want[min(k, 200)], rel=1e-12)
    assert 0 < got[10]["top1"] < got[10]["top5"] < 1


def test_knn_accuracy_vote_ties_go_to_lower_class():
    v, w = [1.0, 0.0], [0.0, 1.0]
    train = torch.tensor([v, v, w, [0.6, 0.8]])
    train_labels = torch.tensor([3, 1, 0, 2])
    test = torch.tensor([v])
    # k=1: tie between items 0 and 1 -> lower index 0 (class 3)
    # k=2: classes 3 and 1 tie exactly -> class 1
    for label, expect in ((3, {1: 1.0, 2: 0.0}), (1, {1: 0.0, 2: 1.0})):
        got = knn_accuracy(train, train_labels, test, torch.tensor([label]), ks=(1, 2), num_classes=4)
        assert {k: r["top1"] for k, r in got.items()} == expect
        want = ref_knn(train, train_labels, test, torch.tensor([label]), (1, 2), 0.07, 4)
        assert got == want


def test_knn_accuracy_fewer_than_five_classes():
    x, y = random_data(80, 3, seed=14)
    got = knn_accuracy(x[:50], y[:50], x[50:], y[50:], ks=(5, 50))
    assert got[50]["top5"] == 1.0  # top-min(5, C) = top-3 of 3 classes, all voted for with 50 neighbours
    want = ref_knn(x[:50], y[:50], x[50:], y[50:], (5, 50), 0.07, 3)
    assert all(got[k] == pytest.approx(want[k]) for k in (5, 50))


def test_knn_top5_never_counts_a_class_without_votes():
    """With k = 1 one class gets a vote: top-5 is top-1 (sorting all 10 scores would have put
    four zero-score classes, 0 to 3 here, in the top 5 and counted them)."""
    g = torch.Generator().manual_seed(3)
    train = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    train_labels = torch.arange(40) % 10
    test = train[:20] + 0.01 * torch.randn(20, 8, generator=g)
    test_labels = (train_labels[:20] + 1) % 10  # never the nearest neighbour's class
    got = knn_accuracy(train, train_labels, test, test_labels, ks=(1, 2), num_classes=10)
    assert got[1] == {"top1": 0.0, "top5": 0.0}
    want = ref_knn(train, train_labels, test, test_labels, (1, 2), 0.07, 10)
    assert all(got[k] == pytest.approx(want[k]) for k in (1, 2))


def test_knn_vote_accuracy_on_merged_shards_equals_knn_accuracy():
    # The sharded kNN path of the programs: search shards, merge, vote.
    x, y = random_data(300, 8, seed=17)
    train, train_labels, test, test_labels = x[:230], y[:230], x[230:], y[230:]
    ks = (1, 5, 20)
    bounds = [0, 70, 150, 230]
    parts = [knn_topk(test, train[a:b], 20, chunk_size=9) for a, b in zip(bounds, bounds[1:])]
    sims, idx = merge_topk(
        torch.cat([s for s, _ in parts], dim=1), torch.cat([i + a for (_, i), a in zip(parts, bounds)], dim=1), 20
    )
    got = knn_vote_accuracy(sims, train_labels[idx], test_labels, ks, num_classes=8)
    # fractions of counts: equal predictions give equal floats
    assert got == knn_accuracy(train, train_labels, test, test_labels, ks, num_classes=8)
    assert got == ref_knn(train, train_labels, test, test_labels, ks, 0.07, 8)
    assert 0 < got[1]["top1"] < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = exact_data(300, 20, seed=15)
    assert retrieval_metrics(x.cuda(), y.cuda(), chunk_size=64) == retrieval_metrics(x, y, chunk_size=64)
    cuda_topk = knn_topk(x[:50].cuda(), x[50:].cuda(), 20)
    cpu_topk = knn_topk(x[:50], x[50:], 20)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(cuda_topk, cpu_topk))
    got = knn_accuracy(x[50:].cuda(), y[50:].cuda(), x[:50].cuda(), y[:50].cuda(), ks=(1, 20))
    assert got == knn_accuracy(x[50:], y[50:], x[:50], y[:50], ks=(1, 20))
