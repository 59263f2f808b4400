"""Clustering and feature extraction for pretraining: ours against faiss, and what 400M x 768 -> 1M costs.

Four measurements:

1. k-means at N = 200k, d = 256, K = 2,000 (times ``--scale`` for N and K): faiss' own
   ``faiss.Kmeans(spherical=True)`` trained on all points then an ``IndexFlatIP`` search,
   against ``unicom._pretrain.kmeans.spherical_kmeans`` with the faiss and the torch backends
   (same niter, same max_points_per_centroid). Time and objective (mean cosine similarity of
   every point to its centroid, computed the same way for all), empty clusters, imbalance.
   Points: a mixture of 4K random directions with noise, L2-normalised.
2. Assignment throughput (points/s) against K = 65,536 centroids of d = 768 (``--assign-scale``
   shrinks K and the number of points on a CPU): ours (torch; fp16 on a GPU) and faiss'
   IndexFlatIP (on a GPU when faiss has one).
3. From (2): what 400M x 768 into 1M clusters would cost on G such devices, flat (exact,
   distributed Lloyd) and two-level.
4. Feature extraction throughput (samples/s) of the pixels and clip sources on synthetic
   webdataset shards (clip: random weights, nothing downloaded).

Run from the repository root:
    python -m benchmarks.bench_kmeans                       # full sizes
    python -m benchmarks.bench_kmeans --scale 0.25 --assign-scale 0.125
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unicom._pretrain.kmeans import assign, cluster_stats, faiss_available, spherical_kmeans

TARGET_N, TARGET_D, TARGET_K = 400_000_000, 768, 1_000_000


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of N = 200k and K = 2,000 (default 1)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--max-points-per-centroid", type=int, default=256)
    p.add_argument("--assign-scale", type=float, default=None,
                   help="fraction of K = 65,536 and of the points for the throughput "
                        "(default: 1 on a GPU, 1/16 on a CPU)")
    p.add_argument("--assign-points", type=int, default=1 << 20, help="points assigned at full assign scale")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device of the torch backend")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch and faiss)")
    p.add_argument("--clip-model", default="ViT-S-32", help="open_clip model for the extraction throughput")
    p.add_argument("--extract-images", type=int, default=64, help="images for the extraction throughput")
    p.add_argument("--skip", nargs="*", default=(), choices=("kmeans", "assign", "extract"))
    p.add_argument("--seed", type=int, default=0)
    return p


def mixture(n: int, d: int, centers: int, seed: int) -> torch.Tensor:
    """(n, d) float32 unit vectors around ``centers`` random directions (cosine to centre ~0.7)."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(centers, d, generator=g), dim=1)
    which = torch.randint(centers, (n,), generator=g)
    return F.normalize(means[which] + torch.randn(n, d, generator=g) / d**0.5, dim=1)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_kmeans(args, device: torch.device) -> None:
    n, k = max(int(200_000 * args.scale), 1000), max(int(2_000 * args.scale), 10)
    x = mixture(n, args.dim, 4 * k, args.seed)
    print(f"\n== k-means: N={n:,} d={args.dim} K={k:,} niter={args.niter} "
          f"max_points_per_centroid={args.max_points_per_centroid} ==")
    rows = []
    if faiss_available():
        import faiss

        def faiss_own():
            km = faiss.Kmeans(args.dim, k, niter=args.niter, spherical=True, seed=1234,
                              max_points_per_centroid=args.max_points_per_centroid)
            km.train(x.numpy())
            sims, labels = km.index.search(x.numpy(), 1)
            return torch.from_numpy(labels[:, 0].astype(np.int64)), torch.from_numpy(sims[:, 0])

        (labels, sims), seconds = timed(faiss_own)
        rows.append(("faiss.Kmeans (own)", seconds, cluster_stats(labels, k, sims)))
        result, seconds = timed(lambda: spherical_kmeans(
            x, k, args.niter, backend="faiss", max_points_per_centroid=args.max_points_per_centroid))
        rows.append(("ours, faiss backend", seconds, result.stats))
    result, seconds = timed(lambda: spherical_kmeans(
        x, k, args.niter, backend="torch", device=device, max_points_per_centroid=args.max_points_per_centroid))
    rows.append((f"ours, torch backend ({device.type})", seconds, result.stats))
    result, seconds = timed(lambda: spherical_kmeans(
        x, k, args.niter, backend="torch", levels=2, device=device,
        max_points_per_centroid=args.max_points_per_centroid))
    rows.append((f"ours, torch two-level ({device.type})", seconds, result.stats))
    base = rows[0][1]
    print(f"{'method':<34} {'seconds':>8} {'x faiss':>8} {'mean cos':>9} {'empty':>6} {'imbalance':>9}")
    for name, seconds, stats in rows:
        print(f"{name:<34} {seconds:8.2f} {seconds / base:8.2f} {stats['mean_similarity']:9.5f} "
              f"{stats['empty_clusters']:6d} {stats['imbalance']:9.3f}")


