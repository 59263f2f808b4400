"""The on-disk format of a collection, named as clip-retrieval names it::

    COL/manifest.json                 model, checkpoint SHA256, embedding size, transform, counts,
                                      the committed parts, format version
    COL/img_emb/img_emb_N.npy         (rows, D) float16, L2-normalised (zeros for rows not embedded)
    COL/metadata/metadata_N.parquet   one row per embedding row, same order: image_path, id,
                                      size, mtime, sha256, width, height, error, deleted

A part is written whole (embeddings, then metadata, each atomically) and only then listed in the
manifest (atomically): files of a part the manifest does not list are leftovers of a killed run
and are written again. Metadata parts are rewritten (atomically) to mark rows deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._utils import atomic_write, write_json

__all__ = ["FORMAT_VERSION", "SCHEMA", "Store", "live_mask", "new_table", "write_arrays"]

FORMAT_VERSION = 1

SCHEMA = pa.schema([
    ("image_path", pa.string()),
    ("id", pa.int64()),
    ("size", pa.int64()),
    ("mtime", pa.float64()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("error", pa.string()),  # null when the image was embedded
    ("deleted", pa.bool_()),
])


def live_mask(table: pa.Table) -> np.ndarray:
    """Rows that search may return: embedded and not deleted."""
    error = table.column("error").is_null().to_numpy(zero_copy_only=False)
    deleted = table.column("deleted").to_numpy(zero_copy_only=False)
    return error & ~deleted


class Store:
    """Reads and writes one collection folder (no model, no index: see :mod:`.api`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self._mapped: dict[int, np.ndarray] = {}

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        if not self.exists():
            raise FileNotFoundError(f"{self.root} is not a collection: no manifest.json (make one with "
                                    "`unicom embed SOURCE --output COL`)")
        manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.root}: collection format {manifest.get('format_version')!r}, this unicom reads "
                             f"format {FORMAT_VERSION}")
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        write_json(manifest, self.manifest_path)

    def emb_path(self, part: int) -> Path:
        return self.root / "img_emb" / f"img_emb_{part}.npy"

    def meta_path(self, part: int) -> Path:
        return self.root / "metadata" / f"metadata_{part}.parquet"

    def embeddings(self, part: int, mmap: bool = True) -> np.ndarray:
        """(rows, D) float16 of ``part``, memory-mapped by default (and kept open: parts listed in
        the manifest never change)."""
        if not mmap:
            return np.load(self.emb_path(part))
        if part not in self._mapped:
            self._mapped[part] = np.load(self.emb_path(part), mmap_mode="r")
        return self._mapped[part]

    def metadata(self, part: int) -> pa.Table:
        return pq.read_table(self.meta_path(part), schema=SCHEMA)

    def write_embeddings(self, part: int, embeddings: np.ndarray) -> None:
        self._mapped.pop(part, None)
        atomic_write(self.emb_path(part), lambda f: np.save(f, np.ascontiguousarray(embeddings, np.float16)))

    def write_metadata(self, part: int, table: pa.Table) -> None:
        atomic_write(self.meta_path(part), lambda f: pq.write_table(table.cast(SCHEMA), f))

    def all_metadata(self, parts: list[int], columns: list[str] | None = None) -> pa.Table:
        """The metadata of ``parts`` in order, with each row's ``part`` and ``row`` (position in it)."""
        tables = []
        for part in parts:
            table = pq.read_table(self.meta_path(part), columns=columns, schema=SCHEMA)
            table = table.append_column("part", pa.array(np.full(len(table), part, np.int32)))
            tables.append(table.append_column("row", pa.array(np.arange(len(table), dtype=np.int32))))
        if not tables:
            names = columns or SCHEMA.names
            empty = pa.schema([SCHEMA.field(n) for n in names] + [("part", pa.int32()), ("row", pa.int32())])
            return empty.empty_table()
        return pa.concat_tables(tables)


def new_table(rows: dict) -> pa.Table:
    """A metadata table from column lists (the schema's columns, in any order)."""
    return pa.table({name: rows[name] for name in SCHEMA.names}, schema=SCHEMA)


def write_arrays(root: str | os.PathLike, embeddings: np.ndarray, image_paths: list[str] | None = None,
                 part_size: int = 100_000, model: str = "arrays") -> None:
    """A collection made from ready embeddings (normalised here), for benchmarks and tests of the
    index and dedup without images; ``model`` is recorded with no checkpoint."""
    store = Store(root)
    n, dim = embeddings.shape
    paths = image_paths or [f"vector_{i}" for i in range(n)]
    parts = []
    for part, start in enumerate(range(0, n, part_size)):
        chunk = np.asarray(embeddings[start:start + part_size], np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True).clip(1e-12)
        rows = len(chunk)
        store.write_embeddings(part, chunk.astype(np.float16))
        store.write_metadata(part, new_table({
            "image_path": paths[start:start + rows], "id": np.arange(start, start + rows),
            "size": [0] * rows, "mtime": [0.0] * rows, "sha256": [f"{i:064x}" for i in range(start, start + rows)],
            "width": [1] * rows, "height": [1] * rows, "error": [None] * rows, "deleted": [False] * rows}))
        parts.append({"part": part, "rows": rows})
    store.write_manifest({"format_version": FORMAT_VERSION, "model": model, "checkpoint_sha256": "",
                          "embedding_size": dim, "transform": None, "normalised": True, "dtype": "float16",
                          "parts": parts, "next_id": n, "generation": 1,
                          "counts": {"rows": n, "embedded": n, "errors": 0, "deleted": 0}})
