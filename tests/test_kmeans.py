"""Spherical k-means: brute-force float64 references, faiss vs torch, distributed vs one process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_in_processes
from PIL import Image

from unicom._pretrain import kmeans
from unicom._pretrain.kmeans import (
    allocate_subclusters,
    assign,
    cluster_stats,
    spherical_kmeans,
    train_centroids,
)

# Checked without importing faiss: the worker processes of the distributed test import this
# module, and should not pay for faiss (or torchvision) unless they use it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is not installed")


def blobs(n: int, d: int, centers: int, noise: float = 0.35, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) L2-normalised float32 points around ``centers`` random directions, and their blob."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(centers, d, generator=g), dim=1)
    which = torch.arange(n) % centers
    x = F.normalize(means[which] + noise * torch.randn(n, d, generator=g) / d**0.5 * 4, dim=1)
    return x, which


def ref_lloyd(x: np.ndarray, init: np.ndarray, niter: int) -> tuple[np.ndarray, list[float]]:
    """Spherical Lloyd iterations in float64 (no empty cluster may occur)."""
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    history = []
    for _ in range(niter):
        scores = x @ c.T
        labels = scores.argmax(1)
        history.append(scores.max(1).sum())
        sums = np.zeros_like(c)
        np.add.at(sums, labels, x)
        assert (np.bincount(labels, minlength=len(c)) > 0).all(), "reference met an empty cluster"
        c = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return c, history


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_assign_is_argmax_of_cosine(backend: str, monkeypatch) -> None:
    x, _ = blobs(300, 16, 5)
    c = F.normalize(torch.randn(37, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    # tiny score blocks: rows in chunks of 16, centroids in blocks of 4 (the chunked paths)
    monkeypatch.setattr(kmeans, "_MAX_SCORES", 64)
    labels, sims = assign(x.half(), c, backend=backend, chunk_size=16)
    scores = x.half().double().numpy() @ c.double().numpy().T
    np.testing.assert_array_equal(labels.numpy(), scores.argmax(1))
    np.testing.assert_allclose(sims.numpy(), scores.max(1), atol=1e-5)
    assert labels.dtype == torch.int64 and sims.dtype == torch.float32


def test_assign_ties_go_to_the_lowest_index(monkeypatch) -> None:
    monkeypatch.setattr(kmeans, "_MAX_SCORES", 4)  # 2 rows: centroid blocks of two
    x, _ = blobs(4, 8, 2)
    c = torch.cat([x[1:2], x[0:1], x[0:1], -x[0:1]])  # x[0] is centroid 1 (first block) and 2 (second)
    labels, _ = assign(x[:2], c, backend="torch", chunk_size=4)
    assert labels.tolist() == [1, 0]
    labels, _ = assign(x[:2], c[1:], backend="torch", chunk_size=4)  # the tie inside one block
    assert labels.tolist()[0] == 0


def test_lloyd_from_given_init_equals_reference() -> None:
    x, _ = blobs(400, 12, 6)
    init = x[:6].clone()  # one point of each blob: no cluster empties
    for niter in (1, 6):
        centroids, history = train_centroids(x, 6, niter, init=init, backend="torch", max_points_per_centroid=1000)
        ref, ref_history = ref_lloyd(x.double().numpy(), init.double().numpy(), niter)
        np.testing.assert_allclose(centroids.numpy(), ref, atol=2e-6)
        np.testing.assert_allclose(history, ref_history, rtol=1e-6)
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:])), f"objective fell: {history}"
    assert history[-1] > history[0]


def test_training_uses_the_seeded_sample() -> None:
    x, _ = blobs(1000, 8, 4)
    sample = kmeans._sample_indices(1000, 4 * 30, torch.Generator().manual_seed(7))
    assert sample.numel() == 120 and sample.unique().numel() == 120 and torch.equal(sample, sample.sort().values)
    init = x[sample[:4]]
    centroids, _ = train_centroids(x, 4, 3, init=init, backend="torch", max_points_per_centroid=30, seed=7)
    ref, _ = ref_lloyd(x[sample].double().numpy(), init.double().numpy(), 3)
    np.testing.assert_allclose(centroids.numpy(), ref, atol=2e-6)


def test_sampling_without_a_full_permutation(monkeypatch) -> None:
    monkeypatch.setattr(kmeans, "_EXACT_PERMUTATION", 100)
    a = kmeans._sample_indices(10_000, 3000, torch.Generator().manual_seed(3))
    b = kmeans._sample_indices(10_000, 3000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.unique().numel() == 3000 and int(a.max()) < 10_000
    assert torch.equal(kmeans._sample_indices(50, 80, torch.Generator()), torch.arange(50))


def test_faiss_and_torch_agree() -> None:
    x, _ = blobs(900, 16, 9)
    init = x[:9].clone()
    ct, ht = train_centroids(x, 9, 8, init=init, backend="torch")
    cf, hf = train_centroids(x, 9, 8, init=init, backend="faiss")
    torch.testing.assert_close(ct, cf, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ht, hf, rtol=1e-5)
    lt, _ = assign(x, ct, backend="torch")
    lf, _ = assign(x, ct, backend="faiss")
    assert torch.equal(lt, lf)
    # whole runs from the default (seeded, shared) initialisation
    rt = spherical_kmeans(x, 9, 8, backend="torch")
    rf = spherical_kmeans(x, 9, 8, backend="faiss")
    assert torch.equal(rt.labels, rf.labels)
    assert rt.stats["objective"] == pytest.approx(rf.stats["objective"], rel=1e-6)


def test_empty_clusters_are_split_during_training() -> None:
    x, _ = blobs(300, 8, 3)
    init = torch.cat([x[:1], x[:1], x[1:3]])  # centroid 1 duplicates 0: it gets no point at first
    for backend in ("torch", "faiss"):
        centroids, history = train_centroids(x, 4, 6, init=init, backend=backend)
        labels, _ = assign(x, centroids)
        assert torch.bincount(labels, minlength=4).min() > 0, backend
        assert history[-1] > history[0]


def test_cluster_stats_reference() -> None:
    labels = torch.tensor([0, 0, 0, 2, 2, 5])
    sims = torch.tensor([1.0, 0.5, 0.25, 0.5, 0.5, 1.0])
    stats = cluster_stats(labels, 7, sims)
    sizes = np.array([3, 0, 2, 0, 0, 1, 0], dtype=np.float64)
    assert stats["k"] == 7 and stats["n"] == 6 and stats["empty_clusters"] == 4
    assert stats["smallest"] == 1 and stats["largest"] == 3 and stats["mean"] == pytest.approx(6 / 7)
    assert stats["imbalance"] == pytest.approx(7 * (sizes**2).sum() / 36)
    assert stats["objective"] == pytest.approx(3.75) and stats["mean_similarity"] == pytest.approx(3.75 / 6)
    # faiss' own definition of the imbalance factor
    import faiss

    assigned = np.ascontiguousarray(labels.numpy().astype(np.int64))
    assert stats["imbalance"] == pytest.approx(faiss.imbalance_factor(6, 7, faiss.swig_ptr(assigned)))


def test_allocate_subclusters() -> None:
    assert allocate_subclusters(torch.tensor([50, 30, 15, 5, 0]), 10).tolist() == [5, 3, 1, 1, 0]
    assert allocate_subclusters(torch.tensor([1, 1, 1, 97]), 4).tolist() == [1, 1, 1, 1]
    assert allocate_subclusters(torch.tensor([1, 1, 1, 97]), 100).tolist() == [1, 1, 1, 97]
    assert allocate_subclusters(torch.tensor([1, 1, 1, 97]), 50).tolist() == [1, 1, 1, 47]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(0, 40, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        n, nonempty = int(sizes.sum()), int((sizes > 0).sum())
        if nonempty == 0:
            continue
        k = int(torch.randint(nonempty, n + 1, (1,), generator=g))
        alloc = allocate_subclusters(sizes, k)
        assert int(alloc.sum()) == k
        assert bool(((alloc >= 1) == (sizes > 0)).all()) and bool((alloc <= sizes).all())
    with pytest.raises(ValueError):
        allocate_subclusters(torch.tensor([3, 3, 0]), 7)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_two_level_gives_k_clusters(backend: str) -> None:
    x, _ = blobs(800, 16, 20)
    result = spherical_kmeans(x, 30, 6, levels=2, backend=backend, max_points_per_centroid=64)
    assert result.labels.shape == (800,) and result.centroids.shape == (30, 16)
    assert int(result.labels.min()) >= 0 and int(result.labels.max()) < 30
    assert result.stats["k"] == 30 and result.stats["coarse_clusters"] == 5
    sizes = torch.bincount(result.labels, minlength=30)
    assert result.stats["empty_clusters"] == int((sizes == 0).sum()) == 0
    torch.testing.assert_close(result.centroids.norm(dim=1), torch.ones(30))
    # the objective recorded is that of the labels and centroids returned
    sims = (x * result.centroids[result.labels]).sum(1)
    assert result.stats["objective"] == pytest.approx(float(sims.double().sum()), rel=1e-5)


def _kmeans_in_process(rank: int, world_size: int, x: torch.Tensor, sizes: list[int], runs: list[dict]) -> list:
    start = sum(sizes[:rank])
    local = x[start : start + sizes[rank]]
    results = []
    for options in runs:
        r = spherical_kmeans(local, gather=True, **options)
        results.append((r.centroids, r.labels, r.stats, r.objective_history))
    return results


def test_distributed_equals_one_process() -> None:
    x, _ = blobs(500, 16, 12)
    runs = [
        {"k": 12, "niter": 5, "backend": "torch", "max_points_per_centroid": 20},  # a sample spread over both
        {"k": 20, "niter": 4, "backend": "torch", "levels": 2},
        {"k": 12, "niter": 5, "backend": "faiss", "max_points_per_centroid": 20},
    ]
    # uneven blocks, as shard_range gives when N is not a multiple of the world size
    distributed = run_in_processes(_kmeans_in_process, 2, x, [280, 220], runs, timeout_s=120)
    for options, got0, got1 in zip(runs, distributed[0], distributed[1]):
        one = spherical_kmeans(x, **options)
        for got in (got0, got1):
            centroids, labels, stats, history = got
            torch.testing.assert_close(centroids, one.centroids, atol=1e-6, rtol=0)
            assert torch.equal(labels, one.labels), options
            assert stats.keys() == one.stats.keys()
            for key, value in one.stats.items():
                assert stats[key] == pytest.approx(value, rel=1e-9), (options, key)
            np.testing.assert_allclose(history, one.objective_history, rtol=1e-9)


def test_cluster_program(tmp_path: Path) -> None:
    from unicom._pretrain.features import PixelSource, extract_features, load_features
    from unicom.programs.cluster import main

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10)]
    for i in range(48):
        base = np.array(colors[i % 4], dtype=np.float64)
        pixels = np.clip(base + rng.normal(0, 20, size=(6, 6, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
    features_dir = tmp_path / "features"
    extract_features(PixelSource(size=3), root, features_dir, folder_shard_size=20)
    out = tmp_path / "clusters"
    assert main(["--features", str(features_dir), "--k", "4", "--niter", "5", "--backend", "torch",
                 "--output", str(out), "--device", "cpu"]) == 0
    labels = np.load(out / "labels.npy")
    centroids = np.load(out / "centroids.npy")
    stats = json.loads((out / "stats.json").read_text())
    assert labels.dtype == np.int64 and labels.shape == (48,)
    assert centroids.dtype == np.float32 and centroids.shape == (4, 27)
    x, _ = load_features(features_dir)
    expected = spherical_kmeans(x, 4, 5, backend="torch")
    np.testing.assert_array_equal(labels, expected.labels.numpy())
    sizes = np.bincount(labels, minlength=4)
    assert stats["n"] == 48 and stats["k"] == 4 and stats["empty_clusters"] == 0
    assert stats["smallest"] == sizes.min() and stats["largest"] == sizes.max()
    assert stats["imbalance"] == pytest.approx(4 * (sizes.astype(float) ** 2).sum() / 48**2)
    sims = (x.double().numpy() * centroids[labels]).sum(1)
    assert stats["objective"] == pytest.approx(sims.sum(), rel=1e-4)
    assert len(stats["objective_history"]) == 5

    out2 = tmp_path / "two-level"
    assert main(["--features", str(features_dir), "--k", "6", "--levels", "2", "--niter", "3",
                 "--output", str(out2)]) == 0
    labels2 = np.load(out2 / "labels.npy")
    assert labels2.shape == (48,) and labels2.max() < 6 and np.load(out2 / "centroids.npy").shape == (6, 27)