def bench_assign(args, device: torch.device) -> float:
    """Assignment throughput; returns ours in multiply-adds per second (for the extrapolation)."""
    scale = args.assign_scale if args.assign_scale is not None else (1.0 if device.type == "cuda" else 1 / 16)
    k, d = max(int(65_536 * scale), 16), TARGET_D
    n = max(int(args.assign_points * scale), 1000)
    x = mixture(n, d, 1000, args.seed + 1).half()  # features are stored in float16
    centroids = mixture(k, d, 1000, args.seed + 2)
    print(f"\n== assignment: {n:,} points x {k:,} centroids, d={d} ==")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    assign(x[:1000], centroids, backend="torch", device=device, dtype=dtype)  # warm-up
    _, seconds = timed(lambda: assign(x, centroids, backend="torch", device=device, dtype=dtype))
    ours = n / seconds
    print(f"ours (torch, {device.type}, {str(dtype).split('.')[-1]}): {ours:,.0f} points/s "
          f"= {ours * k * d / 1e12:.3f} T multiply-adds/s")
    if faiss_available():
        gpu = device.type == "cuda"
        _, seconds = timed(lambda: assign(x, centroids, backend="faiss", gpu=gpu))
        print(f"faiss IndexFlatIP ({'GPU if faiss has one' if gpu else 'CPU'}): {n / seconds:,.0f} points/s "
              f"= {n / seconds * k * d / 1e12:.3f} T multiply-adds/s")
    return ours * k * d


def extrapolate(rate: float, device: torch.device, niter: int, mppc: int) -> None:
    """Cost of 400M x 768 into 1M from a measured multiply-add rate per device."""
    n, d, k = TARGET_N, TARGET_D, TARGET_K
    sample = min(n, k * mppc)
    flat = niter * sample * k * d + n * k * d  # training Lloyd iterations on the sample, then every point
    k1 = round(math.sqrt(k))
    k2 = k / k1
    two = (niter * min(n, k1 * mppc) * k1 * d + n * k1 * d  # level 1
           + niter * min(n, k * mppc) * k2 * d + n * k2 * d)  # level 2: every point against its k2 fine centroids
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU like this one"
    print(f"\n== 400M x 768 into 1M clusters (niter={niter}, {mppc} points per centroid: {sample / 1e6:.0f}M "
          f"training points) at the measured {rate / 1e12:.3f} T multiply-adds/s per device ({name}) ==")
    print(f"flat: {flat:.2e} multiply-adds; two-level (k1={k1}, ~{k2:.0f} per coarse cluster): {two:.2e}")
    print(f"{'devices':>8} {'flat, hours':>12} {'two-level, hours':>17} {'features per device':>20}")
    for g in (1, 8, 64, 256):
        print(f"{g:8d} {flat / rate / g / 3600:12.2f} {two / rate / g / 3600:17.4f} "
              f"{n * d * 2 / g / 1e9:17.1f} GB")
    print("assumptions: the measured rate holds at K = 1M (larger matrix products are at least as "
          "efficient); work divides evenly over devices (rows are split evenly); per iteration the flat "
          "scheme all-reduces K x d float64 sums (6 GB), seconds on NVLink/InfiniBand, ignored; reading "
          "the 614 GB of float16 features once per pass is not counted (each device reads its 1/G).")


def synthetic_shards(folder: Path, images: int, per_shard: int = 32) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in range(math.ceil(images / per_shard)):
        with tarfile.open(folder / f"bench-{s:04d}.tar", "w") as tar:
            for i in range(min(per_shard, images - s * per_shard)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
                for ext, data in (("jpg", buffer.getvalue()), ("txt", f"a synthetic picture {i}".encode())):
                    info = tarfile.TarInfo(f"{s:04d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "bench-*.tar")


def bench_extract(args, device: torch.device) -> None:
    from unicom._pretrain.features import ClipSource, PixelSource, extract_features

    print(f"\n== feature extraction: {args.extract_images} JPEG images 256x192 with captions ==")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = synthetic_shards(Path(tmp), args.extract_images)
        sources = [("pixels (16x16)", lambda: PixelSource(16, device=device))]
        try:
            import open_clip  # noqa: F401

            sources.append((f"clip {args.clip_model}, random weights, mean fusion",
                            lambda: ClipSource.create(args.clip_model, pretrained=None, device=device)))
        except ImportError:
            print("open_clip is not installed: clip skipped")
        precision = "fp16" if device.type == "cuda" else "fp32"
        for i, (name, make) in enumerate(sources):
            source = make()
            output = Path(tmp) / f"out{i}"
            start = time.perf_counter()
            extract_features(source, inputs, output, batch_size=32, precision=precision, num_workers=2)
            seconds = time.perf_counter() - start
            print(f"{name:<45} {args.extract_images / seconds:10.1f} samples/s ({device.type}, {precision})")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(f"device {device}, {args.threads} CPU threads, torch {torch.__version__}")
    if "kmeans" not in args.skip:
        bench_kmeans(args, device)
    if "assign" not in args.skip:
        rate = bench_assign(args, device)
        extrapolate(rate, device, args.niter, args.max_points_per_centroid)
    if "extract" not in args.skip:
        bench_extract(args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
