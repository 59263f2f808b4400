"""What the service needs from a collection, over :class:`unicom.collection.Collection`.

The application (:mod:`.app`) calls these methods only; the batch worker calls ``embed`` and
``search`` from one thread, the request threads call the read-only rest.
"""

from __future__ import annotations

import functools
import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

__all__ = ["CollectionBackend", "ImageSource"]

_TAR = ".tar/"  # how unicom.collection.sources names a member: /abs/shard.tar/member.jpg


@dataclass(frozen=True)
class ImageSource:
    """Where an item's image bytes are: a regular file (served as it is) or a tar member."""

    key: tuple  # identity of these bytes (id, size, mtime): thumbnails are cached under it
    name: str  # the file name, for the media type
    path: Path | None  # a regular file, or None for a tar member
    read: Callable[[], bytes]


@functools.lru_cache(maxsize=16)
def _tar_members(tar_path: str, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of an uncompressed tar (read once per tar and mtime)."""
    with tarfile.open(tar_path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def _read_range(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def image_source(item_id: int, image_path: str) -> ImageSource:
    """The bytes of a collection item: its file, or its member of a webdataset ``.tar`` (whose
    path the collection records as ``/abs/shard.tar/member.jpg``). Raises ``FileNotFoundError``."""
    path = Path(image_path)
    if path.is_file():
        stat = path.stat()
        return ImageSource((item_id, stat.st_size, stat.st_mtime_ns), path.name, path, path.read_bytes)
    cut = image_path.rfind(_TAR)
    if cut >= 0:
        tar_path, member = image_path[:cut + 4], image_path[cut + 5:]
        if os.path.isfile(tar_path):
            stat = os.stat(tar_path)
            found = _tar_members(tar_path, stat.st_mtime_ns).get(member)
            if found is not None:
                offset, size = found
                return ImageSource((item_id, stat.st_size, stat.st_mtime_ns), Path(member).name, None,
                                   functools.partial(_read_range, tar_path, offset, size))
    raise FileNotFoundError(f"the image of item {item_id} is no longer at {image_path}")


class CollectionBackend:
    """The service's view of one collection: read-only, opened once."""

    def __init__(self, collection, duplicates: str | os.PathLike | None = None) -> None:
        self.collection = collection
        self.duplicates_path = Path(duplicates) if duplicates else collection.path / "dups.parquet"
        self._duplicates: tuple[Any, list[dict]] | None = None  # (file identity, clusters)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike, device: str | None = None,
             duplicates: str | os.PathLike | None = None) -> CollectionBackend:
        from ..collection import Collection

        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path} is not a folder: expected a collection made by `unicom embed ... "
                                    "--output COL`")
        return cls(Collection.open(path, device=device), duplicates)

    @property
    def dim(self) -> int:
        return self.collection.embedding_size

    def warm_up(self) -> None:
        """Load the model, the rows and the searcher now, in one thread, so that the first
        queries do not pay for it and request threads only ever read."""
        self.collection.ids()
        self.collection.searcher()
        self.embed([Image.new("RGB", (64, 64))])

    def info(self) -> dict:
        """Model, counts, and the index (``index.json``: kind, factory, measured recall@k, latency;
        ``in_use`` false when it is older than the collection and search runs exactly)."""
        record_path = self.collection.path / "index.json"
        index = None
        if record_path.is_file():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            index = {name: record.get(name) for name in ("kind", "factory", "k", "recall_at_k", "recall_target",
                                                         "latency_ms", "on_disk", "rows")}
            index["in_use"] = getattr(self.collection.searcher(), "kind", "exact") != "exact"
        return {"collection": str(self.collection.path), "model": self.collection.model, "dim": self.dim,
                "count": len(self.collection), "counts": self.collection.manifest.get("counts"), "index": index,
                "duplicates": self.duplicates_path.is_file()}

    def preprocess(self, image: Image.Image) -> Image.Image:
        """What a request thread prepares for the batch: the decoded image."""
        return image

    def embed(self, images: list) -> np.ndarray:
        """(Q, D) float32 L2-normalised embeddings: one model call for the batch."""
        return self.collection.embed_images(images, batch_size=max(1, len(images)))

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        return self.collection.search(vectors, k)

    def vector(self, item_id: int) -> np.ndarray:
        """The stored embedding of a searchable item; KeyError otherwise."""
        return self.collection.vectors_of([item_id])[0]

    def image_source(self, item_id: int) -> ImageSource:
        """Where item ``item_id``'s image is; KeyError for an id that is not searchable,
        FileNotFoundError when its file has gone."""
        path = self.collection.paths_of(np.array([item_id], dtype=np.int64))[0]
        if path is None:
            raise KeyError(item_id)
        return image_source(item_id, path)

    def duplicates(self) -> list[dict] | None:
        """The clusters of ``dups.parquet`` (None when there is none): each ``{"cluster", "items"}``,
        the kept item first, then by score; items no longer searchable are left out."""
        path = self.duplicates_path
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        identity = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._duplicates is None or self._duplicates[0] != identity:
                self._duplicates = (identity, _read_clusters(path, self.collection.metadata(
                    ["id", "width", "height", "size", "error", "deleted"])))
            return self._duplicates[1]


def _read_clusters(path: Path, metadata) -> list[dict]:
    """The clusters of a dedup output, each item with its width, height and file size (what the kept
    item was chosen by); items that are no longer searchable are left out."""
    import pyarrow.parquet as pq

    from ..collection.store import live_mask

    live = metadata.filter(live_mask(metadata)).to_pydict()
    sizes = {i: (w, h, s) for i, w, h, s in zip(live["id"], live["width"], live["height"], live["size"])}
    clusters: dict[int, list[dict]] = {}
    for row in pq.read_table(path, columns=["cluster", "id", "image_path", "score", "keep"]).to_pylist():
        if row["id"] in sizes:
            width, height, size = sizes[row["id"]]
            clusters.setdefault(int(row["cluster"]), []).append(
                {"id": int(row["id"]), "image_path": row["image_path"], "score": float(row["score"]),
                 "keep": bool(row["keep"]), "width": width, "height": height, "size": size})
    out = []
    for cluster, items in sorted(clusters.items()):
        if len(items) > 1:  # a cluster whose other items were deleted is no longer a duplicate
            items.sort(key=lambda item: (not item["keep"], -item["score"], item["id"]))
            out.append({"cluster": cluster, "items": items})
    return out
