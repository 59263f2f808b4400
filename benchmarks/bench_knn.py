"""kNN classification search at ImageNet scale: unicom's search + vote against faiss.

Random unit vectors for ``train`` training items (1.28M x 768 on a GPU at full scale) and
``val`` validation items (50k), k = 200 neighbours, DINO's weighted vote over 1,000 classes:

* ours:   ``unicom.metrics.knn_topk`` (chunked matmul + topk, on the GPU when there is one)
          followed by ``knn_vote_accuracy``; with ``--shards N`` the training set is split
          in N shards searched one after the other and merged with ``merge_topk``, as the
          kNN program does across processes;
* faiss:  ``IndexFlatIP.search`` (faiss-cpu) followed by the same vote.

Prints times, the ratio ours / faiss, and checks that both find the same neighbours
(differences only allowed between items whose similarities tie up to float32 rounding)
and the same accuracies.

    python -m benchmarks.bench_knn --scale 0.02          # CPU: 25,600 x 768 train, 1,000 val
    python -m benchmarks.bench_knn --scale 1 --device cuda --skip-faiss
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from unicom.metrics import knn_topk, knn_vote_accuracy, merge_topk

TIE_TOLERANCE = 1e-5


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1_281_167)
    p.add_argument("--val", type=int, default=50_000)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of --train and --val")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shards", type=int, default=1, help="search the training set in this many shards and merge")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-faiss", action="store_true")
    return p


def unit(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)


def ours(val, train, k, shards, chunk_size):
    bounds = np.linspace(0, train.shape[0], shards + 1).astype(int)
    sims, ids = None, None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s, i = knn_topk(val, train[lo:hi], k, chunk_size)
        i = i + int(lo)
        sims, ids = (s, i) if sims is None else merge_topk(torch.cat([sims, s], 1), torch.cat([ids, i], 1), k)
    return sims, ids


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    n_train, n_val = max(int(args.train * args.scale), args.k), max(int(args.val * args.scale), 1)
    g = torch.Generator().manual_seed(args.seed)
    train, val = unit(n_train, args.dim, g), unit(n_val, args.dim, g)
    train_labels = torch.randint(args.classes, (n_train,), generator=g)
    val_labels = torch.randint(args.classes, (n_val,), generator=g)
    print(f"train {n_train:,} x {args.dim}, val {n_val:,}, k = {args.k}, device {device}, "
          f"{args.threads} CPU threads, shards {args.shards}")

    train_d, val_d = train.to(device), val.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ours(val_d[:8], train_d, args.k, args.shards, args.chunk_size)  # warm-up
    sync()
    t0 = time.perf_counter()
    sims, ids = ours(val_d, train_d, args.k, args.shards, args.chunk_size)
    acc = knn_vote_accuracy(sims, train_labels.to(device)[ids], val_labels.to(device), (10, 20, 100, args.k),
                            num_classes=args.classes)
    sync()
    t_ours = time.perf_counter() - t0
    print(f"ours   {t_ours:8.2f} s   {n_val / t_ours:10.0f} queries/s   top-1@{args.k} {acc[args.k]['top1']:.4f}")
    if args.skip_faiss:
        return 0
    import faiss

    faiss.omp_set_num_threads(args.threads)
    index = faiss.IndexFlatIP(args.dim)
    t0 = time.perf_counter()
    index.add(train.numpy())
    f_sims, f_ids = index.search(val.numpy(), args.k)
    f_acc = knn_vote_accuracy(torch.from_numpy(f_sims), train_labels[torch.from_numpy(f_ids)], val_labels,
                              (10, 20, 100, args.k), num_classes=args.classes)
    t_faiss = time.perf_counter() - t0
    print(f"faiss  {t_faiss:8.2f} s   {n_val / t_faiss:10.0f} queries/s   top-1@{args.k} {f_acc[args.k]['top1']:.4f}")
    print(f"ratio ours / faiss time: {t_ours / t_faiss:.2f} (below 1: ours is faster)")

    # Same neighbours, up to ties at the k-th similarity.
    ours_ids, ours_sims = ids.cpu().numpy(), sims.cpu().numpy()
    mismatched = 0
    for row in range(n_val):
        a, b = set(ours_ids[row].tolist()), set(f_ids[row].tolist())
        if a != b:
            kth = min(ours_sims[row, -1], f_sims[row, -1])
            differing = [i for i in a ^ b]
            if any(abs(float(train[i] @ val[row]) - kth) > TIE_TOLERANCE for i in differing):
                mismatched += 1
    print(f"neighbour sets differing beyond ties: {mismatched} of {n_val}")
    same_acc = all(abs(acc[k]["top1"] - f_acc[k]["top1"]) <= 1.0 / n_val for k in acc)
    print(f"accuracies equal: {same_acc}")
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
