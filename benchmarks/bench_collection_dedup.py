"""`unicom dedup` on synthetic clustered 512-d vectors with planted near duplicates (cosine ~0.97
to their source; distinct neighbours ~0.7), against an exact all-pairs computation (faiss'
exhaustive range search, chunked: the same pairs an N x N similarity matrix gives).

Prints time and duplicate-pair recall against the exact pairs; with ``--no-exact`` (for 1M)
only the time and the peak memory of the dedup process (``unicom dedup`` runs in a child
process, so the figure is its own, not the generator's).

    nice python -m benchmarks.bench_collection_dedup --rows 100000
    nice python -m benchmarks.bench_collection_dedup --rows 1000000 --no-exact
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from benchmarks.collection_vectors import clustered
from unicom.collection.store import write_arrays

ROOT = Path(__file__).resolve().parents[1]


def exact_pairs(x: np.ndarray, threshold: float, chunk: int = 10_000) -> set[tuple[int, int]]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    pairs = set()
    for start in range(0, len(x), chunk):
        lims, _, found = index.range_search(x[start:start + chunk], threshold)
        rows = np.repeat(np.arange(start, start + min(chunk, len(x) - start)), np.diff(lims).astype(np.int64))
        keep = found > rows
        pairs.update(zip(rows[keep].tolist(), found[keep].tolist()))
    return pairs


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--no-exact", action="store_true")
    args = p.parse_args(argv)
    x, planted = clustered(args.rows)
    with tempfile.TemporaryDirectory() as folder:
        write_arrays(folder, x)
        x16 = None if args.no_exact else x.astype(np.float16).astype(np.float32)  # what the collection stores
        del x
        if args.no_exact:  # a child process: its peak memory is the dedup's own
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "unicom", "dedup", folder, "--threshold",
                                     str(args.threshold)], env=env, capture_output=True, text=True)
            ours = time.perf_counter() - start
            if result.returncode:
                sys.exit(result.stderr)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            print(result.stdout.strip())
            print(f"unicom dedup {args.rows} rows: {ours:.1f} s (the whole command, Python start included), "
                  f"peak memory {peak:.2f} GiB, planted pairs {len(planted)}", flush=True)
            return
        from unicom.collection.dedup import dedup_collection

        start = time.perf_counter()
        report = dedup_collection(folder, threshold=args.threshold)
        ours = time.perf_counter() - start
        dups = pq.read_table(report.output).to_pylist()
        print("\n".join(report.lines()))
        print(f"unicom dedup {args.rows} rows: {ours:.1f} s, planted pairs {len(planted)}", flush=True)
        start = time.perf_counter()
        truth = exact_pairs(x16, args.threshold)
        exact = time.perf_counter() - start
        clusters: dict[int, set[int]] = {}
        for d in dups:
            clusters.setdefault(d["cluster"], set()).add(d["id"])
        cluster_of = {i: c for c, members in clusters.items() for i in members}
        found = sum(1 for a, b in truth if a in cluster_of and cluster_of.get(a) == cluster_of.get(b))
        print(f"exact all-pairs: {exact:8.1f} s, {len(truth)} pairs; pair recall of unicom dedup "
              f"{found / max(len(truth), 1):.4f}; exact/unicom time {exact / ours:.1f}x", flush=True)


if __name__ == "__main__":
    main()
