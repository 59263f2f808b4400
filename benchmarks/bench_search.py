"""Exhaustive search for Recall@K: unicom.metrics against faiss and plain numpy.

Random unit vectors at the scale of a test set (query set == gallery, self excluded by
index), searched for the K + 1 nearest items with:

* ours:   ``retrieval_metrics`` (the whole metric computation, K up to max(ks)) and
          ``knn_topk`` (the search alone, like for like with the peers);
* faiss:  ``IndexFlatIP.search`` (faiss-cpu, always on the CPU);
* numpy:  chunked float32 matmul + ``argpartition`` + a sort of the K + 1 candidates.

It prints times, the ratios ours/faiss and ours/numpy, and checks that all return the same
Recall@K and the same neighbour sets (a difference is allowed only between items whose
similarities tie up to float32 rounding). On a machine with CUDA ours runs on the GPU.

Run from the repository root (``python -m`` finds ``unicom`` without installing it):
    python -m benchmarks.bench_search --preset sop                 # 60,502 x 512, K = 1000
    python -m benchmarks.bench_search --preset inat --scale 0.25   # 34,023 of 136,093

On a machine shared with other jobs, OpenMP's default spin-then-sleep wait can cost a
scheduler slice (~8 ms here) at every parallel op whose second thread was descheduled,
which penalises many small ops (ours) over few large ones (faiss). Setting
``OMP_WAIT_POLICY=PASSIVE`` in the environment of the run removes that for all three;
say which setting a reported number used. Methods run in turns (``--repeats`` rounds),
so a load that drifts during the run hits them alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from unicom.metrics import knn_topk, retrieval_metrics

# Test-set sizes and customary Recall@K of the two largest benchmarks; images per class
# gives the label distribution (SOP: 60,502 / 11,316 products; iNaturalist 2018 test
# split: 136,093 images / 2,452 species).
PRESETS = {
    "sop": {"num": 60_502, "ks": (1, 10, 100, 1000), "per_class": 60_502 / 11_316},
    "inat": {"num": 136_093, "ks": (1, 4, 16, 32), "per_class": 136_093 / 2_452},
}

# Two float32 dot products of 512-d unit vectors computed by different kernels differ by
# up to ~1e-6; items closer than this to the K-th similarity count as tied.
TIE_TOLERANCE = 1e-5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sop")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the preset's items (default 1)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ks", type=int, nargs="+", help="Recall@K ks (default: the preset's)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="our query chunk")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device of ours")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of all three")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timed runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--skip-numpy", action="store_true")
    return parser


def run_all(
    methods: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]
) -> tuple[dict[str, float], dict[str, object]]:
    """Best wall time of each method over ``repeats`` rounds, and its last result.

    Rounds go through all methods in turn, so a load that drifts during the run (a shared
    machine) affects every method alike rather than whichever ran last.
    """
    best = {name: float("inf") for name in methods}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync()
            start = time.perf_counter()
            results[name] = fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def numpy_search(x: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    """Indices (Q, k) of the k most similar rows (inner product), similarity descending."""
    out = np.empty((x.shape[0], k), dtype=np.int64)
    for start in range(0, x.shape[0], chunk_size):
        sims = x[start : start + chunk_size] @ x.T  # (c, N) float32
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (c, k), unordered
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        out[start : start + chunk_size] = np.take_along_axis(part, order, 1)
    return out


def drop_self(indices: np.ndarray) -> np.ndarray:
    """(Q, K+1) neighbours including possibly the query itself -> (Q, K) without it."""
    is_self = indices == np.arange(indices.shape[0])[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False  # self fell off the list: drop the last instead
    return indices[keep].reshape(indices.shape[0], indices.shape[1] - 1)


def recall_at(indices: np.ndarray, labels: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    hits = labels[indices] == labels[:, None]  # (Q, K)
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def compare_sets(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """Rows whose neighbour sets differ, and the largest distance of a differing item's
    float64 similarity from the row's boundary (the last similarity of list ``a``)."""
    differ = np.nonzero((np.sort(a, axis=1) != np.sort(b, axis=1)).any(axis=1))[0]
    worst = 0.0
    x64 = x.astype(np.float64)
    for row in differ:
        sa, sb = set(a[row].tolist()), set(b[row].tolist())
        items = np.fromiter(sa ^ sb, dtype=np.int64)
        boundary = x64[row] @ x64[a[row, -1]]
        worst = max(worst, float(np.abs(x64[items] @ x64[row] - boundary).max()))
    return len(differ), worst


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    ks = tuple(args.ks or preset["ks"])
    num = max(2, round(preset["num"] * args.scale))
    k_max = max(ks)
    if k_max + 1 > num:
        raise SystemExit(f"need more than {k_max + 1} items, got {num}")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    generator = torch.Generator().manual_seed(args.seed)
    features = torch.nn.functional.normalize(torch.randn(num, args.dim, generator=generator), dim=1)
    num_classes = max(1, round(num / preset["per_class"]))
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    x_np, labels_np = features.numpy(), labels.numpy()
    x_dev, labels_dev = features.to(device), labels.to(device)

    print(
        f"{args.preset} x{args.scale:g}: {num} x {args.dim} float32, {num_classes} classes, "
        f"Recall@{list(ks)} (search K+1 = {k_max + 1}), ours on {device}, {args.threads} CPU threads, "
        f"chunk {args.chunk_size}, best of {args.repeats}"
    )
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(args.threads)
        blas = [f"{i['internal_api']} {i.get('architecture', '?')} x{i['num_threads']}" for i in threadpool_info()]
        print("numpy BLAS:", ", ".join(blas))
    except ImportError:
        pass

    # Warm-ups: first calls pay for lazy initialisation, not for searching.
    retrieval_metrics(x_dev[:200], labels_dev[:200], ks=(1,), chunk_size=64)
    sync()

    def faiss_search() -> np.ndarray:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        index = faiss.IndexFlatIP(args.dim)
        index.add(x_np)
        return index.search(x_np, k_max + 1)[1]

    methods: dict[str, Callable[[], object]] = {
        "ours metrics": lambda: retrieval_metrics(x_dev, labels_dev, ks=ks, chunk_size=args.chunk_size),
        "ours search": lambda: knn_topk(x_dev, x_dev, k_max + 1, chunk_size=args.chunk_size)[1].cpu().numpy(),
    }
    if not args.skip_faiss:
        methods["faiss"] = faiss_search
    if not args.skip_numpy:
        methods["numpy"] = lambda: numpy_search(x_np, k_max + 1, args.chunk_size)
    times, results = run_all(methods, args.repeats, sync)
    metrics = results.pop("ours metrics")
    neighbours: dict[str, np.ndarray] = results
    recalls = {"ours metrics": metrics["recall"]}
    for name, idx in neighbours.items():
        recalls[name] = recall_at(drop_self(idx), labels_np, ks)

    print(f"\n{'method':<14}{'seconds':>10}   " + "  ".join(f"R@{k:<6}" for k in ks))
    for name, seconds in times.items():
        print(f"{name:<14}{seconds:>10.2f}   " + "  ".join(f"{recalls[name][k]:<8.5f}" for k in ks))
    print()
    for ours in ("ours metrics", "ours search"):
        for peer in ("faiss", "numpy"):
            if peer in times:
                print(f"{ours} / {peer}: {times[ours] / times[peer]:.2f}")

    ok = True
    differing_rows = 0
    for peer in sorted(neighbours.keys() - {"ours search"}):
        rows, worst = compare_sets(x_np, neighbours["ours search"], neighbours[peer])
        differing_rows += rows
        tied = worst <= TIE_TOLERANCE
        ok &= tied
        print(
            f"neighbour sets, ours vs {peer}: {rows} of {num} rows differ, max |sim - boundary| "
            f"of differing items {worst:.1e} ({'ties only' if tied else 'MISMATCH'})"
        )
    for name, recall in recalls.items():
        flipped = max(round(abs(recall[k] - metrics["recall"][k]) * num) for k in ks)
        # A tie resolved differently can change the outcome of its own query only.
        ok &= flipped <= differing_rows
        print(f"Recall@K, {name} vs ours metrics: at most {flipped} queries differ")
    print("\nOK" if ok else "\nFAILED: results differ beyond ties")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
