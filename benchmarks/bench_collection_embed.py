"""Images per second of `unicom embed` (the collection path: listing, hashing, embedding, writing
parts) against, on the same JPEG files and model:

* ``eval``: the evaluation path of ``retrieval.py --eval`` (:func:`unicom.evaluate.embed_dataset`,
  the project's input pipeline), embedding only;
* ``published``: the published-style pipeline, a plain DataLoader whose workers decode, resize,
  crop and normalise with the eval transform and ship float32 tensors.

The model is ViT-B/32's architecture with random weights (no download); every method loads it
from the checkpoint file, as its command does. The collection path must not be slower than the
evaluation path.

    nice python -m benchmarks.bench_collection_embed --images 256 --num-workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import unicom
from unicom.checkpoint import save_model
from unicom.collection.embed import embed_collection
from unicom.data.image import ImageDataset
from unicom.data.loader import collate
from unicom.evaluate import embed_dataset


def write_images(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(pixels).resize((320, 240), Image.BILINEAR).save(path, quality=90)
        paths.append(str(path))
    return paths


def published(model, transform, paths, batch_size, workers) -> None:
    dataset = ImageDataset(paths, [0] * len(paths), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    with torch.no_grad():
        for images, *_ in loader:
            model(images)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        paths = write_images(folder / "images", args.images)
        checkpoint = folder / "vit_b32.pt"
        torch.manual_seed(0)
        save_model(unicom.create_model("ViT-B/32"), checkpoint)
        options = dict(batch_size=args.batch_size, num_workers=args.num_workers, device="cpu")
        times = {}
        # Every method loads the model from the checkpoint file, as each command does; the
        # collection path also hashes the checkpoint and every image file and writes its parts.
        published(*unicom.load(str(checkpoint), device="cpu"), paths[:8], 8, 0)  # warm the page cache
        start = time.perf_counter()
        model, transform = unicom.load(str(checkpoint), device="cpu")
        published(model, transform, paths, args.batch_size, args.num_workers)
        times["published"] = time.perf_counter() - start
        start = time.perf_counter()
        model, transform = unicom.load(str(checkpoint), device="cpu")
        embed_dataset(model, ImageDataset(paths, [0] * len(paths), transform), decode="auto", **options)
        times["eval path"] = time.perf_counter() - start
        start = time.perf_counter()
        embed_collection([str(folder / "images")], folder / "col", str(checkpoint), decode="auto", **options)
        times["unicom embed"] = time.perf_counter() - start
    for name, seconds in times.items():
        print(f"{name:<14} {args.images / seconds:7.1f} images/s")
    print(f"unicom embed / eval path {times['eval path'] / times['unicom embed']:.2f}x, "
          f"/ published {times['published'] / times['unicom embed']:.2f}x  (above 1: unicom embed is faster)")


if __name__ == "__main__":
    main()
