"""Where the time of an input pipeline goes: per-image worker costs, per-batch main-process costs,
and the loader alone. Complements ``bench_throughput`` (which times whole pipelines).

    python -m benchmarks.profile_pipeline                 # GPU host: 2048 JPEGs of 500x375
    python -m benchmarks.profile_pipeline --count 128     # a quick look on the CPU

(1) one process, per image (ms): the published float transform, and what each ``--decode``
    option's workers do (load and lay out batches of ``--loader-batch``); (2) per batch of
    ``--batch`` images, in the main process (ms): pinning and moving the batch to the device,
    and the device work (the resize), each synchronised; (3) the DataLoader alone (workers,
    pinning; no device work), images/s; (4) whether TurboJPEG gives PIL's pixels on these files.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import write_photos  # noqa: E402

from unicom.data import ImageDataset, sharded_loader  # noqa: E402
from unicom.data._pipelines import DECODE_CHOICES, jpeg, make_pipeline, pipeline_loader, slots  # noqa: E402
from unicom.transforms import eval_transform  # noqa: E402


def _ms(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) * 1e3 / max(len(items), 1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--loader-batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory(prefix="unicom-profile-") as tmp:
        paths = write_photos(Path(tmp), args.count, (500, 375), args.workers, 0)
        dataset = ImageDataset(paths, [0] * len(paths), eval_transform(224))
        sample = list(range(min(256, len(paths))))

        print(f"(1) per image, one process, {len(sample)} images of 500x375 (ms)")
        print(f"  published float transform   {_ms(lambda i: dataset[i], sample):6.2f}")
        chunks = [sample[i:i + args.loader_batch] for i in range(0, len(sample), args.loader_batch)]
        for decode in DECODE_CHOICES:  # what a worker does: load and lay out a batch
            pipeline = make_pipeline(decode)
            per_batch = _ms(lambda chunk, p=pipeline: p.load_batch(dataset, chunk), chunks)
            print(f"  worker batch, {decode:14s} {per_batch * len(chunks) / len(sample):6.2f}")

        print(f"\n(2) per batch of {args.batch} in the main process, on {device} (ms, synchronised)")
        if device.type != "cuda":
            print("  (skipped: the device work is for GPUs; on a CPU the exact resize replay costs more than PIL's)")
        for decode in DECODE_CHOICES if device.type == "cuda" else ():
            pipeline = make_pipeline(decode)
            images, _, _, ok = pipeline.load_batch(dataset, range(min(args.batch, len(paths))))
            ok = torch.as_tensor(ok)
            times = {"pin": [], "to_device": []}
            for _ in range(4):
                start = time.perf_counter()
                pinned = images.pin_memory()
                times["pin"].append(time.perf_counter() - start)
                _sync(device)
                start = time.perf_counter()
                pipeline.to_device(pinned, ok, device)
                _sync(device)
                times["to_device"].append(time.perf_counter() - start)
            line = "  ".join(f"{k} {1e3 * float(np.median(v)):7.1f}" for k, v in times.items())
            print(f"  {decode:14s} {line}")

        print(f"\n(3) the DataLoader alone: {len(paths)} images, {args.workers} workers, batches of {args.loader_batch}"
              f" (images/s; the published float transform in the same DataLoader = 1.00x). First pass: a new"
              f" slot pool (made in the main process; {'pinned' if device.type == 'cuda' else 'not pinned'}) and"
              f" cold workers; second: the pool of the first pass reused")
        published = None
        for decode in ("published", *DECODE_CHOICES):
            pipeline = make_pipeline(decode) if decode != "published" else None
            slots.clear()
            rates, setup, first = [], 0.0, 0.0
            for _ in range(2):
                start = time.perf_counter()
                loader = (sharded_loader(dataset, args.loader_batch, args.workers) if pipeline is None else
                          pipeline_loader(dataset, pipeline, args.loader_batch, args.workers, device,
                                          normalize_in_workers=False))  # uint8 and slots, as on a GPU
                setup = setup or time.perf_counter() - start
                for n, _batch in enumerate(loader):
                    if n == 0 and not first:
                        first = time.perf_counter() - start  # worker start (fork) and one batch
                rates.append(len(paths) / (time.perf_counter() - start))
                del loader, _batch
                gc.collect()
            published = published or rates[1]
            print(f"  {decode:14s} first {rates[0]:8.1f}  second {rates[1]:8.1f}  {rates[1] / published:5.2f}x"
                  f"  (making the loader: {1e3 * setup:6.1f} ms, first batch after {1e3 * first:6.1f} ms)")

        same = sum(np.array_equal(np.asarray(Image.open(path).convert("RGB")), jpeg.decode(Path(path).read_bytes()))
                   for path in paths)
        print(f"\n(4) PIL's pixels on {len(paths)} files: TurboJPEG (simplejpeg, decode=turbo) on {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
