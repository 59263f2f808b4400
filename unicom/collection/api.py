"""The Python side of a collection: open it, read its rows and embeddings, search it."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .store import Store, live_mask

__all__ = ["Collection"]

logger = logging.getLogger(__name__)


class Collection:
    """A collection folder written by ``unicom embed`` (see :mod:`unicom.collection`)."""

    def __init__(self, path: str | os.PathLike, device: str | None = None) -> None:
        self.store = Store(path)
        self.path = Path(path)
        self.device = device
        self.manifest = self.store.read_manifest()
        self._live: dict[str, Any] | None = None
        self._vectors: np.ndarray | None = None
        self._model = None
        self._searcher = None

    @classmethod
    def open(cls, path: str | os.PathLike, device: str | None = None) -> Collection:
        """Open the collection at ``path``; ``device`` embeds query images (default: CUDA if present)."""
        return cls(path, device)

    def reload(self) -> Collection:
        """Read the collection again after ``embed`` or ``index`` changed it; returns self."""
        self.manifest = self.store.read_manifest()
        self._live = self._vectors = self._searcher = None
        return self

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def embedding_size(self) -> int:
        return int(self.manifest["embedding_size"])

    @property
    def parts(self) -> list[int]:
        return [p["part"] for p in self.manifest["parts"]]

    def __len__(self) -> int:
        """The number of searchable rows (embedded, not deleted)."""
        return len(self._rows()["id"])

    def metadata(self, columns: list[str] | None = None) -> pa.Table:
        """Every row of every part (deleted and undecodable ones too), with ``part`` and ``row``."""
        return self.store.all_metadata(self.parts, columns)

    def _rows(self) -> dict[str, Any]:
        if self._live is None:
            table = self.metadata()
            live = live_mask(table)
            self._live = {name: table.column(name).to_numpy(zero_copy_only=False)[live]
                          for name in ("id", "image_path", "part", "row")}
            order = np.argsort(self._live["id"], kind="stable")
            self._live["by_id"] = order
            self._live["sorted_ids"] = self._live["id"][order]
        return self._live

    def ids(self) -> np.ndarray:
        """(N,) int64 ids of the searchable rows, in storage order."""
        return self._rows()["id"]

    def row(self, id: int) -> dict | None:
        """The metadata of row ``id`` as a dict (None for an unknown id; deleted rows are returned too)."""
        table = self.metadata()
        match = np.flatnonzero(table.column("id").to_numpy() == int(id))
        return table.slice(int(match[-1]), 1).to_pylist()[0] if len(match) else None

    def paths_of(self, ids: np.ndarray) -> list[str | None]:
        """The image paths of searchable ``ids`` (None for ids that are not searchable)."""
        rows = self._rows()
        sorted_ids = rows["sorted_ids"]
        pos = np.searchsorted(sorted_ids, ids).clip(0, max(len(sorted_ids) - 1, 0))
        found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
        return [rows["image_path"][rows["by_id"][p]] if f else None for p, f in zip(pos, found)]

    def embeddings(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), embeddings (N, D)) of the searchable rows, L2-normalised, in storage order."""
        if self._vectors is None:
            rows = self._rows()
            chunks = []
            for part in self.parts:
                keep = rows["row"][rows["part"] == part]
                if len(keep):
                    chunks.append(np.asarray(self.store.embeddings(part)[keep], dtype=np.float32))
            dim = self.embedding_size
            self._vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return self.ids(), self._vectors.astype(dtype, copy=False)

    def vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), D) float32 stored embeddings of searchable ``ids`` (KeyError for others)."""
        rows = self._rows()
        sorted_ids = rows["sorted_ids"]
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(sorted_ids, ids).clip(0, max(len(sorted_ids) - 1, 0))
        if len(ids) and (not len(sorted_ids) or not np.all(sorted_ids[pos] == ids)):
            missing = ids[(sorted_ids[pos] != ids) if len(sorted_ids) else slice(None)]
            raise KeyError(f"id {int(missing[0])} is not a searchable row of {self.path}")
        return self.embeddings()[1][rows["by_id"][pos]]

    def embed_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """(Q, D) float32 L2-normalised embeddings of image files or PIL images, with the
        collection's model (loaded on first use; a changed checkpoint file is refused)."""
        import torch.nn.functional as F

        from ..data.image import ImageDataset
        from ..evaluate import embed_dataset

        model, transform = self._load_model()
        dataset = ImageDataset(list(images), [0] * len(images), transform)
        device = next(model.parameters()).device
        result = embed_dataset(model, dataset, batch_size=batch_size, num_workers=0, device=device, decode="exact")
        return F.normalize(result.features.float(), dim=-1).cpu().numpy()

    def _load_model(self):
        if self._model is None:
            import unicom

            from .embed import model_identity

            name, sha256 = model_identity(self.model)
            if sha256 != self.manifest["checkpoint_sha256"]:
                raise ValueError(f"{self.model} has changed since {self.path} was embedded (checkpoint SHA256 "
                                 f"{sha256[:12]}..., recorded {self.manifest['checkpoint_sha256'][:12]}...)")
            self._model = unicom.load(name, device=self.device)
        return self._model

    def searcher(self):
        """What searches: the index (``index.faiss``) when it is up to date, else exact search."""
        if self._searcher is None:
            from .index import make_searcher

            self._searcher = make_searcher(self)
        return self._searcher

    def search(self, queries: Any, k: int = 10) -> list[list[dict]]:
        """The ``k`` nearest searchable rows of each query, best first.

        ``queries``: embeddings ((D,) or (Q, D) array, normalised here), or a sequence of image
        paths / PIL images (embedded with the collection's model). Returns one list per query of
        ``{"id": int, "image_path": str, "score": float}`` (cosine similarity).
        """
        if isinstance(queries, (str, os.PathLike)) or hasattr(queries, "convert"):
            queries = [queries]
        if isinstance(queries, np.ndarray) or hasattr(queries, "detach"):
            vectors = np.asarray(queries.detach().cpu() if hasattr(queries, "detach") else queries, np.float32)
            vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
            if vectors.ndim != 2 or vectors.shape[1] != self.embedding_size:
                raise ValueError(f"expected query embeddings of size {self.embedding_size}, got shape {vectors.shape}")
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        else:
            vectors = self.embed_images(list(queries))
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores, ids = self.searcher().search(vectors, k)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            keep = row_ids >= 0
            paths = self.paths_of(row_ids[keep])
            # float16 storage can put a vector's similarity to itself a hair above 1
            results.append([{"id": int(i), "image_path": p, "score": min(float(s), 1.0)}
                            for i, p, s in zip(row_ids[keep], paths, row_scores[keep]) if p is not None])
        return results

    def search_ids(self, ids: Sequence[int], k: int = 10) -> list[list[dict]]:
        """Search with stored rows as queries (``unicom search COL id:N``); each finds itself first."""
        return self.search(self.vectors_of(ids), k)
