"""Step 2 of cluster discrimination pretraining: spherical k-means into K pseudo classes.

The algorithm is faiss' spherical k-means (``faiss.Kmeans(spherical=True)``):

1. Sample ``min(N, K * max_points_per_centroid)`` training points (seeded).
2. Initialise the K centroids with K random training points.
3. ``niter`` Lloyd iterations on the sample: assign each point to the centroid of largest
   inner product, set each centroid to the sum of its points, give every empty cluster half
   of a large one (faiss' split: a donor picked with probability proportional to its size
   minus one, both copies perturbed by a relative 1/1024), L2-normalise the centroids.
4. Assign *every* sample to its nearest centroid, in chunks.

Two backends run it: ``faiss`` (``faiss.Kmeans`` trained on the sample, then an
``IndexFlatIP`` searched chunk by chunk, on a GPU with ``gpu=True`` when faiss has one) and
``torch`` (the same steps as matrix products on any device, chunked over rows and over
centroids so memory stays bounded). Both start from the same sampled points and the same
initial centroids, so for one seed they differ only by floating point summation order and
the random draws of the empty-cluster split.

Scale. The torch backend is *distributed*: with a process group (torchrun) every process
holds a contiguous block of the rows, the training sample is drawn from the global row
numbering with a seed all processes share, each process assigns its own rows and the
centroid sums (float64) and counts are all-reduced, so every process ends each iteration
with the same centroids as one process would (up to summation order in float64, which
leaves the float32 centroids equal in practice). More processes take more rows; nothing
else changes. For 400M x 768 into K = 1M: 256M training points (K x 256) spread over the
GPUs, K x d centroids (1.5 GB in fp16) replicated on each, score matrices chunked; the cost
is ``niter x 256 K^2 d + N K d`` multiply-adds, divided over the GPUs
(``benchmarks/bench_kmeans.py`` prints it from a measured throughput).

``levels=2`` is the cheaper alternative for K in the hundreds of thousands: k1 = round(sqrt(K))
coarse clusters, then each coarse cluster c split into k2_c clusters, k2_c proportional to
its size (largest remainders, at least one per non-empty cluster, at most one per point) so
that the k2_c add up to K. A point is only compared with k1 + k2_c ~ 2 sqrt(K) centroids
instead of K (the price: a point is never moved to a fine cluster of another coarse cluster).
It runs on the same distributed code: every coarse cluster is clustered by all processes
together, each with its local rows of that cluster.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import _distributed as dist
from .._utils import atomic_write, write_json

__all__ = [
    "BACKENDS",
    "KMeansResult",
    "allocate_subclusters",
    "assign",
    "cluster_stats",
    "faiss_available",
    "save_clustering",
    "spherical_kmeans",
    "train_centroids",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
_SPLIT_EPS = 1.0 / 1024  # faiss' relative perturbation when a cluster is split in two
_MAX_SCORES = 1 << 27  # elements of one (rows x centroids) score block: 512 MiB in float32
_CPU_ROWS = 4096  # on a CPU, rows x 1024 centroids at a time (16 MiB of scores) is faster
_EXACT_PERMUTATION = 1 << 26  # up to this many rows the sample comes from one randperm


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, d) float32, L2-normalised, on the CPU
    labels: torch.Tensor  # (n,) int64: the cluster of each of this process's rows
    stats: dict  # global statistics, see cluster_stats
    objective_history: list[float] = field(default_factory=list)  # per iteration, on the sample


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_gpu(gpu: bool) -> bool:
    """Whether to use faiss' GPU code: asked for and present (faiss-gpu, a GPU visible)."""
    if not gpu:
        return False
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return True
    logger.warning("faiss has no GPU support here (faiss-cpu, or no GPU visible): using its CPU code")
    return False


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise ImportError("backend='faiss' needs faiss (pip install faiss-cpu, or faiss-gpu); "
                          "backend='torch' needs nothing")
    return backend


# ----------------------------------------------------------------------------- assignment


