"""Spherical k-means of extracted features into K pseudo classes: step 2 of cluster discrimination.

    python cluster.py --features features/ --k 2000 --output clusters/
    python cluster.py --features features/ --k 300000 --levels 2 --output clusters/
    torchrun --nproc_per_node 8 cluster.py --features features/ --k 1000000 --backend torch --half \\
        --output clusters/

Writes labels.npy (N,) int64 in the order of load_features, centroids.npy (K, d) float32
and stats.json (cluster sizes: empty, smallest, largest, imbalance; objective). With torchrun
every process loads its block of the rows and the torch backend runs distributed Lloyd
iterations (see unicom/_pretrain/kmeans.py).
"""

from __future__ import annotations

import argparse
import logging
import time

# Only the flags at import: --help and usage errors answer before torch loads (see .flags).
from .flags import KMEANS_BACKENDS, device_option, output_dir, parse, positive_int, program_parser, seed

logger = logging.getLogger("unicom.cluster")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = program_parser("cluster", __doc__, add_help)
    p.add_argument("--features", required=True, help="output folder of extract_features.py")
    p.add_argument("--output", required=True, type=output_dir, help="folder for labels.npy, centroids.npy, stats.json")
    p.add_argument("--k", type=int, required=True, help="number of clusters (pseudo classes)")
    p.add_argument("--niter", type=positive_int, default=20, help="Lloyd iterations (as faiss)")
    p.add_argument("--levels", type=int, default=1, choices=(1, 2),
                   help="2: sqrt(K) coarse clusters, each split in proportion to its size")
    p.add_argument("--backend", default="auto", choices=KMEANS_BACKENDS,
                   help="faiss, torch (distributed with torchrun), or auto: faiss when installed")
    p.add_argument("--max-points-per-centroid", "--max_points_per_centroid", dest="max_points_per_centroid",
                   type=positive_int, default=256,
                   help="training sample: at most K times this many points (faiss default)")
    p.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=positive_int, default=None,
                   help="rows assigned at once (default: 1M for faiss, 65536 for torch)")
    p.add_argument("--gpu", action="store_true", help="faiss backend: use faiss' GPU code when present")
    p.add_argument("--half", action="store_true", help="torch backend: fp16 matrix products (for GPUs)")
    p.add_argument("--device", default=None, type=device_option,
                   help="torch backend: cuda, cuda:1 or cpu (default: the local GPU when there is one)")
    p.add_argument("--seed", type=seed, default=1234)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse(get_args_parser(), argv)
    import torch

    from .. import _distributed as dist
    from .._pretrain.features import load_features, read_manifest
    from .._pretrain.kmeans import save_clustering, spherical_kmeans
    from .common import process_group

    with process_group(args.device) as device:
        start = time.perf_counter()
        total = read_manifest(args.features)["num_samples"]
        rows = dist.shard_range(total)
        x, _ = load_features(args.features, rows=rows, with_keys=False)  # (n_local, d) float16
        logger.info("clustering %d features (%d on this process) into %d clusters", total, len(rows), args.k)
        result = spherical_kmeans(
            x, args.k, args.niter, levels=args.levels, seed=args.seed,
            max_points_per_centroid=args.max_points_per_centroid, backend=args.backend, device=device,
            dtype=torch.float16 if args.half else torch.float32, chunk_size=args.chunk_size, gpu=args.gpu,
            gather=True,
        )
        stats = {
            **result.stats,
            "levels": args.levels, "niter": args.niter, "backend": args.backend, "seed": args.seed,
            "max_points_per_centroid": args.max_points_per_centroid, "world_size": dist.get_world_size(),
            "features": str(args.features), "objective_history": result.objective_history,
            "seconds": time.perf_counter() - start,
        }
        if dist.is_main_process():
            save_clustering(args.output, result.labels, result.centroids, stats)
            print(f"{stats['n']} samples -> {stats['k']} clusters: {stats['empty_clusters']} empty, sizes "
                  f"{stats['smallest']} to {stats['largest']} (mean {stats['mean']:.1f}), imbalance "
                  f"{stats['imbalance']:.3f}, mean similarity {stats['mean_similarity']:.4f} -> {args.output}",
                  flush=True)
        dist.barrier()
        return 0
