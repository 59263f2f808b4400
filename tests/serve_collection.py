"""A small real collection for the `unicom serve` tests: drawn pictures in a folder and in a
webdataset tar, an exact copy and an altered copy of two of them (duplicates for `unicom dedup`),
embedded with the tiny checkpoint, and altered copies kept outside the collection to query with."""

from __future__ import annotations

import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from collection_images import altered, draw, write_folder

__all__ = ["SmallCollection", "build_collection"]

SEEDS = range(24)


@dataclass
class SmallCollection:
    path: Path  # the collection folder
    images: Path  # the folder that was embedded
    queries: dict[int, Path]  # seed -> an altered copy of img_<seed>.png, outside the collection
    ids: dict[str, int]  # file name -> id


def build_collection(root: Path, checkpoint: str) -> SmallCollection:
    from unicom.collection import Collection
    from unicom.collection.dedup import dedup_collection
    from unicom.collection.embed import embed_collection
    from unicom.collection.index import build_index

    images = root / "images"
    write_folder(images, SEEDS)
    shutil.copy(images / "img_0003.png", images / "copy_of_3.png")  # an exact duplicate
    altered(draw(7), "jpeg").save(images / "img_0007_small.jpg", quality=80)  # a near duplicate
    queries = {}
    for seed, how in ((5, "jpeg"), (11, "brightness"), (16, "crop")):
        queries[seed] = root / f"query_{seed}_{how}.jpg"
        altered(draw(seed), how).save(queries[seed], quality=90)
    shard = root / "shard.tar"  # a webdataset shard: its members are served from inside the tar
    with tarfile.open(shard, "w") as tar:
        for seed in (30, 31):
            data = io.BytesIO()
            draw(seed).save(data, "PNG")
            member = tarfile.TarInfo(f"tar_{seed:04d}.png")
            member.size = len(data.getvalue())
            tar.addfile(member, io.BytesIO(data.getvalue()))
    collection = root / "col"
    embed_collection([str(images), str(shard)], collection, checkpoint, batch_size=16, num_workers=0, device="cpu",
                     decode="exact")
    build_index(Collection.open(collection), kind="flat")
    dedup_collection(collection, threshold=0.9)
    table = Collection.open(collection).metadata(["image_path", "id"]).to_pydict()
    ids = {Path(p).name: i for p, i in zip(table["image_path"], table["id"])}
    return SmallCollection(collection, images, queries, ids)