def _nearest(rows: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, d) rows and (K, d) centroids on one device -> (labels (r,) int64, similarity (r,) float32).

    Centroids are taken in blocks so one score block holds at most ``_MAX_SCORES`` elements
    (on a CPU also rows, in blocks of ``_CPU_ROWS``, so a block stays in cache); ties go to
    the lowest centroid index, as argmax does.
    """
    if rows.device.type == "cpu" and rows.shape[0] > _CPU_ROWS:
        parts = [_nearest(rows[i : i + _CPU_ROWS], centroids) for i in range(0, rows.shape[0], _CPU_ROWS)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    k = centroids.shape[0]
    budget = _MAX_SCORES if rows.device.type != "cpu" else min(_MAX_SCORES, _CPU_ROWS * 1024)
    block = max(1, min(k, budget // max(rows.shape[0], 1)))
    best = torch.full((rows.shape[0],), -math.inf, device=rows.device, dtype=torch.float32)
    arg = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    for c0 in range(0, k, block):
        value, index = (rows @ centroids[c0 : c0 + block].T).float().max(dim=1)  # (r,) each
        better = value > best  # strict: an earlier block keeps a tie
        best = torch.where(better, value, best)
        arg = torch.where(better, index + c0, arg)
    return arg, best


@torch.no_grad()
def _assign_torch(x, centroids, chunk_size, device, dtype):
    """Rows are moved to ``device`` and cast there ``chunk_size`` at a time, so ``x`` may stay
    on the CPU in float16."""
    c = centroids.to(device=device, dtype=dtype)
    labels = torch.empty(x.shape[0], dtype=torch.long)
    sims = torch.empty(x.shape[0], dtype=torch.float32)
    for start in range(0, x.shape[0], chunk_size):
        arg, best = _nearest(x[start : start + chunk_size].to(device=device, dtype=dtype), c)
        labels[start : start + arg.shape[0]] = arg.cpu()
        sims[start : start + arg.shape[0]] = best.cpu()
    return labels, sims


def _assign_faiss(x, centroids, chunk_size, gpu):
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids.detach().cpu().float().numpy()))
    if _faiss_gpu(gpu):
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index)
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long)
    sims = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, chunk_size):
        rows = np.ascontiguousarray(x[start : start + chunk_size].detach().cpu().float().numpy())
        distance, index_ = index.search(rows, 1)  # (r, 1) each: inner product and centroid id
        labels[start : start + rows.shape[0]] = torch.from_numpy(index_[:, 0].astype(np.int64))
        sims[start : start + rows.shape[0]] = torch.from_numpy(distance[:, 0])
    return labels, sims


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    backend: str = "torch",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    gpu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest centroid (largest inner product) of every row, in chunks.

    Args:
        x: (n, d) rows (L2-normalised for cosine), any float dtype, any device.
        centroids: (K, d).
        backend: ``torch`` (on ``device``, matmuls in ``dtype``) or ``faiss`` (IndexFlatIP,
            on a GPU with ``gpu=True`` when faiss has GPUs).
        chunk_size: rows per step (default 1M for faiss, 65536 for torch).

    Returns:
        ``(labels, similarity)``: (n,) int64 and (n,) float32, on the CPU.
    """
    backend = _resolve_backend(backend)
    if x.shape[0] and x.shape[1] != centroids.shape[1]:
        raise ValueError(f"rows have {x.shape[1]} dimensions, centroids {centroids.shape[1]}")
    if backend == "faiss":
        return _assign_faiss(x, centroids, chunk_size or (1 << 20), gpu)
    device = torch.device(device) if device is not None else x.device
    return _assign_torch(x, centroids, chunk_size or (1 << 16), device, dtype)


# ----------------------------------------------------------------------------- training


