"""Partial FC against a full margin softmax with many classes: step time and peak memory.

One training step (forward + backward + SGD update of the class centres) of the margin
softmax head on random embeddings:

* full:    F.linear over all C normalised centres, CombinedMarginLoss, cross_entropy;
* partial: ``unicom.losses.PartialFC`` with sample_rate 1.0, 0.3 and 0.1 (positives always kept).

Each configuration runs in a fresh process so peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the growth of the peak resident set size.
Ratios are against ``full`` measured in the same run.

    python -m benchmarks.bench_partial_fc                                # CPU: 100k classes x 512
    python -m benchmarks.bench_partial_fc --classes 1000000 --device cuda
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    return p


def _run(kind: str, rate: float, args, queue) -> None:
    from unicom.losses import CombinedMarginLoss, PartialFC

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    margin = CombinedMarginLoss(s=32.0, m2=0.3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "full":
        weight = torch.nn.Parameter(torch.normal(0, 0.01, (args.classes, args.dim), device=device))

        def step(emb, labels):
            logits = F.linear(F.normalize(emb), F.normalize(weight))
            return F.cross_entropy(margin(logits, labels), labels)

        params = [weight]
    else:
        head = PartialFC(margin, args.dim, args.classes, sample_rate=rate).to(device)
        step, params = head, list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    emb = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(args.classes, (args.batch,), device=device)
    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(emb, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB -> MiB
    queue.put((sorted(times)[len(times) // 2], peak, float(loss.detach())))


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.classes:,} classes x {args.dim}, batch {args.batch}, device {args.device}, "
          f"median of {args.steps} steps; memory: {'CUDA peak' if args.device == 'cuda' else 'peak RSS growth'}")
    ctx = mp.get_context("spawn")
    rows = []
    for kind, rate in [("full", 1.0)] + [("partial", r) for r in args.rates]:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(kind, rate, args, queue))
        proc.start()
        seconds, peak, loss = queue.get()
        proc.join()
        rows.append((kind if kind == "full" else f"partial {rate:g}", seconds, peak, loss))
    full_t, full_m = rows[0][1], rows[0][2]
    print(f"{'head':<14} {'step ms':>9} {'x full':>7} {'peak MiB':>9} {'x full':>7} {'loss':>8}")
    for name, seconds, peak, loss in rows:
        print(f"{name:<14} {1000 * seconds:9.1f} {seconds / full_t:7.2f} {peak:9.1f} "
              f"{peak / full_m if full_m > 0 else float('nan'):7.2f} {loss:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
