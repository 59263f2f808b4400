"""Faiss indexes of a collection (``unicom index``)."""

from __future__ import annotations

import json

__all__ = ["build_index", "load_index"]


def load_index(collection):
    """(faiss index, params) when ``COL/index.faiss`` is up to date with the collection, else None."""
    meta = collection.path / "index.json"
    if not meta.is_file():
        return None
    record = json.loads(meta.read_text())
    if record.get("generation") != collection.manifest.get("generation"):
        return None
    import faiss

    index = faiss.read_index(str(collection.path / "index.faiss"), faiss.IO_FLAG_MMAP)
    return index, record["params"]


def build_index(path, **options) -> dict:
    raise NotImplementedError