def _sample_indices(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` distinct indices of ``range(n)``, uniformly at random, sorted; all of them if m >= n."""
    if m >= n:
        return torch.arange(n)
    if n <= _EXACT_PERMUTATION:
        return torch.randperm(n, generator=generator)[:m].sort().values
    # A permutation of 400M indices would take 3.2 GB: draw with replacement until m distinct.
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < m:
        draw = torch.randint(n, (int(1.1 * (m - chosen.numel())) + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    return chosen[torch.randperm(chosen.numel(), generator=generator)[:m]].sort().values


def _global_layout(n_local: int) -> tuple[int, int]:
    """(offset of this process's block in the global row order, total rows)."""
    sizes = dist.all_gather_varlen(torch.tensor([n_local], dtype=torch.long))
    rank = dist.get_rank()
    return int(sizes[:rank].sum()), int(sizes.sum())


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> int:
    """Give each empty cluster half of a donor cluster, in place (faiss' ``split_clusters``).

    Donors are drawn with probability proportional to size - 1 (a singleton cannot be split);
    the donor and the new cluster are the donor's centroid perturbed in opposite directions.
    """
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype)
    sign[1::2] = -1
    splits = 0
    for ci in empty:
        weights = (counts - 1).clamp(min=0)
        if float(weights.sum()) <= 0:
            break  # every cluster has at most one point: nothing to split
        cj = int(torch.multinomial(weights, 1, generator=generator))
        centroids[ci] = centroids[cj] * (1 + _SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - _SPLIT_EPS * sign)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
        splits += 1
    return splits


@torch.no_grad()
def _lloyd_torch(sample, init, niter, generator, chunk_size, device, dtype):
    """Distributed Lloyd iterations: local sample rows, centroid sums and counts all-reduced."""
    k, d = init.shape
    centroids = F.normalize(init.to(device=device, dtype=torch.float32), dim=-1)
    history = []
    for it in range(niter):
        sums = torch.zeros(k, d, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        objective = torch.zeros(1, dtype=torch.float64, device=device)
        c = centroids.to(dtype)
        for start in range(0, sample.shape[0], chunk_size):
            rows = sample[start : start + chunk_size].to(device)  # (r, d)
            labels, sims = _nearest(rows.to(dtype), c)
            # float64 so the reduction order hardly matters; index_put_ rather than index_add_,
            # whose CPU kernel has a fixed cost of tens of ms per call with several threads
            sums.index_put_((labels,), rows.double(), accumulate=True)
            counts += torch.bincount(labels, minlength=k).double()
            objective += sims.double().sum()
        for t in (sums, counts, objective):
            dist.all_reduce_sum(t)
        history.append(float(objective))
        if bool((counts == 0).any()):
            # rare, and on the host: the split draws from the CPU generator that every process
            # holds in the same state, and sees the same (all-reduced) counts
            sums, counts = sums.cpu(), counts.cpu()
            logger.info("iteration %d: split %d empty clusters", it, _split_empty(sums, counts, generator))
        centroids = F.normalize(sums, dim=-1).to(device=device, dtype=torch.float32)
    return centroids.cpu(), history


def train_centroids(
    x: torch.Tensor,
    k: int,
    niter: int = 20,
    *,
    seed: int = 1234,
    max_points_per_centroid: int = 256,
    backend: str = "auto",
    init: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 1 << 16,
    gpu: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Train K spherical k-means centroids on a sample of the rows (steps 1-3 of the module doc).

    With a process group, ``x`` is this process's block of the rows (blocks in rank order
    make up the data set) and every process must call this; all return the same centroids.

    Args:
        x: (n, d) L2-normalised rows, any float dtype, any device (kept where it is; chunks
            and the training sample go to ``device``).
        k: number of clusters (at most the total number of rows).
        init: (K, d) initial centroids; default K random training points.
        backend: ``faiss`` (process 0 trains ``faiss.Kmeans`` on the gathered sample and
            shares the result) or ``torch`` (distributed Lloyd iterations).

    Returns:
        ``(centroids, history)``: (K, d) float32 L2-normalised on the CPU, and the objective
        (sum over the training sample of the similarity to the nearest centroid) at each
        iteration, before that iteration's update.
    """
    backend = _resolve_backend(backend)
    offset, total = _global_layout(x.shape[0])
    if k < 1 or k > total:
        raise ValueError(f"cannot make {k} clusters of {total} points")
    generator = torch.Generator().manual_seed(seed)
    sample = _sample_indices(total, min(total, k * max_points_per_centroid), generator)  # sorted global rows
    mine = sample[(sample >= offset) & (sample < offset + x.shape[0])] - offset
    local = x[mine.to(x.device)]  # (m_local, d): this process's training points, rows in sample order
    d = x.shape[1]
    if init is None:
        # K random training points; each process fills the ones it holds, a sum collects them
        picks = sample[_sample_indices(sample.numel(), k, generator)]
        init = torch.zeros(k, d, dtype=torch.float32)
        held = (picks >= offset) & (picks < offset + x.shape[0])
        init[held] = x[(picks[held] - offset).to(x.device)].float().cpu()
        dist.all_reduce_sum(init)
    elif init.shape != (k, d):
        raise ValueError(f"init has shape {tuple(init.shape)}, expected {(k, d)}")
    init = F.normalize(init.float().cpu(), dim=-1)
    logger.info("k-means (%s): %d clusters, %d training points of %d, %d iterations",
                backend, k, sample.numel(), total, niter)
    if backend == "torch":
        device = torch.device(device) if device is not None else x.device
        # the sample is read once per iteration: keep it on the device (K x 256 rows at most)
        return _lloyd_torch(local.to(device), init, niter, generator, chunk_size, device, dtype)

    import faiss

    gathered = dist.all_gather_varlen(local.float().cpu())  # (m, d) in global row order
    centroids = torch.zeros(k, d, dtype=torch.float32)
    history = torch.zeros(niter, dtype=torch.float64)
    if dist.is_main_process():
        km = faiss.Kmeans(d, k, niter=niter, spherical=True, max_points_per_centroid=max_points_per_centroid,
                          seed=seed, gpu=_faiss_gpu(gpu), verbose=False)
        km.train(np.ascontiguousarray(gathered.numpy()), init_centroids=np.ascontiguousarray(init.numpy()))
        centroids = torch.from_numpy(np.array(km.centroids, dtype=np.float32))
        history[: len(km.obj)] = torch.from_numpy(np.asarray(km.obj, dtype=np.float64))
    # process 0 holds the result, the others zeros: a sum hands it to all of them exactly
    dist.all_reduce_sum(centroids)
    dist.all_reduce_sum(history)
    return centroids, history.tolist()


# ----------------------------------------------------------------------------- statistics


def cluster_stats(labels: torch.Tensor, k: int, similarity: torch.Tensor | None = None) -> dict:
    """Cluster-size statistics of ``labels`` (this process's rows; summed over processes).

    ``imbalance`` is faiss' imbalance factor ``K * sum(n_i^2) / N^2`` (1 when every cluster
    has N/K points); ``smallest`` is the size of the smallest non-empty cluster;
    ``objective`` is the sum over points of the similarity to their centroid and
    ``mean_similarity`` its mean.
    """
    counts = torch.bincount(labels.long().cpu(), minlength=k)[:k].double()
    dist.all_reduce_sum(counts)
    n = float(counts.sum())
    nonempty = counts[counts > 0]
    stats = {
        "k": k,
        "n": int(n),
        "empty_clusters": int((counts == 0).sum()),
        "smallest": int(nonempty.min()) if nonempty.numel() else 0,
        "largest": int(counts.max()) if k else 0,
        "mean": n / k if k else 0.0,
        "median": float(counts.median()) if k else 0.0,
        "imbalance": float(k * (counts**2).sum() / (n * n)) if n else 0.0,
    }
    if similarity is not None:
        total = torch.tensor([float(similarity.double().sum())], dtype=torch.float64)
        dist.all_reduce_sum(total)
        stats["objective"] = float(total)
        stats["mean_similarity"] = float(total) / n if n else 0.0
    return stats


def allocate_subclusters(sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Split ``k`` clusters over groups of ``sizes`` points, proportionally (largest remainders).

    Every non-empty group gets at least one cluster and no group more clusters than points;
    the result adds up to ``k`` exactly (requires ``sum(sizes) >= k >= number of non-empty groups``).
    """
    sizes = sizes.long().cpu()
    n, nonempty = int(sizes.sum()), int((sizes > 0).sum())
    if not nonempty <= k <= n:
        raise ValueError(f"cannot split {k} clusters over {nonempty} non-empty groups of {n} points")
    quota = sizes.double() * k / n
    alloc = torch.minimum(torch.maximum(quota.floor().long(), (sizes > 0).long()), sizes)
    remainder = quota - alloc.double()
    while int(alloc.sum()) != k:
        if int(alloc.sum()) < k:
            room = alloc < sizes
            j = int(torch.where(room, remainder, torch.full_like(remainder, -math.inf)).argmax())
            alloc[j] += 1
        else:
            spare = alloc > 1
            j = int(torch.where(spare, remainder, torch.full_like(remainder, math.inf)).argmin())
            alloc[j] -= 1
        remainder[j] = quota[j] - alloc[j]
    return alloc


# ----------------------------------------------------------------------------- the whole


def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    niter: int = 20,
    *,
    levels: int = 1,
    seed: int = 1234,
    max_points_per_centroid: int = 256,
    backend: str = "auto",
    init: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    gpu: bool = False,
    gather: bool = False,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` clusters and assign every row.

    ``levels=1``: :func:`train_centroids` then :func:`assign` (exact assignment to all K
    centroids). ``levels=2``: the two-level scheme of the module doc. With a process group
    ``x`` is this process's block of rows and ``labels`` are those rows' labels, or every
    process's labels in rank order (the global row order) with ``gather=True``.
    """
    backend = _resolve_backend(backend)
    for name, value in (("niter", niter), ("max_points_per_centroid", max_points_per_centroid)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for the backend's default), got {chunk_size}")
    assign_chunk = chunk_size or ((1 << 20) if backend == "faiss" else (1 << 16))
    options = {"max_points_per_centroid": max_points_per_centroid, "backend": backend, "device": device,
               "dtype": dtype, "chunk_size": min(assign_chunk, 1 << 16), "gpu": gpu}
    assign_options = {"backend": backend, "chunk_size": assign_chunk, "device": device, "dtype": dtype, "gpu": gpu}
    if levels == 1:
        centroids, history = train_centroids(x, k, niter, seed=seed, init=init, **options)
        labels, sims = assign(x, centroids, **assign_options)
        stats = cluster_stats(labels, k, sims)
        return KMeansResult(centroids, dist.all_gather_varlen(labels) if gather else labels, stats, history)
    if levels != 2:
        raise ValueError(f"levels must be 1 or 2, got {levels}")
    if init is not None:
        raise ValueError("init is only supported with levels=1")

    k1 = max(1, min(k, round(math.sqrt(k))))
    coarse, history = train_centroids(x, k1, niter, seed=seed, **options)
    coarse_labels, _ = assign(x, coarse, **assign_options)
    sizes = torch.bincount(coarse_labels, minlength=k1).double()
    dist.all_reduce_sum(sizes)
    fine = allocate_subclusters(sizes.long(), k)  # (k1,) clusters per coarse cluster, sum k
    offsets = torch.cumsum(fine, 0) - fine
    order = torch.argsort(coarse_labels, stable=True)
    bounds = torch.cumsum(torch.bincount(coarse_labels, minlength=k1), 0).tolist()
    centroids = torch.zeros(k, x.shape[1], dtype=torch.float32)
    labels = torch.empty(x.shape[0], dtype=torch.long)
    sims = torch.empty(x.shape[0], dtype=torch.float32)
    logger.info("two-level k-means: %d coarse clusters of %d to %d points, split into 1 to %d clusters",
                k1, int(sizes.min()), int(sizes.max()), int(fine.max()))
    start = 0
    for c in range(k1):
        rows = order[start : bounds[c]].to(x.device)  # this process's rows in coarse cluster c
        start = bounds[c]
        if int(fine[c]) == 0:
            continue  # an empty coarse cluster (on every process, as its size is global)
        part = x[rows]
        sub, _ = train_centroids(part, int(fine[c]), niter, seed=seed + 1 + c, **options)
        sub_labels, sub_sims = assign(part, sub, **assign_options)
        o = int(offsets[c])
        centroids[o : o + sub.shape[0]] = sub
        labels[rows.cpu()] = sub_labels + o
        sims[rows.cpu()] = sub_sims
    stats = cluster_stats(labels, k, sims)
    stats.update(levels=2, coarse_clusters=k1)
    return KMeansResult(centroids, dist.all_gather_varlen(labels) if gather else labels, stats, history)


def save_clustering(output_dir: str | os.PathLike, labels: torch.Tensor, centroids: torch.Tensor, stats: dict) -> None:
    """Write ``labels.npy`` (N,) int64, ``centroids.npy`` (K, d) float32 and ``stats.json``, each atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labels_array = labels.cpu().numpy().astype(np.int64)
    atomic_write(output_dir / "labels.npy", lambda f: np.save(f, labels_array))
    centroids_array = centroids.cpu().numpy().astype(np.float32)
    atomic_write(output_dir / "centroids.npy", lambda f: np.save(f, centroids_array))
    write_json(stats, output_dir / "stats.json")
